"""ONNX (as our export writes it) -> a Relax module whose every op is a generated kernel.

Two steps: ``_Lowering`` translates the graph into Relax, each conv as plain ``relax.nn.conv2d``
with a constant weight followed by its bias add, residual add and ReLU (BN is already folded), the
pools and the classifier as our kernels on NCHW[L]c; then the Relax pass
``passes.relax_passes.rewrite_pattern_convs`` turns every conv chain into one generated kernel
whose epilogue runs the bias, residual and ReLU, choosing per conv the variant (pattern-sparse,
connectivity-only, dense) with ``plan_conv`` and recording the reason. Activations stay in
NCHW[L]c from the packed input to the global pool: the unpack/pack pairs between kernels vanish.

The conv kernels a target gets are a ``ConvKernels``: this module's is the CPU one; CUDA targets
use ``compile.cuda.lower``'s (NCHW, batch fixed at compile time) through the same two steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax

from ..errors import ClickTrainError
from ..export.metadata import PatternMetadata
from .conv_kernels import (
    ALL_TAPS, ConvSpec, choose_tile, compact_weights, connectivity_assignment, conv_tvmscript, library_taps,
    pattern_assignment,
)
from .ops import avgpool_tvmscript, dense_tvmscript, maxpool_tvmscript, pack_tvmscript, unpack_tvmscript
from .targets import Layout, TargetSpec

# Kernel choice by multiply-adds saved: below DENSE_BELOW stay dense, from MEASURE_BELOW go sparse,
# in between time both on the host; targets that cannot run here go sparse from SPARSE_FROM.
DENSE_BELOW, MEASURE_BELOW, SPARSE_FROM = 1.1, 3.0, 1.25
SHAPE_OPS = {"Shape", "Squeeze", "Unsqueeze", "Concat", "Constant", "Gather", "Cast", "Slice", "Identity"}


class CompileError(ClickTrainError):
    """The model holds a layer the compiler does not support; the message names it."""


@dataclass
class LayerKernel:
    """Manifest entry: which kernel a layer got and why."""

    layer: str
    op: str
    kernel: str
    shape: list[int]
    reason: str
    kept_fraction: float = 1.0
    estimated_speedup: float = 1.0
    measured_us: dict | None = None
    function: str | None = None  # a conv's kernel in the library (set by the rewrite)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Value:
    expr: relax.Expr
    channels: int
    height: int = 1
    width: int = 1
    lanes: int = 1
    blocked: bool = True


def _key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Lowering:
    batch = 1  # images per call of the built module

    def __init__(self, model: onnx.ModelProto, metadata: PatternMetadata | None, target: TargetSpec):
        self.model, self.target, self.pattern_metadata = model, target, metadata
        self.metadata = {e.initializer: e for e in (metadata.layers if metadata else [])}
        self.layout = target.layout_for([e.mask.block_size for e in self.metadata.values()])
        self.lanes = self.layout.lanes
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            value = _attr(node, "value", None) if node.op_type == "Constant" else None
            if value is not None:
                self.consts[node.output[0]] = numpy_helper.to_array(value)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.values: dict[str, _Value] = {}
        self.plans: dict[str, tuple] = {}
        self.manifest: list[LayerKernel] = []
        self.conv_names: dict[str, str] = {}
        self.builder = relax.BlockBuilder()
        self.count = 0

    # -- planning: which node produces each materialised value, with fused epilogues ------------
    def plan(self) -> None:
        claimed: set[str] = set()
        for node in self.model.graph.node:
            if node.op_type != "Conv":
                continue
            out, relu, residual = node.output[0], False, None
            users = self.consumers.get(out, [])
            if len(users) == 1 and users[0].op_type == "Add" and _key(users[0]) not in claimed:
                add = users[0]
                residual = add.input[1] if add.input[0] == out else add.input[0]
                out = add.output[0]
                claimed.add(_key(add))
                users = self.consumers.get(out, [])
            if len(users) == 1 and users[0].op_type == "Relu" and out not in self._graph_outputs():
                relu = True
                out = users[0].output[0]
                claimed.add(_key(users[0]))
            self.plans[out] = ("conv", node, relu, residual)
        for node in self.model.graph.node:
            if node.op_type == "Conv" or _key(node) in claimed or node.op_type in SHAPE_OPS:
                continue
            if node.op_type == "Gemm":
                out, relu = node.output[0], False
                users = self.consumers.get(out, [])
                if len(users) == 1 and users[0].op_type == "Relu":
                    relu, out = True, users[0].output[0]
                    claimed.add(_key(users[0]))
                self.plans[out] = ("dense", node, relu, None)
            elif node.op_type in ("ReduceMean", "GlobalAveragePool", "MaxPool", "Reshape", "Flatten"):
                self.plans[node.output[0]] = (node.op_type, node, False, None)
            else:
                raise CompileError(f"node {node.name!r} ({node.op_type}): not supported by the compiler "
                                   "(supported: Conv with fused bias/Add/Relu, Gemm, ReduceMean, "
                                   "GlobalAveragePool, MaxPool 2x2, Reshape/Flatten)")

    def _graph_outputs(self) -> set[str]:
        return {o.name for o in self.model.graph.output}

    # -- emission -------------------------------------------------------------------------------
    def _add_kernel(self, source: str, prefix: str) -> tvm.ir.GlobalVar:
        name = f"{prefix}{self.count}"
        self.count += 1
        return self.builder.add_func(tvm.script.from_source(source.replace("__NAME__", name)), name)

    def _call(self, source: str, prefix: str, args: list, shape: tuple[int, ...]) -> relax.Expr:
        gv = self._add_kernel(source, prefix)
        args = [a if isinstance(a, relax.Expr) else relax.const(a) for a in args]
        return self.builder.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))

    def value(self, name: str) -> _Value:
        if name in self.values:
            return self.values[name]
        if name not in self.plans:
            producer = self.producer.get(name)
            raise CompileError(f"tensor {name!r} (from {producer.op_type if producer else 'nowhere'}): "
                               "not supported by the compiler")
        kind, node, relu, residual = self.plans[name]
        emit = {"conv": self._conv, "dense": self._dense, "ReduceMean": self._avgpool,
                "GlobalAveragePool": self._avgpool, "MaxPool": self._maxpool,
                "Reshape": self._flatten, "Flatten": self._flatten}[kind]
        self.values[name] = emit(node, relu, residual)
        return self.values[name]

    def _conv(self, node: onnx.NodeProto, relu: bool, residual: str | None) -> _Value:
        x = self.value(node.input[0])
        weight = self.consts.get(node.input[1])
        if weight is None or not x.blocked:
            raise CompileError(f"Conv {node.name!r}: weight must be a constant and input an image")
        oc, ic, kh, kw = weight.shape
        stride = _attr(node, "strides", [1, 1])
        pads = _attr(node, "pads", [0, 0, 0, 0])
        if _attr(node, "group", 1) != 1 or stride[0] != stride[1] or stride[0] not in (1, 2) \
                or _attr(node, "dilations", [1, 1]) != [1, 1] or \
                not ((kh, kw) == (3, 3) and pads == [1] * 4 or (kh, kw) == (1, 1) and pads == [0] * 4):
            raise CompileError(f"Conv {node.name!r} ({node.input[1]}): {kh}x{kw}, pads {pads}, stride "
                               f"{stride}, group {_attr(node, 'group', 1)} is not supported "
                               "(3x3 pad 1 or 1x1 pad 0, stride 1 or 2, group 1)")
        # plain Relax ops, named after the layer; pattern_conv_rewrite turns each chain into one kernel
        layer = self.metadata.get(node.input[1])
        name = layer.module if layer else node.input[1].removesuffix(".weight")
        out = self.builder.emit(relax.op.nn.conv2d(self._nchw(x), relax.const(weight), strides=stride[0],
                                                   padding=pads[0]), name_hint=name)
        self.conv_names[out.name] = name  # Relax spells "layers.0.conv1" as layers_0_conv1
        if len(node.input) > 2:
            out = self.builder.emit(relax.op.add(out, relax.const(self.consts[node.input[2]].reshape(1, oc, 1, 1))))
        if residual is not None:
            out = self.builder.emit(relax.op.add(out, self._nchw(self.value(residual))))
        if relu:
            out = self.builder.emit(relax.op.nn.relu(out))
        return _Value(out, oc, (x.height - 1) // stride[0] + 1, (x.width - 1) // stride[0] + 1, lanes=0)

    def _nchw(self, x: _Value) -> relax.Expr:
        """An image value as (1, C, H, W): blocked values are unpacked (the rewrite skips the
        unpack where a conv reads it)."""
        if x.lanes == 0:
            return x.expr
        return self._call(unpack_tvmscript(x.channels, x.height, x.width, x.lanes, "__NAME__"), "unpack",
                          [x.expr], (1, x.channels, x.height, x.width))

    def _blocked(self, x: _Value) -> _Value:
        """An image value in NCHW[L]c (a pack of a conv's output is skipped by the rewrite)."""
        if x.lanes:
            return x
        blocks = math.ceil(x.channels / self.lanes)
        packed = self._call(pack_tvmscript(x.channels, x.height, x.width, self.lanes, "__NAME__"), "pack",
                            [x.expr], (blocks, x.height, x.width, self.lanes))
        return _Value(packed, x.channels, x.height, x.width, self.lanes)

    def _avgpool(self, node, relu, residual) -> _Value:
        x = self._blocked(self.value(node.input[0]))
        blocks = math.ceil(x.channels / x.lanes)
        src = avgpool_tvmscript(blocks, x.height, x.width, x.lanes, "__NAME__")
        self.manifest.append(LayerKernel(node.name, node.op_type, "avgpool", [x.channels, x.height, x.width], "generated"))
        return _Value(self._call(src, "avgpool", [x.expr], (1, blocks * x.lanes)), x.channels,
                      lanes=x.lanes, blocked=False)

    def _maxpool(self, node, relu, residual) -> _Value:
        x = self._blocked(self.value(node.input[0]))
        if _attr(node, "kernel_shape", None) != [2, 2] or _attr(node, "strides", None) != [2, 2]:
            raise CompileError(f"MaxPool {node.name!r}: only 2x2 stride 2 is supported")
        blocks = math.ceil(x.channels / x.lanes)
        oh, ow = math.ceil(x.height / 2), math.ceil(x.width / 2)
        src = maxpool_tvmscript(blocks, x.height, x.width, x.lanes, "__NAME__")
        self.manifest.append(LayerKernel(node.name, "MaxPool", "maxpool", [x.channels, x.height, x.width], "generated"))
        return _Value(self._call(src, "maxpool", [x.expr], (blocks, oh, ow, x.lanes)), x.channels, oh, ow, x.lanes)

    def _flatten(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        if x.blocked and (x.height, x.width) != (1, 1):
            raise CompileError(f"{node.op_type} {node.name!r}: only flattening a 1x1 map is supported")
        if x.blocked:
            blocks = math.ceil(x.channels / x.lanes)
            expr = self.builder.emit(relax.op.reshape(x.expr, (1, blocks * x.lanes)))
            return _Value(expr, x.channels, lanes=x.lanes, blocked=False)
        return x

    def _dense(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        weight, bias = self.consts.get(node.input[1]), self.consts.get(node.input[2]) if len(node.input) > 2 else None
        if weight is None or x.blocked or _attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0:
            raise CompileError(f"Gemm {node.name!r}: needs a constant transposed weight after a pool")
        outputs, inputs = weight.shape
        width = outputs if node.output[0] in self._graph_outputs() or (
            relu and self.consumers[node.output[0]][0].output[0] in self._graph_outputs()) \
            else math.ceil(outputs / self.lanes) * self.lanes
        k = math.ceil(inputs / x.lanes) * x.lanes
        padded = np.zeros((width, k), np.float32)
        padded[:outputs, :inputs] = weight
        b = np.zeros(width, np.float32)
        b[:outputs] = bias if bias is not None else 0
        src = dense_tvmscript(k, width, relu, x.lanes, "__NAME__")
        self.manifest.append(LayerKernel(node.name, "Gemm", "dense", [outputs, inputs], "generated"))
        return _Value(self._call(src, "dense", [x.expr, padded, b], (1, width)), outputs,
                      lanes=self.lanes if width % self.lanes == 0 else 1, blocked=False)

    def build(self) -> tvm.IRModule:
        self.plan()
        graph_input = self.model.graph.input[0]
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim[1:]]
        channels, height, width = dims
        x = relax.Var(graph_input.name, relax.TensorType((self.batch, channels, height, width), "float32"))
        with self.builder.function("main", [x]):
            with self.builder.dataflow():
                self.values[graph_input.name] = _Value(x, channels, height, width, lanes=0)
                out = self.value(self.model.graph.output[0].name)
                result = self.builder.emit_output(out.expr)
            self.builder.emit_func_output(result)
        return self.builder.get()

    def conv_kernels(self) -> ConvKernels:
        """The kernels the rewrite gives this target's convs."""
        return ConvKernels()

    def lower(self, measure: HostTimer | None = None) -> tuple[tvm.IRModule, list[LayerKernel], Layout]:
        """Both steps: the Relax module, then every conv chain rewritten into a kernel; fails
        naming the ops that got no generated kernel. Returns module, manifest (convs first), layout."""
        from ..passes.relax_passes import rewrite_pattern_convs

        module, convs = rewrite_pattern_convs(self.build(), self.pattern_metadata, self.target, measure,
                                              self.conv_kernels())
        left = set(_relax_ops(module["main"])) - {"relax.call_tir", "relax.reshape"}
        if left:
            raise CompileError(f"ops left without a generated kernel: {sorted(left)}")
        for entry in convs:
            entry.layer = self.conv_names.get(entry.layer, entry.layer)
        return module, convs + self.manifest, self.layout


def lower_onnx(model: onnx.ModelProto, metadata: PatternMetadata | None, target: TargetSpec,
               measure: HostTimer | None = None) -> tuple[tvm.IRModule, list[LayerKernel], Layout]:
    """Lower a verified ONNX model to a Relax module for ``target``.

    Returns the module, the per-layer manifest entries and the activation layout it chose.

    ``measure``, when given, times the candidate kernels of layers whose multiply-add saving is
    ambiguous (1.1x-3x) and picks the faster (every layer when ``measure.every_layer``);
    otherwise a layer goes sparse when it saves at least 1.25x of the multiply-adds.
    """
    return _Lowering(model, metadata, target).lower(measure)


def _relax_ops(func: relax.Function) -> list[str]:
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e.op.name) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) else None)
    return found


