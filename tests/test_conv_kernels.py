"""Every generated conv variant against torch (float64) on odd shapes, compiled for the host."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from clicktrain_deploy.compile.conv_kernels import (  # noqa: E402
    ALL_TAPS, ConvSpec, compact_weights, connectivity_assignment, conv_tvmscript, from_nchwc,
    library_taps, pattern_assignment, to_nchwc,
)
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES  # noqa: E402

HOST = tvm.target.Target({"kind": "llvm", "num-cores": 2})
LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")().numpy()


def _run(weight, assign, groups, *, in_channels, height, width, stride, lanes, in_lanes=None,
         relu=True, residual=True, tile=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    out_channels = weight.shape[0]
    in_lanes = in_lanes or lanes
    spec = ConvSpec(in_channels, out_channels, height, width, stride, in_lanes, lanes, groups, 0,
                    relu, residual, tile)
    ptr, coff, wv = compact_weights(weight, assign, spec)
    spec = ConvSpec(**{**spec.__dict__, "entries": int(ptr[-1])})
    kernel = tvm.compile(tvm.script.from_source(conv_tvmscript(spec, "conv")), target=HOST).jit()["conv"]
    x = rng.standard_normal((1, in_channels, height, width)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    oh, ow = spec.out_hw
    res = rng.standard_normal((1, out_channels, oh, ow)).astype(np.float32)
    bias_blocks = to_nchwc(bias[None, :, None, None], lanes).reshape(spec.out_blocks, lanes)
    args = [to_nchwc(x, in_lanes), ptr, coff, wv, bias_blocks]
    args += [to_nchwc(res, lanes)] if residual else []
    args += [np.zeros((spec.out_blocks, oh, ow, lanes), np.float32)]
    tensors = [tvm.runtime.tensor(a) for a in args]
    kernel(*tensors)
    got = from_nchwc(tensors[-1].numpy(), out_channels)
    pad = 1 if any(len(g) > 1 or g != ((1, 1),) for g in groups) else 0
    w64 = torch.from_numpy(weight).double()
    if pad == 0:
        w64 = w64[:, :, 1:2, 1:2]
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), w64, torch.from_numpy(bias).double(),
                                     stride=stride, padding=pad)
    if residual:
        ref = ref + torch.from_numpy(res).double()
    if relu:
        ref = torch.relu(ref)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-5, rtol=1e-5)
    return spec


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
    _run(weight, assign, library_taps(LIBRARY), in_channels=in_channels, height=size[0],
         width=size[1], stride=stride, lanes=lanes, tile=tile)


@pytest.mark.parametrize("target,lanes,tile", [("x86", 16, (4, 4)), ("cortex-a72", 16, (2, 2))])
def test_accumulators_need_no_workspace_call(target, lanes, tile):
    """Only the padded-input scratch is a workspace allocation: the accumulator tile (1 KiB on
    AVX-512) and the per-pattern entry offsets live on the stack, i.e. in registers."""
    from clicktrain_deploy.compile.targets import TARGETS

    spec = ConvSpec(16, 16, 12, 12, 1, lanes, lanes, library_taps(LIBRARY), 8, True, True, tile)
    built = tvm.compile(tvm.script.from_source(conv_tvmscript(spec, "conv")),
                        target=tvm.target.Target(TARGETS.get(target)().tvm_target))
    module = built.mod.imports[0] if built.mod.imports else built.mod
    calls = [line for line in module.inspect_source("ll").splitlines()
             if "call ptr" in line and "(i32 1, i32 %dev_id" in line]
    assert len(calls) == 1 and "%Xp = " in calls[0]


def test_every_library_pattern_is_exercised():
    assert sorted(len(t) for t in library_taps(LIBRARY)) == [4] * 8
    weight, ids = _pattern_weight(16, 40, 16, removed=0.0, seed=3)
    assert set(np.unique(ids)) == set(range(8))
    _run(weight, pattern_assignment(ids, 16, 16, 8), library_taps(LIBRARY), in_channels=40,
         height=6, width=6, stride=1, lanes=8, relu=False, residual=False)


def test_connectivity_variant_for_per_kernel_patterns():
    weight, ids = _pattern_weight(24, 16, 1, removed=0.7, seed=1)  # B=1: lanes differ in pattern
    kept = np.abs(weight).sum((2, 3)) > 0
    _run(weight, connectivity_assignment(kept, 8), (ALL_TAPS,), in_channels=16, height=9,
         width=7, stride=1, lanes=8)


def test_dense_variant_stem_and_tiles():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    _run(weight, np.zeros((1, 1), int), (ALL_TAPS,), in_channels=1, height=28, width=28, stride=1,
         lanes=16, in_lanes=1, residual=False, tile=(8, 2))


def test_pointwise_shortcut_as_centre_tap():
    rng = np.random.default_rng(4)
    weight = np.zeros((32, 16, 3, 3), np.float32)
    weight[:, :, 1, 1] = rng.standard_normal((32, 16))
    _run(weight, np.zeros((4, 16), int), (((1, 1),),), in_channels=16, height=13, width=13,
         stride=2, lanes=8, relu=False, residual=False)


def test_weights_outside_their_group_are_refused():
    weight, ids = _pattern_weight(8, 4, 8, removed=0.0)
    weight[0, 0] = 1.0  # all 9 taps non-zero
    spec = ConvSpec(4, 8, 5, 5, 1, 8, 8, library_taps(LIBRARY), 0, False, False)
    with pytest.raises(ValueError, match="output block 0, input channel 0"):
        compact_weights(weight, pattern_assignment(ids, 8, 8, 8), spec)
