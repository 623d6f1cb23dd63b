"""Every generated conv variant against torch (float64) on odd shapes, compiled for the host."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from clicktrain_deploy.compile.conv_kernels import (
    ConvSpec, DepthwiseSpec, all_taps, block_diagonal, compact_weights, connectivity_assignment, conv_tvmscript,
    depthwise_tvmscript, depthwise_weights, epilogue_expression, from_nchwc, library_taps, pattern_assignment,
    to_nchwc,
)
from clicktrain_deploy.compile.ops import LAYOUT_ATTR, pack_tvmscript, unpack_tvmscript
from clicktrain_deploy.compile.targets import TARGETS
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES

HOST = tvm.target.Target({**TARGETS.get("x86")().tvm_target, "num-cores": 2})
LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")().numpy()
RESIDUAL_RELU = (("residual",), ("relu",))


def _build(source: str, name: str = "conv"):
    return tvm.compile(tvm.script.from_source(source), target=HOST).jit()[name]


def reference_epilogue(v: torch.Tensor, steps, residual: torch.Tensor) -> torch.Tensor:
    """The epilogue steps in torch (written apart from ``epilogue_expression``, to check it)."""
    for step in steps:
        op = step[0]
        if op == "residual":
            v = v + residual
        elif op == "relu":
            v = torch.relu(v)
        elif op == "clip":
            v = torch.clamp(v, float(np.float32(step[1])), float(np.float32(step[2])))
        elif op == "hardsigmoid":
            v = torch.clamp(float(np.float32(step[1])) * v + float(np.float32(step[2])), 0, 1)
        elif op == "hardswish":
            v = v * torch.clamp(float(np.float32(step[1])) * v + float(np.float32(step[2])), 0, 1)
        elif op == "sigmoid":
            v = torch.sigmoid(v)
        elif op == "silu":
            v = v * torch.sigmoid(v)
        else:
            raise AssertionError(op)
    return v


def _reference(x, weight, bias, res, *, stride, padding, dilation, epilogue, groups=1):
    pt, pl, pb, pr = padding
    xp = torch.nn.functional.pad(torch.from_numpy(x).double(), (pl, pr, pt, pb))
    ref = torch.nn.functional.conv2d(xp, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(),
                                     stride=stride, dilation=dilation, groups=groups)
    return reference_epilogue(ref, epilogue, torch.from_numpy(res).double()).numpy()


def _run(weight, assign, groups, *, height, width, lanes, in_lanes=None, kernel=None, stride=(1, 1),
         padding=(1, 1, 1, 1), dilation=(1, 1), batch=1, epilogue=RESIDUAL_RELU, tile=(4, 4), seed=0,
         reference_weight=None, conv_groups=1, **schedule):
    """Build the conv kernel for ``weight`` (OC, IC, KH, KW), run it on random data and compare
    with torch; ``reference_weight``/``conv_groups``: the grouped conv torch runs instead."""
    rng = np.random.default_rng(seed)
    out_channels, in_channels = weight.shape[:2]
    in_lanes = in_lanes or lanes
    base = dict(in_channels=in_channels, out_channels=out_channels, height=height, width=width,
                in_lanes=in_lanes, lanes=lanes, groups=groups, kernel=kernel or weight.shape[2:], stride=stride,
                padding=padding, dilation=dilation, batch=batch, epilogue=epilogue, tile=tile, **schedule)
    ptr, coff, wv = compact_weights(weight, assign, ConvSpec(entries=0, **base))
    spec = ConvSpec(entries=int(ptr[-1]), **base)
    kernel_fn = _build(conv_tvmscript(spec, "conv"))
    x = rng.standard_normal((batch, in_channels, height, width)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    oh, ow = spec.out_hw
    res = rng.standard_normal((batch, out_channels, oh, ow)).astype(np.float32)
    bias_blocks = to_nchwc(bias[None, :, None, None], lanes).reshape(spec.out_blocks, lanes)
    args = [to_nchwc(x, in_lanes), ptr, coff, wv, bias_blocks]
    args += [to_nchwc(res, lanes)] if spec.residual else []
    args += [np.zeros((batch, spec.out_blocks, oh, ow, lanes), np.float32)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    kernel_fn(*tensors)
    got = from_nchwc(tensors[-1].numpy(), out_channels)
    ref = _reference(x, weight if reference_weight is None else reference_weight, bias, res, stride=stride,
                     padding=padding, dilation=dilation, epilogue=epilogue, groups=conv_groups)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    return spec


def _dense(out_channels, in_channels, kh, kw, lanes, **kwargs):
    weight = np.random.default_rng(7).standard_normal((out_channels, in_channels, kh, kw)).astype(np.float32)
    blocks = -(-out_channels // lanes)
    return _run(weight, np.zeros((blocks, in_channels), int), (all_taps(kh, kw),), lanes=lanes, **kwargs)


def _pattern_weight(out_channels, in_channels, block, removed, seed=0):
    rng = np.random.default_rng(seed)
    blocks = -(-out_channels // block)
    ids = rng.integers(0, len(LIBRARY), (blocks, in_channels))
    ids[rng.random((blocks, in_channels)) < removed] = -1
    kernel_ids = np.repeat(ids, block, 0)[:out_channels]
    mask = LIBRARY[np.maximum(kernel_ids, 0)] & (kernel_ids >= 0)[..., None]
    weight = rng.standard_normal((out_channels, in_channels, 9)).astype(np.float32) * mask
    return weight.reshape(out_channels, in_channels, 3, 3), ids


@pytest.mark.parametrize("out_channels,in_channels,size,stride,lanes,block,tile", [
    (16, 16, (8, 8), 1, 16, 16, (4, 4)),      # one block, every pattern used
    (24, 20, (7, 9), 2, 8, 8, (4, 4)),        # channels not a multiple of the block, odd sizes, stride 2
    (32, 16, (14, 14), 2, 4, 16, (4, 4)),     # NEON lanes, B=16 model
    (20, 12, (5, 5), 1, 4, 4, (4, 4)),        # OC not a multiple of lanes (last block partial)
    (48, 24, (9, 7), 2, 16, 16, (2, 2)),      # the NEON B=16 layout: 16 lanes, 2x2 tiles, odd, stride 2
    (32, 16, (11, 13), 1, 16, 16, (2, 3)),    # tile rows and columns both cut at the edge
])
def test_pattern_variant(out_channels, in_channels, size, stride, lanes, block, tile):
    weight, ids = _pattern_weight(out_channels, in_channels, block, removed=0.6)
    ids[0] = -1  # a fully removed output block
    weight[:block] = 0
    assign = pattern_assignment(ids, block, out_channels, lanes)
    _run(weight, assign, library_taps(LIBRARY), height=size[0], width=size[1], stride=(stride, stride),
         lanes=lanes, tile=tile)


def test_every_library_pattern_is_exercised():
    assert sorted(len(t) for t in library_taps(LIBRARY)) == [4] * 8
    weight, ids = _pattern_weight(16, 40, 16, removed=0.0, seed=3)
    assert set(np.unique(ids)) == set(range(8))
    _run(weight, pattern_assignment(ids, 16, 16, 8), library_taps(LIBRARY), height=6, width=6, lanes=8,
         epilogue=(), batch=2)


def test_connectivity_variant_for_per_kernel_patterns():
    weight, ids = _pattern_weight(24, 16, 1, removed=0.7, seed=1)  # B=1: lanes differ in pattern
    kept = np.abs(weight).sum((2, 3)) > 0
    _run(weight, connectivity_assignment(kept, 8), (all_taps(3, 3),), height=9, width=7, lanes=8)


@pytest.mark.parametrize("kernel,padding", [((1, 1), (0, 0, 0, 0)), ((3, 3), (1, 1, 1, 1)),
                                            ((5, 5), (2, 2, 2, 2)), ((7, 7), (3, 3, 3, 3))])
def test_stride2_stem_with_three_input_channels(kernel, padding):
    """ImageNet-style stems: IC = 3 < L lanes, so the input block holds 3 lanes."""
    _dense(20, 3, *kernel, 16, in_lanes=3, height=23, width=21, stride=(2, 2), padding=padding,
           epilogue=(("relu",),), tile=(8, 2))


@pytest.mark.parametrize("case", [
    dict(kh=3, kw=3, height=13, width=11),                                    # odd sizes
    dict(kh=1, kw=3, height=9, width=10, padding=(0, 1, 0, 1)),               # 1xk
    dict(kh=3, kw=3, height=10, width=9, padding=(0, 1, 1, 0)),               # asymmetric padding
    dict(kh=3, kw=3, height=12, width=11, dilation=(2, 2), padding=(2, 2, 2, 2)),
    dict(kh=3, kw=3, height=11, width=12, stride=(2, 1)),                     # separate strides
    dict(kh=3, kw=3, height=7, width=9, batch=3),                             # batch 3
    dict(kh=1, kw=1, height=9, width=9, padding=(0, 0, 0, 0), batch=3),       # unpadded: reads X directly
    dict(kh=2, kw=2, height=9, width=8, stride=(2, 2), padding=(0, 0, 1, 1)), # even kernel, bottom pad only
    dict(kh=3, kw=3, height=3, width=2, tile=(8, 2)),                         # tile wider and taller than the map
])
def test_dense_geometries(case):
    case = dict(case)
    kh, kw = case.pop("kh"), case.pop("kw")
    _dense(20, 12, kh, kw, 8, **case)  # OC 20 on 8 lanes: the last block is partial


def test_grouped_conv_as_block_diagonal():
    """4 groups: the block-diagonal weight with the all-zero kernel blocks left unassigned."""
    rng = np.random.default_rng(3)
    grouped = rng.standard_normal((32, 6, 3, 3)).astype(np.float32)  # 24 -> 32 channels, 4 groups
    weight = block_diagonal(grouped, 4)
    assign = connectivity_assignment(np.abs(weight).sum((2, 3)) > 0, 8)
    assert (assign == -1).sum() == 4 * 24 - 4 * 6  # each 8-lane block reads only its group's 6 channels
    spec = _run(weight, assign, (all_taps(3, 3),), height=9, width=11, lanes=8, stride=(2, 2),
                reference_weight=grouped, conv_groups=4)
    assert spec.entries == 4 * 6 and not spec.full_dense


@pytest.mark.parametrize("case", [
    dict(out_tile=2, tile=(3, 2), ic_block=8),                              # 3 chunks, bands of row tiles
    dict(out_tile=3, tile=(4, 1), ic_block=16, stride=(2, 2), batch=2),     # OCB 5: last group shifted back
    dict(out_tile=2, tile=(8, 1)),                                          # register blocking, one chunk
    dict(out_tile=1, tile=(4, 2), ic_block=5),                              # chunks not a multiple of lanes
])
def test_dense_output_block_tiles_and_cache_blocks(case):
    """Full-dense schedule: several output blocks per register tile and input-channel cache
    blocks whose partial sums wait in Y (overlapping shifted tiles must store each pixel once)."""
    spec = _dense(40, 24, 3, 3, 8, height=9, width=7, **case)
    assert spec.full_dense
    if case.get("ic_block"):
        assert spec.cache_blocks()[0] == case["ic_block"]


def test_cache_blocks_only_where_a_tile_overflows_l1():
    deep = ConvSpec(512, 64, 7, 7, 16, 16, (all_taps(3, 3),), 4 * 512, tile=(8, 1), out_tile=2)
    block, band = deep.cache_blocks()
    assert block < 512 and block % 16 == 0 and band == 7  # 7x7: every row tile of the map in one job
    wide = ConvSpec(64, 64, 56, 56, 16, 16, (all_taps(3, 3),), 4 * 64, tile=(8, 1), out_tile=2)
    assert wide.cache_blocks() == (64, 1)
    pointwise = ConvSpec(256, 64, 56, 56, 16, 16, (all_taps(1, 1),), 4 * 256, kernel=(1, 1), padding=(0,) * 4)
    assert pointwise.cache_blocks() == (256, 1)
    with pytest.raises(ValueError, match="full-dense"):
        conv_tvmscript(ConvSpec(16, 32, 5, 5, 16, 16, library_taps(LIBRARY), 3, out_tile=2), "conv")


EPILOGUES = [
    (),
    (("relu",),),
    (("residual",),),
    (("residual",), ("relu",)),
    (("clip", 0.0, 6.0),),
    (("clip", -0.5, 0.3),),
    (("hardsigmoid", 1 / 6, 0.5),),
    (("hardswish", 1 / 6, 0.5),),
    (("sigmoid",),),
    (("silu",),),
    (("relu",), ("residual",), ("hardswish", 0.2, 0.5)),
]


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: "-".join(s[0] for s in e) or "none")
def test_epilogue_steps(epilogue):
    _dense(12, 8, 3, 3, 8, height=5, width=7, epilogue=epilogue)


def test_epilogue_expression_text():
    text = epilogue_expression((("residual",), ("hardswish", 1 / 6, 0.5), ("clip", 0, float("inf"))), "a + b", "R[i]")
    gate = "T.min(T.max(T.float32(0.1666666716337204) * ((a + b) + R[i]) + T.float32(0.5), T.float32(0)), T.float32(1))"
    assert text == f"T.max((((a + b) + R[i]) * {gate}), T.float32(0.0))"  # 1/6 as its float32 value; no upper clip
    assert epilogue_expression((), "v", "R") == "v"
    with pytest.raises(ValueError, match="at most one residual"):
        epilogue_expression((("residual",), ("residual",)), "v", "R")
    with pytest.raises(ValueError, match="unknown epilogue step"):
        epilogue_expression((("gelu",),), "v", "R")


def test_sigmoid_and_silu_at_extreme_values():
    """The vectorised exp of the sigmoid steps: no overflow or NaN far out, ~1e-7 relative."""
    v = np.array([-1e4, -200, -87.5, -30, -3, -1e-3, 0, 1e-3, 0.5, 3, 30, 87.5, 200, 1e4, -0.34657, 0.34657] * 4,
                 np.float32)
    v64 = torch.from_numpy(v).double()
    for steps, expected in [((("sigmoid",),), torch.sigmoid(v64).numpy()),
                            ((("silu",),), (v64 * torch.sigmoid(v64)).numpy())]:
        body = epilogue_expression(steps, "A[i * 16 + l]", "")
        source = ("@T.prim_func\ndef f(A: T.Buffer((64,), 'float32'), B: T.Buffer((64,), 'float32')):\n"
                  "    T.func_attr({'tirx.noalias': True, 'global_symbol': 'f'})\n    for i in range(4):\n"
                  f"        for l in T.vectorized(16):\n            B[i * 16 + l] = {body}")
        out = tvm.runtime.tensor(np.zeros(64, np.float32))
        _build(source, "f")(tvm.runtime.tensor(v), out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-30)


def _depthwise(channels, lanes, *, height, width, kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1),
               dilation=(1, 1), batch=1, epilogue=RESIDUAL_RELU, tile=(4, 4)):
    rng = np.random.default_rng(5)
    spec = DepthwiseSpec(channels, height, width, lanes, kernel, stride, padding, dilation, batch, epilogue, tile)
    fn = _build(depthwise_tvmscript(spec, "dw"), "dw")
    weight = rng.standard_normal((channels, 1, *kernel)).astype(np.float32)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    oh, ow = spec.out_hw
    res = rng.standard_normal((batch, channels, oh, ow)).astype(np.float32)
    args = [to_nchwc(x, lanes), depthwise_weights(weight, lanes), to_nchwc(bias[None, :, None, None], lanes)
            .reshape(spec.blocks, lanes)]
    args += [to_nchwc(res, lanes)] if spec.residual else []
    args += [np.zeros((batch, spec.blocks, oh, ow, lanes), np.float32)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    fn(*tensors)
    ref = _reference(x, weight, bias, res, stride=stride, padding=padding, dilation=dilation,
                     epilogue=epilogue, groups=channels)
    np.testing.assert_allclose(from_nchwc(tensors[-1].numpy(), channels), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", [
    dict(height=13, width=11),                                                      # 3x3 s1
    dict(height=14, width=13, stride=(2, 2), epilogue=(("clip", 0.0, 6.0),), batch=2),  # 3x3 s2, ReLU6
    dict(height=11, width=12, kernel=(5, 5), padding=(2, 2, 2, 2), epilogue=(("hardswish", 1 / 6, 0.5),)),
    dict(height=9, width=10, padding=(0, 1, 1, 0), dilation=(2, 1), epilogue=()),   # asymmetric, dilated
    # more output rows than one band (DEPTHWISE_BAND_ROWS): 3 bands, the last shifted back
    dict(height=37, width=6, epilogue=(("clip", 0.0, 6.0),), batch=2),
    dict(height=45, width=7, stride=(2, 2), epilogue=()),                          # 23 rows: 2 bands
    dict(height=35, width=9, padding=(0, 0, 0, 0)),                                # unpadded, read in place
    dict(height=40, width=8, padding=(2, 1, 0, 1), dilation=(3, 1), stride=(2, 1), epilogue=()),
])
def test_depthwise(case):
    _depthwise(20, 8, **case)  # 20 channels on 8 lanes: the last block is partial


def test_depthwise_weights_layout():
    weight = np.arange(5 * 9, dtype=np.float32).reshape(5, 1, 3, 3)
    packed = depthwise_weights(weight, 4)
    assert packed.shape == (2, 9, 4)
    assert packed[1, 2, 0] == weight[4, 0, 0, 2] and not packed[1, :, 1:].any()
    with pytest.raises(ValueError, match="multiplier 1"):
        depthwise_weights(np.zeros((4, 2, 3, 3), np.float32), 4)


def test_pack_and_unpack_round_trip():
    x = np.random.default_rng(8).standard_normal((3, 13, 5, 7)).astype(np.float32)
    pack = tvm.script.from_source(pack_tvmscript(3, 13, 5, 7, 8, "pack"))
    assert pack.attrs[LAYOUT_ATTR] == "pack"
    packed = tvm.runtime.tensor(np.full((3, 2, 5, 7, 8), np.nan, np.float32))
    tvm.compile(pack, target=HOST).jit()["pack"](tvm.runtime.tensor(x), packed)
    np.testing.assert_array_equal(packed.numpy(), to_nchwc(x, 8))  # padded lanes are zeros
    back = tvm.runtime.tensor(np.zeros_like(x))
    _build(unpack_tvmscript(3, 13, 5, 7, 8, "unpack"), "unpack")(packed, back)
    np.testing.assert_array_equal(back.numpy(), x)


def _workspace_calls(spec: ConvSpec, target: str) -> list[str]:
    built = tvm.compile(tvm.script.from_source(conv_tvmscript(spec, "conv")),
                        target=tvm.target.Target(TARGETS.get(target)().tvm_target))
    module = built.mod.imports[0] if built.mod.imports else built.mod
    return [line for line in module.inspect_source("ll").splitlines()
            if "call ptr" in line and "(i32 1, i32 %dev_id" in line]


@pytest.mark.parametrize("target,lanes,tile", [("x86", 16, (4, 4)), ("cortex-a72", 16, (2, 2))])
def test_accumulators_need_no_workspace_call(target, lanes, tile):
    """Only the padded-input scratch is a workspace allocation: the accumulator tile (1 KiB on
    AVX-512) and the per-pattern entry offsets live on the stack, i.e. in registers."""
    spec = ConvSpec(16, 16, 12, 12, lanes, lanes, library_taps(LIBRARY), 8, epilogue=RESIDUAL_RELU, tile=tile)
    calls = _workspace_calls(spec, target)
    assert len(calls) == 1 and "%Xp = " in calls[0]


def test_dense_schedule_needs_no_workspace_call():
    """Two output blocks per tile and input-channel cache blocks: still only the scratch."""
    spec = ConvSpec(64, 48, 12, 12, 16, 16, (all_taps(3, 3),), 3 * 64, tile=(8, 1), out_tile=2, ic_block=16,
                    epilogue=RESIDUAL_RELU)
    calls = _workspace_calls(spec, "x86")
    assert spec.cache_blocks()[0] == 16 and len(calls) == 1 and "%Xp = " in calls[0]


def test_unpadded_conv_needs_no_workspace_at_all():
    spec = ConvSpec(32, 32, 9, 9, 16, 16, (((0, 0),),), 64, kernel=(1, 1), padding=(0, 0, 0, 0), batch=2)
    assert _workspace_calls(spec, "x86") == []


def test_geometry_arithmetic_matches_torch():
    for h, w, k, s, p, d in [(224, 224, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)), (13, 11, (3, 1), (2, 3), (0, 1, 1, 0),
                                                                             (2, 1)), (8, 8, (2, 2), (2, 2), (0, 0, 0, 0), (1, 1))]:
        spec = ConvSpec(4, 4, h, w, 4, 4, (all_taps(*k),), 4, kernel=k, stride=s, padding=p, dilation=d)
        x = torch.nn.functional.pad(torch.zeros(1, 1, h, w), (p[1], p[3], p[0], p[2]))
        y = torch.nn.functional.conv2d(x, torch.zeros(1, 1, *k), stride=s, dilation=d)
        assert spec.out_hw == tuple(y.shape[2:])
        assert spec.padded_hw == (h + p[0] + p[2], w + p[1] + p[3])
    assert ConvSpec(4, 4, 5, 5, 4, 4, (all_taps(3, 3),), 4, epilogue=RESIDUAL_RELU).residual
    assert all_taps(1, 3) == ((0, 0), (0, 1), (0, 2))


def test_weights_outside_their_group_are_refused():
    weight, ids = _pattern_weight(8, 4, 8, removed=0.0)
    weight[0, 0] = 1.0  # all 9 taps non-zero
    spec = ConvSpec(4, 8, 5, 5, 8, 8, library_taps(LIBRARY), 0)
    with pytest.raises(ValueError, match="output block 0, input channel 0"):
        compact_weights(weight, pattern_assignment(ids, 8, 8, 8), spec)
    with pytest.raises(ValueError, match="does not match"):
        compact_weights(np.zeros((8, 4, 1, 1), np.float32), np.zeros((1, 4), int), spec)


@pytest.mark.parametrize("dense,stride", [(False, 1), (False, 2), (True, 1)])
def test_rows_outer_job_order_on_a_map_larger_than_l2(dense, stride):
    """A 64-channel 46x45 map with 32 output channels in 8 blocks: the padded input (577 KiB) is
    larger than L2_BYTES, so the jobs run every output block of a band of rows before the next
    band, and the padded pattern kernel copies each band's rows into a job-local scratch (the
    last band shifted back to end at the map's edge); pattern and dense kernels, odd rows,
    stride 1 and 2, batch 2, residual epilogue."""
    if dense:
        spec = _dense(32, 64, 3, 3, 4, height=46, width=45, batch=2)
    else:
        weight, ids = _pattern_weight(32, 64, 16, removed=0.7, seed=5)
        spec = _run(weight, pattern_assignment(ids, 16, 32, 4), library_taps(LIBRARY), height=46, width=45,
                    lanes=4, batch=2, stride=(stride, stride))
    xw, ry = spec.effective_tile()
    assert spec.rows_outer(-(-spec.out_hw[0] // ry))
