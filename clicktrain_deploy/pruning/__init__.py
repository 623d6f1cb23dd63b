"""Pruning methods behind one contract (``method.PruningMethod``): ClickTrain pattern pruning
during training, PruneTrain channel pruning, ADMM pattern pruning after training, dense; plus
pattern libraries, masks (torch-side; the compiler contract is ``clicktrain_deploy.contract``) and
the sparsity report."""
from .admm import AdmmPruner
from .clicktrain import ClickTrainPruner
from .config import PruningConfig
from .masks import REMOVED, LayerMask
from .method import PRUNING_METHODS, DenseTraining, EpochContext, PruningMethod, create_method
from .patterns import PATTERN_LIBRARIES
from .prunetrain import PruneTrain
from .report import SparsityReport, sparsity_report

__all__ = ["PATTERN_LIBRARIES", "PRUNING_METHODS", "REMOVED", "AdmmPruner", "ClickTrainPruner",
           "DenseTraining", "EpochContext", "LayerMask", "PruneTrain", "PruningConfig",
           "PruningMethod", "SparsityReport", "create_method", "sparsity_report"]
