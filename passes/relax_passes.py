"""Relax passes for modules whose ops are all generated, scheduled kernels (``call_tir``).

``deploy_pipeline`` is TVM 0.27's default build pipeline without ``RewriteDataflowReshape``: that
pass inspects every called PrimFunc for a reshape pattern and requires a root block, which our
hand-scheduled kernels (plain loops, ``tirx.is_scheduled``) do not have; none of them is a reshape.
For GPU targets, ops that Relax legalises itself (a flatten's reshape) get dlight's fallback GPU
schedule; our kernels, marked scheduled, are left as they are.
"""
from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.relax import backend, transform

from clicktrain_deploy.compile.lower import CompileError, ConvKernels, LayerKernel, plan_conv
from clicktrain_deploy.compile.ops import LAYOUT_ATTR, pack_tvmscript, unpack_tvmscript
from clicktrain_deploy.compile.targets import Layout, TargetSpec
from clicktrain_deploy.export.metadata import MetadataError, PatternMetadata
from clicktrain_deploy.passes.onnx_passes import check_weight


def deploy_pipeline(gpu: bool = False) -> tvm.transform.Pass:
    """Lower a Relax module of ``call_tir`` kernels to VM code, planning memory statically.

    ``gpu``: schedule legalised ops with thread bindings (needs the target in scope).
    """
    from tvm.s_tir import dlight

    return tvm.transform.Sequential([
        backend.DispatchSampling(),
        backend.DispatchSortScan(),
        transform.LegalizeOps(),
        *([dlight.ApplyDefaultSchedule(dlight.gpu.Fallback())] if gpu else []),
        transform.ToNonDataflow(),
        transform.RemovePurityChecking(),
        transform.CallTIRRewrite(),
        transform.StaticPlanBlockMemory(),
        transform.LowerAllocTensor(),
        transform.KillAfterLastUse(),
        transform.LowerRuntimeBuiltin(),
        transform.ComputePrimValue(),
        transform.VMShapeLower(),
        transform.AttachGlobalSymbol(),
    ], name="clicktrain_deploy_pipeline")


def rewrite_pattern_convs(module: tvm.IRModule, metadata: PatternMetadata | None, target: TargetSpec,
                          measure=None, kernels: ConvKernels | None = None) -> tuple[tvm.IRModule, list[LayerKernel]]:
    """Every ``relax.nn.conv2d`` with a constant weight becomes a call of our generated kernel.

    ``kernels``: the target's conv kernels (default: the CPU ones; CUDA targets pass
    ``compile.cuda.lower.CudaConvKernels``). Works on any Relax module (TVM's ONNX frontend,
    hand-built) whose convs are NCHW/OIHW at the kernels' batch (1 on CPUs), 3x3 pad 1 or 1x1 pad
    0, stride 1 or 2, group 1. A conv whose weight has the shape of a metadata layer and conforms
    to its patterns is that layer (layers are taken in order; a weight that contradicts every
    candidate stops the build naming the layer). Per conv the kernel is
    chosen as in the ONNX lowering (pattern / connectivity / dense, ``plan_conv``); a following
    bias add, residual add and ReLU, when only the conv's chain uses them, run in the kernel's
    epilogue. The CPU kernels read and write NCHW[L]c: a pack before and an unpack after each, and
    an unpack that feeds a pack of the same layout is skipped, so consecutive convs stay blocked
    (dead unpacks are removed by ``DeadCodeElimination``); NCHW kernels (CUDA) need neither.
    Returns the module and the manifest entries. Unsupported convs raise ``CompileError``,
    contradicting weights ``MetadataError``.
    """
    kernels = kernels or ConvKernels()
    if kernels.device != target.device:
        raise CompileError(f"{target.name}: a {target.device} target given {kernels.device} conv kernels")
    layout = target.layout_for([e.mask.block_size for e in metadata.layers] if metadata else [])
    rewriter = _ConvRewriter(module, metadata, layout, measure, kernels)
    functions = [(gvar, func) for gvar, func in module.functions_items() if isinstance(func, relax.Function)]
    for _, func in functions:  # in Python, before any FFI callback, so errors keep their type
        rewriter.analyse(func)
    if rewriter.unmatched:
        raise rewriter.unmatched_error()
    for gvar, func in functions:
        rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return transform.DeadCodeElimination()(rewriter.builder_.get()), rewriter.manifest


def pattern_conv_rewrite(metadata: PatternMetadata | None, target: TargetSpec, measure=None,
                         kernels: ConvKernels | None = None) -> tvm.transform.Pass:
    """``rewrite_pattern_convs`` as a module pass for pipelines; ``.manifest`` holds the layers
    after it ran (inside a pass, errors reach the caller as TVM errors with the same message)."""

    @tvm.transform.module_pass(opt_level=0, name="PatternConvRewrite")
    class PatternConvRewrite:
        def __init__(self):
            self.manifest: list[LayerKernel] = []

        def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
            mod, self.manifest = rewrite_pattern_convs(mod, metadata, target, measure, kernels)
            return mod

    return PatternConvRewrite()


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _identifier(name: str) -> str:
    """A layer name as a Relax variable name (the BlockBuilder replaces dots and the like)."""
    return re.sub(r"\W", "_", name)


