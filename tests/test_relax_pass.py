"""The Relax pass that rewrites relax.nn.conv2d with constant weights into our generated kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from clicktrain_deploy.compile.targets import TARGETS  # noqa: E402
from clicktrain_deploy.export.metadata import LayerEntry, MetadataError, PatternMetadata  # noqa: E402
from clicktrain_deploy.passes.relax_passes import (  # noqa: E402
    deploy_pipeline, pattern_conv_rewrite, rewrite_pattern_convs,
)
from clicktrain_deploy.pruning.masks import LayerMask  # noqa: E402
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES  # noqa: E402

LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")()


def _pruned(out_channels, in_channels, block, rng):
    ids = rng.integers(0, len(LIBRARY), (-(-out_channels // block), in_channels))
    ids[rng.random(ids.shape) < 0.6] = -1
    mask = LayerMask(out_channels, block, torch.from_numpy(ids))
    weight = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
    return weight * mask.dense(LIBRARY).numpy(), mask


def _block(seed=0):
    """stem 3x3 (dense) -> pruned 3x3 stride 2 -> pruned 3x3 + 1x1 stride-2 shortcut, ReLUs;
    odd 9x11 input. Returns the weights, biases and metadata (the two pruned convs, B=16)."""
    rng = np.random.default_rng(seed)
    stem = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    conv1, mask1 = _pruned(32, 16, 16, rng)
    conv2, mask2 = _pruned(32, 32, 16, rng)
    shortcut = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    biases = [rng.standard_normal(c).astype(np.float32) for c in (16, 32, 32, 32)]
    metadata = PatternMetadata(LIBRARY, [LayerEntry("conv1.weight", "conv1", mask1),
                                         LayerEntry("conv2.weight", "conv2", mask2)])
    return [stem, conv1, conv2, shortcut], biases, metadata


def _module(weights, biases, batch: int = 1) -> tvm.IRModule:
    """The block as plain Relax ops, as TVM's ONNX frontend writes a Conv with bias."""
    stem, conv1, conv2, shortcut = weights
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 3, 9, 11), "float32"))

    def conv(data, weight, bias, stride, padding):
        out = bb.emit(relax.op.nn.conv2d(data, relax.const(weight), strides=stride, padding=padding))
        return bb.emit(relax.op.add(out, relax.const(bias.reshape(1, -1, 1, 1))))

    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(conv(x, stem, biases[0], 1, 1)))
            y = bb.emit(relax.op.nn.relu(conv(h, conv1, biases[1], 2, 1)))
            s = conv(h, shortcut, biases[3], 2, 0)
            out = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(conv(y, conv2, biases[2], 1, 1), s))))
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get()


def _reference(image, weights, biases):
    t = [torch.from_numpy(w).double() for w in weights]
    b = [torch.from_numpy(v).double() for v in biases]
    conv = torch.nn.functional.conv2d
    h = torch.relu(conv(torch.from_numpy(image).double(), t[0], b[0], padding=1))
    y = torch.relu(conv(h, t[1], b[1], stride=2, padding=1))
    return torch.relu(conv(y, t[2], b[2], padding=1) + conv(h, t[3], b[3], stride=2)).numpy()


def _calls(module: tvm.IRModule) -> list[str]:
    """Names of the call_tir kernels and the Relax ops left in main, in order."""
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            found.append(expr.args[0].name_hint if expr.op.name == "relax.call_tir" else expr.op.name)
    relax.analysis.post_order_visit(module["main"], visit)
    return found


def test_rewrite_fuses_epilogues_keeps_blocks_and_matches_torch():
    weights, biases, metadata = _block()
    rewrite = pattern_conv_rewrite(metadata, TARGETS.get("x86")())
    module = rewrite(_module(weights, biases))
    calls = _calls(module)
    # one pack at the input, 4 fused convs, one unpack at the output: no conv2d/add/relu left
    assert [c.rstrip("0123456789") for c in calls] == ["pack", "conv", "conv", "conv", "conv", "unpack"]
    kinds = {entry.layer: entry.kernel for entry in rewrite.manifest}
    assert kinds == {"conv2d_0": "dense", "conv1": "pattern", "conv2d_2": "pointwise", "conv2": "pattern"}
    library = tvm.compile(module, target=tvm.target.Target({"kind": "llvm", "num-cores": 2}),
                          relax_pipeline=deploy_pipeline())
    vm = relax.VirtualMachine(library, tvm.cpu())
    image = np.random.default_rng(1).standard_normal((1, 3, 9, 11)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(image)).numpy()
    np.testing.assert_allclose(got, _reference(image, weights, biases), atol=1e-4, rtol=1e-4)


def test_weights_that_contradict_or_miss_their_layer_stop_the_rewrite():
    weights, biases, metadata = _block()
    weights[2][3, 5] = 1.0  # every tap of one kernel of conv2 non-zero
    with pytest.raises(MetadataError, match=r"layer 'conv2' \(conv2d #3\): kernel \(out 3, in 5\)"):
        rewrite_pattern_convs(_module(weights, biases), metadata, TARGETS.get("x86")())
    weights, biases, metadata = _block()
    metadata.layers[1].module = "extra"
    metadata.layers.append(metadata.layers[1])  # a third pruned layer the module does not hold
    with pytest.raises(MetadataError, match=r"layer 'extra': no relax.nn.conv2d with a constant \[32, 32, 3, 3\]"):
        rewrite_pattern_convs(_module(weights, biases), metadata, TARGETS.get("x86")())


def test_without_metadata_every_conv_gets_our_dense_kernel():
    weights, biases, _ = _block()
    _, manifest = rewrite_pattern_convs(_module(weights, biases), None, TARGETS.get("x86")())
    assert [e.kernel for e in manifest] == ["dense", "dense", "dense", "pointwise"]


def test_unsupported_conv_is_named_and_odd_bias_shapes_are_not_fused():
    from clicktrain_deploy.compile.lower import CompileError

    weight = np.ones((8, 4, 3, 3), np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1, groups=1))
            # (1, 1, 1, 8) has the channel count but broadcasts over width: not a bias
            out = bb.emit_output(bb.emit(relax.op.add(conv, relax.const(np.ones((1, 1, 1, 8), np.float32)))))
        bb.emit_func_output(out)
    module, manifest = rewrite_pattern_convs(bb.get(), None, TARGETS.get("x86")())
    assert "relax.add" in _calls(module) and [e.kernel for e in manifest] == ["dense"]
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, relax.const(weight), strides=3, padding=1)))
        bb.emit_func_output(out)
    with pytest.raises(CompileError, match=r"conv2d #0 \(\[8, 4, 3, 3\], strides \[3, 3\]"):
        rewrite_pattern_convs(bb.get(), None, TARGETS.get("x86")())
