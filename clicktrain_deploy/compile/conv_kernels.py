"""Generated 3x3 conv kernels on NCHW[L]c activations: pattern-sparse, connectivity-only and dense.

One generator serves every variant: the taps of a kernel are grouped ("tap groups": the library's
patterns, or one 9-tap group for dense and connectivity-only layers), and the compact weights list,
per block of L output channels and per tap group, the input channels that use it. L is the
target's fp32 SIMD width (16 AVX-512, 8 AVX2, 4 NEON); training's block size B must be a multiple
of L for the pattern variant, else the connectivity-only variant runs all 9 taps of kept kernels.
L may span several SIMD vectors (16 channels = 4 NEON vectors), so one broadcast feeds several FMAs.

Tensors (batch 1):
  X     (ceil(IC/Li), H, W, Li)  input, NCHW[Li]c (Li = L, or IC for a stem with IC < L)
  ptr   (OCB * G + 1,) int32     entry range of (output block ob, tap group g)
  coff  (NK,) int32              offset of the entry's input channel in the padded input scratch
  wv    (NK * T * L,) float32    per entry: T taps x L output lanes (lanes innermost), T = group size
  bias  (OCB, L) float32         folded BN bias (zeros in padded lanes)
  R     (OCB, OH, OW, L)         optional residual added before the ReLU
  Y     (OCB, OH, OW, L)         output, NCHW[L]c; Y = relu?(conv(X) + bias + R?)
with OCB = ceil(OC / L). Rows and columns are computed in RY x XW register tiles with a guarded
store, so odd sizes need no padding of the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Tap = tuple[int, int]
ALL_TAPS: tuple[Tap, ...] = tuple((dy, dx) for dy in range(3) for dx in range(3))


@dataclass(frozen=True)
class ConvSpec:
    """Shape and variant of one generated conv (everything the TVMScript text depends on)."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    stride: int
    in_lanes: int
    lanes: int
    groups: tuple[tuple[Tap, ...], ...]
    entries: int
    relu: bool
    residual: bool
    tile: tuple[int, int] = (4, 4)  # (XW columns, RY rows)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.height - 1) // self.stride + 1, (self.width - 1) // self.stride + 1

    @property
    def in_blocks(self) -> int:
        return math.ceil(self.in_channels / self.in_lanes)

    @property
    def out_blocks(self) -> int:
        return math.ceil(self.out_channels / self.lanes)

    @property
    def padded_hw(self) -> tuple[int, int]:
        """Size of the zero-padded input scratch: the 1-pixel halo plus what the last tile reads."""
        (oh, ow), (xw, ry), s = self.out_hw, self.tile, self.stride
        return (max(self.height + 2, math.ceil(oh / ry) * ry * s + 2),
                max(self.width + 2, math.ceil(ow / xw) * xw * s + 2))


