"""Per-conv kernel choice: which generated kernel a conv gets, its packed constants, and why.

``ConvLayer`` is what the Relax rewrite knows of one conv (weight, attributes, input, fused
epilogue, metadata layer); ``plan_conv`` builds its candidate kernels with the target's
``ConvKernels`` and picks one: pattern-sparse (the metadata's block-shared patterns),
connectivity-only (per-kernel patterns, B < L: all taps of kept kernel blocks), dense (every other
conv: any kernel size, stride, padding, dilation; grouped convs as their block-diagonal weight,
whose all-zero kernel blocks are skipped exactly), or depthwise. Sparse goes in when it saves at
least ``MEASURE_BELOW`` of the multiply-adds, dense below ``DENSE_BELOW``; in between both are
timed on the host (``HostTimer``), or, for targets that cannot run here, sparse from
``SPARSE_FROM``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tvm

from ..contract import LayerEntry
from .conv_kernels import (
    ConvSpec, DepthwiseSpec, all_taps, choose_tile, compact_weights, connectivity_assignment, conv_tvmscript,
    depthwise_tvmscript, depthwise_weights, library_taps, pattern_assignment,
)
from .targets import Layout, TargetSpec

DENSE_BELOW, MEASURE_BELOW, SPARSE_FROM = 1.1, 3.0, 1.25


@dataclass
class LayerKernel:
    """Manifest entry of one conv: the kernel it got and why."""

    layer: str
    op: str
    kernel: str
    shape: list[int]
    reason: str
    kept_fraction: float = 1.0
    estimated_speedup: float = 1.0
    measured_us: dict | None = None
    function: str | None = None  # the kernel's PrimFunc in the library (set by the rewrite)
    attributes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConvLayer:
    """One conv as the rewrite found it.

    weight (OC, IC / groups, KH, KW) float32; bias (OC,); source (N, C, H, W) of the input;
    padding (top, left, bottom, right); epilogue: the fused steps (see ``conv_kernels``).
    """

    name: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray = field(repr=False)
    source: tuple[int, int, int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    epilogue: tuple = ()
    entry: LayerEntry | None = None

    @property
    def depthwise(self) -> bool:
        channels = self.source[1]
        return self.groups > 1 and self.groups == channels == self.weight.shape[0] and self.weight.shape[1] == 1

    def full_weight(self) -> tuple[np.ndarray, np.ndarray]:
        """The weight as (OC, IC, KH, KW), a grouped conv's block-diagonal expansion, and which
        (output, input channel) pairs its groups connect, bool (OC, IC)."""
        oc, per_group, kh, kw = self.weight.shape
        if self.groups == 1:
            return self.weight, np.ones((oc, per_group), bool)
        full = np.zeros((oc, per_group * self.groups, kh, kw), np.float32)
        connected = np.zeros((oc, per_group * self.groups), bool)
        out_per_group = oc // self.groups
        for g in range(self.groups):
            rows, cols = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * per_group, (g + 1) * per_group)
            full[rows, cols] = self.weight[rows]
            connected[rows, cols] = True
        return full, connected

    def attributes(self) -> dict:
        return {"kernel": list(self.weight.shape[2:]), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "epilogue": [list(s) for s in self.epilogue]}


class ConvKernels:
    """A target's conv kernels. This one: the CPU kernels of ``conv_kernels`` on NCHW[L]c
    activations, at the batch of the conv's input (the rewrite packs before and unpacks after;
    pairs between our kernels vanish). Covers every float32 2-D conv."""

    device = "cpu"
    blocked = True  # activations in NCHW[L]c (False: the kernels read and write NCHW)

    def covers(self, layer: ConvLayer) -> str | None:
        """None when these kernels can run ``layer``, else why not (it stays TVM's)."""
        return None

    def candidate(self, kernel: str, groups, assign: np.ndarray, weight: np.ndarray, layer: ConvLayer,
                  in_lanes: int, layout: Layout) -> tuple[str, ConvSpec, list[np.ndarray]]:
        """One candidate: its spec and compact weights [ptr, coff, wv]."""
        spec = _spec(layer, groups, 0, in_lanes, layout.lanes, (4, 4))
        full_dense = len(groups) == 1 and bool((assign >= 0).all()) and layout.full_dense_tiles
        out_tile = layout.full_dense_out_tile if full_dense else 1
        tiles = layout.full_dense_tiles if full_dense else layout.dense_tiles
        tile = choose_tile(*spec.out_hw, layout.pattern_tiles if kernel == "pattern" else tiles)
        spec = _spec(layer, groups, 0, in_lanes, layout.lanes, tile)
        ptr, coff, wv = compact_weights(weight, assign, spec)
        return kernel, _spec(layer, groups, int(ptr[-1]), in_lanes, layout.lanes, tile, out_tile), [ptr, coff, wv]

    def depthwise(self, layer: ConvLayer, layout: Layout) -> tuple[str, DepthwiseSpec, list[np.ndarray]]:
        """The depthwise kernel of a channel-multiplier-1 grouped conv: spec and [w (CB, KH*KW, L)]."""
        spec = DepthwiseSpec(channels=layer.source[1], height=layer.source[2], width=layer.source[3],
                             lanes=layout.lanes, kernel=tuple(layer.weight.shape[2:]), stride=layer.stride,
                             padding=layer.padding, dilation=layer.dilation, batch=layer.source[0],
                             epilogue=layer.epilogue)
        return "depthwise", spec, [depthwise_weights(layer.weight, layout.lanes)]

    def source(self, spec, name: str) -> str:
        """TVMScript of the chosen kernel: (X, *constants, bias, R?) -> Y."""
        return depthwise_tvmscript(spec, name) if isinstance(spec, DepthwiseSpec) else conv_tvmscript(spec, name)

    def input_shape(self, spec) -> tuple[int, ...]:
        if isinstance(spec, DepthwiseSpec):
            return spec.batch, math.ceil(spec.channels / spec.lanes), spec.height, spec.width, spec.lanes
        return spec.batch, spec.in_blocks, spec.height, spec.width, spec.in_lanes

    def output_shape(self, spec) -> tuple[int, ...]:
        oh, ow = spec.out_hw
        blocks = math.ceil(spec.channels / spec.lanes) if isinstance(spec, DepthwiseSpec) else spec.out_blocks
        return spec.batch, blocks, oh, ow, spec.lanes


def _spec(layer: ConvLayer, groups, entries: int, in_lanes: int, lanes: int, tile, out_tile: int = 1) -> ConvSpec:
    batch, channels, height, width = layer.source
    return ConvSpec(in_channels=channels, out_channels=layer.weight.shape[0], height=height, width=width,
                    in_lanes=in_lanes, lanes=lanes, groups=groups, entries=entries,
                    kernel=tuple(layer.weight.shape[2:]), stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, batch=batch, epilogue=layer.epilogue, tile=tile, out_tile=out_tile)


def plan_conv(layer: ConvLayer, library: np.ndarray | None, layout: Layout, in_lanes: int,
              measure: HostTimer | None = None, kernels: ConvKernels | None = None
              ) -> tuple[object, list[np.ndarray], LayerKernel]:
    """Choose and pack the kernel of one conv; ``in_lanes``: Li of its NCHW[Li]c input (1: NCHW).

    Returns the kernel's spec, its constant arguments [*packed weights, bias (blocks, L)] and the
    manifest entry. Weights that break the layer's patterns raise ValueError (compact_weights).
    """
    kernels = kernels or ConvKernels()
    lanes = layout.lanes
    shape = list(layer.weight.shape)
    if layer.depthwise and kernels.blocked:
        kernel, spec, packed = kernels.depthwise(layer, layout)
        entry = LayerKernel(layer.name, "conv", kernel, shape, "depthwise conv", attributes=layer.attributes())
    else:
        built = [kernels.candidate(kernel, groups, assign, weight, layer, in_lanes, layout)
                 for kernel, groups, assign, weight in _candidates(layer, library, lanes)]
        kernel, spec, packed, entry = _choose(layer, shape, built, measure, kernels)
    blocks = math.ceil(layer.weight.shape[0] / lanes)
    bias = np.zeros(blocks * lanes, np.float32)
    bias[: layer.weight.shape[0]] = layer.bias
    return spec, [*packed, bias.reshape(blocks, lanes)], entry


def _candidates(layer: ConvLayer, library: np.ndarray | None, lanes: int) -> list:
    """(kernel, tap groups, assignment (OCB, IC), weight (OC, IC, KH, KW)) of each candidate."""
    weight, connected = layer.full_weight()
    oc, ic, kh, kw = weight.shape
    blocks = math.ceil(oc / lanes)
    padded = np.zeros((blocks * lanes, ic), bool)
    padded[:oc] = connected
    # a grouped conv's blocks skip the input channels their groups do not read; nothing else is
    # skipped, so "dense" is the dense work (the baseline that pattern kernels are measured against)
    dense = ("dense", (all_taps(kh, kw),), np.where(padded.reshape(blocks, lanes, ic).any(1), 0, -1), weight)
    if layer.entry is None:
        return [dense]
    ids = layer.entry.mask.pattern_ids
    if layer.entry.mask.block_size % lanes == 0 or oc <= layer.entry.mask.block_size:
        sparse = ("pattern", library_taps(library), pattern_assignment(ids, layer.entry.mask.block_size, oc, lanes),
                  weight)
    else:
        kept = layer.entry.mask.kernel_pattern_ids() >= 0
        sparse = ("connectivity", (all_taps(3, 3),), connectivity_assignment(kept, lanes), weight)
    return [sparse, dense]


def _choose(layer: ConvLayer, shape: list[int], built: list, measure: HostTimer | None, kernels) -> tuple:
    timed = measure(built, kernels) if measure is not None and measure.every_layer else None
    attributes = layer.attributes()
    if len(built) == 1:
        kernel, spec, packed = built[0]
        dense_entries = math.ceil(shape[0] / spec.lanes) * spec.in_channels
        kept = spec.entries / max(dense_entries, 1)
        reason = "no pattern metadata" + (f" (groups {layer.groups}: {kept:.0%} of kernel blocks connected)"
                                          if layer.groups > 1 else "")
        return kernel, spec, packed, LayerKernel(layer.name, "conv", kernel, shape, reason, kept,
                                                 measured_us=timed, attributes=attributes)
    (sparse_kernel, sparse_spec, _), dense = built[0], built[1]
    work = {kernel: spec.entries * len(spec.groups[0]) for kernel, spec, _ in built}
    kept = sparse_spec.entries / max(dense[1].entries, 1)
    estimate = work["dense"] / max(work[sparse_kernel], 1)
    if measure is not None and MEASURE_BELOW > estimate >= DENSE_BELOW:
        times = timed or measure(built, kernels)
        faster = times[sparse_kernel] < times["dense"]
        reason = f"measured {times[sparse_kernel]:.1f} us {sparse_kernel} vs {times['dense']:.1f} us dense"
        entry = LayerKernel(layer.name, "conv", sparse_kernel if faster else "dense", shape, reason,
                            kept, estimate, times, attributes=attributes)
    else:
        threshold = SPARSE_FROM if measure is None else MEASURE_BELOW
        faster = estimate >= threshold
        entry = LayerKernel(layer.name, "conv", sparse_kernel if faster else "dense", shape,
                            f"{estimate:.2f}x fewer multiply-adds than dense "
                            f"({'>=' if faster else '<'} {threshold}x)", kept, estimate, timed,
                            attributes=attributes)
    chosen = built[0] if faster else built[1]
    return (*chosen, entry)


@dataclass
class HostTimer:
    """Times a conv's candidate kernels on this machine: {kernel: microseconds per call}.

    ``every_layer`` (benchmarks) times every conv, recording the times in the manifest without
    changing which kernel is chosen; otherwise only layers whose choice is ambiguous are timed.
    """

    target: TargetSpec
    repeats: int = 20
    every_layer: bool = False

    def __call__(self, candidates: list, kernels: ConvKernels) -> dict[str, float]:
        times = {}
        for kernel, spec, packed in candidates:
            func = tvm.script.from_source(kernels.source(spec, "candidate"))
            fn = tvm.compile(func, target=tvm.target.Target(self.target.tvm_target)).jit()["candidate"]
            out = np.zeros(kernels.output_shape(spec), np.float32)
            bias = np.zeros((out.shape[1], out.shape[-1]), np.float32)
            args = [np.zeros(kernels.input_shape(spec), np.float32), *packed, bias]
            if spec.residual:
                args.append(out.copy())
            tensors = [tvm.runtime.tensor(a) for a in [*args, out]]
            fn(*tensors)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(self.repeats):
                    fn(*tensors)
                best = min(best, (time.perf_counter() - started) / self.repeats)
            times[kernel] = round(best * 1e6, 2)
        return times
