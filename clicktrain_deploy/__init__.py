"""clicktrain-deploy: ClickTrain pattern pruning during training, toward fast deployed models.

Python API, one verb per job::

    from clicktrain_deploy import train, load_recipe
    result = train(load_recipe("recipes/fashion_resnet20.toml"))
    print(result.test_accuracy, result.report.compression["paper_convs"])
    export_onnx(result.output_dir, "model.onnx")
"""
from .config import Recipe, load_recipe, parse_recipe
from .errors import ClickTrainError
from .export.onnx_export import export_onnx
from .pruning.clicktrain import ClickTrainPruner
from .pruning.report import sparsity_report
from .train import TrainResult, load_checkpoint, train

__all__ = ["ClickTrainError", "ClickTrainPruner", "export_onnx", "Recipe", "TrainResult", "load_checkpoint",
           "load_recipe", "parse_recipe", "sparsity_report", "train"]
