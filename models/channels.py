"""Channel graph of a model, traced: which layers write, normalise and read each set of channels.

Channel pruning (PruneTrain) removes a channel together with every layer touching it. Which layers
share a channel dimension is derived by tracing the model with ``torch.fx`` and running it once on
a small example input (for the shapes), then joining channel dimensions in a union-find:

- a conv's or linear's output channels (weight dim 0, bias) start a set, the BatchNorms on them
  and the next convs' input channels (weight dim 1) and linears' input features join it, through
  ops that keep channels one to one (ReLU/ReLU6/other activations, pooling, dropout, identity,
  padding, interpolation, reductions over spatial dims, flatten or view after a global pool);
- a residual ``add`` (any broadcasting elementwise op) ties its operands, so a residual stage is
  one set (stem or projection shortcut, every block's last conv, all readers); a squeeze-excite
  ``x * gate`` ties the gate's channels (the conv or linear writing them) to x's;
- a depthwise conv (groups = in = out channels) ties its input and output channels: it is cut
  with the set (weight dim 0), like a layer writing it.

What the tracer cannot prove one to one is refused by name, and every set it touches keeps all of
its channels: concatenation along channels, grouped convs (other than depthwise), flatten or view
of a map larger than 1x1 (a linear reading channel x spatial blocks), channel shuffles, views and
permutes that move or split the channel dimension, reductions and softmax over channels, tensors
created in ``forward`` or read from the model directly, a model's inputs and outputs, and any op
or module the tracer does not know. A model fx cannot trace (control flow on tensor values) raises
``PruningError`` naming the module. Sets written by no conv (an MLP's hidden features) stay too:
PruneTrain prunes feature-map channels.

Node names come from module names only (stable across processes): a set with several writers is
named by their common module path ("layers.1": the stage) where that is unique, else by its first
writer in execution order; a set with one writer by that writer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from clicktrain_deploy.errors import PruningError

_CONV = nn.modules.conv._ConvNd
_NORM = nn.modules.batchnorm._BatchNorm

# Parameter-free modules applied to each channel on its own (shapes are checked as well).
_KEEP_MODULES = {
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
}
# Functions and tensor methods applied per element or per channel, with broadcasting between
# tensor operands (the residual add, x * gate).
_ELEMENTWISE = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "gelu",
    "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "softplus", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "abs", "neg",
    "exp", "square", "sqrt", "rsqrt", "pow", "contiguous", "clone", "detach", "float",
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv",
    "itruediv", "div", "div_", "maximum", "minimum",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate", "upsample", "pad",
}
_FIRST_OPERAND = {"to", "type_as", "expand_as", "expand"}  # only the first tensor carries data
_RESHAPE = {"flatten", "view", "reshape", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_"}
_PERMUTE = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "t"}
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp"}
_CAT = {"cat", "concat", "concatenate"}
_SOFTMAX = {"softmax", "log_softmax"}
_SIZES = {"size", "dim", "numel", "getattr", "getitem", "len"}  # read shapes, not values
_TRUSTED = ("torch", "_operator", "operator", "builtins", "math")


@dataclass
class ChannelNode:
    """One set of feature channels, cut together.

    producers: (layer, norm) pairs writing the channels: convs and linears (their output channels,
    dim 0 of the weight and the bias) and depthwise convs (in = out = groups: dim 0 again), each
    with the BatchNorm applied to its output, or None. consumers: convs (weight dim 1) and linear
    layers (weight dim 1, after global pooling) reading the channels. norms: BatchNorms over the
    channels that follow no producer directly (pre-activation blocks, a norm on a residual sum).
    """

    name: str
    producers: list[tuple[nn.Module, nn.Module | None]] = field(default_factory=list)
    consumers: list[nn.Module] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.producers[0][0].weight.shape[0]

    def all_norms(self) -> list[nn.Module]:
        return [norm for _, norm in self.producers if norm is not None] + self.norms


@dataclass
class ChannelGraph:
    """The traced graph: the prunable ``nodes``; ``refused`` maps the name of every other set of
    channels written by a conv or linear to why it keeps all of them; ``modules`` names each
    module (id -> name)."""

    nodes: list[ChannelNode]
    refused: dict[str, str]
    modules: dict[int, str]

    def members(self, node: ChannelNode) -> frozenset[tuple[str, int]]:
        """(module name, weight dim) of every layer cut with ``node``: writers and norms dim 0,
        readers dim 1."""
        cut = [(layer, 0) for layer, _ in node.producers] + [(n, 0) for n in node.all_norms()]
        cut += [(reader, 1) for reader in node.consumers]
        return frozenset((self.modules[id(m)], dim) for m, dim in cut)


class _Tracer(fx.Tracer):
    """fx's tracer, remembering the innermost module whose forward failed to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = f"{self.path_of_module(m)!r} ({type(m).__name__})"
            raise


