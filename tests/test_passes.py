"""The Relax rewrite: constant-weight convs with their epilogues (dpl patterns) into our kernels,
on hand-built modules in the forms TVM's ONNX importer writes; outputs against torch (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from clicktrain_deploy.compile.cuda.lower import CudaConvKernels
from clicktrain_deploy.compile.passes import prepare, rewrite_convs
from clicktrain_deploy.compile.plan import ConvKernels
from clicktrain_deploy.compile.schedule import finalize_pipeline, fuse_and_schedule
from clicktrain_deploy.compile.targets import TARGETS
from clicktrain_deploy.contract import LayerEntry, LayerMask, MetadataError, PatternMetadata
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES

LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")().numpy()
X86 = TARGETS.get("x86")()


def _pruned(out_channels, in_channels, block, rng):
    ids = rng.integers(0, len(LIBRARY), (-(-out_channels // block), in_channels))
    ids[rng.random(ids.shape) < 0.6] = -1
    mask = LayerMask(out_channels, block, ids)
    weight = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
    return weight * mask.dense(LIBRARY), mask


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


def _conv(bb, data, weight, bias, stride=1, padding=1, **attrs):
    out = bb.emit(relax.op.nn.conv2d(data, relax.const(weight), strides=stride, padding=padding, **attrs))
    return bb.emit(relax.op.add(out, relax.const(bias.reshape(1, -1, 1, 1))))


def _module(weights, biases, batch: int = 1) -> tvm.IRModule:
    """The block as plain Relax ops, as TVM's ONNX importer writes a Conv with bias."""
    stem, conv1, conv2, shortcut = weights
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 3, 9, 11), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(_conv(bb, x, stem, biases[0])))
            y = bb.emit(relax.op.nn.relu(_conv(bb, h, conv1, biases[1], 2)))
            s = _conv(bb, h, shortcut, biases[3], 2, 0)
            out = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(_conv(bb, y, conv2, biases[2]), s))))
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
    """Names of the call_tir kernels (digits dropped) and the Relax ops left in main, in order."""
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            found.append(expr.args[0].name_hint.rstrip("0123456789") if expr.op.name == "relax.call_tir"
                         else expr.op.name)
    relax.analysis.post_order_visit(module["main"], visit)
    return found


def _run(module: tvm.IRModule, *inputs: np.ndarray) -> np.ndarray:
    target = tvm.target.Target(X86.tvm_target)
    module = fuse_and_schedule(target, "cpu", {})(module)
    vm = relax.VirtualMachine(tvm.compile(module, target=target, relax_pipeline=finalize_pipeline()), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()


@pytest.mark.parametrize("batch", [1, 2])
def test_rewrite_fuses_epilogues_keeps_blocks_and_matches_torch(batch):
    weights, biases, metadata = _block()
    module, manifest = rewrite_convs(_module(weights, biases, batch), metadata, X86, ConvKernels())
    # one pack at the input, 4 fused convs, one unpack at the output: no conv2d/add/relu left
    assert _calls(module) == ["pack", "conv", "conv", "conv", "conv", "unpack"]
    assert {e.layer: e.kernel for e in manifest} == {"conv2d_0": "dense", "conv1": "pattern",
                                                      "conv2d_2": "dense", "conv2": "pattern"}
    assert [e.attributes["epilogue"] for e in manifest] == [[["relu"]], [["relu"]], [], [["residual"], ["relu"]]]
    image = np.random.default_rng(1).standard_normal((batch, 3, 9, 11)).astype(np.float32)
    np.testing.assert_allclose(_run(module, image), _reference(image, weights, biases), atol=1e-4, rtol=1e-4)


def _epilogue_module(rng):
    """Seven convs in a row, each with an epilogue in a form the ONNX importer writes."""
    channels = 8
    weights = [rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.3 for _ in range(7)]
    biases = [rng.standard_normal(channels).astype(np.float32) for _ in range(7)]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, channels, 6, 7), "float32"))
    c = relax.const
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.relu(_conv(bb, x, weights[0], biases[0])))
            v = _conv(bb, a, weights[1], biases[1])
            b = bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(v, c(np.float32(0)))), c(np.float32(6))))  # Clip
            v = _conv(bb, b, weights[2], biases[2])  # ONNX HardSwish: x * clip(x + 3, 0, 6) / 6
            gate = bb.emit(relax.op.divide(bb.emit(relax.op.clip(bb.emit(relax.op.add(v, c(np.float32(3)))), 0, 6)),
                                           c(np.float32(6))))
            d = bb.emit(relax.op.multiply(v, gate))
            v = _conv(bb, d, weights[3], biases[3])  # ONNX HardSigmoid: clip(alpha x + beta, 0, 1)
            e = bb.emit(relax.op.clip(bb.emit(relax.op.add(bb.emit(relax.op.multiply(c(np.float32(0.2)), v)),
                                                           c(np.float32(0.5)))), 0, 1))
            v = _conv(bb, e, weights[4], biases[4])
            f = bb.emit(relax.op.multiply(bb.emit(relax.op.sigmoid(v)), v))  # SiLU
            g = bb.emit(relax.op.sigmoid(_conv(bb, f, weights[5], biases[5])))
            h = bb.emit(relax.op.add(bb.emit(relax.op.nn.relu(_conv(bb, g, weights[6], biases[6]))), a))  # ReLU, add
            out = bb.emit_output(h)
        bb.emit_func_output(out)

    def reference(image):
        t = [torch.from_numpy(w).double() for w in weights]
        bias = [torch.from_numpy(b).double() for b in biases]

        def conv(data, i):
            return torch.nn.functional.conv2d(data, t[i], bias[i], padding=1)
        a = torch.relu(conv(torch.from_numpy(image).double(), 0))
        b = conv(a, 1).clamp(0, 6)
        v = conv(b, 2)
        d = v * (v + 3).clamp(0, 6) / 6
        e = (0.2 * conv(d, 3) + 0.5).clamp(0, 1)
        v = conv(e, 4)
        g = torch.sigmoid(conv(v * torch.sigmoid(v), 5))
        return (torch.relu(conv(g, 6)) + a).numpy()

    return bb.get(), reference


