"""The compiler's error: the message names the node, op, attribute or layer to fix."""
from ..errors import ClickTrainError


class CompileError(ClickTrainError):
    """The model holds an op, attribute or input the compiler cannot honour, or the built
    library disagrees with onnxruntime; the message names it."""
