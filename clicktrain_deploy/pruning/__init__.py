"""Pattern + connectivity pruning: libraries, masks (the compiler contract), the ClickTrain pruner."""
from .clicktrain import ClickTrainPruner
from .config import PruningConfig
from .masks import REMOVED, LayerMask
from .patterns import PATTERN_LIBRARIES
from .report import SparsityReport, sparsity_report

__all__ = ["PATTERN_LIBRARIES", "REMOVED", "ClickTrainPruner", "LayerMask", "PruningConfig",
           "SparsityReport", "sparsity_report"]
