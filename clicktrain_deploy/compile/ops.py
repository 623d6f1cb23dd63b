"""Generated kernels for the non-conv ops of a CNN, on the same NCHW[L]c activations.

  pack      (N, C, H, W) -> (N, ceil(C/Li), H, W, Li)       activations into the blocked layout
  unpack    (N, ceil(C/L), H, W, L) -> (N, C, H, W)         blocked activations back to NCHW
  maxpool   (N, CB, H, W, L) -> (N, CB, OH, OW, L)          any window, stride, padding, dilation
  matmul    (N, K) x W (M, K) + b (M,) -> (N, M)            a constant-weight classifier, with epilogue
"""
from __future__ import annotations

import math

ATTRS = "T.func_attr({{'tirx.noalias': True, 'global_symbol': '{name}', 'op_pattern': 8, 'tirx.is_scheduled': True}})"
# pack and unpack carry LAYOUT_ATTR ("pack"/"unpack"): the conv rewrite skips an unpack-pack pair
LAYOUT_ATTR = "clicktrain.layout"
LAYOUT = "T.func_attr({{'tirx.noalias': True, 'global_symbol': '{name}', 'op_pattern': 8, 'tirx.is_scheduled': True, '" \
    + LAYOUT_ATTR + "': '{kind}'}})"


def pack_tvmscript(batch: int, channels: int, height: int, width: int, lanes: int, name: str) -> str:
    """(N, C, H, W) -> (N, ceil(C/L), H, W, L), channels zero-padded to whole blocks."""
    blocks = math.ceil(channels / lanes)
    return f"""@T.prim_func
def {name}(X: T.Buffer(({batch}, {channels}, {height}, {width}), 'float32'), Y: T.Buffer(({batch}, {blocks}, {height}, {width}, {lanes}), 'float32')):
    {LAYOUT.format(name=name, kind="pack")}
    for nc in T.parallel({batch * blocks}):
        for y, x in T.grid({height}, {width}):
            for l in T.vectorized({lanes}):
                Y[nc // {blocks}, nc % {blocks}, y, x, l] = T.if_then_else(nc % {blocks} * {lanes} + l < {channels}, X[nc // {blocks}, T.min(nc % {blocks} * {lanes} + l, {channels - 1}), y, x], T.float32(0))
"""


def unpack_tvmscript(batch: int, channels: int, height: int, width: int, lanes: int, name: str) -> str:
    """(N, ceil(C/L), H, W, L) -> (N, C, H, W): the inverse of pack."""
    blocks = math.ceil(channels / lanes)
    return f"""@T.prim_func
def {name}(X: T.Buffer(({batch}, {blocks}, {height}, {width}, {lanes}), 'float32'), Y: T.Buffer(({batch}, {channels}, {height}, {width}), 'float32')):
    {LAYOUT.format(name=name, kind="unpack")}
    for nc in T.parallel({batch * channels}):
        for y, x in T.grid({height}, {width}):
            Y[nc // {channels}, nc % {channels}, y, x] = X[nc // {channels}, nc % {channels} // {lanes}, y, x, nc % {channels} % {lanes}]
"""


def maxpool_tvmscript(batch: int, blocks: int, height: int, width: int, lanes: int, out_hw: tuple[int, int],
                      kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int, int, int],
                      dilation: tuple[int, int], name: str) -> str:
    """Max pool on NCHW[L]c: (N, CB, H, W, L) -> (N, CB, OH, OW, L), vectorised over the lanes.

    Window (oy, ox) starts at (oy * sh - top, ox * sw - left); taps outside the input (padding,
    ceil mode) are skipped, as ONNX defines it. ``out_hw`` is the output size the graph states."""
    (oh, ow), (kh, kw), (sh, sw), (dh, dw) = out_hw, kernel, stride, dilation
    top, left = padding[0], padding[1]
    taps = []
    for ky in range(kh):
        for kx in range(kw):
            y, x = f"oy * {sh} + {ky * dh - top}", f"ox * {sw} + {kx * dw - left}"
            valid = f"{y} >= 0 and {y} < {height} and {x} >= 0 and {x} < {width}"
            load = f"X[n, c, T.min(T.max({y}, 0), {height - 1}), T.min(T.max({x}, 0), {width - 1}), l]"
            taps.append(f"            acc[l] = T.max(acc[l], T.if_then_else({valid}, {load}, T.float32(-3.4028234663852886e38)))")
    body = "\n".join(f"    {t}" for t in taps)
    return f"""@T.prim_func
def {name}(X: T.Buffer(({batch}, {blocks}, {height}, {width}, {lanes}), 'float32'), Y: T.Buffer(({batch}, {blocks}, {oh}, {ow}, {lanes}), 'float32')):
    {ATTRS.format(name=name)}
    for job in T.parallel({batch * blocks * oh}):
        n: T.let = job // {blocks * oh}
        c: T.let = job // {oh} % {blocks}
        oy: T.let = job % {oh}
        for ox in range({ow}):
            acc = T.alloc_buffer(({lanes},), 'float32')
            for l in T.vectorized({lanes}):
                acc[l] = T.float32(-3.4028234663852886e38)
            for l in T.vectorized({lanes}):
{body}
            for l in T.vectorized({lanes}):
                Y[n, c, oy, ox, l] = acc[l]
"""


def matmul_tvmscript(batch: int, inputs: int, outputs: int, epilogue: tuple, lanes: int, name: str) -> str:
    """Y (N, M) = epilogue(X (N, K) @ W.T + b): W (M, K) row-major, b (M,); parallel over the
    outputs, the reduction vectorised over K in ``lanes`` chunks (a scalar loop for the tail)."""
    from .conv_kernels import epilogue_expression

    main, tail = inputs // lanes * lanes, inputs % lanes
    value = epilogue_expression(epilogue, "tot[0] + b[m]", "")
    tail_loop = (f"""
        for k in range({tail}):
            tot[0] = tot[0] + X[n, {main} + k] * W[m, {main} + k]""" if tail else "")
    return f"""@T.prim_func
def {name}(X: T.Buffer(({batch}, {inputs}), 'float32'), W: T.Buffer(({outputs}, {inputs}), 'float32'), b: T.Buffer(({outputs},), 'float32'), Y: T.Buffer(({batch}, {outputs}), 'float32')):
    {ATTRS.format(name=name)}
    for job in T.parallel({batch * outputs}):
        n: T.let = job // {outputs}
        m: T.let = job % {outputs}
        acc = T.alloc_buffer(({lanes},), 'float32')
        tot = T.alloc_buffer((1,), 'float32')
        for l in T.vectorized({lanes}):
            acc[l] = T.float32(0)
        for k in range({main // lanes}):
            for l in T.vectorized({lanes}):
                acc[l] = acc[l] + X[n, k * {lanes} + l] * W[m, k * {lanes} + l]
        tot[0] = T.float32(0)
        for l in range({lanes}):
            tot[0] = tot[0] + acc[l]{tail_loop}
        Y[n, m] = {value}
"""
