"""Generated backward kernels of a pattern-sparse conv, for training on the patterns (issue #16).

Training keeps activations in torch's channels_last layout, which is NCHW[Li]c with one block of
Li = IC lanes, so the forward pass is ``conv_tvmscript`` with ``in_lanes = IC`` and
``channels_last_out``; these are its two gradients on the same ``ConvSpec`` and the same compact
weights (ptr, coff, wv: ``compact_weights``). Only the kept taps of kept (output block, input
channel) entries are computed: removed weights get no gradient and cost nothing.

Tensors (OCp = OCB * L; the forward reads X (N, H, W, IC) and writes Y (N, OH, OW, OCp)):
  dY    (N, OH, OW, OCp)   output gradient, channels_last (zero in padded lanes)
  toff  (NK * T,)          per entry and tap, its input offset (``tap_offsets``)
  owner (NK,)              ob * G + g of each entry: its output block and tap group (``entry_owners``)
  dwv   (NK * T * L,)      weight gradient in wv's layout (``conv_weight_grad_tvmscript``)
  ptrT  (IC * G + 1,)      entry range of (input channel ic, tap group g), ``transposed_entries``
  obT   (NK,)              output block of each transposed entry
  kfw   (NK,)              its index in the forward entry order (where its weights are in wv)
  dX    (N, H, W, IC)      input gradient, channels_last (``conv_input_grad_tvmscript``)

The weight gradient broadcasts one input value into the L output lanes of dY, like the forward.
The input gradient multiplies dY's L lanes by the entry's L weights and sums the lanes (a
transposing reduction, ``_lane_sums``): the output channels of a block share the pattern, so its
reduction is the dense direction.
For stride s, the input pixels split into s x s parity classes; in each, a tap either never or
always reaches an output pixel, at a unit-stride offset, so each class is a stride-1 gather.
"""
from __future__ import annotations

import math

import numpy as np

from .conv_kernels import ATTRS, ConvSpec, _check_geometry, _padded_row, group_taps


def transposed_entries(ptr: np.ndarray, coff: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, ...]:
    """The forward entries (sorted by output block, tap group) re-sorted by (input channel, tap
    group): (ptrT (IC * G + 1,), obT (NK,), kfw (NK,)) as the input-gradient kernel reads them."""
    groups, channels = len(spec.groups), spec.in_channels
    owner = np.repeat(np.arange(spec.out_blocks * groups), np.diff(ptr))  # ob * G + g of each entry
    entries = int(ptr[-1])
    ob, g, ic = owner // groups, owner % groups, coff[:entries]
    order = np.lexsort((ob, g, ic))  # by ic, then group, then block
    counts = np.bincount(ic * groups + g, minlength=channels * groups)
    ptr_t = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    if not entries:  # buffers keep one element
        return ptr_t, np.zeros(1, np.int32), np.zeros(1, np.int32)
    return ptr_t, ob[order].astype(np.int32), order.astype(np.int32)


def _signature(name: str, params: list[str]) -> list[str]:
    return ["@T.prim_func", f"def {name}({', '.join(params)}):", "    " + ATTRS.format(name=name)]


def _check_training_spec(spec: ConvSpec) -> None:
    _check_geometry(spec)
    if spec.in_lanes != spec.in_channels or not spec.channels_last_out or spec.epilogue:
        raise ValueError("training kernels read channels_last: in_lanes = in_channels, channels_last_out, "
                         "no epilogue")
    group_taps(spec)


