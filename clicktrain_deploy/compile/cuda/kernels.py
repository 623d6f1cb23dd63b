"""GPU schedules of the generated kernels, on NCHW activations (batch N).

The conv is the same compute as ``conv_kernels.py`` (tap groups, per output block the entries of
(input channel, tap group) with T x L weights, from ``compact_weights``), scheduled for a GPU:

  X     (N, IC, H, W)              input (NCHW: each input channel's rows are contiguous)
  ptr   (OCB * G + 1,) int32       entry range of (output block ob, tap group g)
  chan  (NK,) int32                input channel of each entry
  wv    (NK * T * L,) float32      per entry: T taps x L output channels (channels innermost)
  bias  (OCB, L) float32
  R     (N, OC, OH, OW)            optional residual (an epilogue step)
  Y     (N, OC, OH, OW)            Y = epilogue(conv(X) + bias), ``epilogue_expression``'s steps

One thread block computes an OH-tile x OW-tile of one image for one block of L output channels
(the L channels that share every input channel's pattern). Its threads load, chunk by chunk, the
input tiles (the output tile's receptive field, zero outside the map) of up to CK entries into shared memory, and their weights,
with consecutive threads reading consecutive pixels of a row (coalesced); then each thread
accumulates a register tile of PY pixels x L channels, the taps of each tap group unrolled with
constant offsets into the shared tile. Stores write consecutive pixels per thread (coalesced).
The statements take any kernel, padding and equal strides; ``cuda_covers`` says which convs the
GPU kernels are used (and checked) for: 3x3 pad 1 and 1x1 pad 0, stride 1 or 2, dilation 1.

``emulate=True`` emits the same statements for a CPU: blockIdx and threadIdx become serial loops,
each phase between two barriers runs for every thread in turn, and the per-thread registers get
a thread index. Built for llvm, it checks the GPU kernels' indexing on this machine, without a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..conv_kernels import ConvSpec, epilogue_expression, group_taps

ATTRS = ("T.func_attr({{'tirx.noalias': True, 'global_symbol': '{name}', 'op_pattern': 8, "
         "'tirx.is_scheduled': True}})")
THREADS = 128  # target threads per block of the non-conv kernels and the conv's tile choice
SHARED_TILE_FLOATS = 8192  # input floats staged per chunk (32 KiB; weights add at most 9 KiB)


@dataclass(frozen=True)
class CudaConvSpec(ConvSpec):
    """A ConvSpec (in_lanes 1: NCHW) plus its GPU schedule.

    tile: (TW, TH) output pixels per thread block; rows_per_thread: PY, so a block has
    TW * TH / PY threads; chunk: CK entries staged in shared memory at a time.
    """

    rows_per_thread: int = 2
    chunk: int = 16

    @property
    def threads(self) -> int:
        return self.tile[0] * self.tile[1] // self.rows_per_thread

    @property
    def input_tile(self) -> tuple[int, int]:
        """Shared input tile (rows, columns) of one entry: the output tile's receptive field."""
        tw, th = self.tile
        return _receptive(th, self.stride[0], self.kernel[0], self.dilation[0]), \
            _receptive(tw, self.stride[1], self.kernel[1], self.dilation[1])


def _receptive(outputs: int, stride: int, kernel: int, dilation: int) -> int:
    return (outputs - 1) * stride + (kernel - 1) * dilation + 1


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def cuda_covers(spec_or_fields) -> str | None:
    """None when the GPU conv kernel covers this conv, else a short reason (the conv then goes
    to TVM's own GPU scheduling). Takes a ConvSpec or a mapping of its fields (kernel, stride,
    padding, dilation; missing ones take ConvSpec's defaults) where ``groups``, if an int, is the
    conv's group count (a ConvSpec's tap groups are not conv groups: a spec is one group)."""
    if isinstance(spec_or_fields, ConvSpec):
        fields = {k: getattr(spec_or_fields, k) for k in ("kernel", "stride", "padding", "dilation")}
    else:
        fields = dict(spec_or_fields)
    kernel = _pair(fields.get("kernel", (3, 3)))
    stride = _pair(fields.get("stride", (1, 1)))
    padding = tuple(fields.get("padding", (1, 1, 1, 1)))
    dilation = _pair(fields.get("dilation", (1, 1)))
    groups = fields.get("groups", 1)
    if isinstance(groups, int) and groups != 1:
        return f"grouped conv ({groups} groups)"
    if dilation != (1, 1):
        return f"dilation {dilation}"
    if kernel == (3, 3):
        if padding != (1, 1, 1, 1):
            return f"3x3 conv with padding {padding} (GPU kernel: 1, 1, 1, 1)"
    elif kernel == (1, 1):
        if any(padding):
            return f"1x1 conv with padding {padding} (GPU kernel: none)"
    else:
        return f"{kernel[0]}x{kernel[1]} kernel (GPU kernel: 3x3 or 1x1)"
    if stride[0] != stride[1] or stride[0] not in (1, 2):
        return f"stride {stride} (GPU kernel: 1 or 2, equal)"
    return None