class ConvKernels:
    """A target's conv kernels, as ``plan_conv`` builds their candidates and the Relax rewrite
    calls them. This one: the CPU kernels of ``conv_kernels`` at batch 1 on NCHW[L]c activations
    (the rewrite packs before and unpacks after each conv; the pairs between convs vanish)."""

    device = "cpu"
    batch = 1
    blocked = True  # activations in NCHW[L]c (False: the kernels read and write NCHW)

    def candidate(self, kernel: str, groups, assign: np.ndarray, weight: np.ndarray, base: dict,
                  out_hw: tuple[int, int], layout: Layout) -> tuple[str, ConvSpec, list[np.ndarray]]:
        """One candidate of a conv: its spec and compact weights [ptr, coff, wv] (``base``: the
        ConvSpec fields every candidate shares; ``out_hw``: the output's OH, OW)."""
        tile = layout.pattern_tile if len(groups[0]) == 4 else choose_tile(*out_hw, layout.dense_tiles)
        spec = ConvSpec(groups=groups, entries=0, tile=tile, **base)
        ptr, coff, wv = compact_weights(weight, assign, spec)
        spec = ConvSpec(groups=groups, entries=int(ptr[-1]), tile=tile, **base)
        return kernel, spec, [ptr, coff, wv]

    def source(self, spec: ConvSpec, name: str) -> str:
        """TVMScript of the chosen kernel: (X, ptr, coff, wv, bias, R?) -> Y."""
        return conv_tvmscript(spec, name)

    def output_shape(self, spec: ConvSpec) -> tuple[int, ...]:
        oh, ow = spec.out_hw
        return spec.out_blocks, oh, ow, spec.lanes