@dataclass
class _Value:
    """A tensor in the traced graph: the union-find key of its channel dimension, which dim that
    is (None: unknown layout, its key is refused) and its shape (None: not one tensor)."""

    key: tuple
    cdim: int | None
    shape: tuple[int, ...] | None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _op_name(node: fx.Node) -> str | None:
    """The function or method name of a call node; None for functions outside torch/operator."""
    if node.op == "call_method":
        return node.target
    module = getattr(node.target, "__module__", None) or "builtins"
    if not module.split(".")[0] in _TRUSTED:
        return None
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _example_inputs(model: nn.Module, graph: fx.Graph) -> list[torch.Tensor]:
    """Candidate inputs (batch 2) for the first layer the input reaches: a conv's planes at a few
    sizes, or a linear's features."""
    modules = dict(model.named_modules())
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, _CONV):
            spatial = len(layer.kernel_size)
            return [torch.randn(2, layer.in_channels, *[side] * spatial, device=device, dtype=dtype)
                    for side in (32, 64, 224, 28)]
        if isinstance(layer, nn.Linear):
            return [torch.randn(2, layer.in_features, device=device, dtype=dtype)]
    raise PruningError(f"model {type(model).__name__}: no conv or linear layer to prune")


class _ChannelTracer:
    """Union-find over channel dimensions of a traced, shape-propagated graph."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.modules = dict(model.named_modules())
        self.parent: dict[tuple, tuple] = {}
        self.reasons: dict[tuple, list[str]] = {}
        self.roles: dict[tuple, tuple[str, nn.Module]] = {}  # ("m", name, dim) -> (role, module)
        self.order: dict[str, int] = {}  # module name -> first call
        self.inputs: dict[str, fx.Node] = {}  # module name -> the node it was called on (once)
        self.calls: dict[str, int] = {}
        self.values: dict[fx.Node, _Value | None] = {}
        self.fresh = 0

    # union-find
    def find(self, key: tuple) -> tuple:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: tuple, b: tuple) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.reasons.setdefault(ra, []).extend(self.reasons.pop(rb, []))

    def freeze(self, key: tuple, reason: str) -> None:
        reasons = self.reasons.setdefault(self.find(key), [])
        if reason not in reasons:
            reasons.append(reason)

    def new_key(self) -> tuple:
        self.fresh += 1
        return ("fresh", self.fresh)

    # descriptions for refusals
    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.modules[node.target]).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        where = f" in module {list(stack)[-1]!r}" if stack else ""
        target = node.target if isinstance(node.target, str) else \
            getattr(node.target, "__name__", node.target)
        return f"node {node.name!r} ({node.op} {target}{where})"

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if self.values.get(n) else None)
        return found

    def refuse(self, node: fx.Node, why: str) -> None:
        """Keep every channel of the node's tensor inputs and output: ``why`` names the node."""
        reason = f"{self.describe(node)} {why}"
        for arg in self.tensor_args(node):
            self.freeze(self.values[arg].key, reason)
        key = self.new_key()
        self.freeze(key, reason)
        self.values[node] = _Value(key, None, _shape(node))

    def layer(self, name: str, dim: int, role: str, node: fx.Node) -> tuple:
        key = ("m", name, dim)
        self.roles[key] = (role, self.modules[name])
        self.order.setdefault(name, len(self.order))
        return key

    # the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                key = self.new_key()
                self.freeze(key, f"the model's input {node.name!r}")
                shape = _shape(node)
                self.values[node] = _Value(key, 1 if shape and len(shape) > 1 else None, shape)
            elif node.op == "get_attr":
                key = self.new_key()
                self.freeze(key, f"{self.describe(node)} reads the model's tensor {node.target!r} "
                                 "directly (not a layer PruneTrain can cut)")
                self.values[node] = _Value(key, None, _shape(node))
            elif node.op == "output":
                for arg in self.tensor_args(node):
                    self.freeze(self.values[arg].key, "its channels are the model's output")
            elif node.op == "call_module":
                self.call_module(node)
            else:
                self.call_function(node)

    def call_module(self, node: fx.Node) -> None:
        name, module = node.target, self.modules[node.target]
        self.calls[name] = self.calls.get(name, 0) + 1
        tensors = self.tensor_args(node)
        value = self.values[tensors[0]] if len(tensors) == 1 else None
        if isinstance(module, _CONV) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            if value is None or value.cdim not in (None, 1):
                return self.refuse(node, "reads a tensor whose channel dimension is not dim 1")
            self.inputs[name] = tensors[0]
            out = self.layer(name, 0, "producer", node)
            if module.groups == 1:
                self.union(value.key, self.layer(name, 1, "consumer", node))
            elif module.groups == module.in_channels == module.out_channels:
                self.roles[out] = ("depthwise", module)
                self.union(value.key, out)
            else:
                reason = (f"{self.describe(node)} is a grouped conv (groups={module.groups}, "
                          f"{module.in_channels} -> {module.out_channels} channels): its input and "
                          "output channels are tied per group")
                self.freeze(value.key, reason)
                self.freeze(out, reason)
            self.values[node] = _Value(out, 1, _shape(node))
        elif isinstance(module, nn.Linear):
            if value is None or value.shape is None or value.cdim not in (None, len(value.shape) - 1):
                return self.refuse(node, "reads a tensor whose channels are not its last dimension")
            self.inputs[name] = tensors[0]
            self.union(value.key, self.layer(name, 1, "consumer", node))
            shape = _shape(node)
            self.values[node] = _Value(self.layer(name, 0, "producer", node), len(shape) - 1, shape)
        elif isinstance(module, _NORM):
            if value is None or value.cdim not in (None, 1):
                return self.refuse(node, "normalises a tensor whose channel dimension is not dim 1")
            self.inputs[name] = tensors[0]
            self.union(value.key, self.layer(name, 0, "norm", node))
            self.values[node] = _Value(value.key, 1, _shape(node))
        elif _shape(node) is None:
            self.refuse(node, "returns something other than one tensor")
        elif type(module) in _KEEP_MODULES:
            self.keep(node, tensors)
        elif isinstance(module, nn.Flatten | nn.Unflatten):
            self.reshape(node, tensors)
        elif isinstance(module, nn.Softmax | nn.LogSoftmax):
            self.softmax(node, tensors, module.dim)
        elif isinstance(module, nn.ChannelShuffle | nn.PixelShuffle | nn.PixelUnshuffle):
            self.refuse(node, "rearranges channels")
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.modules.instancenorm._InstanceNorm):
            self.refuse(node, "normalises over channels or with its own per-channel parameters, "
                              "which PruneTrain does not cut")
        else:
            self.refuse(node, "is a module PruneTrain does not know how to follow channels through")

    def call_function(self, node: fx.Node) -> None:
        name = _op_name(node)
        tensors = self.tensor_args(node)
        shape = _shape(node)
        if not tensors:
            if shape is not None or node.meta.get("tensor_meta") is not None:
                return self.refuse(node, "creates a tensor in forward")
            self.values[node] = None  # arithmetic on sizes
            return
        if name is None:
            return self.refuse(node, "calls a function PruneTrain does not know")
        if name == "getitem":
            return self.getitem(node, tensors)
        if shape is None:
            if name in _SIZES:
                self.values[node] = None
                return
            return self.refuse(node, "returns something other than one tensor")
        if name in _ELEMENTWISE:
            self.keep(node, tensors)
        elif name in _FIRST_OPERAND:
            if name == "expand" and self.hardcodes_channels(node):
                return self.refuse(node, "hard-codes the channel count")
            self.keep(node, tensors[:1])
        elif name in _RESHAPE:
            self.reshape(node, tensors)
        elif name in _PERMUTE:
            self.permute(node, tensors, name)
        elif name in _REDUCE:
            self.reduce(node, tensors)
        elif name in _CAT:
            self.cat(node, tensors)
        elif name in _SOFTMAX:
            self.softmax(node, tensors, self.arg(node, 1, "dim"))
        else:
            self.refuse(node, "is an op PruneTrain does not know how to follow channels through")

    # helpers
    def arg(self, node: fx.Node, index: int, name: str, default=None):
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def opaque(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        """An op on tensors of unknown layout (already refused): its output is one of them."""
        for arg in tensors[1:]:
            self.union(self.values[tensors[0]].key, self.values[arg].key)
        self.values[node] = _Value(self.values[tensors[0]].key, None, _shape(node))

    def keep(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        """Channel-wise op with right-aligned broadcasting: operands with the output's channels tie."""
        shape = _shape(node)
        position, known = None, []
        for arg in tensors:
            value = self.values[arg]
            if value.cdim is None or value.shape is None:
                continue
            aligned = len(shape) - (len(value.shape) - value.cdim)
            if position not in (None, aligned) or aligned < 0:
                return self.refuse(node, "combines tensors whose channel dimensions do not line up")
            position = aligned
            known.append(value)
        if position is None:
            return self.opaque(node, tensors)
        width = shape[position]
        for arg in tensors:
            value = self.values[arg]
            if value.shape is None:
                return self.refuse(node, "reads a value that is not one tensor")
            offset = len(value.shape) - (len(shape) - position)
            size = value.shape[offset] if offset >= 0 else 1
            if value.cdim is None and size != 1:
                return self.refuse(node, "combines the channels with a tensor of unknown layout")
            if value.cdim is not None and size not in (1, width):
                return self.refuse(node, "changes the number of channels")
        matching = [value for value in known if value.shape[value.cdim] == width]
        if matching:
            for value in matching[1:]:
                self.union(matching[0].key, value.key)
            self.values[node] = _Value(matching[0].key, position, shape)
        else:  # every operand broadcasts along channels: a new set nobody writes
            key = self.new_key()
            self.freeze(key, f"{self.describe(node)} broadcasts along channels")
            self.values[node] = _Value(key, position, shape)

    def hardcodes_channels(self, node: fx.Node) -> bool:
        """A view/reshape/expand given a literal size where the output's channels go."""
        value, shape = self.values[self.tensor_args(node)[0]], _shape(node)
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
            sizes = sizes[0]
        if "size" in node.kwargs or "shape" in node.kwargs:
            sizes = node.kwargs.get("size", node.kwargs.get("shape"))
        if value.cdim is None or value.shape is None or len(sizes) != len(shape):
            return False
        channels = value.shape[value.cdim]
        return any(isinstance(s, int) and s == channels and channels > 1 for s in sizes)

    def reshape(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        """flatten/view/reshape/squeeze/unsqueeze: follow the channels only where the sizes other
        than 1 stay the same, in the same order (a flatten after a global pool, a gate's view)."""
        value, shape = self.values[tensors[0]], _shape(node)
        if value.cdim is None:
            return self.opaque(node, tensors)
        if len(tensors) != 1 or value.shape is None:
            return self.refuse(node, "reshapes with a tensor")
        before = [i for i, size in enumerate(value.shape) if size != 1]
        after = [i for i, size in enumerate(shape) if size != 1]
        if value.cdim not in before or [value.shape[i] for i in before] != [shape[i] for i in after]:
            return self.refuse(node, f"reshapes the channel dimension ({tuple(value.shape)} -> "
                                     f"{tuple(shape)}): what follows does not read one value per "
                                     "channel (a flatten or view of a map larger than 1x1, a channel "
                                     "shuffle or split)")
        if node.op != "call_module" and self.hardcodes_channels(node):
            return self.refuse(node, "hard-codes the channel count")
        self.values[node] = _Value(value.key, after[before.index(value.cdim)], shape)

    def permute(self, node: fx.Node, tensors: list[fx.Node], name: str) -> None:
        value, shape = self.values[tensors[0]], _shape(node)
        if value.cdim is None:
            return self.opaque(node, tensors)
        ndim = len(value.shape)
        order = list(range(ndim))
        args = [a for a in node.args[1:]]
        try:
            if name == "permute":
                dims = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args
                order = [int(d) % ndim for d in dims]
            elif name == "t":
                order = order[::-1]
            elif name == "movedim":
                source, target = int(args[0]) % ndim, int(args[1]) % ndim
                order.remove(source)
                order.insert(target, source)
            else:
                a, b = int(self.arg(node, 1, "dim0")) % ndim, int(self.arg(node, 2, "dim1")) % ndim
                order[a], order[b] = order[b], order[a]
        except (TypeError, ValueError, IndexError):
            return self.refuse(node, "permutes dimensions this tracer cannot read")
        if order.index(value.cdim) != value.cdim:
            return self.refuse(node, "moves the channel dimension")
        self.values[node] = _Value(value.key, value.cdim, shape)

    def reduce(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        value, shape = self.values[tensors[0]], _shape(node)
        if value.cdim is None:
            return self.opaque(node, tensors)
        if len(tensors) != 1:
            return self.refuse(node, "reduces with a tensor")
        dims = self.arg(node, 1, "dim")
        if dims is None:
            return self.refuse(node, "reduces over every dimension, channels included")
        ndim = len(value.shape)
        dims = {int(d) % ndim for d in (dims if isinstance(dims, tuple | list) else [dims])}
        if value.cdim in dims:
            return self.refuse(node, "reduces over channels")
        cdim = value.cdim
        if len(shape) < ndim:  # keepdim=False
            cdim -= sum(d < value.cdim for d in dims)
        self.values[node] = _Value(value.key, cdim, shape)

    def cat(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        values = [self.values[t] for t in tensors]
        if any(v.cdim is None or v.shape is None for v in values):
            return self.refuse(node, "concatenates tensors whose channel dimension is not known")
        ndim = len(values[0].shape)
        dim = int(self.arg(node, 1, "dim", 0)) % ndim
        if any(v.cdim != values[0].cdim or len(v.shape) != ndim for v in values):
            return self.refuse(node, "concatenates tensors whose channel dimensions do not line up")
        if dim == values[0].cdim:
            return self.refuse(node, "concatenates along channels: its channel range is made of its "
                                     "inputs' ranges, which PruneTrain does not cut")
        for v in values[1:]:
            self.union(values[0].key, v.key)
        self.values[node] = _Value(values[0].key, values[0].cdim, _shape(node))

    def softmax(self, node: fx.Node, tensors: list[fx.Node], dim) -> None:
        value = self.values[tensors[0]]
        if value.cdim is None:
            return self.opaque(node, tensors)
        if dim is None or \
                int(dim) % len(value.shape) == value.cdim:
            return self.refuse(node, "normalises across channels (softmax)")
        self.keep(node, tensors[:1])

    def getitem(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        base = node.args[0]
        value = self.values.get(base) if isinstance(base, fx.Node) else None
        if value is None or value.shape is None:
            return self.refuse(node, "takes an item of a value that is not one tensor "
                                     "(the output of a split, chunk or multi-output module)")
        if value.cdim is None:
            return self.opaque(node, tensors)
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > value.cdim and index[value.cdim] != slice(None) or \
                not all(isinstance(i, slice) for i in index[:value.cdim + 1]):
            return self.refuse(node, "indexes or slices the channel dimension")
        if len(self.tensor_args(node)) != 1:
            return self.refuse(node, "indexes with a tensor")
        self.values[node] = _Value(value.key, value.cdim, _shape(node))

    # the graph
    def graph(self) -> ChannelGraph:
        groups: dict[tuple, list[tuple]] = {}
        for key in sorted(self.roles, key=lambda k: (self.order[k[1]], k[2])):
            groups.setdefault(self.find(key), []).append(key)
        nodes, refused, names = [], {}, {}
        candidates: list[tuple[tuple, list[str]]] = []
        for root, keys in groups.items():
            writers = [k[1] for k in keys if self.roles[k][0] in ("producer", "depthwise")]
            if writers:
                candidates.append((root, writers))
        proposed = [_common_path(writers) or writers[0] for _, writers in candidates]
        for (root, writers), name in zip(candidates, proposed):
            names[root] = name if proposed.count(name) == 1 else writers[0]
        for root, _ in candidates:
            keys, name = groups[root], names[root]
            reasons = self.reasons.get(root, [])
            producers = [self.roles[k][1] for k in keys if self.roles[k][0] in ("producer", "depthwise")]
            widths = {self.width(k) for k in keys}
            if reasons:
                refused[name] = "; ".join(reasons)
            elif not any(isinstance(m, _CONV) for m in producers):
                refused[name] = "written by no conv (features of a linear layer)"
            elif len(widths) != 1:
                refused[name] = f"its layers disagree on its width ({sorted(widths)})"
            else:
                nodes.append(self.node(name, keys))
        return ChannelGraph(nodes, refused, {id(m): n for n, m in self.modules.items()})

    def width(self, key: tuple) -> int:
        role, module = self.roles[key]
        return module.num_features if role == "norm" else module.weight.shape[key[2]]

    def node(self, name: str, keys: list[tuple]) -> ChannelNode:
        """The node of one set; a norm pairs with the writer it is applied to where both are
        called once."""
        roles = [(key, *self.roles[key]) for key in keys]
        writers = [key[1] for key, role, _ in roles if role in ("producer", "depthwise")]
        node, norm_of = ChannelNode(name), {}
        for key, role, module in roles:
            if role == "consumer":
                node.consumers.append(module)
            elif role == "norm":
                source = self.inputs[key[1]]
                if self.calls[key[1]] == 1 and source.op == "call_module" and source.target in writers \
                        and self.calls[source.target] == 1 and source.target not in norm_of:
                    norm_of[source.target] = module
                else:
                    node.norms.append(module)
        node.producers = [(self.modules[w], norm_of.get(w)) for w in writers]
        return node


def _common_path(names: list[str]) -> str:
    """The longest dotted module path shared by several names ('' for one name or none shared)."""
    if len(names) < 2:
        return names[0] if names else ""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def trace_channel_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> ChannelGraph:
    """The channel graph of ``model`` (see the module docstring); ``example_input`` (N >= 2) for
    the shapes, else a batch of 2 random images at 32, 64, 224 or 28 pixels (the first the model
    runs on). Raises ``PruningError`` for a model that torch.fx cannot trace or run."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:
        where = f"module {tracer.failed_in}" if tracer.failed_in else "its forward"
        raise PruningError(
            f"model {type(model).__name__}: torch.fx cannot trace {where} ({type(error).__name__}: "
            f"{error}); PruneTrain traces the model to find which layers share channels, so its "
            "forward may not branch on tensor values") from error
    gm = fx.GraphModule(model, graph)
    if sum(node.op == "placeholder" for node in graph.nodes) != 1:
        raise PruningError(f"model {type(model).__name__}: PruneTrain traces models of one input")
    candidates = [example_input] if example_input is not None else _example_inputs(model, graph)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    errors = []
    try:
        for x in candidates:
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(x)
                break
            except Exception as error:  # the wrong input size for this model: try the next
                errors.append(f"{tuple(x.shape)}: {type(error).__name__}: {error}")
        else:
            raise PruningError(f"model {type(model).__name__}: could not run it on an example input "
                               f"to trace its shapes ({'; '.join(errors)})")
    finally:
        for module, training in modes.items():
            module.training = training
    walk = _ChannelTracer(model, gm)
    walk.run()
    return walk.graph()


__all__ = ["ChannelGraph", "ChannelNode", "trace_channel_graph"]