def test_every_epilogue_form_is_fused_and_exact():
    module, reference = _epilogue_module(np.random.default_rng(2))
    rewritten, manifest = rewrite_convs(prepare(module), None, X86, ConvKernels())
    assert [e.attributes["epilogue"] for e in manifest] == [
        [["relu"]], [["clip", 0.0, 6.0]], [["hardswish", pytest.approx(1 / 6), 0.5]],
        [["hardsigmoid", pytest.approx(0.2), 0.5]], [["silu"]], [["sigmoid"]], [["relu"], ["residual"]]]
    assert _calls(rewritten) == ["pack", *["conv"] * 7, "unpack"]  # nothing left between the kernels
    image = np.random.default_rng(3).standard_normal((1, 8, 6, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, image), reference(image), atol=1e-4, rtol=1e-4)


def test_values_read_outside_the_chain_are_not_fused():
    rng = np.random.default_rng(4)
    weight, bias = rng.standard_normal((4, 4, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            v = _conv(bb, x, weight, bias)
            # relu(v) + v: v is read twice, so the ReLU stays outside, and the add (whose other
            # operand comes from this conv's own output) is no residual of it
            out = bb.emit_output(bb.emit(relax.op.add(bb.emit(relax.op.nn.relu(v)), v)))
        bb.emit_func_output(out)
    module, manifest = rewrite_convs(bb.get(), None, X86, ConvKernels())
    assert manifest[0].attributes["epilogue"] == [] and "relax.nn.relu" in _calls(module)
    image = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    conv = torch.nn.functional.conv2d(torch.from_numpy(image).double(), torch.from_numpy(weight).double(),
                                      torch.from_numpy(bias).double(), padding=1)
    np.testing.assert_allclose(_run(module, image), (torch.relu(conv) + conv).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("skip_first", [True, False])
def test_residual_fuses_whichever_side_of_the_add_the_skip_is(skip_first):
    """torch writes MobileNetV2's and ImageNet ResNets' ``x + conv(x)`` with the skip first."""
    rng = np.random.default_rng(5)
    weight, bias = rng.standard_normal((8, 8, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 7), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.relu(x))
            v = _conv(bb, h, weight, bias)
            out = bb.emit_output(bb.emit(relax.op.add(h, v) if skip_first else relax.op.add(v, h)))
        bb.emit_func_output(out)
    module, manifest = rewrite_convs(bb.get(), None, X86, ConvKernels())
    assert manifest[0].attributes["epilogue"] == [["residual"]]
    assert "relax.add" not in _calls(module)
    image = rng.standard_normal((1, 8, 6, 7)).astype(np.float32)
    skip = torch.relu(torch.from_numpy(image).double())
    conv = torch.nn.functional.conv2d(skip, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(), padding=1)
    np.testing.assert_allclose(_run(module, image), (skip + conv).numpy(), atol=1e-4, rtol=1e-4)


def test_weights_that_contradict_or_miss_their_layer_stop_the_rewrite():
    weights, biases, metadata = _block()
    weights[2][3, 5] = 1.0  # every tap of one kernel of conv2 non-zero
    with pytest.raises(MetadataError, match=r"layer 'conv2' \(conv 'conv2d_3'\): kernel \(out 3, in 5\)"):
        rewrite_convs(_module(weights, biases), metadata, X86, ConvKernels())
    weights, biases, metadata = _block()
    metadata.layers[1].module = "extra"
    metadata.layers.append(metadata.layers[1])  # a third pruned layer the module does not hold
    with pytest.raises(MetadataError, match=r"layer 'extra': no conv with a constant \[32, 32, 3, 3\]"):
        rewrite_convs(_module(weights, biases), metadata, X86, ConvKernels())


def test_odd_bias_shapes_are_not_fused_and_kernels_must_fit_the_target():
    weight = np.ones((8, 4, 3, 3), np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1))
            # (1, 1, 1, 8) has the channel count but broadcasts over width: not a bias
            out = bb.emit_output(bb.emit(relax.op.add(conv, relax.const(np.ones((1, 1, 1, 8), np.float32)))))
        bb.emit_func_output(out)
    module, manifest = rewrite_convs(bb.get(), None, X86, ConvKernels())
    assert "relax.add" in _calls(module) and [e.kernel for e in manifest] == ["dense"]
    with pytest.raises(Exception, match="a cpu target given cuda conv kernels"):
        rewrite_convs(bb.get(), None, X86, CudaConvKernels())


def test_convs_the_gpu_kernel_does_not_cover_stay_for_tvm():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 9, 9), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(np.ones((8, 4, 5, 5), np.float32)), padding=2))
            out = bb.emit_output(bb.emit(relax.op.nn.conv2d(a, relax.const(np.ones((8, 8, 3, 3), np.float32)), padding=1)))
        bb.emit_func_output(out)
    module, manifest = rewrite_convs(bb.get(), None, TARGETS.get("cuda")(), CudaConvKernels())
    assert [e.kernel for e in manifest] == ["tvm", "dense"]
    assert "5x5 kernel" in manifest[0].reason and _calls(module) == ["relax.nn.conv2d", "conv"]