def plan_conv(name: str, weight: np.ndarray, bias: np.ndarray, layer, library: np.ndarray | None, layout: Layout,
              source: tuple[int, int, int], stride: int, relu: bool, residual: bool,
              measure: HostTimer | None = None,
              kernels: ConvKernels | None = None) -> tuple[ConvSpec, list[np.ndarray], LayerKernel]:
    """Choose and pack the kernel of one conv: weight (OC, IC, 3, 3) or (OC, IC, 1, 1), bias (OC,),
    input ``source`` = (H, W, Li) in NCHW[Li]c (Li 1: NCHW); ``layer`` is its metadata entry (None:
    dense); ``kernels``: the target's (default: the CPU kernels).

    Returns the kernel's spec, its constant arguments [*compact weights, bias (OCB, L)] and the
    manifest entry. Weights that break the layer's patterns raise ValueError (compact_weights).
    """
    kernels = kernels or ConvKernels()
    oc, ic, kh, _ = weight.shape
    shape = list(weight.shape)
    if kh == 1:  # a 1x1 conv is the generator's centre tap (it reads input pixel (y*s, x*s))
        centre = np.zeros((oc, ic, 3, 3), np.float32)
        centre[:, :, 1, 1] = weight[:, :, 0, 0]
        weight = centre
    height, width, in_lanes = source
    lanes = layout.lanes
    out_hw = ((height - 1) // stride + 1, (width - 1) // stride + 1)
    base = dict(in_channels=ic, out_channels=oc, height=height, width=width, stride=stride,
                in_lanes=in_lanes, lanes=lanes, relu=relu, residual=residual)
    built = [kernels.candidate(kernel, groups, assign, weight, base, out_hw, layout)
             for kernel, groups, assign in _conv_candidates(weight, layer, library, lanes)]
    kernel, spec, packed, entry = _choose(name, shape, built, measure)
    bias_blocks = np.zeros(spec.out_blocks * lanes, np.float32)
    bias_blocks[:oc] = bias
    return spec, [*packed, bias_blocks.reshape(spec.out_blocks, lanes)], entry


def _conv_candidates(weight: np.ndarray, layer, library: np.ndarray | None, lanes: int) -> list:
    oc, ic = weight.shape[:2]
    blocks = math.ceil(oc / lanes)
    if not weight[:, :, [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]].any() and layer is None:
        return [("pointwise", (((1, 1),),), np.zeros((blocks, ic), int))]
    dense = ("dense", (ALL_TAPS,), np.zeros((blocks, ic), int))
    if layer is None:
        return [dense]
    ids = layer.mask.pattern_ids.numpy()
    if layer.mask.block_size % lanes == 0 or oc <= layer.mask.block_size:
        sparse = ("pattern", library_taps(library), pattern_assignment(ids, layer.mask.block_size, oc, lanes))
    else:
        kept = layer.mask.kernel_pattern_ids().numpy() >= 0
        sparse = ("connectivity", (ALL_TAPS,), connectivity_assignment(kept, lanes))
    return [sparse, dense]


def _choose(name: str, shape: list[int], built: list, measure: HostTimer | None) -> tuple:
    timed = measure(built) if measure is not None and measure.every_layer else None
    if len(built) == 1:
        kernel, spec, packed = built[0]
        return kernel, spec, packed, LayerKernel(name, "conv", kernel, shape, "no pattern metadata"
                                                 if kernel == "dense" else "1x1 conv", measured_us=timed)
    work = {kernel: spec.entries * len(spec.groups[0]) for kernel, spec, _ in built}
    dense_work = work["dense"]
    (sparse_kernel, sparse_spec, _), dense = built[0], built[1]
    kept = sparse_spec.entries / max(dense[1].entries, 1)
    estimate = dense_work / max(work[sparse_kernel], 1)
    if measure is not None and MEASURE_BELOW > estimate >= DENSE_BELOW:
        times = timed or measure(built)
        faster = times[sparse_kernel] < times["dense"]
        reason = f"measured {times[sparse_kernel]:.1f} us {sparse_kernel} vs {times['dense']:.1f} us dense"
        entry = LayerKernel(name, "conv", sparse_kernel if faster else "dense", shape, reason,
                            kept, estimate, times)
    else:
        threshold = SPARSE_FROM if measure is None else MEASURE_BELOW
        faster = estimate >= threshold
        entry = LayerKernel(name, "conv", sparse_kernel if faster else "dense", shape,
                            f"{estimate:.2f}x fewer multiply-adds than dense "
                            f"({'>=' if faster else '<'} {threshold}x)", kept, estimate, timed)
    chosen = built[0] if faster else built[1]
    return (*chosen, entry)


@dataclass
class HostTimer:
    """Times a layer's candidate kernels on this machine: {kernel: microseconds}.

    ``every_layer`` (benchmarks) times every conv, recording the times in the manifest without
    changing which kernel is chosen; otherwise only layers whose choice is ambiguous are timed.
    """

    target: TargetSpec
    repeats: int = 20
    every_layer: bool = False

    def __call__(self, candidates: list) -> dict[str, float]:
        times = {}
        for kernel, spec, packed in candidates:
            func = tvm.script.from_source(conv_tvmscript(spec, "candidate"))
            fn = tvm.compile(func, target=tvm.target.Target(self.target.tvm_target)).jit()["candidate"]
            oh, ow = spec.out_hw
            args = [np.zeros((spec.in_blocks, spec.height, spec.width, spec.in_lanes), np.float32), *packed,
                    np.zeros((spec.out_blocks, spec.lanes), np.float32)]
            if spec.residual:
                args.append(np.zeros((spec.out_blocks, oh, ow, spec.lanes), np.float32))
            args.append(np.zeros((spec.out_blocks, oh, ow, spec.lanes), np.float32))
            tensors = [tvm.runtime.tensor(a) for a in args]
            fn(*tensors)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(self.repeats):
                    fn(*tensors)
                best = min(best, (time.perf_counter() - started) / self.repeats)
            times[kernel] = round(best * 1e6, 2)
        return times
