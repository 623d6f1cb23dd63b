"""GPU gradients of a pattern-sparse conv, for training on the patterns on a GPU (issue #16).

On a GPU, training keeps torch's NCHW tensors (each channel's rows contiguous, so consecutive
threads read consecutive pixels) and the forward pass is ``conv_cuda_tvmscript`` at the training
batch. These are its two gradients on the same entries (``compact_order``: ptr, coff and wv,
T taps x L lanes per entry), each thread computing one output value:

  X       (N, IC, H, W)        the forward's input
  dY      (N, OC, OH, OW)      output gradient
  owner   (NK,) int32          ob * G + g of each entry: its output block and tap group (``train_kernels.entry_owners``)
  coff    (NK,) int32          its input channel
  taps    (G * T * 2,) int32   (dy, dx) of tap t of group g at 2 * (g * T + t)
  partial (N, NK * T * L)      per image, the weight gradient of its pixels
  dwv     (NK * T * L,)        weight gradient in wv's layout (zero in padded lanes)
  ptrT, obT, kfw               ``transposed_entries``: the entries of each (input channel, group)
  wv      (NK * T * L,)        the compact weights
  dX      (N, IC, H, W)        input gradient

Weight gradient: one thread per (image, entry, tap, lane) sums X x dY over the image's output
pixels into ``partial``; a second kernel sums the images (deterministic: no atomics). Input
gradient: one thread per input value gathers its channel's entries: per tap that reaches an output
pixel (with stride s, where the offset divides by s), the L lanes of dY times the entry's L
weights. Only kept taps of kept entries are computed. ``emulate=True`` gives serial thread loops
that build for a CPU (``toolchain.build_emulated``), to check the kernels without a GPU.
"""
from __future__ import annotations

import numpy as np

from ..conv_kernels import ConvSpec, group_taps
from .kernels import _elementwise


def tap_table(spec: ConvSpec) -> np.ndarray:
    """taps (G * T * 2,) int32: (dy, dx) of every tap of every tap group, in group order."""
    return np.asarray([[dy, dx] for group in spec.groups for dy, dx in group], np.int32).reshape(-1)


def _check(spec: ConvSpec) -> tuple[int, int]:
    """(T, NK) of a GPU training kernel's spec, which reads NCHW and has no epilogue."""
    if spec.in_lanes != 1 or spec.epilogue:
        raise ValueError("GPU training kernels read NCHW (in_lanes 1) and take no epilogue")
    return group_taps(spec), max(spec.entries, 1)


def conv_weight_grad_cuda_tvmscript(spec: ConvSpec, name: str, emulate: bool = False) -> str:
    """TVMScript of the per-image weight gradient: X, dY, owner, coff, taps -> partial."""
    taps, entries = _check(spec)
    n_, lanes, ngroups = spec.batch, spec.lanes, len(spec.groups)
    (oh, ow), (sh, sw), (dh, dw), (pt, pl) = spec.out_hw, spec.stride, spec.dilation, spec.padding[:2]
    per_image = entries * taps * lanes
    params = (f"X: T.Buffer(({n_}, {spec.in_channels}, {spec.height}, {spec.width}), 'float32'), "
              f"dY: T.Buffer(({n_}, {spec.out_channels}, {oh}, {ow}), 'float32'), "
              f"owner: T.Buffer(({entries},), 'int32'), coff: T.Buffer(({entries},), 'int32'), "
              f"taps: T.Buffer(({ngroups * taps * 2},), 'int32'), "
              f"partial: T.Buffer(({n_}, {per_image}), 'float32')")
    body = [f"l: T.int32 = i % {lanes}",
            f"t: T.int32 = i // {lanes} % {taps}",
            f"k: T.int32 = i // {taps * lanes} % {entries}",
            f"n: T.int32 = i // {per_image}",
            f"o: T.int32 = owner[k] // {ngroups} * {lanes} + l",
            f"tap: T.int32 = (owner[k] % {ngroups} * {taps} + t) * 2",
            f"y0: T.int32 = taps[tap] * {dh} - {pt}",
            f"x0: T.int32 = taps[tap + 1] * {dw} - {pl}",
            "acc = T.alloc_buffer((1,), 'float32', scope='local')",
            "acc[0] = T.float32(0)",
            f"if o < {spec.out_channels} and k < {spec.entries}:",  # not padded lanes, nor an empty layer's slot
            f"    for y, x in T.grid({oh}, {ow}):",
            f"        if 0 <= y * {sh} + y0 and y * {sh} + y0 < {spec.height} and "
            f"0 <= x * {sw} + x0 and x * {sw} + x0 < {spec.width}:",
            f"            acc[0] = acc[0] + X[n, coff[k], y * {sh} + y0, x * {sw} + x0] * dY[n, o, y, x]",
            f"partial[n, i % {per_image}] = acc[0]"]
    return _elementwise(name, params, n_ * per_image, body, emulate)


