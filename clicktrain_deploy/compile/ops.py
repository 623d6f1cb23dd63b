"""Generated kernels for the non-conv ops of a CNN, on the same NCHW[L]c activations.

  pack      (N, C, H, W) -> (N, ceil(C/Li), H, W, Li)       activations into the blocked layout
  unpack    (N, ceil(C/L), H, W, L) -> (N, C, H, W)         blocked activations back to NCHW
  avgpool   (CB, H, W, L) -> (1, CB * L)                    global average pool (+ flatten)
  maxpool   (CB, H, W, L) -> (CB, OH, OW, L)                2x2 stride 2, ceil mode
  dense     (1, K) x W (N, K) + b (N,) -> (1, N)            classifier layer, optional ReLU
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


def avgpool_tvmscript(blocks: int, height: int, width: int, lanes: int, name: str) -> str:
    return f"""@T.prim_func
def {name}(X: T.Buffer(({blocks}, {height}, {width}, {lanes}), 'float32'), Y: T.Buffer((1, {blocks * lanes}), 'float32')):
    {ATTRS.format(name=name)}
    acc = T.alloc_buffer(({lanes},), 'float32', scope='local')
    for c in range({blocks}):
        for l in T.vectorized({lanes}):
            acc[l] = T.float32(0)
        for y, x in T.grid({height}, {width}):
            for l in T.vectorized({lanes}):
                acc[l] = acc[l] + X[c, y, x, l]
        for l in T.vectorized({lanes}):
            Y[0, c * {lanes} + l] = acc[l] * T.float32({1.0 / (height * width)!r})
"""


def maxpool_tvmscript(blocks: int, height: int, width: int, lanes: int, name: str) -> str:
    oh, ow = math.ceil(height / 2), math.ceil(width / 2)
    return f"""@T.prim_func
def {name}(X: T.Buffer(({blocks}, {height}, {width}, {lanes}), 'float32'), Y: T.Buffer(({blocks}, {oh}, {ow}, {lanes}), 'float32')):
    {ATTRS.format(name=name)}
    for c in T.parallel({blocks}):
        for y, x in T.grid({oh}, {ow}):
            for l in T.vectorized({lanes}):
                Y[c, y, x, l] = T.max(T.max(X[c, 2 * y, 2 * x, l], X[c, 2 * y, T.min(2 * x + 1, {width - 1}), l]),
                                      T.max(X[c, T.min(2 * y + 1, {height - 1}), 2 * x, l], X[c, T.min(2 * y + 1, {height - 1}), T.min(2 * x + 1, {width - 1}), l]))
"""


def dense_tvmscript(inputs: int, width: int, relu: bool, lanes: int, name: str) -> str:
    """Y = X @ W.T + b for ``width`` outputs; W (width, K) and b are zero-padded by the caller.

    ``inputs`` (K) must be a multiple of ``lanes``; the reduction is vectorized over K.
    """
    value = "T.max(tot[0] + b[n], T.float32(0))" if relu else "tot[0] + b[n]"
    return f"""@T.prim_func
def {name}(X: T.Buffer((1, {inputs}), 'float32'), W: T.Buffer(({width}, {inputs}), 'float32'), b: T.Buffer(({width},), 'float32'), Y: T.Buffer((1, {width}), 'float32')):
    {ATTRS.format(name=name)}
    acc = T.alloc_buffer(({lanes},), 'float32', scope='local')
    tot = T.alloc_buffer((1,), 'float32', scope='local')
    for n in range({width}):
        for l in T.vectorized({lanes}):
            acc[l] = T.float32(0)
        for k in range({inputs // lanes}):
            for l in T.vectorized({lanes}):
                acc[l] = acc[l] + X[0, k * {lanes} + l] * W[n, k * {lanes} + l]
        tot[0] = T.float32(0)
        for l in range({lanes}):
            tot[0] = tot[0] + acc[l]
        Y[0, n] = {value}
"""