def entry_owners(ptr: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """owner (NK,) int32: ob * G + g of every entry (``ptr`` ranges per (ob, g))."""
    owners = np.repeat(np.arange(spec.out_blocks * len(spec.groups)), np.diff(ptr)).astype(np.int32)
    return owners if owners.size else np.zeros(1, np.int32)


def weight_grad_chunk(entries: int) -> int:
    """Entries the weight gradient accumulates per pass over an image (chunk x T vector
    accumulators): all of them where there are at most 6 (one pass, nothing recomputed: 5
    entries ran 27% faster than in chunks of 4, whose shifted last chunk recomputes 3), else 4
    (larger chunks ran slower: 73 entries 0.42 ms in chunks of 4, 0.62 in 5; AMD EPYC, AVX-512,
    ResNet-20's layers at batch 128)."""
    return max(entries, 1) if entries <= 6 else 4


def tap_offsets(ptr: np.ndarray, coff: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """toff (NK * T,) int32: per forward entry and tap, the offset in the weight-gradient kernel's
    (padded) channels_last input of the entry's channel at that tap."""
    taps, ic, (_, pw), (dh, dw) = len(spec.groups[0]), spec.in_channels, spec.padded_hw, spec.dilation
    table = np.asarray([[(dy * dh * pw + dx * dw) * ic for dy, dx in g] for g in spec.groups], np.int64)
    owner = np.repeat(np.arange(spec.out_blocks * len(spec.groups)), np.diff(ptr)) % len(spec.groups)
    entries = int(ptr[-1])
    if not entries:
        return np.zeros(taps, np.int32)
    return (table[owner] + coff[:entries, None]).reshape(-1).astype(np.int32)


def _image_copy(dst: str, image: str, height: int, width: int, lanes: int, padding, indent: str) -> list[str]:
    """Statements filling the job-local flat ``dst`` with image ``image`` of Xf (H x W x lanes
    floats each) zero-padded by (top, left, bottom, right): halo rows zeroed whole, each interior
    row as a padded row."""
    pt, pl, pb, pr = padding
    pw = width + pl + pr
    size = (height + pt + pb) * pw * lanes
    lines = [f"{indent}{dst} = T.alloc_buffer(({size},), 'float32')"]
    for first, rows in ((0, pt), (pt + height, pb)):
        if rows:
            lines += [f"{indent}for i in T.vectorized({rows * pw * lanes}):",
                      f"{indent}    {dst}[{first * pw * lanes} + i] = T.float32(0)"]
    lines.append(f"{indent}for y in range({height}):")
    return lines + _padded_row(dst, f"(y + {pt}) * {pw * lanes}", f"({image} * {height} + y) * {width * lanes}",
                               width, lanes, pl, pr, indent + "    ")


def conv_weight_grad_tvmscript(spec: ConvSpec, name: str, parts: int = 1, chunk: int | None = None) -> str:
    """TVMScript of dwv = d(loss)/d(wv): X (N, H, W, IC), dY (N, OH, OW, OCp), owner, toff -> dwv.

    ``parts`` jobs (the threads) each take every parts-th image: copy it zero-padded into a
    job-local scratch (it stays in L2), then run all entries over its pixels ``chunk`` at a time,
    whatever their output blocks and patterns (the tap offsets come from ``tap_offsets``; the
    last chunk is shifted back onto the end, recomputing an entry with the same result;
    ``weight_grad_chunk`` by default): chunk x T vector accumulators, each pixel's chunk dY vectors
    feeding chunk x T FMAs with one broadcast input value each, added into the job's partial dwv
    (in L1: NK x T x L floats). The partials are summed at the end."""
    _check_training_spec(spec)
    (sh, sw), lanes, n_ = spec.stride, spec.lanes, spec.batch
    (oh, ow), (_, pw) = spec.out_hw, spec.padded_hw
    ic, ocb, ngroups, taps = spec.in_channels, spec.out_blocks, len(spec.groups), len(spec.groups[0])
    entries, ocp = max(spec.entries, 1), spec.out_blocks * spec.lanes
    chunk, parts = min(chunk or weight_grad_chunk(entries), entries), max(1, min(parts, n_))
    size, part = n_ * spec.height * spec.width * ic, entries * taps * lanes
    lines = _signature(name, [f"X: T.Buffer(({n_}, {spec.height}, {spec.width}, {ic}), 'float32')",
                              f"dY: T.Buffer(({n_}, {oh}, {ow}, {ocp}), 'float32')",
                              f"owner: T.Buffer(({entries},), 'int32')",
                              f"toff: T.Buffer(({entries * taps},), 'int32')",
                              f"dwv: T.Buffer(({part},), 'float32')"])
    lines += [f"    Xf = T.decl_buffer(({size},), 'float32', data=X.data)",
              f"    partial = T.alloc_buffer(({parts * part},), 'float32')",
              f"    for p in T.parallel({parts}):",
              f"        for i in T.vectorized({part}):",
              f"            partial[p * {part} + i] = T.float32(0)",
              f"        for m in range({math.ceil(n_ / parts)}):",
              f"            n: T.let = p + m * {parts}",
              f"            if n < {n_}:"]
    ind = "                "
    source, image = "Xf", f"n * {spec.height * spec.width * ic}"
    if spec.padded:
        lines += _image_copy("Xn", "n", spec.height, spec.width, ic, spec.padding, ind)
        source, image = "Xn", "0"
    lines += [f"{ind}for c in range({math.ceil(entries / chunk)}):"]
    ind += "    "
    for e in range(chunk):
        lines += [f"{ind}k{e}: T.let = T.min(c * {chunk} + {e}, {entries - 1})",
                  f"{ind}o{e}: T.let = owner[k{e}] // {ngroups} * {lanes}",
                  f"{ind}acc{e} = T.alloc_buffer(({taps}, {lanes}), 'float32')",
                  f"{ind}for t in T.unroll({taps}):",
                  f"{ind}    for l in T.vectorized({lanes}):",
                  f"{ind}        acc{e}[t, l] = partial[p * {part} + (k{e} * {taps} + t) * {lanes} + l]"]
        lines += [f"{ind}t{e}_{t}: T.let = toff[k{e} * {taps} + {t}]" for t in range(taps)]
    lines += [f"{ind}for y, x in T.grid({oh}, {ow}):",
              f"{ind}    pix: T.let = {image} + (y * {sh * pw} + x * {sw}) * {ic}"]
    for e in range(chunk):
        for t in range(taps):
            lines += [f"{ind}    for l in T.vectorized({lanes}):",
                      f"{ind}        acc{e}[{t}, l] = acc{e}[{t}, l] + {source}[pix + t{e}_{t}] * "
                      f"dY[n, y, x, o{e} + l]"]
    for e in range(chunk):
        lines += [f"{ind}for t in T.unroll({taps}):",
                  f"{ind}    for l in T.vectorized({lanes}):",
                  f"{ind}        partial[p * {part} + (k{e} * {taps} + t) * {lanes} + l] = acc{e}[t, l]"]
    lines += [f"    for i in T.vectorized({part}):",
              "        dwv[i] = " + " + ".join(f"partial[{q * part} + i]" for q in range(parts))]
    return "\n".join(lines)


def _lane_sums(vectors: list[tuple[str, str]], lanes: int) -> list[str]:
    """Statements storing the sum of the lanes of each vector (TIR text of an L-lane value) into
    its target (TIR text of a scalar element): a transposing reduction, in which each level adds
    the two halves of every lane segment of two vectors into one vector (two shuffles and one add
    per pair), so L vectors take L - 1 adds instead of L x log2(L) (one tree per vector)."""
    zero = f"T.Broadcast(T.float32(0), {lanes})"
    items = [(vector, [target] * lanes) for vector, target in vectors]  # value, lane -> owner
    items += [(zero, [None] * lanes)] * (-len(items) % lanes)
    lines, segment, level = [], lanes, 0
    while segment > 1:
        half, merged = segment // 2, []
        for q in range(len(items) // 2):
            (va, oa), (vb, ob) = items[2 * q], items[2 * q + 1]
            first, owners = [], []
            for seg in range(lanes // segment):
                first += [seg * segment + j for j in range(half)] + [lanes + seg * segment + j for j in range(half)]
                owners += [oa[seg * segment + j] for j in range(half)] + [ob[seg * segment + j] for j in range(half)]
            second = [i + half for i in first]
            name = f"red{level}_{q}"
            lines += [f"{name} = T.alloc_buffer(({lanes},), 'float32')",
                      f"{name}[T.ramp(0, 1, {lanes})] = T.Shuffle([{va}, {vb}], {first}) + "
                      f"T.Shuffle([{va}, {vb}], {second})"]
            merged.append((f"{name}[T.ramp(0, 1, {lanes})]", owners))
        items, segment, level = merged, half, level + 1
    for q, (value, owners) in enumerate(items):
        for lane, target in enumerate(owners):
            if target is not None:
                lines.append(f"{target} = {value.replace(f'T.ramp(0, 1, {lanes})', str(lane))}")
    return lines


def _class_offsets(spec: ConvSpec, a: int, length: int, stride: int, pad: int, dilation: int, k: int):
    """For input rows (or columns) a, a + s, ...: the number of them, and per kernel tap d the
    unit-stride offset o with output row = i + o, or None where the tap never reaches this class."""
    count = math.ceil((length - a) / stride) if length > a else 0
    return count, [((a + pad - d * dilation) // stride if (a + pad - d * dilation) % stride == 0 else None)
                   for d in range(k)]


def conv_input_grad_tvmscript(spec: ConvSpec, name: str) -> str:
    """TVMScript of dX = d(loss)/dX: dY (N, OH, OW, OCp), ptrT, obT, kfw, wv -> dX (N, H, W, IC).

    A job is one image: its dY is copied into a job-local zero-padded scratch (in L2) so that every
    tap of every class reads inside it; then per parity class, RY x XW tile and input channel,
    RY x XW vector accumulators gather entry weights x dY lanes over the channel's entries, and
    each sums its lanes into one dX value (channels no entry uses get zeros)."""
    _check_training_spec(spec)
    (kh, kw), (sh, sw), (dh, dw), lanes, n_ = spec.kernel, spec.stride, spec.dilation, spec.lanes, spec.batch
    (oh, ow), (pt, pl, _, _) = spec.out_hw, spec.padding
    ic, ngroups, taps = spec.in_channels, len(spec.groups), len(spec.groups[0])
    entries, ocp = max(spec.entries, 1), spec.out_blocks * spec.lanes
    classes = []
    for a in range(sh):
        rows, offs_y = _class_offsets(spec, a, spec.height, sh, pt, dh, kh)
        for b in range(sw):
            cols, offs_x = _class_offsets(spec, b, spec.width, sw, pl, dw, kw)
            if rows and cols:
                classes.append((a, b, rows, cols, offs_y, offs_x))
    ys = [(i, o) for _, _, rows, _, offs, _ in classes for o in offs if o is not None for i in (0, rows - 1)]
    xs = [(j, o) for _, _, _, cols, _, offs in classes for o in offs if o is not None for j in (0, cols - 1)]
    top = max([0] + [-(i + o) for i, o in ys])
    bottom = max([0] + [i + o - (oh - 1) for i, o in ys])
    left = max([0] + [-(j + o) for j, o in xs])
    right = max([0] + [j + o - (ow - 1) for j, o in xs])
    qw = ow + left + right
    lines = _signature(name, [f"dY: T.Buffer(({n_}, {oh}, {ow}, {ocp}), 'float32')",
                              f"ptrT: T.Buffer(({ic * ngroups + 1},), 'int32')",
                              f"obT: T.Buffer(({entries},), 'int32')",
                              f"kfw: T.Buffer(({entries},), 'int32')",
                              f"wv: T.Buffer(({entries * taps * lanes},), 'float32')",
                              f"dX: T.Buffer(({n_}, {spec.height}, {spec.width}, {ic}), 'float32')"])
    lines += [f"    Xf = T.decl_buffer(({n_ * oh * ow * ocp},), 'float32', data=dY.data)",
              f"    for n in T.parallel({n_}):"]
    lines += _image_copy("Xp", "n", oh, ow, ocp, (top, left, bottom, right), "        ")
    for a, b, rows, cols, offs_y, offs_x in classes:
        xw, ry = min(spec.tile[0], cols), min(spec.tile[1], rows)
        row_tiles, col_tiles = math.ceil(rows / ry), math.ceil(cols / xw)
        lines += [f"        for it in range({row_tiles}):",
                  f"            i0: T.let = T.min(it * {ry}, {rows - ry})",
                  f"            for jt in range({col_tiles}):",
                  f"                j0: T.let = T.min(jt * {xw}, {cols - xw})",
                  f"                pix: T.let = ((i0 + {top}) * {qw} + j0 + {left}) * {ocp}",
                  f"                for c in range({ic}):"]
        accs = [f"acc{r}" for r in range(ry)]
        body = []  # per input channel that some entry uses; the others get zeros
        for acc in accs:
            body += [f"{acc} = T.alloc_buffer(({xw}, {lanes}), 'float32')",
                     f"for xi in T.unroll({xw}):",
                     f"    for l in T.vectorized({lanes}):",
                     f"        {acc}[xi, l] = T.float32(0)"]
        for g, group in enumerate(spec.groups):
            reach = [(t, offs_y[dy], offs_x[dx]) for t, (dy, dx) in enumerate(group)
                     if offs_y[dy] is not None and offs_x[dx] is not None]
            if not reach:
                continue
            body += [f"for k in range(ptrT[c * {ngroups} + {g}], ptrT[c * {ngroups} + {g + 1}]):",
                     f"    w0: T.let = kfw[k] * {taps * lanes}",
                     f"    base: T.let = pix + obT[k] * {lanes}"]
            for t, oy, ox in reach:
                for r in range(ry):
                    body += [f"    for xi in T.unroll({xw}):",
                             f"        for l in T.vectorized({lanes}):",
                             f"            {accs[r]}[xi, l] = {accs[r]}[xi, l] + wv[w0 + {t * lanes} + l]"
                             f" * Xp[base + {((r + oy) * qw + ox) * ocp} + xi * {ocp} + l]"]
        body += _lane_sums([(f"{accs[r]}[{xi}, T.ramp(0, 1, {lanes})]",
                             f"dX[n, {a} + (i0 + {r}) * {sh}, {b} + (j0 + {xi}) * {sw}, c]")
                            for r in range(ry) for xi in range(xw)], lanes)
        lines += [f"                    if ptrT[c * {ngroups}] == ptrT[c * {ngroups} + {ngroups}]:",
                  f"                        for r, xi in T.grid({ry}, {xw}):",
                  f"                            dX[n, {a} + (i0 + r) * {sh}, {b} + (j0 + xi) * {sw}, c] = T.float32(0)",
                  "                    else:"]
        lines += ["                        " + x for x in body]
    return "\n".join(lines)
