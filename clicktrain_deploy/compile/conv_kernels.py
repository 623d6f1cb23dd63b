"""Generated conv kernels on NCHW[L]c activations: pattern-sparse, connectivity-only, dense, depthwise.

One generator serves every variant of a conv with a constant weight: the taps of a kernel are
grouped ("tap groups": the library's patterns, or one group of all KH x KW taps for dense and
connectivity-only layers), and the compact weights list, per block of L output channels and per
tap group, the input channels that use it. L is the target's fp32 SIMD width (16 AVX-512, 8 AVX2,
4 NEON); training's block size B must be a multiple of L for the pattern variant, else the
connectivity-only variant runs all taps of kept kernels. L may span several SIMD vectors (16
channels = 4 NEON vectors), so one broadcast feeds several FMAs. Any kernel size, separate
strides, asymmetric padding and dilation; a grouped conv is given to ``compact_weights`` as its
block-diagonal dense weight with the all-zero kernel blocks unassigned (-1), so it is not special
here. Depthwise convs (channel multiplier 1) have their own kernel (``depthwise_tvmscript``).

Tensors of ``conv_tvmscript``:
  X     (N, ceil(IC/Li), H, W, Li) input, NCHW[Li]c (Li = L, or IC for a stem with IC < L)
  ptr   (OCB * G + 1,) int32         entry range of (output block ob, tap group g)
  coff  (NK,) int32                  input channel of the entry
  wv    (NK * T * L,) float32        per entry: T taps x L output lanes (lanes innermost), T = group size
  bias  (OCB, L) float32             folded BN bias (zeros in padded lanes)
  R     (N, OCB, OH, OW, L)          optional residual (an epilogue step)
  Y     (N, OCB, OH, OW, L)          output, NCHW[L]c; Y = epilogue(conv(X) + bias)
with ``channels_last_out`` R and Y are (N, OH, OW, OCB * L) instead: with Li = IC (one input
block) the kernel then reads and writes torch's channels_last tensors as they are (training's op).
with OCB = ceil(OC / L). Rows and columns are computed in RY x XW register tiles; the last tile of
a row or column is shifted back to end at the map's edge (it recomputes a few outputs with the
same values), so odd sizes need neither padding of the output nor guards in the inner loops.
A padded conv first copies its input into a zero-padded scratch; an unpadded one reads X directly.

Full-dense convs (one tap group, every entry: ``ConvSpec.full_dense``) index their entries
directly and take two more schedule knobs: ``out_tile`` output blocks per register tile (one
broadcast input feeds that many FMAs; on AVX-512 (8, 1) or (7, 1) tiles with out_tile 2 measured
best, 16 accumulators + 2 weight vectors of 32 registers), and ``ic_block`` input channels per
cache block (``ConvSpec.cache_blocks``: automatic for deep layers on small maps).

Epilogue: a tuple of steps applied in order to v = acc + bias[lane] (``epilogue_expression``):
  ("residual",) v + R   ("relu",)   ("clip", lo, hi)   ("hardsigmoid", alpha, beta)
  ("hardswish", alpha, beta)   ("sigmoid",)   ("silu",)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Tap = tuple[int, int]
ATTRS = ("T.func_attr({{'tirx.noalias': True, 'global_symbol': '{name}', 'op_pattern': 8, "
         "'tirx.is_scheduled': True}})")
L2_BYTES = 512 * 1024  # what a kernel may count on keeping in a core's L2 (x86 1-2 MiB, Cortex-A 0.5-1)
EPILOGUE_STEPS = {"residual": 0, "relu": 0, "clip": 2, "hardsigmoid": 2, "hardswish": 2, "sigmoid": 0, "silu": 0}


def all_taps(kh: int, kw: int) -> tuple[Tap, ...]:
    """Every tap (dy, dx) of a KH x KW kernel, row-major: the tap group of a dense conv."""
    return tuple((dy, dx) for dy in range(kh) for dx in range(kw))


def conv_out_hw(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """ONNX / torch conv arithmetic: (H + pt + pb - dh * (kh - 1) - 1) // sh + 1, likewise for W."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, stride, padding, dilation
    return (height + pt + pb - dh * (kh - 1) - 1) // sh + 1, (width + pl + pr - dw * (kw - 1) - 1) // sw + 1


def _check_geometry(spec) -> None:
    oh, ow = spec.out_hw
    if oh < 1 or ow < 1:
        raise ValueError(f"conv output {oh}x{ow} is empty")
    if min(spec.padding) < 0 or min(spec.stride) < 1 or min(spec.dilation) < 1 or min(spec.kernel) < 1:
        raise ValueError("kernel, stride and dilation must be positive, padding non-negative")
    residuals = [s for s in spec.epilogue if s[0] == "residual"]
    if len(residuals) > 1:
        raise ValueError("an epilogue holds at most one residual step")