def _layer_name(var: relax.Var, index: int) -> str:
    """The binding's name, unless the builder made it up (lv, lv1, ...): then conv2d_<index>."""
    return f"conv2d_{index}" if re.fullmatch(r"(lv|gv)\d*", var.name) else var.name


@relax.expr_functor.mutator
class _ConvRewriter(relax.PyExprMutator):
    """Finds conv -> [bias add] -> [residual add] -> [ReLU] chains and emits one kernel per chain."""

    def __init__(self, mod: tvm.IRModule, metadata, layout: Layout, measure, kernels: ConvKernels):
        super().__init__(mod)
        self.module, self.metadata, self.layout, self.measure = mod, metadata, layout, measure
        self.kernels = kernels
        self.rejected: list = []   # (conv index, weight) of 3x3 convs that matched no layer
        self.library = metadata.library.numpy() if metadata else None
        self.unmatched = list(metadata.layers) if metadata else []
        self.manifest: list[LayerKernel] = []
        self.chains: dict = {}     # tail var -> (conv call, its index, bias | None, residual | None, relu)
        self.inner: set = set()    # vars folded into a chain
        self.blocked: dict = {}    # NCHW var -> (blocked var, lanes) it was unpacked from
        self.count, self.names = 0, {gv.name_hint for gv in mod.get_global_vars()}

    def analyse(self, func: relax.Function) -> None:
        """Find the chains of ``func``, check their convs and match them to metadata layers."""
        bindings = [b for block in func.body.blocks for b in block.bindings]
        users: dict = {}
        for b in bindings:
            for v in relax.analysis.free_vars(b.value):
                users.setdefault(v, []).append(b)
        convs = [b for b in bindings if _is_op(b.value, "relax.nn.conv2d")
                 and isinstance(b.value.args[1], tvm.ir.Constant)]
        for index, b in enumerate(convs):
            self._find_chain(b, users, index)

    def _find_chain(self, conv: relax.VarBinding, users: dict, index: int) -> None:
        tail, bias, residual, relu = conv.var, None, None, False

        def sole_user(var):  # the one binding using var, unless another chain folded it already
            found = users.get(var, [])
            if len(found) == 1 and isinstance(var, relax.DataflowVar) and found[0].var not in self.inner \
                    and found[0].var not in self.chains:
                return found[0]
            return None

        channels = _shape(conv.var)[1]
        user = sole_user(tail)
        if user is not None and _is_op(user.value, "relax.add"):
            other = [a for a in user.value.args if not a.same_as(tail)]
            if len(other) == 1 and isinstance(other[0], tvm.ir.Constant) \
                    and tuple(other[0].value.shape) in ((1, channels, 1, 1), (channels, 1, 1)):
                bias, tail = other[0].value.numpy().reshape(-1), user.var
                user = sole_user(tail)
        if user is not None and _is_op(user.value, "relax.add"):
            other = [a for a in user.value.args if not a.same_as(tail)]
            if len(other) == 1 and not isinstance(other[0], tvm.ir.Constant) \
                    and _shape(other[0]) == _shape(tail):
                residual, tail = other[0], user.var
                user = sole_user(tail)
        if user is not None and _is_op(user.value, "relax.nn.relu"):
            relu, tail = True, user.var
        self.inner.update(v for v in self._chain_vars(conv.var, tail, users) if not v.same_as(tail))
        self.chains[tail] = (conv.value, self._check(conv, index), _layer_name(conv.var, index), bias,
                             residual, relu)

    @staticmethod
    def _chain_vars(head, tail, users) -> list:
        chain, var = [head], head
        while not var.same_as(tail):
            var = users[var][0].var
            chain.append(var)
        return chain

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.inner:
            return
        value, out = binding.value, None
        layout = self._layout_kind(value)
        if binding.var in self.chains:
            out = self._emit_conv(*self.chains[binding.var])
        elif layout == "pack":  # packing what a kernel of ours unpacked: use its blocked output
            source = self.visit_expr(value.args[1].fields[0])
            if source in self.blocked and self.blocked[source][1] == _shape(binding.var)[-1]:
                out = self.blocked[source][0]
        elif layout == "unpack":
            out = self.builder_.emit(self.visit_expr(value))
            self.blocked[out] = (self.visit_expr(value.args[1].fields[0]), _shape(value.args[1].fields[0])[-1])
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

    def _layer(self, weight: np.ndarray, index: int, name: str):
        """The metadata layer of a conv: the one named like its binding (the ONNX lowering names
        them), else the first unmatched layer of its shape whose patterns the weight fits."""
        named = [e for e in self.unmatched if name in (_identifier(e.module), _identifier(e.initializer))]
        if named:
            check_weight(named[0], weight, self.metadata, f"layer {named[0].module!r}")
        for entry in named or [e for e in self.unmatched if e.shape == list(weight.shape)]:
            try:
                check_weight(entry, weight, self.metadata, "")
            except MetadataError:
                continue
            self.unmatched.remove(entry)
            return entry
        self.rejected.append((index, weight))
        return None

    def unmatched_error(self) -> MetadataError:
        """For the first layer no conv matched: its first bad kernel in the first conv of its shape."""
        entry = self.unmatched[0]
        for index, weight in self.rejected:
            if list(weight.shape) == entry.shape:
                try:
                    check_weight(entry, weight, self.metadata, f"layer {entry.module!r} (conv2d #{index})")
                except MetadataError as error:
                    return error
        return MetadataError(f"layer {entry.module!r}: no relax.nn.conv2d with a constant {entry.shape} weight")

    def _check(self, conv: relax.VarBinding, index: int):
        """Refuse what the generator cannot run; return the conv's metadata layer (None: dense)."""
        attrs, weight = conv.value.attrs, conv.value.args[1].value.numpy()
        kh, kw = weight.shape[2:]
        strides, padding = [int(v) for v in attrs.strides], [int(v) for v in attrs.padding]
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW" \
                or conv.value.args[0].ty.dtype != "float32" or weight.dtype != np.float32 or int(attrs.groups) != 1 \
                or [int(v) for v in attrs.dilation] != [1, 1] or strides[0] != strides[1] \
                or strides[0] not in (1, 2) or _shape(conv.value.args[0])[0] != self.kernels.batch \
                or not ((kh, kw) == (3, 3) and padding == [1] * 4 or (kh, kw) == (1, 1) and padding == [0] * 4):
            raise CompileError(f"conv2d #{index} ({list(weight.shape)}, strides {strides}, padding {padding}, "
                               f"groups {int(attrs.groups)}): not supported (float32 NCHW batch "
                               f"{self.kernels.batch}, 3x3 pad 1 or 1x1 pad 0, stride 1 or 2, group 1)")
        return self._layer(weight, index, conv.var.name) if kh == 3 else None

    def _emit_conv(self, conv: relax.Call, layer, name: str, bias, residual, relu: bool) -> relax.Var:
        weight = conv.args[1].value.numpy()
        oc, stride = weight.shape[0], int(conv.attrs.strides[0])
        x = self.visit_expr(conv.args[0])
        _, channels, height, width = _shape(x)
        in_lanes = min(channels, self.layout.lanes) if self.kernels.blocked else 1
        name = layer.module if layer else name
        spec, packed, entry = plan_conv(name, weight, np.zeros(oc, np.float32) if bias is None else bias, layer,
                                        self.library, self.layout, (height, width, in_lanes), stride, relu,
                                        residual is not None, self.measure, self.kernels)
        self.manifest.append(entry)
        args = [self._pack(x, in_lanes), *[relax.const(a) for a in packed]]
        if residual is not None:
            args.append(self._pack(self.visit_expr(residual), spec.lanes))
        out = self._kernel(self.kernels.source(spec, "__NAME__"), "conv", args, self.kernels.output_shape(spec))
        entry.function = self.builder_.lookup_binding(out).args[0].name_hint
        if not self.kernels.blocked:
            return out
        oh, ow = spec.out_hw
        nchw = self._kernel(unpack_tvmscript(oc, oh, ow, spec.lanes, "__NAME__"), "unpack", [out], (1, oc, oh, ow))
        self.blocked[nchw] = (out, spec.lanes)
        return nchw

    def _pack(self, x: relax.Expr, lanes: int) -> relax.Expr:
        """``x`` (1, C, H, W) in NCHW[lanes]c for a CPU kernel (NCHW kernels take it as it is)."""
        if not self.kernels.blocked:
            return x
        if x in self.blocked and self.blocked[x][1] == lanes:
            return self.blocked[x][0]
        _, channels, height, width = _shape(x)
        return self._kernel(pack_tvmscript(channels, height, width, lanes, "__NAME__"), "pack", [x],
                            (-(-channels // lanes), height, width, lanes))

    def _kernel(self, source: str, prefix: str, args: list, shape: tuple[int, ...]) -> relax.Var:
        while f"{prefix}{self.count}" in self.names:
            self.count += 1
        name = f"{prefix}{self.count}"
        self.names.add(name)
        gv = self.builder_.add_func(tvm.script.from_source(source.replace("__NAME__", name)), name)
        return self.builder_.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))
