"""Relax passes: from the imported module to one whose convs are our generated kernels.

``prepare`` folds BatchNorm into the convs before it, folds constants, and canonicalises the
``call_tir(maximum|minimum)`` that TVM's ONNX importer emits for Clip into ``relax.maximum`` /
``relax.minimum``. ``rewrite_convs`` then turns every ``relax.nn.conv2d`` with a constant weight,
with its epilogue, into one call of our kernel: the epilogue is a bias add followed by up to four
steps, each a residual add or an activation (ReLU, Clip/ReLU6, HardSigmoid, HardSwish, Sigmoid,
SiLU) in any of the forms the importer writes them, each form a ``relax.dpl`` pattern
(``STEP_PATTERNS``). A step is fused only when nothing outside the chain reads its intermediate
values. CPU kernels read and write NCHW[L]c: a pack before and an unpack after each kernel, and an
unpack that feeds a pack of the same lanes is skipped, so consecutive kernels stay blocked (dead
unpacks go with ``DeadCodeElimination``); layout changes remain only where an op that is not ours
reads the activations.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax import transform
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard

from ..contract import LayerEntry, MetadataError, PatternMetadata, check_weight
from .errors import CompileError
from .ops import LAYOUT_ATTR, matmul_tvmscript, maxpool_tvmscript, pack_tvmscript, unpack_tvmscript
from .plan import ConvKernels, ConvLayer, HostTimer, LayerKernel, plan_conv
from .targets import Layout, TargetSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)
GENERATED_ATTR = "clicktrain.kernel"  # our kernels carry it: the manifest tells them from TVM's


# -- preparation ------------------------------------------------------------------------------
def prepare(module: tvm.IRModule) -> tvm.IRModule:
    """BatchNorm folded into the preceding convs, constants folded, Clip canonicalised."""
    module = tvm.transform.Sequential([
        transform.FoldBatchnormToConv2D(),
        transform.DecomposeOpsForInference(),
        transform.FoldConstant(),
        transform.CanonicalizeBindings(),
    ])(module)
    return transform.FoldConstant()(_ClipCanonicaliser(module).run())


@relax.expr_functor.mutator
class _ClipCanonicaliser(relax.PyExprMutator):
    """``call_tir(maximum|minimum, (x, scalar))`` as the importer emits Clip -> ``relax.maximum``
    / ``relax.minimum`` (which the epilogue patterns match and legalisation turns back into TIR)."""

    def __init__(self, module: tvm.IRModule):
        super().__init__(module)
        self.module = module

    def run(self) -> tvm.IRModule:
        for gvar, func in self.module.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return transform.DeadCodeElimination()(self.builder_.get())

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _is_op(call, "relax.call_tir"):
            return call
        args = call.args[1].fields
        func = self.module[call.args[0]]
        if len(args) != 2 or not isinstance(func, tvm.tirx.PrimFunc) or len(func.params) != 3:
            return call
        kind = re.search(r'T\.sblock\("T_(maximum|minimum)"\)', func.script())
        if kind is None or _scalar(args[1]) is None:
            return call
        op = relax.op.maximum if kind.group(1) == "maximum" else relax.op.minimum
        return op(args[0], args[1])


# -- epilogue steps as dpl patterns ---------------------------------------------------------
def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _scalar(expr) -> float | None:
    """A one-element float constant's value, or an immediate's (a clip bound), else None."""
    if not isinstance(expr, tvm.ir.Constant):
        return None
    if isinstance(expr.value, (int, float)):  # IntImm / FloatImm (a PrimValue is one in 0.27)
        return float(expr.value)
    value = expr.value.numpy()
    return float(np.float32(value.reshape(-1)[0])) if value.size == 1 and value.dtype.kind == "f" else None


Extract = Callable[[dict], "tuple | None"]
INPUT = wildcard()  # the value a step applies to (the chain's tail)


def _commutative(op: str, a: DFPattern, b: DFPattern) -> DFPattern:
    return is_op(op)(a, b) | is_op(op)(b, a)


def _clip_forms(x: DFPattern) -> Iterator[tuple[DFPattern, Callable[[dict], tuple | None]]]:
    """clip(x, lo, hi) as the importer writes it: relax.clip, or maximum and/or minimum."""
    lo, hi = wildcard(), wildcard()
    yield is_op("relax.clip")(x, lo, hi), lambda m: (_scalar(m[lo]), _scalar(m[hi]))
    a, b = is_const(), is_const()
    yield is_op("relax.minimum")(is_op("relax.maximum")(x, a), b), lambda m: (_scalar(m[a]), _scalar(m[b]))
    c, d = is_const(), is_const()
    yield is_op("relax.maximum")(is_op("relax.minimum")(x, d), c), lambda m: (_scalar(m[c]), _scalar(m[d]))
    e = is_const()
    yield is_op("relax.maximum")(x, e), lambda m: (_scalar(m[e]), math.inf)
    f = is_const()
    yield is_op("relax.minimum")(x, f), lambda m: (-math.inf, _scalar(m[f]))


def _affine_forms(x: DFPattern) -> Iterator[tuple[DFPattern, Callable[[dict], tuple | None]]]:
    """alpha * x + beta: multiply or divide, then add."""
    a, b = is_const(), is_const()
    yield _commutative("relax.add", _commutative("relax.multiply", x, a), b), lambda m: (_scalar(m[a]), _scalar(m[b]))
    c, d = is_const(), is_const()
    yield _commutative("relax.add", is_op("relax.divide")(x, c), d), \
        lambda m: (1 / _scalar(m[c]) if _scalar(m[c]) else None, _scalar(m[d]))
    e = is_const()
    yield _commutative("relax.add", x, e), lambda m: (1.0, _scalar(m[e]))


def _hardsigmoid_forms(x: DFPattern) -> Iterator[tuple[DFPattern, Callable[[dict], tuple | None]]]:
    """(alpha, beta) of min(max(alpha x + beta, 0), 1): ONNX HardSigmoid, or HardSwish's
    clip(x + 3, 0, 6) / 6 (and the same times 1/6)."""
    def fits(affine, clip, lo_hi: Callable[[float | None], bool], scale: Callable[[dict], float | None]):
        def extract(m):
            ab, bounds, s = affine(m), clip(m), scale(m)
            if None in ab or None in bounds or s is None or not lo_hi(bounds, s):
                return None
            return ab[0] * s, ab[1] * s
        return extract

    for affine, affine_params in _affine_forms(x):
        for clip, clip_params in _clip_forms(affine):
            yield clip, fits(affine_params, clip_params, lambda b, s: b == (0.0, 1.0), lambda m: 1.0)
            d = is_const()
            yield is_op("relax.divide")(clip, d), fits(
                affine_params, clip_params, lambda b, s: b[0] == 0.0 and math.isclose(b[1] * s, 1.0, rel_tol=1e-6),
                lambda m, d=d: 1 / _scalar(m[d]) if _scalar(m[d]) else None)
            e = is_const()
            yield _commutative("relax.multiply", clip, e), fits(
                affine_params, clip_params, lambda b, s: b[0] == 0.0 and math.isclose(b[1] * s, 1.0, rel_tol=1e-6),
                lambda m, e=e: _scalar(m[e]))


def _step_patterns() -> list[tuple[str, DFPattern, Extract]]:
    """Every activation step on ``INPUT``, longest first: (kind, pattern, params of a match)."""
    steps: list[tuple[str, DFPattern, Extract]] = []
    for gate, params in _hardsigmoid_forms(INPUT):
        steps.append(("hardswish", _commutative("relax.multiply", INPUT, gate),
                      lambda m, params=params: None if params(m) is None else ("hardswish", *params(m))))
    steps.append(("silu", _commutative("relax.multiply", INPUT, is_op("relax.sigmoid")(INPUT)), lambda m: ("silu",)))
    for gate, params in _hardsigmoid_forms(INPUT):
        steps.append(("hardsigmoid", gate,
                      lambda m, params=params: None if params(m) is None else ("hardsigmoid", *params(m))))
    steps.append(("sigmoid", is_op("relax.sigmoid")(INPUT), lambda m: ("sigmoid",)))
    for clip, bounds in _clip_forms(INPUT):
        steps.append(("clip", clip, lambda m, bounds=bounds: _clip_step(bounds(m))))
    steps.append(("relu", is_op("relax.nn.relu")(INPUT), lambda m: ("relu",)))
    return steps


def _clip_step(bounds: tuple) -> tuple | None:
    lo, hi = bounds
    if lo is None or hi is None or lo > hi:
        return None
    if lo == 0.0 and hi == math.inf:
        return ("relu",)
    return ("clip", max(lo, -FLOAT32_MAX), min(hi, FLOAT32_MAX))


STEP_PATTERNS = _step_patterns()
RESIDUAL_OPERAND = wildcard()
# two patterns, not one commutative one: in add(skip, conv) a commutative match binds INPUT to
# skip (both sides are wildcards) and the chain's check that INPUT is its tail then rejects it
RESIDUAL_STEPS = [("residual", is_op("relax.add")(INPUT, RESIDUAL_OPERAND), lambda m: ("residual",)),
                  ("residual", is_op("relax.add")(RESIDUAL_OPERAND, INPUT), lambda m: ("residual",))]
BIAS_VALUE = is_const()
BIAS = _commutative("relax.add", INPUT, BIAS_VALUE)
MAX_STEPS = 4  # epilogue steps after the bias (one residual at most)


# -- the rewrite ------------------------------------------------------------------------------
@dataclass
class _Chain:
    conv: relax.VarBinding
    index: int
    bias: np.ndarray | None
    steps: tuple
    residual: relax.Expr | None


def rewrite_convs(module: tvm.IRModule, metadata: PatternMetadata | None, target: TargetSpec,
                  kernels: ConvKernels, measure: HostTimer | None = None,
                  conv_names: list[str] | None = None) -> tuple[tvm.IRModule, list[LayerKernel]]:
    """Every ``relax.nn.conv2d`` with a constant weight that ``kernels`` covers becomes one call of
    our kernel with its fused epilogue (module docstring); the others stay for TVM to schedule.

    ``conv_names``: the layer name of each constant-weight conv in binding order (the ONNX node
    names; default conv2d_<index>). A conv is the metadata layer named like it (its ONNX weight
    initializer, or module), else the first unmatched layer of its shape whose patterns the
    weight fits; a layer left without a conv, or a weight that contradicts its layer, stops the
    build naming the layer (``MetadataError``). Returns the module and the conv manifest entries.
    """
    if kernels.device != target.device:
        raise CompileError(f"{target.name}: a {target.device} target given {kernels.device} conv kernels")
    layout = target.layout_for([e.mask.block_size for e in metadata.layers] if metadata else [])
    rewriter = _ConvRewriter(module, metadata, layout, measure, kernels, conv_names or [])
    functions = [(gvar, func) for gvar, func in module.functions_items() if isinstance(func, relax.Function)]
    for _, func in functions:  # in Python, before any FFI callback, so errors keep their type
        rewriter.analyse(func)
    if rewriter.unmatched:
        raise rewriter.unmatched_error()
    for gvar, func in functions:
        rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return transform.DeadCodeElimination()(rewriter.builder_.get()), rewriter.manifest


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    """Finds each conv's epilogue chain (``analyse``) and emits one kernel per chain."""

    def __init__(self, mod: tvm.IRModule, metadata: PatternMetadata | None, layout: Layout, measure,
                 kernels: ConvKernels, conv_names: list[str]):
        super().__init__(mod)
        self.module, self.metadata, self.layout, self.measure = mod, metadata, layout, measure
        self.kernels, self.conv_names = kernels, conv_names
        self.library = metadata.library if metadata else None
        self.unmatched: list[LayerEntry] = list(metadata.layers) if metadata else []
        self.rejected: list = []   # (name, weight) of 3x3 convs that matched no layer
        self.manifest: list[LayerKernel] = []
        self.chains: dict = {}     # tail var -> (_Chain, ConvLayer)
        self.matmuls: dict = {}    # tail var -> (matmul call, bias | None, steps)
        self.blocked: dict = {}    # NCHW var -> (blocked var, lanes) it was unpacked from
        self.count, self.names = 0, {gv.name_hint for gv in mod.get_global_vars()}

    # -- analysis -------------------------------------------------------------------------------
    def analyse(self, func: relax.Function) -> None:
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.position = {b.var: i for i, b in enumerate(bindings)}
        self.bindings = bindings
        self.var2val = relax.analysis.get_var2val(func)
        self.users: dict = {}
        for b in bindings:
            for v in relax.analysis.free_vars(b.value):
                self.users.setdefault(v, []).append(b.var)
        convs = [b for b in bindings if _is_op(b.value, "relax.nn.conv2d") and isinstance(b.value.args[1], tvm.ir.Constant)]
        claimed: set = set()
        for index, conv in enumerate(convs):
            name = self.conv_names[index] if index < len(self.conv_names) else f"conv2d_{index}"
            layer = self._conv_layer(conv, name)
            reason = self.kernels.covers(layer)
            if reason is not None:
                self.manifest.append(LayerKernel(name, "conv", "tvm", list(layer.weight.shape),
                                                 f"left to TVM: {reason}", attributes=layer.attributes()))
                continue
            chain, tail = self._chain(conv, index, claimed)
            layer = self._conv_layer(conv, name, chain)
            self.chains[tail] = (chain, layer)
            claimed.add(tail)
        if self.kernels.blocked:  # CPU: constant-weight classifiers on our matmul kernel
            for b in bindings:
                if _is_op(b.value, "relax.matmul") and isinstance(b.value.args[1], tvm.ir.Constant) \
                        and len(_shape(b.value.args[0])) == 2 and b.value.args[1].value.numpy().ndim == 2 \
                        and b.value.args[0].ty.dtype == "float32":
                    self._matmul_chain(b, claimed)

    def _conv_layer(self, conv: relax.VarBinding, name: str, chain: _Chain | None = None) -> ConvLayer:
        attrs, weight = conv.value.attrs, conv.value.args[1].value.numpy()
        x = conv.value.args[0]
        where = f"conv {name!r} ({list(weight.shape)})"
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
            raise CompileError(f"{where}: layout {attrs.data_layout}/{attrs.kernel_layout} is not supported (NCHW/OIHW)")
        if x.ty.dtype != "float32" or weight.dtype != np.float32:
            raise CompileError(f"{where}: dtype {x.ty.dtype}/{weight.dtype} is not supported (float32)")
        source = _shape(x)
        bias = chain.bias if chain is not None and chain.bias is not None else np.zeros(weight.shape[0], np.float32)
        entry = None
        if chain is not None and weight.shape[2:] == (3, 3) and int(attrs.groups) == 1:
            entry = self._layer(weight, chain.index, name)
        return ConvLayer(entry.module if entry is not None else name, weight, bias.astype(np.float32), source,
                         tuple(int(v) for v in attrs.strides), tuple(int(v) for v in attrs.padding),
                         tuple(int(v) for v in attrs.dilation), int(attrs.groups),
                         chain.steps if chain is not None else (), entry)

    def _chain(self, conv: relax.VarBinding, index: int, claimed: set) -> tuple[_Chain, relax.Var]:
        """The longest epilogue of ``conv`` whose intermediate values nothing else reads."""
        tail, bias, steps, residual = conv.var, None, [], None
        match = self._step(tail, [("bias", BIAS, lambda m: ("bias",))], claimed)
        if match is not None:
            values = match[1][BIAS_VALUE].value.numpy()
            channels = _shape(conv.var)[1]
            if values.size == channels and values.shape in ((1, channels, 1, 1), (channels, 1, 1)):
                tail, bias = match[0], values.reshape(-1)
        for _ in range(MAX_STEPS):
            patterns = STEP_PATTERNS + ([] if residual is not None else RESIDUAL_STEPS)
            match = self._step(tail, patterns, claimed, head=conv.var)
            if match is None:
                break
            tail, found, step = match
            if step == ("residual",):
                residual = self._operand_var(found[RESIDUAL_OPERAND])
            steps.append(step)
        return _Chain(conv, index, bias, tuple(steps), residual), tail

    def _matmul_chain(self, matmul: relax.VarBinding, claimed: set) -> None:
        """A classifier layer: matmul (N, K) x (K, M) with its bias add and activations."""
        tail, bias, steps = matmul.var, None, []
        match = self._step(tail, [("bias", BIAS, lambda m: ("bias",))], claimed)
        outputs = _shape(matmul.var)[1]
        if match is not None:
            values = match[1][BIAS_VALUE].value.numpy()
            if values.size == outputs and values.shape in ((outputs,), (1, outputs)):
                tail, bias = match[0], values.reshape(-1)
        for _ in range(MAX_STEPS):
            match = self._step(tail, STEP_PATTERNS, claimed)
            if match is None:
                break
            tail, _, step = match
            steps.append(step)
        claimed.add(tail)
        self.matmuls[tail] = (matmul.value, bias, tuple(steps))

    def _operand_var(self, expr) -> relax.Expr:
        """The variable a matched operand was bound to (matches see through bindings)."""
        for b in self.bindings:
            if b.value.same_as(expr):
                return b.var
        return expr

    def _downstream(self, var, depth: int) -> list:
        found, frontier = [], [var]
        for _ in range(depth):
            frontier = [u for v in frontier for u in self.users.get(v, [])]
            found += frontier
        return sorted(set(found), key=lambda v: -self.position[v])

    def _step(self, tail, patterns, claimed: set, head=None):
        """(new tail, match, step) of the first pattern that matches a binding after ``tail``
        with ``tail`` as its input and only the chain reading the intermediate values."""
        if not isinstance(tail, relax.DataflowVar) or tail in claimed:
            return None
        tail_value = self.var2val[tail]
        for candidate in self._downstream(tail, 4):
            if candidate in claimed:
                continue
            for _, pattern, extract in patterns:
                found = pattern.extract_matched_expr(self.var2val[candidate], self.var2val)
                if found is None or not found[INPUT].same_as(tail_value):
                    continue
                step = extract(found)
                if step is None:
                    continue
                inner = self._inner_vars(tail, candidate, found)
                if inner is None:
                    continue
                if step == ("residual",):
                    operand = self._operand_var(found[RESIDUAL_OPERAND])
                    if head is not None and (operand.same_as(head) or operand in self._downstream(head, 64)):
                        continue  # the residual is computed from this conv's own output
                    if _shape(operand) != _shape(tail):
                        continue
                claimed.update(inner)
                claimed.add(tail)
                return candidate, found, step
        return None

    def _inner_vars(self, tail, final, found: dict) -> set | None:
        """The vars between ``tail`` and ``final`` that the match covers, when nothing outside
        the step reads them (else None)."""
        values = list(found.values())
        inner = {v for v in self._downstream(tail, 4) if self.position[v] < self.position[final]
                 and any(self.var2val[v].same_as(e) for e in values)}
        members = inner | {final}
        for v in inner | {tail}:
            if not isinstance(v, relax.DataflowVar) or any(u not in members for u in self.users.get(v, [])):
                return None
        return inner

    def _layer(self, weight: np.ndarray, index: int, name: str) -> LayerEntry | None:
        """The metadata layer of a 3x3 conv: the one named like it, else the first unmatched layer
        of its shape whose patterns the weight fits."""
        named = [e for e in self.unmatched if _identifier(name) in (_identifier(e.module), _identifier(e.initializer))
                 or name in (e.module, e.initializer)]
        if named:
            check_weight(named[0], weight, self.library, f"layer {named[0].module!r}")
        for entry in named or [e for e in self.unmatched if e.shape == list(weight.shape)]:
            try:
                check_weight(entry, weight, self.library, "")
            except MetadataError:
                continue
            self.unmatched.remove(entry)
            return entry
        self.rejected.append((index, name, weight))
        return None

    def unmatched_error(self) -> MetadataError:
        """For the first layer no conv matched: its first bad kernel in the first conv of its shape."""
        entry = self.unmatched[0]
        for index, name, weight in self.rejected:
            if list(weight.shape) == entry.shape:
                try:
                    check_weight(entry, weight, self.library, f"layer {entry.module!r} (conv {name!r})")
                except MetadataError as error:
                    return error
        return MetadataError(f"layer {entry.module!r}: no conv with a constant {entry.shape} weight in the model")

    # -- emission -------------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value, out = binding.value, None
        layout = self._layout_kind(value)
        if binding.var in self.chains:
            out = self._emit_conv(*self.chains[binding.var])
        elif binding.var in self.matmuls:
            out = self._emit_matmul(*self.matmuls[binding.var])
        elif self.kernels.blocked and _is_op(value, "relax.nn.max_pool2d"):
            out = self._emit_maxpool(value, _shape(binding.var))
        elif layout == "pack":  # packing what a kernel of ours unpacked: use its blocked output
            source = self.visit_expr(value.args[1].fields[0])
            if source in self.blocked and self.blocked[source][1] == _shape(binding.var)[-1]:
                out = self.blocked[source][0]
        if out is None:
            super().visit_var_binding_(binding)
            return
        if not isinstance(binding.var, relax.DataflowVar):  # the binding is a block output
            out = self.builder_.emit_output(out)
        self.set_var_remap(binding.var, out)

    def _layout_kind(self, value) -> str | None:
        """"pack" / "unpack" for a call of our layout kernels (see ``LAYOUT_ATTR``), else None."""
        if not _is_op(value, "relax.call_tir"):
            return None
        attrs = self.module[value.args[0]].attrs
        return str(attrs[LAYOUT_ATTR]) if attrs is not None and LAYOUT_ATTR in attrs else None

    def _emit_conv(self, chain: _Chain, layer: ConvLayer) -> relax.Var:
        x = self.visit_expr(chain.conv.value.args[0])
        channels = layer.source[1]
        lanes = self.layout.lanes
        if not self.kernels.blocked:
            in_lanes = 1
        elif layer.depthwise or channels >= lanes or (x in self.blocked and self.blocked[x][1] == lanes):
            in_lanes = lanes
        else:
            in_lanes = channels
        try:
            spec, packed, entry = plan_conv(layer, self.library, self.layout, in_lanes, self.measure, self.kernels)
        except ValueError as error:  # weights that break the layer's patterns
            raise MetadataError(f"layer {layer.name!r}: {error}") from None
        self.manifest.append(entry)
        args = [self._pack(x, in_lanes), *[relax.const(a) for a in packed]]
        if chain.residual is not None:
            args.append(self._pack(self.visit_expr(chain.residual), lanes))
        out = self._kernel(self.kernels.source(spec, "__NAME__"), "conv", args, self.kernels.output_shape(spec))
        entry.function = self.builder_.lookup_binding(out).args[0].name_hint
        if not self.kernels.blocked:
            return out
        batch, oc, (oh, ow) = layer.source[0], layer.weight.shape[0], spec.out_hw
        nchw = self._kernel(unpack_tvmscript(batch, oc, oh, ow, lanes, "__NAME__"), "unpack", [out], (batch, oc, oh, ow))
        self.blocked[nchw] = (out, lanes)
        return nchw

    def _emit_matmul(self, matmul: relax.Call, bias, steps: tuple) -> relax.Var:
        weight = matmul.args[1].value.numpy()
        x = self.visit_expr(matmul.args[0])
        (batch, inputs), outputs = _shape(x), weight.shape[1]
        bias = np.zeros(outputs, np.float32) if bias is None else bias.astype(np.float32)
        source = matmul_tvmscript(batch, inputs, outputs, steps, self.layout.lanes, "__NAME__")
        return self._kernel(source, "matmul", [x, relax.const(np.ascontiguousarray(weight.T, np.float32)),
                                              relax.const(bias)], (batch, outputs))

    def _emit_maxpool(self, pool: relax.Call, out_shape: tuple[int, ...]) -> relax.Var | None:
        """A max pool between our kernels runs on their blocked output (else it stays TVM's)."""
        x = self.visit_expr(pool.args[0])
        attrs = pool.attrs
        if x not in self.blocked or attrs.layout != "NCHW" or attrs.out_layout != "NCHW" or x.ty.dtype != "float32":
            return None
        blocked, lanes = self.blocked[x]
        batch, blocks, height, width, _ = _shape(blocked)
        source = maxpool_tvmscript(batch, blocks, height, width, lanes, out_shape[2:],
                                   tuple(int(v) for v in attrs.pool_size), tuple(int(v) for v in attrs.strides),
                                   tuple(int(v) for v in attrs.padding), tuple(int(v) for v in attrs.dilation), "__NAME__")
        pooled = self._kernel(source, "maxpool", [blocked], (batch, blocks, *out_shape[2:], lanes))
        nchw = self._kernel(unpack_tvmscript(batch, out_shape[1], *out_shape[2:], lanes, "__NAME__"), "unpack",
                            [pooled], out_shape)
        self.blocked[nchw] = (pooled, lanes)
        return nchw

    def _pack(self, x: relax.Expr, lanes: int) -> relax.Expr:
        """``x`` (N, C, H, W) in NCHW[lanes]c for a CPU kernel (NCHW kernels take it as it is)."""
        if not self.kernels.blocked:
            return x
        if x in self.blocked and self.blocked[x][1] == lanes:
            return self.blocked[x][0]
        batch, channels, height, width = _shape(x)
        return self._kernel(pack_tvmscript(batch, channels, height, width, lanes, "__NAME__"), "pack", [x],
                            (batch, -(-channels // lanes), height, width, lanes))

    def _kernel(self, source: str, prefix: str, args: list, shape: tuple[int, ...]) -> relax.Var:
        while f"{prefix}{self.count}" in self.names:
            self.count += 1
        name = f"{prefix}{self.count}"
        self.names.add(name)
        func = tvm.script.from_source(source.replace("__NAME__", name)).with_attr(GENERATED_ATTR, prefix)
        gv = self.builder_.add_func(func, name)
        return self.builder_.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))