class _Geometry:
    """What ConvSpec and DepthwiseSpec share: output size, padded scratch, epilogue."""

    channels_last_out = False  # a ConvSpec field; depthwise kernels write NCHW[L]c

    @property
    def out_hw(self) -> tuple[int, int]:
        return conv_out_hw(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def residual(self) -> bool:
        return any(step[0] == "residual" for step in self.epilogue)

    @property
    def padded(self) -> bool:
        """True when the input is copied into a zero-padded scratch first (any padding)."""
        return any(self.padding)

    @property
    def padded_hw(self) -> tuple[int, int]:
        """Size of the (zero-padded) input the kernel reads: H + pt + pb, W + pl + pr. Every tap of
        every (shifted) tile lies inside it; unpadded, it is X itself."""
        pt, pl, pb, pr = self.padding
        return self.height + pt + pb, self.width + pl + pr

    def effective_tile(self) -> tuple[int, int]:
        """The register tile (XW, RY) cut to the output map."""
        oh, ow = self.out_hw
        return min(self.tile[0], ow), min(self.tile[1], oh)


@dataclass(frozen=True)
class ConvSpec(_Geometry):
    """Shape and variant of one generated conv (everything the TVMScript text depends on)."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    in_lanes: int
    lanes: int
    groups: tuple[tuple[Tap, ...], ...]  # tap groups, taps (dy, dx) in kernel coordinates
    entries: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (1, 1, 1, 1)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    batch: int = 1
    epilogue: tuple = ()
    tile: tuple[int, int] = (4, 4)  # (XW columns, RY rows)
    out_tile: int = 1  # output blocks per register tile (full-dense convs only)
    ic_block: int = 0  # full-dense: input channels per cache block (0: automatic, weights ~16 KiB)
    channels_last_out: bool = False  # Y (and R) as (N, OH, OW, OCB * L): NHWC, as torch's channels_last

    @property
    def in_blocks(self) -> int:
        return math.ceil(self.in_channels / self.in_lanes)

    @property
    def out_blocks(self) -> int:
        return math.ceil(self.out_channels / self.lanes)

    @property
    def full_dense(self) -> bool:
        """One tap group and every (output block, input channel) entry present: entries are in
        channel order, so the kernel can index them without ptr and coff."""
        return len(self.groups) == 1 and self.entries == self.out_blocks * self.in_channels

    def cache_blocks(self) -> tuple[int, int]:
        """Full-dense schedule: (input channels per cache block, row tiles per job). A job runs
        every block of input channels over a band of row tiles, so each block's weights (~16 KiB)
        stay in L1 while the band's tiles use them (partial sums wait in Y); one block: no band.
        Automatic (ic_block 0): blocks only when one tile's input over all channels exceeds
        48 KiB (L1d) and the weights 32 KiB, i.e. deep layers on small maps, where input and
        weights both stream from L2."""
        taps, obt = len(self.groups[0]), min(self.out_tile, self.out_blocks)
        xw, ry = self.effective_tile()
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        footprint = self.in_channels * 4 * ((ry - 1) * sh + (kh - 1) * dh + 1) * ((xw - 1) * sw + (kw - 1) * dw + 1)
        per_channel = taps * self.lanes * 4 * obt  # weight bytes of one input channel
        if not self.ic_block and (footprint <= 49152 or per_channel * self.in_channels <= 32768):
            return self.in_channels, 1  # a tile's input, or all the weights, fit L1
        block = self.ic_block or max(self.in_lanes, (16384 // per_channel) // self.in_lanes * self.in_lanes)
        block = min(block, self.in_channels)
        if block >= self.in_channels:
            return self.in_channels, 1
        oh, ow = self.out_hw
        row_tiles, col_tiles = math.ceil(oh / ry), math.ceil(ow / xw)
        band = min(row_tiles, math.ceil(8 / col_tiles))  # about 8 tiles use each weight block
        bands = math.ceil(row_tiles / band)
        return block, math.ceil(row_tiles / bands)

    def rows_outer(self, bands: int) -> bool:
        """Job order: True runs every output block of one band of rows before the next band
        (the band's input rows stay in L2 while the blocks use them; the weights are read once
        per band), False every band of one output block before the next (its weights stay hot;
        the whole input is read once per block). The order that moves fewer bytes from beyond
        L2 wins: VGG's 224x224 and 56x56x256 maps (3-13 MB of input) run rows outer, deep layers
        on small maps (weights larger than the map) blocks outer."""
        ph, pw = self.padded_hw
        image = self.in_blocks * ph * pw * self.in_lanes * 4
        weights = max(self.entries, 1) * len(self.groups[0]) * self.lanes * 4
        groups = math.ceil(self.out_blocks / min(self.out_tile, self.out_blocks))
        blocks_outer = weights + (groups * image if image > L2_BYTES else image)
        rows_first = image + (bands * weights if weights > L2_BYTES else weights)
        return rows_first < blocks_outer


@dataclass(frozen=True)
class DepthwiseSpec(_Geometry):
    """A depthwise conv (channel multiplier 1) on NCHW[L]c: each lane is its own channel."""

    channels: int
    height: int
    width: int
    lanes: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (1, 1, 1, 1)
    dilation: tuple[int, int] = (1, 1)
    batch: int = 1
    epilogue: tuple = ()
    tile: tuple[int, int] = (4, 4)  # (XW columns, RY rows)

    @property
    def blocks(self) -> int:
        return math.ceil(self.channels / self.lanes)


def _f32(value: float) -> str:
    """A float32 constant, exactly (the repr of its float32 value)."""
    value = float(np.float32(value))
    if not math.isfinite(value):
        raise ValueError(f"epilogue constant {value} is not finite")
    return f"T.float32({value!r})"


def epilogue_expression(steps, value: str, residual: str) -> str:
    """TIR expression text of the epilogue ``steps`` applied in order to ``value`` (the text of
    v = acc + bias), ``residual`` the text of R at the same index. Every kernel uses this."""
    v = value if not steps else f"({value})"
    residuals = 0
    zero, one = "T.float32(0)", "T.float32(1)"
    for step in steps:
        op, args = step[0], tuple(step[1:])
        if op not in EPILOGUE_STEPS or len(args) != EPILOGUE_STEPS[op]:
            raise ValueError(f"unknown epilogue step {step!r}")
        if op == "residual":
            residuals += 1
            if residuals > 1:
                raise ValueError("an epilogue holds at most one residual step")
            v = f"({v} + {residual})"
        elif op == "relu":
            v = f"T.max({v}, {zero})"
        elif op == "clip":
            lo, hi = (float(np.float32(a)) for a in args)
            if lo != -math.inf:
                v = f"T.max({v}, {_f32(lo)})"
            if hi != math.inf:
                v = f"T.min({v}, {_f32(hi)})"
        elif op in ("hardsigmoid", "hardswish"):
            gate = f"T.min(T.max({_f32(args[0])} * {v} + {_f32(args[1])}, {zero}), {one})"
            v = gate if op == "hardsigmoid" else f"({v} * {gate})"
        else:  # sigmoid, silu: with e = exp(-|v|) (no overflow), v >= 0: 1 / (1 + e), else e / (1 + e)
            e = _exp_nonpositive(f"T.min({v}, {zero} - {v})")
            gate = f"(T.Select({v} >= {zero}, {one}, {e}) / ({one} + {e}))"
            v = gate if op == "sigmoid" else f"({v} * {gate})"
    return v


def _exp_nonpositive(z: str) -> str:
    """exp(z) for z <= 0 as TIR text that vectorises (T.exp becomes one libm call per lane):
    z clamped at -87, n = round(z / ln 2), r = z - n ln 2 (ln 2 in two parts), exp(r) by its
    degree-6 Taylor polynomial (|r| <= ln 2 / 2: relative error ~2e-7), 2^n from exponent bits."""
    zc = f"T.max({z}, {_f32(-87.0)})"
    n = f"T.floor({zc} * {_f32(1 / math.log(2))} + {_f32(0.5)})"
    r = f"({zc} - {n} * {_f32(0.693145751953125)} - {n} * {_f32(1.428606765330187e-06)})"
    poly = _f32(1 / 720)
    for c in (1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0):
        poly = f"({poly} * {r} + {_f32(c)})"
    return f"({poly} * T.reinterpret('float32', T.shift_left(T.Cast('int32', {n}) + 127, 23)))"


def choose_tile(out_height: int, out_width: int, tiles: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """Of ``tiles`` (XW, RY), the one that computes the fewest padded pixels of an OH x OW map;
    the earlier one on a tie."""
    def padded(tile: tuple[int, int]) -> int:
        xw, ry = min(tile[0], out_width), min(tile[1], out_height)
        return math.ceil(out_height / ry) * ry * math.ceil(out_width / xw) * xw
    return min(tiles, key=padded)


def compact_order(assign: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The compact layout of ``spec``'s weights: (ptr, coff, index).

    assign: int (OCB, IC), the tap group that output block ob uses on input channel ic, -1 where
    the block's kernels are all removed (or all zero, as outside a grouped conv's diagonal blocks).
    ptr: int32 (OCB * groups + 1,) first entry of each (block, group); coff: int32 (entries,) the
    input channel of each entry; index: int64 (entries * T * L,) the flat index into a weight
    (OC, IC, KH, KW) of each slot of wv (T taps x L lanes per entry), -1 in padded lanes.
    """
    lanes, groups = spec.lanes, spec.groups
    (kh, kw), ic, oc = spec.kernel, spec.in_channels, spec.out_channels
    if any(not (0 <= dy < kh and 0 <= dx < kw) for g in groups for dy, dx in g):
        raise ValueError(f"a tap group holds a tap outside the {kh}x{kw} kernel")
    if (~np.isin(assign, np.arange(len(groups))) & (assign != -1)).any():
        raise ValueError("assign holds a tap group index that does not exist")
    ptr, coff, slots = [0], [], []
    for ob in range(spec.out_blocks):
        out = np.arange(ob * lanes, (ob + 1) * lanes)
        for g, taps in enumerate(groups):
            for c in np.flatnonzero(assign[ob] == g):
                coff.append(c)
                slots.append([np.where(out < oc, ((out * ic + c) * kh + dy) * kw + dx, -1) for dy, dx in taps])
            ptr.append(len(coff))
    index = np.asarray(slots, np.int64).reshape(-1) if slots else np.full(len(groups[0]) * lanes, -1, np.int64)
    return np.asarray(ptr, np.int32), np.asarray(coff or [0], np.int32), index


def compact_weights(weight: np.ndarray, assign: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, ...]:
    """Pack a conv weight (OC, IC, KH, KW) into (ptr, coff, wv float32) for ``spec``
    (``compact_order``). Weights outside an entry's taps must be zero (checked)."""
    oc, ic, kh, kw = weight.shape
    if (kh, kw) != tuple(spec.kernel) or ic != spec.in_channels or oc != spec.out_channels:
        raise ValueError(f"weight {weight.shape} does not match the spec's {spec.out_channels}x"
                         f"{spec.in_channels}x{spec.kernel}")
    ptr, coff, index = compact_order(assign, spec)
    kept = np.zeros(weight.size, bool)
    kept[index[index >= 0]] = True
    kept = kept.reshape(oc, ic, kh * kw)
    outside = (np.asarray(weight).reshape(oc, ic, -1) != 0) & ~kept & kept.any(-1, keepdims=True)
    if outside.any():
        o, c, _ = np.argwhere(outside)[0]
        ob = o // spec.lanes
        raise ValueError(f"output block {ob}, input channel {c}: non-zero weight outside tap group "
                         f"{assign[ob, c]}")
    wv = np.where(index >= 0, np.asarray(weight, np.float32).reshape(-1)[np.maximum(index, 0)], 0)
    return ptr, coff, wv.astype(np.float32)


def _padded_row(dst: str, row: str, src: str, width: int, lanes: int, left: int, right: int,
                indent: str) -> list[str]:
    """Statements writing one zero-padded row into ``dst`` from flat offset ``row``: ``left``
    zero pixels, the ``width`` pixels of ``lanes`` floats starting at ``src`` in Xf, ``right``
    zero pixels (no per-pixel branch: the copy runs at load/store speed)."""
    lines = []
    if left:
        lines += [f"{indent}for i in T.vectorized({left * lanes}):", f"{indent}    {dst}[{row} + i] = T.float32(0)"]
    lines += [f"{indent}for x in range({width}):",
              f"{indent}    for l in T.vectorized({lanes}):",
              f"{indent}        {dst}[{row} + (x + {left}) * {lanes} + l] = Xf[{src} + x * {lanes} + l]"]
    if right:
        lines += [f"{indent}for i in T.vectorized({right * lanes}):",
                  f"{indent}    {dst}[{row} + {(left + width) * lanes} + i] = T.float32(0)"]
    return lines


def _scratch_copy(blocks: int, height: int, width: int, lanes: int, padding, ph: int, pw: int) -> list[str]:
    """Statements copying X (N*blocks images of H x W x lanes) into the zero-padded flat Xp: the
    top and bottom halo rows zeroed whole, then each interior row as a padded row."""
    pt, pl, pb, pr = padding
    plane = ph * pw * lanes
    lines = [f"    Xp = T.alloc_buffer(({blocks * plane},), 'float32')",
             f"    for c in T.parallel({blocks}):"]
    for first, rows in ((0, pt), (pt + height, pb)):
        if rows:
            lines += [f"        for i in T.vectorized({rows * pw * lanes}):",
                      f"            Xp[c * {plane} + {first * pw * lanes} + i] = T.float32(0)"]
    lines.append(f"        for y in range({height}):")
    return lines + _padded_row("Xp", f"c * {plane} + (y + {pt}) * {pw * lanes}",
                               f"c * {height * width * lanes} + y * {width * lanes}", width, lanes, pl, pr,
                               "            ")


def _band_copy(spec, rows: int, lanes: int, x_blocks: int, blocks: int, first: str = "") -> list[str]:
    """Statements (in a job whose band starts at output row yb of image n) filling the job-local
    Xb (blocks x rows x PW x lanes) with padded input rows yb * SH ... yb * SH + rows - 1 of X's
    blocks ``first`` ... ``first`` + blocks - 1 (X holds ``x_blocks``): zeros outside X, X's row as
    a padded row inside."""
    pt, pl, _, pr = spec.padding
    (_, pw), h, w = spec.padded_hw, spec.height, spec.width
    row = f"(b * {rows} + r) * {pw * lanes}"
    block = f"{first} + b" if first else "b"
    return [
        f"        Xb = T.alloc_buffer(({blocks * rows * pw * lanes},), 'float32')",
        f"        for b, r in T.grid({blocks}, {rows}):",
        f"            src: T.let = yb * {spec.stride[0]} + r - {pt}",
        f"            if src >= 0 and src < {h}:",
        *_padded_row("Xb", row, f"((n * {x_blocks} + {block}) * {h} + src) * {w * lanes}", w, lanes, pl, pr,
                     "                "),
        "            else:",
        f"                for i in T.vectorized({pw * lanes}):",
        f"                    Xb[{row} + i] = T.float32(0)",
    ]


def conv_tvmscript(spec: ConvSpec, name: str) -> str:
    """TVMScript text of the conv PrimFunc described in the module docstring."""
    _check_geometry(spec)
    (sh, sw), (dh, dw), lanes, li, n_ = spec.stride, spec.dilation, spec.lanes, spec.in_lanes, spec.batch
    oh, ow = spec.out_hw
    ph, pw = spec.padded_hw
    xw, ry = spec.effective_tile()
    row_tiles, col_tiles = math.ceil(oh / ry), math.ceil(ow / xw)
    taps = group_taps(spec)
    ngroups, entries, ocb, icb = len(spec.groups), max(spec.entries, 1), spec.out_blocks, spec.in_blocks
    obt = min(spec.out_tile, ocb)
    if obt > 1 and not spec.full_dense:
        raise ValueError("out_tile > 1 needs a full-dense conv (one tap group, every entry)")
    obg = math.ceil(ocb / obt)  # output block groups; the last one is shifted back to end at OCB
    block, band = spec.cache_blocks() if spec.full_dense else (spec.in_channels, 1)
    chunks, bands = math.ceil(spec.in_channels / block), math.ceil(row_tiles / band)
    rows_outer = spec.rows_outer(bands)
    # Banded: a padded conv whose jobs go rows outer copies, per band of rows, just the padded
    # input rows that band reads into a job-local scratch, which every output block then uses
    # while it is in L2 (the input is read from memory once and no padded copy is written back).
    # A batch (training) always runs banded: a padded copy of every image would go through memory.
    banded = spec.padded and chunks == 1 and (rows_outer or spec.batch > 1)
    lines, source = _prologue(spec, name, icb, li, ocb, [f"ptr: T.Buffer(({ocb * ngroups + 1},), 'int32')",
                                                         f"coff: T.Buffer(({entries},), 'int32')",
                                                         f"wv: T.Buffer(({entries * taps * lanes},), 'float32')"],
                              scratch=not banded)
    band_rows = min((band * ry - 1) * sh + (spec.kernel[0] - 1) * dh + 1, ph)  # padded rows a band reads
    plane = (band_rows if banded else ph) * pw * li  # floats per input block in the buffer the taps read
    if not spec.full_dense:  # each entry's channel offset in the buffer the taps read, once per call
        lines += [f"    offs = T.alloc_buffer(({entries},), 'int32')",
                  f"    for k in range({entries}):",
                  f"        offs[k] = coff[k] // {li} * {plane} + coff[k] % {li}"]
    if banded:  # job = (image, band of rows); output block groups inside
        lines += [f"    for job in T.parallel({n_ * bands}):",
                  f"        n: T.let = job // {bands}",
                  f"        yb: T.let = T.min(job % {bands} * {band * ry}, {oh - ry})",
                  *_band_copy(spec, band_rows, li, icb, icb),
                  f"        for gi in range({obg}):",
                  f"            g0: T.let = gi * {obt}",
                  f"            ob: T.let = T.min(g0, {ocb - obt})"]
        source, rband, ind = "Xb", f"job % {bands}", "            "
    else:
        if rows_outer:  # job = (image, band of rows, output block group)
            group, rband = f"job % {obg}", f"job // {obg} % {bands}"
        else:  # job = (image, output block group, band of rows)
            group, rband = f"job // {bands} % {obg}", f"job % {bands}"
        lines += [
            f"    for job in T.parallel({n_ * obg * bands}):",
            f"        g0: T.let = {group} * {obt}",
            f"        ob: T.let = T.min(g0, {ocb - obt})",
            f"        n: T.let = job // {bands * obg}",
        ]
        ind = "        "
    if chunks > 1:  # cache blocks of input channels; partial sums of all but the last wait in Y
        lines += [f"{ind}for icc in range({chunks}):"]
        ind += "    "
    if band > 1:
        lines += [f"{ind}for rb in range({band}):",
                  f"{ind}    rt: T.let = {rband} * {band} + rb",
                  f"{ind}    y0: T.let = T.min(rt * {ry}, {oh - ry})"]
    else:
        lines += [f"{ind}rt: T.let = {rband}",
                  f"{ind}y0: T.let = T.min(rt * {ry}, {oh - ry})"]
    ind += "    " if band > 1 else ""
    lines += [f"{ind}for xt in range({col_tiles}):",
              f"{ind}    x0: T.let = T.min(xt * {xw}, {ow - xw})",
              f"{ind}    pix: T.let = " + (f"((y0 - yb) * {sh * pw} + x0 * {sw}) * {li}" if banded else
                                          f"n * {icb * ph * pw * li} + (y0 * {sh * pw} + x0 * {sw}) * {li}")]
    ind += "    "
    # One accumulator buffer per (output block, tile row): TVM keeps buffers under 1 KiB on the
    # stack (LLVM then holds them in registers); larger ones become a workspace call per tile.
    accs = [[f"acc{j}_{r}" for r in range(ry)] for j in range(obt)]

    def index(j: int, r: int) -> str:
        if spec.channels_last_out:
            return f"n, y0 + {r}, x0 + xi, (ob + {j}) * {lanes} + l"
        return f"n, ob + {j}, y0 + {r}, x0 + xi, l"

    for row in accs:
        for acc in row:
            lines.append(f"{ind}{acc} = T.alloc_buffer(({xw}, {lanes}), 'float32')")
    init = []
    for j, row in enumerate(accs):
        for r, acc in enumerate(row):
            init += [f"for xi in T.unroll({xw}):", f"    for l in T.vectorized({lanes}):",
                     f"        {acc}[xi, l] = {{}}".format("T.float32(0)" if chunks == 1 else f"Y[{index(j, r)}]")]
    if chunks > 1:
        zero_init = []
        for j, row in enumerate(accs):
            for r, acc in enumerate(row):
                zero_init += [f"for xi in T.unroll({xw}):", f"    for l in T.vectorized({lanes}):",
                              f"        {acc}[xi, l] = T.float32(0)"]
        lines += [f"{ind}if icc == 0:"] + [f"{ind}    {x}" for x in zero_init]
        lines += [f"{ind}else:"] + [f"{ind}    {x}" for x in init]
    else:
        lines += [f"{ind}{x}" for x in init]

    def taps_body(group, base: str, weight: str, indent: str) -> list[str]:
        body = []
        for t, (dy, dx) in enumerate(group):
            for r in range(ry):
                x = f"{source}[{base} + {((r * sh + dy * dh) * pw + dx * dw) * li} + xi * {sw * li}]"
                body.append(f"{indent}for xi in T.unroll({xw}):")
                for j in range(obt):  # one broadcast input feeds the FMAs of every output block
                    body += [f"{indent}    for l in T.vectorized({lanes}):",
                             f"{indent}        {accs[j][r]}[xi, l] = {accs[j][r]}[xi, l] + {x} * "
                             f"wv[{weight} + {(j * spec.in_channels * taps + t) * lanes} + l]"]
        return body

    if spec.full_dense:
        # entries in channel order: entry ob * IC + ic, so the channel needs no coff
        span = f"icc * {block}, T.min(icc * {block} + {block}, {spec.in_channels})" if chunks > 1 \
            else f"{spec.in_channels}"
        lines += [f"{ind}for ic in range({span}):",
                  f"{ind}    base: T.let = ic // {li} * {plane} + ic % {li} + pix",
                  f"{ind}    wk: T.let = (ob * {spec.in_channels} + ic) * {taps * lanes}"]
        lines += taps_body(spec.groups[0], "base", "wk", ind + "    ")
    else:
        for g, group in enumerate(spec.groups):
            # T.let: a plain binding (x = ...) in the loop would become a one-element workspace buffer
            lines += [
                f"{ind}for k in range(ptr[ob * {ngroups} + {g}], ptr[ob * {ngroups} + {g + 1}]):",
                f"{ind}    base{g}: T.let = offs[k] + pix",
            ]
            lines += taps_body(group, f"base{g}", f"k * {taps * lanes}", ind + "    ")
    final, partial = [], []
    for j in range(obt):
        for r in range(ry):
            value = epilogue_expression(spec.epilogue, f"{accs[j][r]}[xi, l] + bias[ob + {j}, l]", f"R[{index(j, r)}]")
            for out_lines, v in ((final, value), (partial, f"{accs[j][r]}[xi, l]")):
                if chunks == 1:  # shifted tiles and blocks recompute the same values: no guard
                    out_lines += [f"for xi in T.unroll({xw}):", f"    for l in T.vectorized({lanes}):",
                                  f"        Y[{index(j, r)}] = {v}"]
                else:  # partial sums accumulate: only the tile that owns a pixel stores it
                    out_lines += [f"for xi in T.unroll({xw}):",
                                  f"    if y0 + {r} >= rt * {ry} and x0 + xi >= xt * {xw} and ob + {j} >= g0:",
                                  f"        for l in T.vectorized({lanes}):",
                                  f"            Y[{index(j, r)}] = {v}"]
    if chunks > 1:
        lines += [f"{ind}if icc == {chunks - 1}:"] + [f"{ind}    {x}" for x in final]
        lines += [f"{ind}else:"] + [f"{ind}    {x}" for x in partial]
    else:
        lines += [f"{ind}{x}" for x in final]
    return "\n".join(lines)


def depthwise_weights(weight: np.ndarray, lanes: int) -> np.ndarray:
    """Depthwise weight (C, 1, KH, KW) -> (CB, KH * KW, L), channels zero-padded to CB * L."""
    channels, multiplier, kh, kw = weight.shape
    if multiplier != 1:
        raise ValueError(f"depthwise weight {weight.shape}: channel multiplier 1 only")
    blocks = math.ceil(channels / lanes)
    padded = np.zeros((blocks * lanes, kh * kw), np.float32)
    padded[:channels] = weight.reshape(channels, kh * kw)
    return np.ascontiguousarray(padded.reshape(blocks, lanes, kh * kw).transpose(0, 2, 1))


def _prologue(spec, name: str, in_blocks: int, in_lanes: int, out_blocks: int, weights: list[str],
              scratch: bool = True) -> tuple[list[str], str]:
    """The PrimFunc's signature X, *weights, bias, [R], Y and its input view: a flat alias of X,
    or (padded, ``scratch``) the zero-padded scratch copy. Returns the lines and the buffer the
    taps read."""
    (oh, ow), (ph, pw) = spec.out_hw, spec.padded_hw
    out = f"{spec.batch}, {out_blocks}, {oh}, {ow}, {spec.lanes}"
    if spec.channels_last_out:
        out = f"{spec.batch}, {oh}, {ow}, {out_blocks * spec.lanes}"
    params = [f"X: T.Buffer(({spec.batch}, {in_blocks}, {spec.height}, {spec.width}, {in_lanes}), 'float32')",
              *weights, f"bias: T.Buffer(({out_blocks}, {spec.lanes}), 'float32')"]
    if spec.residual:
        params.append(f"R: T.Buffer(({out}), 'float32')")
    params.append(f"Y: T.Buffer(({out}), 'float32')")
    size = spec.batch * in_blocks * spec.height * spec.width * in_lanes
    lines = ["@T.prim_func", f"def {name}({', '.join(params)}):", "    " + ATTRS.format(name=name),
             f"    Xf = T.decl_buffer(({size},), 'float32', data=X.data)"]
    if not (spec.padded and scratch):
        return lines, "Xf"
    return lines + _scratch_copy(spec.batch * in_blocks, spec.height, spec.width, in_lanes, spec.padding, ph, pw), "Xp"


DEPTHWISE_BAND_ROWS = 16  # output rows per depthwise job: its padded input rows stay in L2


def depthwise_tvmscript(spec: DepthwiseSpec, name: str) -> str:
    """TVMScript of a depthwise conv: X (N, CB, H, W, L), w (CB, KH*KW, L), bias (CB, L), [R],
    Y (N, CB, OH, OW, L). A job is one image's channel block and a band of output rows; padded,
    it first copies just the padded input rows its band reads into a job-local scratch (the input
    is read from memory once, no padded copy of it is written back). Vector multiply-adds over the
    lanes, RY x XW register tiles."""
    _check_geometry(spec)
    (kh, kw), (sh, sw), (dh, dw), lanes, n_, cb = spec.kernel, spec.stride, spec.dilation, spec.lanes, \
        spec.batch, spec.blocks
    oh, ow = spec.out_hw
    ph, pw = spec.padded_hw
    xw, ry = spec.effective_tile()
    band = min(oh, max(ry, DEPTHWISE_BAND_ROWS // ry * ry))  # the last band is shifted back to end at OH
    bands, band_tiles, col_tiles = math.ceil(oh / band), math.ceil(band / ry), math.ceil(ow / xw)
    band_rows = (band - 1) * sh + (kh - 1) * dh + 1  # padded input rows a band reads
    lines, _ = _prologue(spec, name, cb, lanes, cb, [f"w: T.Buffer(({cb}, {kh * kw}, {lanes}), 'float32')"],
                         scratch=False)
    lines += [
        f"    for job in T.parallel({n_ * cb * bands}):",
        f"        n: T.let = job // {cb * bands}",
        f"        c: T.let = job // {bands} % {cb}",
        f"        yb: T.let = T.min(job % {bands} * {band}, {oh - band})",
    ]
    if spec.padded:
        lines += _band_copy(spec, band_rows, lanes, cb, 1, first="c")
        source, origin = "Xb", "0"
    else:
        source, origin = "Xf", f"((n * {cb} + c) * {ph} + yb * {sh}) * {pw * lanes}"
    lines += [
        f"        for yt in range({band_tiles}):",
        f"            y0: T.let = T.min(yt * {ry}, {band - ry})",
        f"            for xt in range({col_tiles}):",
        f"                x0: T.let = T.min(xt * {xw}, {ow - xw})",
        f"                base: T.let = {origin} + (y0 * {sh * pw} + x0 * {sw}) * {lanes}",
    ]
    ind = "                "
    for r in range(ry):
        lines += [f"{ind}acc{r} = T.alloc_buffer(({xw}, {lanes}), 'float32')",
                  f"{ind}for xi in T.unroll({xw}):",
                  f"{ind}    for l in T.vectorized({lanes}):",
                  f"{ind}        acc{r}[xi, l] = bias[c, l]"]
    for t, (dy, dx) in enumerate(all_taps(kh, kw)):
        for r in range(ry):
            lines += [
                f"{ind}for xi in T.unroll({xw}):",
                f"{ind}    for l in T.vectorized({lanes}):",
                f"{ind}        acc{r}[xi, l] = acc{r}[xi, l] + {source}[base + "
                f"{((r * sh + dy * dh) * pw + dx * dw) * lanes} + xi * {sw * lanes} + l] * w[c, {t}, l]",
            ]
    for r in range(ry):
        index = f"n, c, yb + y0 + {r}, x0 + xi, l"
        value = epilogue_expression(spec.epilogue, f"acc{r}[xi, l]", f"R[{index}]")
        lines += [
            f"{ind}for xi in T.unroll({xw}):",
            f"{ind}    for l in T.vectorized({lanes}):",
            f"{ind}        Y[{index}] = {value}",
        ]
    return "\n".join(lines)


def group_taps(spec: ConvSpec) -> int:
    """T, the taps of each of ``spec``'s tap groups (the kernels give every group as many)."""
    taps = len(spec.groups[0])
    if any(len(g) != taps for g in spec.groups):
        raise ValueError("every tap group of one conv must have the same number of taps")
    return taps


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
    """Single all-taps group wherever any kernel of the L-lane block is kept: bool (OC, IC) -> (OCB, IC).

    For a grouped conv's block-diagonal weight, ``kept`` = the non-zero kernels: blocks that see
    only zeros of an input channel skip it."""
    blocks = math.ceil(kept.shape[0] / lanes)
    padded = np.zeros((blocks * lanes, kept.shape[1]), bool)
    padded[: kept.shape[0]] = kept
    return np.where(padded.reshape(blocks, lanes, -1).any(1), 0, -1)


def block_diagonal(weight: np.ndarray, groups: int) -> np.ndarray:
    """Grouped conv weight (OC, IC/groups, KH, KW) -> the dense (OC, IC, KH, KW) it stands for."""
    oc, icg, kh, kw = weight.shape
    ocg = oc // groups
    dense = np.zeros((oc, icg * groups, kh, kw), weight.dtype)
    for g in range(groups):
        dense[g * ocg:(g + 1) * ocg, g * icg:(g + 1) * icg] = weight[g * ocg:(g + 1) * ocg]
    return dense


def to_nchwc(array: np.ndarray, lanes: int) -> np.ndarray:
    """(N, C, H, W) -> (N, ceil(C / L), H, W, L), padding channels with zeros."""
    n, channels, h, w = array.shape
    blocks = math.ceil(channels / lanes)
    padded = np.zeros((n, blocks * lanes, h, w), array.dtype)
    padded[:, :channels] = array
    return np.ascontiguousarray(padded.reshape(n, blocks, lanes, h, w).transpose(0, 1, 3, 4, 2))


def from_nchwc(array: np.ndarray, channels: int) -> np.ndarray:
    """(N, CB, H, W, L) -> (N, channels, H, W)."""
    n, blocks, h, w, lanes = array.shape
    return np.ascontiguousarray(array.transpose(0, 1, 4, 2, 3).reshape(n, blocks * lanes, h, w)[:, :channels])
