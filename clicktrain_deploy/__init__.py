"""clicktrain-deploy: ClickTrain pattern pruning during training, toward fast deployed models.

Python API, one verb per job::

    from clicktrain_deploy import train, load_recipe
    result = train(load_recipe("recipes/fashion_resnet20.toml"))
    print(result.test_accuracy, result.report.compression["paper_convs"])
    export_onnx(result.output_dir, "model.onnx")

The names below are imported on first use, so ``import clicktrain_deploy.contract`` (or the
compiler) does not load torch and the training code.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .errors import ClickTrainError

_LAZY = {
    "ClickTrainPruner": ".pruning.clicktrain", "export_onnx": ".export.onnx_export", "Recipe": ".config",
    "TrainResult": ".train", "load_checkpoint": ".train", "load_recipe": ".config",
    "parse_recipe": ".config", "sparsity_report": ".pruning.report", "train": ".train",
}

__all__ = ["ClickTrainError", "ClickTrainPruner", "export_onnx", "Recipe", "TrainResult", "load_checkpoint",
           "load_recipe", "parse_recipe", "sparsity_report", "train"]

if TYPE_CHECKING:
    from .config import Recipe, load_recipe, parse_recipe
    from .export.onnx_export import export_onnx
    from .pruning.clicktrain import ClickTrainPruner
    from .pruning.report import sparsity_report
    from .train import TrainResult, load_checkpoint, train


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``clicktrain_deploy.train`` is the function, as the eager imports used to leave it: loading
    the ``train`` subpackage would otherwise rebind the name to the subpackage (which stays
    importable as a module: ``from clicktrain_deploy.train import load_checkpoint``)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "train" and isinstance(value, types.ModuleType) and hasattr(value, "train"):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
