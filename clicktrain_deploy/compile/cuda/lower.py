"""The GPU conv kernels behind the shared Relax rewrite (``compile.passes.rewrite_convs``).

The same layer matching and per-layer choice as on CPUs (by multiply-adds saved: nothing is timed
on the host), with the batch in every shape and no pack/unpack: the GPU kernels (``kernels.py``)
read and write NCHW, so each input channel's rows are contiguous and the shared-memory loads are
coalesced. Convs the GPU kernel does not cover (``cuda_covers``) stay relax.nn.conv2d, for TVM's
legalisation and dlight's GPU rules, like every other op.
"""
from __future__ import annotations

import numpy as np

from ..conv_kernels import compact_weights
from ..plan import ConvKernels, ConvLayer, _spec
from ..targets import Layout
from .kernels import CudaConvSpec, conv_cuda_tvmscript, cuda_covers, cuda_schedule, entry_channels


class CudaConvKernels(ConvKernels):
    """The GPU conv kernels on NCHW activations (at the batch of the conv's input); ``emulate``:
    serial thread loops, for building and checking on a CPU (``toolchain.build_emulated``)."""

    device = "cuda"
    blocked = False

    def __init__(self, emulate: bool = False):
        self.emulate = emulate

    def covers(self, layer: ConvLayer) -> str | None:
        return cuda_covers({"kernel": tuple(layer.weight.shape[2:]), "stride": layer.stride,
                            "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups})

    def candidate(self, kernel, groups, assign, weight, layer: ConvLayer, in_lanes: int, layout: Layout):
        """Spec with its GPU schedule, and compact weights [ptr, chan (entry -> input channel), wv]."""
        base = _spec(layer, groups, 0, 1, layout.lanes, (1, 1))
        ptr, _, wv = compact_weights(weight, assign, base)
        per_block = np.diff(ptr[:: len(groups)]).max(initial=0)
        rows = (layout.pattern_tiles[0] if kernel == "pattern" else layout.dense_tiles[0])[1]
        schedule = cuda_schedule(*base.out_hw, layer.stride, rows, int(per_block), tuple(layer.weight.shape[2:]),
                                 layer.dilation)
        fields = {k: getattr(base, k) for k in base.__dataclass_fields__ if k not in ("entries", "tile")}
        spec = CudaConvSpec(**{**fields, "entries": int(ptr[-1]), **schedule})
        return kernel, spec, [ptr, entry_channels(assign, len(groups)), wv]

    def source(self, spec: CudaConvSpec, name: str) -> str:
        return conv_cuda_tvmscript(spec, name, self.emulate)

    def input_shape(self, spec) -> tuple[int, ...]:
        return spec.batch, spec.in_channels, spec.height, spec.width

    def output_shape(self, spec: CudaConvSpec) -> tuple[int, ...]:
        return spec.batch, spec.out_channels, *spec.out_hw