def cuda_schedule(out_height: int, out_width: int, stride, rows_per_thread: int, max_entries: int,
                  kernel=(3, 3), dilation=(1, 1)) -> dict:
    """Tile, rows per thread and chunk of a conv with an OH x OW output (stride, kernel and
    dilation: ints or (y, x) pairs).

    A block spans the map's width up to 32 pixels and about ``THREADS`` threads, each computing
    PY rows (the layout's register tile). CK, the entries staged at a time, is at most 16, the
    most entries of one output block, and what keeps the input tiles within SHARED_TILE_FLOATS.
    """
    (sh, sw), (kh, kw), (dh, dw) = _pair(stride), _pair(kernel), _pair(dilation)
    rows_per_thread = max(1, min(rows_per_thread, out_height))
    width = min(out_width, 32)
    thread_rows = max(1, min(math.ceil(out_height / rows_per_thread), THREADS // width))
    tile_floats = _receptive(thread_rows * rows_per_thread, sh, kh, dh) * _receptive(width, sw, kw, dw)
    chunk = max(1, min(16, max_entries, SHARED_TILE_FLOATS // tile_floats))
    return {"tile": (width, thread_rows * rows_per_thread), "rows_per_thread": rows_per_thread, "chunk": chunk}


def entry_channels(assign: np.ndarray, groups: int) -> np.ndarray:
    """Input channel of every entry, in ``compact_weights``' order: (ob, g, ascending channel)."""
    channels = [np.flatnonzero(row == g) for row in assign for g in range(groups)]
    merged = np.concatenate(channels) if channels else np.zeros(0, np.int64)
    return (merged if merged.size else np.zeros(1, np.int64)).astype(np.int32)


def _loop(extent: int, tag: str, emulate: bool) -> str:
    return f"range({extent})" if emulate else f"T.thread_binding({extent}, thread='{tag}')"


def _threads(body: list[str], extent: int, emulate: bool, indent: str) -> list[str]:
    """A per-thread phase: on the GPU the thread loop encloses all phases (opened once by the
    caller); emulated, each phase is its own loop over the threads."""
    if not emulate:
        return [indent + line for line in body]
    return [f"{indent}for t in range({extent}):"] + [indent + "    " + line for line in body]


def conv_cuda_tvmscript(spec: CudaConvSpec, name: str, emulate: bool = False) -> str:
    """TVMScript of the GPU conv described in the module docstring."""
    n_, (sh, sw), (dh, dw), lanes = spec.batch, spec.stride, spec.dilation, spec.lanes
    pt, pl = spec.padding[:2]
    oh, ow = spec.out_hw
    tw, th = spec.tile
    py = spec.rows_per_thread
    by = th // py
    nt = spec.threads
    rows, cols = spec.input_tile
    taps = group_taps(spec)
    if th % py:
        raise ValueError(f"tile height {th} is not a multiple of {py} rows per thread")
    ck = spec.chunk
    ngroups, entries = len(spec.groups), max(spec.entries, 1)
    row_tiles, col_tiles = math.ceil(oh / th), math.ceil(ow / tw)
    blocks = n_ * spec.out_blocks * row_tiles * col_tiles
    xs_size, ws_size = ck * rows * cols, ck * taps * lanes
    a = "t, " if emulate else ""
    unroll = "range"  # nvcc unrolls the constant row and lane loops (acc stays in registers)
    params = [f"X: T.Buffer(({n_}, {spec.in_channels}, {spec.height}, {spec.width}), 'float32')",
              f"ptr: T.Buffer(({spec.out_blocks * ngroups + 1},), 'int32')",
              f"chan: T.Buffer(({entries},), 'int32')",
              f"wv: T.Buffer(({entries * taps * lanes},), 'float32')",
              f"bias: T.Buffer(({spec.out_blocks}, {lanes}), 'float32')"]
    if oh < 1 or ow < 1:
        raise ValueError(f"conv output {oh}x{ow} is empty")
    if spec.residual:
        params.append(f"R: T.Buffer(({n_}, {spec.out_channels}, {oh}, {ow}), 'float32')")
    params.append(f"Y: T.Buffer(({n_}, {spec.out_channels}, {oh}, {ow}), 'float32')")
    shared = "'global'" if emulate else "'shared'"
    lines = [
        "@T.prim_func",
        f"def {name}({', '.join(params)}):",
        "    " + ATTRS.format(name=name),
        f"    for bx in {_loop(blocks, 'blockIdx.x', emulate)}:",
        f"        n: T.int32 = bx // {spec.out_blocks * row_tiles * col_tiles}",
        f"        ob: T.int32 = bx // {row_tiles * col_tiles} % {spec.out_blocks}",
        f"        y0: T.int32 = bx // {col_tiles} % {row_tiles} * {th}",
        f"        x0: T.int32 = bx % {col_tiles} * {tw}",
        f"        lo: T.int32 = ptr[ob * {ngroups}]",
        f"        hi: T.int32 = ptr[ob * {ngroups} + {ngroups}]",
        f"        Xs = T.alloc_buffer(({xs_size},), 'float32', scope={shared})",
        f"        Ws = T.alloc_buffer(({ws_size},), 'float32', scope={shared})",
    ]
    indent = "        "
    if emulate:
        lines.append(f"{indent}acc = T.alloc_buffer(({nt}, {py}, {lanes}), 'float32')")
    else:
        lines += [f"{indent}for t in {_loop(nt, 'threadIdx.x', emulate)}:",
                  f"{indent}    acc = T.alloc_buffer(({py}, {lanes}), 'float32', scope='local')"]
        indent += "    "
    lines += _threads([f"for r in {unroll}({py}):", f"    for l in {unroll}({lanes}):",
                       f"        acc[{a}r, l] = T.float32(0)"], nt, emulate, indent)
    lines += [f"{indent}for c in range((hi - lo + {ck - 1}) // {ck}):",
              f"{indent}    k0: T.int32 = lo + c * {ck}"]
    inner = indent + "    "
    load = [
        f"for i in range({math.ceil(xs_size / nt)}):",
        f"    e: T.int32 = i * {nt} + t",
        f"    if e < {xs_size}:",
        f"        iy: T.int32 = y0 * {sh} - {pt} + e % {rows * cols} // {cols}",
        f"        ix: T.int32 = x0 * {sw} - {pl} + e % {cols}",
        f"        Xs[e] = T.if_then_else(k0 + e // {rows * cols} < hi and 0 <= iy and iy < {spec.height} "
        f"and 0 <= ix and ix < {spec.width}, X[n, chan[T.min(k0 + e // {rows * cols}, {entries - 1})], "
        f"T.max(T.min(iy, {spec.height - 1}), 0), T.max(T.min(ix, {spec.width - 1}), 0)], T.float32(0))",
        f"for i in range({math.ceil(ws_size / nt)}):",
        f"    e: T.int32 = i * {nt} + t",
        f"    if e < {ws_size}:",
        f"        Ws[e] = T.if_then_else(k0 + e // {taps * lanes} < hi, "
        f"wv[T.min(k0 * {taps * lanes} + e, {entries * taps * lanes - 1})], T.float32(0))",
    ]
    compute = []
    for g, group in enumerate(spec.groups):
        compute += [f"for k in range(T.max(ptr[ob * {ngroups} + {g}], k0), "
                    f"T.min(ptr[ob * {ngroups} + {g + 1}], k0 + {ck})):"]
        for tap, (dy, dx) in enumerate(group):
            compute += [
                f"    for r in {unroll}({py}):",
                f"        xv: T.float32 = Xs[((k - k0) * {rows} + (t // {tw} + r * {by}) * {sh} + {dy * dh}) * {cols} "
                f"+ t % {tw} * {sw} + {dx * dw}]",
                f"        for l in {unroll}({lanes}):",
                f"            acc[{a}r, l] = acc[{a}r, l] + xv * Ws[((k - k0) * {taps} + {tap}) * {lanes} + l]",
            ]
    lines += _threads(load, nt, emulate, inner)
    if not emulate:
        lines.append(f"{inner}T.tvm_storage_sync('shared')")
    lines += _threads(compute, nt, emulate, inner)
    if not emulate:
        lines.append(f"{inner}T.tvm_storage_sync('shared')")
    index = f"n, ob * {lanes} + l, y0 + t // {tw} + r * {by}, x0 + t % {tw}"
    value = epilogue_expression(spec.epilogue, f"acc[{a}r, l] + bias[ob, l]", f"R[{index}]")
    store = [
        f"for r in {unroll}({py}):",
        f"    for l in {unroll}({lanes}):",
        f"        if y0 + t // {tw} + r * {by} < {oh} and x0 + t % {tw} < {ow} and ob * {lanes} + l < {spec.out_channels}:",
        f"            Y[{index}] = {value}",
    ]
    lines += _threads(store, nt, emulate, indent)
    return "\n".join(lines)


def _elementwise(name: str, params: str, total: int, body: list[str], emulate: bool) -> str:
    """One thread per output element i < total, THREADS per block."""
    blocks = math.ceil(total / THREADS)
    lines = ["@T.prim_func", f"def {name}({params}):", "    " + ATTRS.format(name=name),
             f"    for bx in {_loop(blocks, 'blockIdx.x', emulate)}:",
             f"        for t in {_loop(THREADS, 'threadIdx.x', emulate)}:",
             f"            if bx * {THREADS} + t < {total}:",
             f"                i: T.int32 = bx * {THREADS} + t"]
    return "\n".join(lines + ["                " + line for line in body])


def _accumulate(name: str, params: str, total: int, loop: str, term: str, store: str, emulate: bool) -> str:
    """One thread per output element i: ``acc`` sums ``term`` over ``loop``; then ``store``."""
    body = ["acc = T.alloc_buffer((1,), 'float32', scope='local')", "acc[0] = T.float32(0)",
            f"for {loop}:", f"    acc[0] = acc[0] + {term}", store]
    return _elementwise(name, params, total, body, emulate)


def avgpool_cuda_tvmscript(batch: int, channels: int, height: int, width: int, name: str,
                           emulate: bool = False) -> str:
    """(N, C, H, W) -> (N, C): global average pool (+ flatten), one thread per (n, c)."""
    params = (f"X: T.Buffer(({batch}, {channels}, {height}, {width}), 'float32'), "
              f"Y: T.Buffer(({batch}, {channels}), 'float32')")
    plane = f"i // {channels}, i % {channels}"
    return _accumulate(name, params, batch * channels, f"y, x in T.grid({height}, {width})", f"X[{plane}, y, x]",
                       f"Y[{plane}] = acc[0] * T.float32({1.0 / (height * width)!r})", emulate)


def maxpool_cuda_tvmscript(batch: int, channels: int, height: int, width: int, name: str,
                           emulate: bool = False) -> str:
    """(N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2)): 2x2 stride 2, ceil mode."""
    oh, ow = math.ceil(height / 2), math.ceil(width / 2)
    params = (f"X: T.Buffer(({batch}, {channels}, {height}, {width}), 'float32'), "
              f"Y: T.Buffer(({batch}, {channels}, {oh}, {ow}), 'float32')")
    y, x = f"i // {ow} % {oh}", f"i % {ow}"
    plane = f"i // {oh * ow} // {channels}, i // {oh * ow} % {channels}"
    y1, x1 = f"T.min(2 * ({y}) + 1, {height - 1})", f"T.min(2 * ({x}) + 1, {width - 1})"
    body = [f"Y[{plane}, {y}, {x}] = T.max(T.max(X[{plane}, 2 * ({y}), 2 * ({x})], X[{plane}, 2 * ({y}), {x1}]), "
            f"T.max(X[{plane}, {y1}, 2 * ({x})], X[{plane}, {y1}, {x1}]))"]
    return _elementwise(name, params, batch * channels * oh * ow, body, emulate)


def dense_cuda_tvmscript(batch: int, inputs: int, width: int, relu: bool, name: str,
                         emulate: bool = False) -> str:
    """(N, K) x W (M, K) + b (M,) -> (N, M), optional ReLU; one thread per (n, m)."""
    params = (f"X: T.Buffer(({batch}, {inputs}), 'float32'), W: T.Buffer(({width}, {inputs}), 'float32'), "
              f"b: T.Buffer(({width},), 'float32'), Y: T.Buffer(({batch}, {width}), 'float32')")
    value = f"acc[0] + b[i % {width}]"
    value = f"T.max({value}, T.float32(0))" if relu else value
    return _accumulate(name, params, batch * width, f"k in range({inputs})",
                       f"X[i // {width}, k] * W[i % {width}, k]", f"Y[i // {width}, i % {width}] = {value}", emulate)
