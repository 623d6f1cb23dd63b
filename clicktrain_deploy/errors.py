"""Errors that name what the user must fix: a file, a recipe field or a layer."""


class ClickTrainError(Exception):
    """Base class: the CLI prints these as one clear line and exits non-zero."""


class DataError(ClickTrainError):
    """Training or test data is missing or malformed; the message names the path."""


class RecipeError(ClickTrainError):
    """A recipe file is unreadable or a field is invalid; the message names the field."""


class PruningError(ClickTrainError):
    """A pruning setting does not fit the model; the message names the layer."""


class CheckpointError(ClickTrainError):
    """A checkpoint is missing, truncated or from an incompatible run."""


class DistributedError(ClickTrainError):
    """A torch.distributed launch is incomplete, or its ranks disagree on masks or weights."""


class ExportError(ClickTrainError):
    """An ONNX file is unreadable, or an exported model disagrees with PyTorch."""


class ModelError(ClickTrainError):
    """A user's model (``model.factory``/``model.file``) or its weights (``model.weights``) cannot
    be built or loaded; the message names the file or callable, and the keys that do not fit."""