def weight_grad_sum_cuda_tvmscript(spec: ConvSpec, name: str, emulate: bool = False) -> str:
    """TVMScript of dwv = the sum of ``partial`` over the images."""
    taps, entries = _check(spec)
    per_image = entries * taps * spec.lanes
    params = (f"partial: T.Buffer(({spec.batch}, {per_image}), 'float32'), "
              f"dwv: T.Buffer(({per_image},), 'float32')")
    body = ["acc = T.alloc_buffer((1,), 'float32', scope='local')", "acc[0] = T.float32(0)",
            f"for n in range({spec.batch}):", "    acc[0] = acc[0] + partial[n, i]", "dwv[i] = acc[0]"]
    return _elementwise(name, params, per_image, body, emulate)


def conv_input_grad_cuda_tvmscript(spec: ConvSpec, name: str, emulate: bool = False) -> str:
    """TVMScript of dX: dY, ptrT, obT, kfw, wv -> dX (one thread per input value)."""
    taps, entries = _check(spec)
    n_, lanes, ngroups, ic = spec.batch, spec.lanes, len(spec.groups), spec.in_channels
    (oh, ow), (sh, sw), (dh, dw), (pt, pl) = spec.out_hw, spec.stride, spec.dilation, spec.padding[:2]
    h, w = spec.height, spec.width
    params = (f"dY: T.Buffer(({n_}, {spec.out_channels}, {oh}, {ow}), 'float32'), "
              f"ptrT: T.Buffer(({ic * ngroups + 1},), 'int32'), obT: T.Buffer(({entries},), 'int32'), "
              f"kfw: T.Buffer(({entries},), 'int32'), wv: T.Buffer(({entries * taps * lanes},), 'float32'), "
              f"dX: T.Buffer(({n_}, {ic}, {h}, {w}), 'float32')")
    body = [f"ix: T.int32 = i % {w}",
            f"iy: T.int32 = i // {w} % {h}",
            f"c: T.int32 = i // {h * w} % {ic}",
            f"n: T.int32 = i // {ic * h * w}",
            "acc = T.alloc_buffer((1,), 'float32', scope='local')",
            "acc[0] = T.float32(0)"]
    for g, group in enumerate(spec.groups):
        body += [f"for k in range(ptrT[c * {ngroups} + {g}], ptrT[c * {ngroups} + {g + 1}]):"]
        for t, (dy, dx) in enumerate(group):
            yy, xx = f"(iy + {pt - dy * dh})", f"(ix + {pl - dx * dw})"
            reach = [f"0 <= {yy}", f"{yy} < {oh * sh}", f"0 <= {xx}", f"{xx} < {ow * sw}"]
            reach += [f"{yy} % {sh} == 0"] if sh > 1 else []
            reach += [f"{xx} % {sw} == 0"] if sw > 1 else []
            body += [f"    if {' and '.join(reach)}:",
                     f"        for l in range({lanes}):",
                     f"            if obT[k] * {lanes} + l < {spec.out_channels}:",
                     f"                acc[0] = acc[0] + wv[kfw[k] * {taps * lanes} + {t * lanes} + l] * "
                     f"dY[n, obT[k] * {lanes} + l, {yy} // {sh}, {xx} // {sw}]"]
    body.append("dX[n, c, iy, ix] = acc[0]")
    return _elementwise(name, params, n_ * ic * h * w, body, emulate)
