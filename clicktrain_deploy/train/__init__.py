"""Training: the epoch loop with pruning phases, checkpoints, metrics and resume."""
from .checkpoint import load_checkpoint, restore_model
from .trainer import TrainResult, train

__all__ = ["TrainResult", "load_checkpoint", "restore_model", "train"]
