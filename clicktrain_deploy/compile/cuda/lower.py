"""ONNX -> Relax for CUDA targets: the CPU lowering's two steps (``compile.lower``: the graph as
Relax with plain ``relax.nn.conv2d`` chains, then ``rewrite_pattern_convs`` choosing and fusing
each conv's kernel), with GPU kernels (``kernels.py``) on NCHW activations and a batch fixed at
compile time.

Differences from the CPU build: activations stay NCHW (no packing: each input channel's rows are
contiguous, so the conv's shared-memory loads are coalesced), L is the conv's output-channel block
(16 for B=16 models), and kernel choice is by multiply-adds saved (no host timing).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import tvm
from tvm import relax

from ...export.metadata import PatternMetadata
from ..conv_kernels import compact_weights
from ..lower import CompileError, ConvKernels, LayerKernel, _attr, _Lowering, _Value
from ..targets import Layout, TargetSpec
from .kernels import (
    CudaConvSpec, avgpool_cuda_tvmscript, conv_cuda_tvmscript, cuda_schedule, dense_cuda_tvmscript,
    entry_channels, maxpool_cuda_tvmscript,
)


class CudaConvKernels(ConvKernels):
    """The GPU conv kernels for ``batch`` images on NCHW activations; ``emulate``: serial thread
    loops, for building and checking on a CPU (``toolchain.build_emulated``)."""

    device = "cuda"
    blocked = False

    def __init__(self, batch: int, emulate: bool = False):
        self.batch, self.emulate = batch, emulate

    def candidate(self, kernel, groups, assign, weight, base, out_hw, layout):
        """Spec with its GPU schedule, and compact weights [ptr, chan (entry -> input channel), wv]."""
        spec = CudaConvSpec(groups=groups, entries=0, batch=self.batch, **base)
        ptr, _, wv = compact_weights(weight, assign, spec)
        per_block = np.diff(ptr[:: len(groups)]).max(initial=0)
        rows = (layout.pattern_tile if len(groups[0]) == 4 else layout.dense_tiles[0])[1]
        schedule = cuda_schedule(*out_hw, spec.stride, rows, int(per_block))
        spec = CudaConvSpec(groups=groups, entries=int(ptr[-1]), batch=self.batch, **schedule, **base)
        return kernel, spec, [ptr, entry_channels(assign, len(groups)), wv]

    def source(self, spec: CudaConvSpec, name: str) -> str:
        return conv_cuda_tvmscript(spec, name, self.emulate)

    def output_shape(self, spec: CudaConvSpec) -> tuple[int, ...]:
        return self.batch, spec.out_channels, *spec.out_hw


class _CudaLowering(_Lowering):
    """The pools and the classifier as GPU kernels on NCHW; convs as in ``_Lowering`` (plain
    Relax, rewritten into ``CudaConvKernels``). Image values stay NCHW (lanes 0)."""

    def __init__(self, model: onnx.ModelProto, metadata: PatternMetadata | None, target: TargetSpec,
                 batch: int, emulate: bool):
        super().__init__(model, metadata, target)
        self.batch, self.emulate = batch, emulate

    def conv_kernels(self) -> CudaConvKernels:
        return CudaConvKernels(self.batch, self.emulate)

    def _avgpool(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        src = avgpool_cuda_tvmscript(self.batch, x.channels, x.height, x.width, "__NAME__", self.emulate)
        self.manifest.append(LayerKernel(node.name, node.op_type, "avgpool", [x.channels, x.height, x.width], "generated"))
        return _Value(self._call(src, "avgpool", [x.expr], (self.batch, x.channels)), x.channels, blocked=False)

    def _maxpool(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        if _attr(node, "kernel_shape", None) != [2, 2] or _attr(node, "strides", None) != [2, 2]:
            raise CompileError(f"MaxPool {node.name!r}: only 2x2 stride 2 is supported")
        oh, ow = math.ceil(x.height / 2), math.ceil(x.width / 2)
        src = maxpool_cuda_tvmscript(self.batch, x.channels, x.height, x.width, "__NAME__", self.emulate)
        self.manifest.append(LayerKernel(node.name, "MaxPool", "maxpool", [x.channels, x.height, x.width], "generated"))
        return _Value(self._call(src, "maxpool", [x.expr], (self.batch, x.channels, oh, ow)), x.channels,
                      oh, ow, lanes=0)

    def _flatten(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        if x.blocked and (x.height, x.width) != (1, 1):
            raise CompileError(f"{node.op_type} {node.name!r}: only flattening a 1x1 map is supported")
        if x.blocked:
            expr = self.builder.emit(relax.op.reshape(x.expr, (self.batch, x.channels)))
            return _Value(expr, x.channels, blocked=False)
        return x

    def _dense(self, node, relu, residual) -> _Value:
        x = self.value(node.input[0])
        weight = self.consts.get(node.input[1])
        bias = self.consts.get(node.input[2]) if len(node.input) > 2 else None
        if weight is None or x.blocked or _attr(node, "transB", 0) != 1 or _attr(node, "transA", 0) != 0:
            raise CompileError(f"Gemm {node.name!r}: needs a constant transposed weight after a pool")
        outputs, inputs = weight.shape
        b = np.zeros(outputs, np.float32) if bias is None else bias.astype(np.float32)
        src = dense_cuda_tvmscript(self.batch, inputs, outputs, relu, "__NAME__", self.emulate)
        self.manifest.append(LayerKernel(node.name, "Gemm", "dense", [outputs, inputs], "generated"))
        return _Value(self._call(src, "dense", [x.expr, weight.astype(np.float32), b], (self.batch, outputs)),
                      outputs, blocked=False)


def lower_onnx_cuda(model: onnx.ModelProto, metadata: PatternMetadata | None, target: TargetSpec,
                    batch: int = 1, emulate: bool = False) -> tuple[tvm.IRModule, list[LayerKernel], Layout]:
    """Lower a verified ONNX model to a Relax module of GPU kernels for ``batch`` images.

    Returns the module, the per-layer manifest entries (convs first, as on CPUs) and the layout (L)
    it chose. ``emulate`` emits every GPU kernel with serial thread loops, for building and
    checking on a CPU.
    """
    if batch < 1:
        raise CompileError(f"batch {batch}: must be at least 1")
    return _CudaLowering(model, metadata, target, batch, emulate).lower()