def choose_tile(out_height: int, out_width: int, tiles: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """Of ``tiles`` (XW, RY), the one that computes the fewest padded pixels of an OH x OW map;
    the earlier one on a tie."""
    def padded(tile: tuple[int, int]) -> int:
        xw, ry = tile
        return math.ceil(out_height / ry) * ry * math.ceil(out_width / xw) * xw
    return min(tiles, key=padded)


def compact_weights(weight: np.ndarray, assign: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, ...]:
    """Pack a conv weight (OC, IC, 3, 3) into (ptr, coff, wv) for ``spec``.

    assign: int (OCB, IC), the tap group that output block ob uses on input channel ic, -1 where
    the block's kernels are all removed. Weights outside a group's taps must be zero (checked).
    """
    lanes, groups = spec.lanes, spec.groups
    ph, pw = spec.padded_hw
    padded = np.zeros((spec.out_blocks * lanes, *weight.shape[1:]), np.float32)
    padded[: weight.shape[0]] = weight
    blocks = padded.reshape(spec.out_blocks, lanes, spec.in_channels, 3, 3)
    ptr, coff, values = [0], [], []
    for ob in range(spec.out_blocks):
        for g, taps in enumerate(groups):
            for ic in np.flatnonzero(assign[ob] == g):
                kernel = blocks[ob, :, ic]  # (L, 3, 3)
                outside = kernel.copy()
                for dy, dx in taps:
                    outside[:, dy, dx] = 0
                if outside.any():
                    raise ValueError(f"output block {ob}, input channel {ic}: non-zero weight outside "
                                     f"tap group {g}")
                coff.append((ic // spec.in_lanes) * ph * pw * spec.in_lanes + ic % spec.in_lanes)
                values.append(np.stack([kernel[:, dy, dx] for dy, dx in taps]))  # (T, L)
            ptr.append(len(coff))
    unused = ~np.isin(assign, np.arange(len(groups))) & (assign != -1)
    if unused.any():
        raise ValueError("assign holds a tap group index that does not exist")
    taps = len(groups[0])
    wv = np.concatenate(values).reshape(-1) if values else np.zeros(taps * lanes, np.float32)
    return (np.asarray(ptr, np.int32), np.asarray(coff or [0], np.int32), wv.astype(np.float32))


def conv_tvmscript(spec: ConvSpec, name: str) -> str:
    """TVMScript text of the conv PrimFunc described in the module docstring."""
    s, lanes, li = spec.stride, spec.lanes, spec.in_lanes
    oh, ow = spec.out_hw
    ph, pw = spec.padded_hw
    xw, ry = spec.tile
    row_tiles, col_tiles = math.ceil(oh / ry), math.ceil(ow / xw)
    taps = len(spec.groups[0])
    if any(len(g) != taps for g in spec.groups):
        raise ValueError("every tap group of one conv must have the same number of taps")
    ngroups, entries = len(spec.groups), max(spec.entries, 1)
    params = [f"X: T.Buffer(({spec.in_blocks}, {spec.height}, {spec.width}, {li}), 'float32')",
              f"ptr: T.Buffer(({spec.out_blocks * ngroups + 1},), 'int32')",
              f"coff: T.Buffer(({entries},), 'int32')",
              f"wv: T.Buffer(({entries * taps * lanes},), 'float32')",
              f"bias: T.Buffer(({spec.out_blocks}, {lanes}), 'float32')"]
    if spec.residual:
        params.append(f"R: T.Buffer(({spec.out_blocks}, {oh}, {ow}, {lanes}), 'float32')")
    params.append(f"Y: T.Buffer(({spec.out_blocks}, {oh}, {ow}, {lanes}), 'float32')")
    lines = [
        "@T.prim_func",
        f"def {name}({', '.join(params)}):",
        f"    T.func_attr({{'tirx.noalias': True, 'global_symbol': '{name}', 'op_pattern': 8, "
        "'tirx.is_scheduled': True})",
        f"    Xp = T.alloc_buffer(({spec.in_blocks * ph * pw * li},), 'float32')",
        f"    for c in T.parallel({spec.in_blocks}):",
        f"        for y in range({ph}):",  # zero the halo only: top/bottom rows, left/right columns
        f"            if y == 0 or y > {spec.height}:",
        f"                for x in range({pw}):",
        f"                    for l in T.vectorized({li}):",
        f"                        Xp[((c * {ph} + y) * {pw} + x) * {li} + l] = T.float32(0)",
        "            else:",
        f"                for x in range({pw}):",
        f"                    if x == 0 or x > {spec.width}:",
        f"                        for l in T.vectorized({li}):",
        f"                            Xp[((c * {ph} + y) * {pw} + x) * {li} + l] = T.float32(0)",
        f"        for y, x in T.grid({spec.height}, {spec.width}):",
        f"            for l in T.vectorized({li}):",
        f"                Xp[((c * {ph} + y + 1) * {pw} + x + 1) * {li} + l] = X[c, y, x, l]",
        f"    for job in T.parallel({spec.out_blocks * row_tiles}):",
        f"        for xt in range({col_tiles}):",
    ]
    # One accumulator buffer per tile row: TVM keeps buffers under 1 KiB on the stack (LLVM then
    # holds them in registers); larger ones become a workspace call per tile.
    for r in range(ry):
        lines += [f"            acc{r} = T.alloc_buffer(({xw}, {lanes}), 'float32')",
                  f"            for xi in T.unroll({xw}):",
                  f"                for l in T.vectorized({lanes}):",
                  f"                    acc{r}[xi, l] = T.float32(0)"]
    for g, group in enumerate(spec.groups):
        # T.let: a plain binding (x = ...) in the loop would become a one-element workspace buffer
        lines += [
            f"            for k in range(ptr[job // {row_tiles} * {ngroups} + {g}], "
            f"ptr[job // {row_tiles} * {ngroups} + {g + 1}]):",
            f"                base{g}: T.let = coff[k] + ((job % {row_tiles}) * {ry * s * pw} + xt * {xw * s}) * {li}",
        ]
        for t, (dy, dx) in enumerate(group):
            for r in range(ry):
                lines += [
                    f"                for xi in T.unroll({xw}):",
                    f"                    for l in T.vectorized({lanes}):",
                    f"                        acc{r}[xi, l] = acc{r}[xi, l] + Xp[base{g} + {(r * s + dy) * pw + dx} * {li} "
                    f"+ xi * {s * li}] * wv[(k * {taps} + {t}) * {lanes} + l]",
                ]
    for r in range(ry):
        row = f"(job % {row_tiles}) * {ry} + {r}"
        value = f"acc{r}[xi, l] + bias[job // {row_tiles}, l]"
        if spec.residual:
            value += f" + R[job // {row_tiles}, {row}, xt * {xw} + xi, l]"
        if spec.relu:
            value = f"T.max({value}, T.float32(0))"
        lines += [
            f"            for xi in T.unroll({xw}):",
            f"                if {row} < {oh} and xt * {xw} + xi < {ow}:",
            f"                    for l in T.vectorized({lanes}):",
            f"                        Y[job // {row_tiles}, {row}, xt * {xw} + xi, l] = {value}",
        ]
    return "\n".join(lines)


def library_taps(library: np.ndarray) -> tuple[tuple[Tap, ...], ...]:
    """Pattern library bool (K, 9) -> per pattern its 4 taps (dy, dx), row-major."""
    return tuple(tuple((int(t) // 3, int(t) % 3) for t in np.flatnonzero(row)) for row in library)


def pattern_assignment(pattern_ids: np.ndarray, block_size: int, out_channels: int, lanes: int) -> np.ndarray:
    """Tap group of every (L-lane output block, input channel) for a block-shared pattern layer.

    pattern_ids: int (ceil(OC / B), IC) from the metadata, -1 removed; needs B % L == 0 (or the
    layer narrower than L), so the L lanes of a kernel block share one pattern.
    """
    if block_size % lanes and out_channels > block_size:
        raise ValueError(f"block size {block_size} is not a multiple of {lanes} lanes")
    blocks = math.ceil(out_channels / lanes)
    return pattern_ids[[min(ob * lanes // block_size, len(pattern_ids) - 1) for ob in range(blocks)]]


def connectivity_assignment(kept: np.ndarray, lanes: int) -> np.ndarray:
    """Single 9-tap group wherever any kernel of the L-lane block is kept: bool (OC, IC) -> (OCB, IC)."""
    blocks = math.ceil(kept.shape[0] / lanes)
    padded = np.zeros((blocks * lanes, kept.shape[1]), bool)
    padded[: kept.shape[0]] = kept
    return np.where(padded.reshape(blocks, lanes, -1).any(1), 0, -1)


def to_nchwc(array: np.ndarray, lanes: int) -> np.ndarray:
    """(1, C, H, W) -> (ceil(C / L), H, W, L), padding channels with zeros."""
    _, channels, h, w = array.shape
    blocks = math.ceil(channels / lanes)
    padded = np.zeros((blocks * lanes, h, w), array.dtype)
    padded[:channels] = array[0]
    return np.ascontiguousarray(padded.reshape(blocks, lanes, h, w).transpose(0, 2, 3, 1))


def from_nchwc(array: np.ndarray, channels: int) -> np.ndarray:
    """(CB, H, W, L) -> (1, channels, H, W)."""
    blocks, h, w, lanes = array.shape
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2).reshape(1, blocks * lanes, h, w)[:, :channels])
