"""Whole-model compile through TVM's ONNX importer: our exports and models no project code wrote,
x86 in process and aarch64 under qemu, against onnxruntime; the gate, the manifest, refusals."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from clicktrain_deploy.bench.flops import flop_reduction_limit, layer_work
from clicktrain_deploy.compile.build import compile_model, run_images
from clicktrain_deploy.compile.errors import CompileError
from clicktrain_deploy.contract import read_metadata
from clicktrain_deploy.errors import ClickTrainError
from clicktrain_deploy.export.check import onnxruntime_session


def _real_inputs(fmnist, count):
    images = (fmnist.test.images[:count].float() / 255 - 0.2860) / 0.3530
    return images.numpy()


def _assert_scheduled(manifest):
    """Every op is ours or got a TVM schedule rule, and the shares of time add up."""
    assert manifest["ops"] and all(op["rule"] for op in manifest["ops"])
    assert all(op["kind"] == "generated" or op["rule"].startswith(("dlight", "CpuParallel")) for op in manifest["ops"])
    if "time_share" in manifest["ops"][0]:
        assert sum(op["time_share"] for op in manifest["ops"]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("sparse", [True, False])
def test_x86_build_matches_onnxruntime_on_real_images(exported, fmnist, tmp_path, sparse):
    _, result = exported
    built = compile_model(result.path, "x86", tmp_path / "model.so", measure=False, sparse=sparse)
    manifest = json.loads((tmp_path / "model.json").read_text())
    convs = manifest["layers"]
    assert len(convs) == 21  # stem, 18 block convs, 2 shortcuts
    kinds = {layer["kernel"] for layer in convs}
    assert kinds <= {"dense", "connectivity", "pattern"}
    assert ("connectivity" in kinds or "pattern" in kinds) == sparse
    assert manifest["check"]["status"] == "passed" and manifest["check"]["max_abs_diff"] < 1e-4
    assert manifest["inputs"][0]["shape"] == [1, 1, 28, 28] and built.manifest["target"] == "x86"
    # every block conv carries its epilogue: ReLU, or the residual add then ReLU
    assert sum(layer["attributes"]["epilogue"] == [["residual"], ["relu"]] for layer in convs) == 9
    assert [op["function"] for op in manifest["ops"] if op["kind"] == "generated"][0].startswith("pack")
    assert sum(op["function"].startswith("unpack") for op in manifest["ops"]) == 1  # blocked until the pool
    _assert_scheduled(manifest)
    images = _real_inputs(fmnist, 5)
    session = onnxruntime_session(result.path.read_bytes())
    expected = np.concatenate([session.run(None, {"input": image[None]})[0] for image in images])
    np.testing.assert_allclose(run_images(built.library, images), expected, atol=1e-4, rtol=1e-4)


def test_batched_x86_build(exported, fmnist, tmp_path):
    _, result = exported
    built = compile_model(result.path, "x86", tmp_path / "b3.so", measure=False, batch=3)
    assert built.manifest["inputs"][0]["shape"] == [3, 1, 28, 28]
    images = _real_inputs(fmnist, 7)  # two full batches and a short one
    expected = onnxruntime_session(result.path.read_bytes()).run(None, {"input": images})[0]
    np.testing.assert_allclose(run_images(built.library, images, batch=3), expected, atol=1e-4, rtol=1e-4)


def test_arm64_build_is_an_aarch64_library(exported, tmp_path):
    _, result = exported
    built = compile_model(result.path, "cortex-a72", tmp_path / "model_arm.so")
    header = built.library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert built.manifest["check"]["status"] == "passed"
    assert built.manifest["check"]["runtime"] == "qemu-aarch64 -cpu cortex-a72"
    # B=4 matches NEON's 4 lanes: the pattern kernel, chosen by its multiply-add saving
    convs = built.manifest["layers"]
    assert sum(layer["kernel"] == "pattern" for layer in convs) == 18
    assert all("fewer multiply-adds" in layer["reason"] for layer in convs if layer["kernel"] == "pattern")


def test_target_and_input_shape_errors(tmp_path):
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 1, 3, 3], np.ones(36, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], name="conv", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 4, "H", "W"])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), tmp_path / "d.onnx")
    with pytest.raises(KeyError, match="unknown target 'riscv'"):
        compile_model(tmp_path / "d.onnx", "riscv", tmp_path / "x.so")
    with pytest.raises(CompileError, match=r"input 'input' has symbolic dims \['N', 1, 'H', 'W'\]"):
        compile_model(tmp_path / "d.onnx", "x86", tmp_path / "d.so", measure=False)
    with pytest.raises(CompileError, match=r"input 'input': shape \[1, 3, 8, 8\] contradicts"):
        compile_model(tmp_path / "d.onnx", "x86", tmp_path / "d.so", input_shape=[1, 3, 8, 8])
    built = compile_model(tmp_path / "d.onnx", "x86", tmp_path / "d.so", input_shape=[2, 1, 5, 7])
    assert built.manifest["inputs"][0]["shape"] == [2, 1, 5, 7] and built.manifest["check"]["status"] == "passed"


def test_the_gate_writes_nothing_beyond_tolerance(exported, tmp_path, monkeypatch):
    from clicktrain_deploy.compile import check

    real = check.onnxruntime_outputs
    monkeypatch.setattr(check, "onnxruntime_outputs", lambda model, inputs: [r + 1e-2 for r in real(model, inputs)])
    with pytest.raises(CompileError, match="disagrees with onnxruntime.*nothing written"):
        compile_model(exported[1].path, "x86", tmp_path / "m.so", measure=False)
    assert list(tmp_path.iterdir()) == []
    built = compile_model(exported[1].path, "x86", tmp_path / "m.so", measure=False, check=False)
    assert built.manifest["check"] == {"status": "skipped", "reason": "--no-check"}


def test_metadata_that_contradicts_the_weights_stops_the_build(exported, tmp_path):
    model = onnx.load(str(exported[1].path))
    entry = read_metadata(model).layers[0]
    tensor = next(t for t in model.graph.initializer if t.name == entry.initializer)
    weight = numpy_helper.to_array(tensor).copy()
    weight[..., 0, 0] = 1.0
    tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(ClickTrainError, match=entry.module):
        compile_model(tmp_path / "bad.onnx", "x86", tmp_path / "bad.so", measure=False)


def test_arm64_build_runs_under_qemu_and_matches_onnxruntime(exported, fmnist, tmp_path):
    from clicktrain_deploy.compile.arm import instructions_per_inference, run_under_qemu

    _, result = exported
    built = compile_model(result.path, "arm64", tmp_path / "model_arm.so")
    session = onnxruntime_session(result.path.read_bytes())
    for image in _real_inputs(fmnist, 2):
        got, _ = run_under_qemu(built.library, image[None])
        expected = session.run(None, {"input": image[None]})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    image = _real_inputs(fmnist, 1)
    first = instructions_per_inference(built.library, image)
    assert first == instructions_per_inference(built.library, image)  # deterministic
    dense = compile_model(result.path, "arm64", tmp_path / "dense_arm.so", sparse=False)
    ratio = instructions_per_inference(dense.library, image) / first
    # the fixture is B=4 at 70% connectivity (not the README's B=16 ResNet-20), so the claim that
    # transfers is the share of the model's own FLOP-reduction limit (the ARM bar is 0.6)
    limit = flop_reduction_limit(layer_work(onnx.load(str(result.path)), read_metadata(onnx.load(str(result.path)))))
    print(f"ARM dense/sparse {ratio:.2f}x of the {limit:.2f}x limit ({ratio / limit:.0%})")
    assert ratio >= 0.58 * limit, (ratio, limit)  # measured 4.33x of 7.09x = 61% (Intel Xeon, 2026-12-01)


def test_layout_follows_the_models_block_size():
    from clicktrain_deploy.compile.targets import TARGETS

    arm = TARGETS.get("cortex-a72")()
    assert arm.layout_for([16, 16]).lanes == 16  # four NEON vectors per kernel block
    assert arm.layout_for([16, 8]).lanes == 8
    assert arm.layout_for([4]).lanes == 4
    assert arm.layout_for([1]).lanes == 4  # per-kernel patterns: the connectivity kernel, narrowest
    assert arm.layout_for([]) == arm.dense_layout


# -- models no project code wrote ------------------------------------------------------------
class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class _TinyMobileNet(nn.Module):
    """Inverted residuals with depthwise convs, ReLU6, HardSwish, SiLU, squeeze-excite, BN unfolded."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.se = _SqueezeExcite(48)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 16, 5, 2, 2, groups=16), nn.SiLU(), nn.Conv2d(16, 24, 1), nn.SiLU())
        self.grouped = nn.Conv2d(24, 24, 3, 1, 2, dilation=2, groups=4)
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.depthwise(self.expand(x))))
        x = torch.sigmoid(self.grouped(self.down(x)))
        return torch.softmax(self.head(x.mean((2, 3))), 1)


class _TinyImageNetResNet(nn.Module):
    """ImageNet-style: 7x7 stride-2 stem, padded 3x3 max pool, basic blocks with a projection."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1))
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1))
        self.shortcut = nn.Conv2d(16, 32, 1, 2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.relu(self.b(x) + self.shortcut(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _TinyDetector(nn.Module):
    """Detector-style ops: ConvTranspose, Resize (by size and by scale), Concat, BN unfolded, a
    MatMul attention-like head with Softmax."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1))
        self.deeper = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, 2)
        self.fuse = nn.Conv2d(48, 24, 1)
        self.query = nn.Linear(24, 24)

    def forward(self, x):
        a = self.down(x)
        b = self.deeper(a)
        up = nn.functional.interpolate(b, size=a.shape[2:], mode="nearest")
        c = self.fuse(torch.cat([self.up(b)[..., :a.shape[2], :a.shape[3]] + a, up], 1))
        c = nn.functional.interpolate(c, scale_factor=2.0, mode="bilinear", align_corners=False)
        tokens = c.flatten(2).transpose(1, 2)  # (N, HW, C)
        attention = torch.softmax(self.query(tokens) @ tokens.transpose(1, 2) / 5.0, -1)
        return (attention @ tokens).mean(1)


def _export_foreign(model: nn.Module, path, shape, opset: int, dynamic: bool = True) -> None:
    torch.manual_seed(0)
    for module in model.modules():  # trained-looking BN statistics, so folding them matters
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    torch.onnx.export(model.eval(), torch.randn(*shape), str(path), dynamo=False, opset_version=opset,
                      input_names=["image"], do_constant_folding=False,
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}} if dynamic else None)


@pytest.mark.parametrize("target", ["x86", "cortex-a72"])
@pytest.mark.parametrize("net, opset", [(_TinyMobileNet, 13), (_TinyImageNetResNet, 11), (_TinyDetector, 12)])
def test_foreign_torch_exports_compile_and_match_onnxruntime(net, opset, target, tmp_path):
    path = tmp_path / "foreign.onnx"
    _export_foreign(net(), path, (1, 3, 40, 40), opset)
    built = compile_model(path, target, tmp_path / "foreign.so", input_shape=[1, 3, 37, 45])
    assert built.manifest["check"]["status"] == "passed", built.manifest["check"]
    convs = {layer["layer"]: layer for layer in built.manifest["layers"]}
    assert all(layer["kernel"] in ("dense", "depthwise") for layer in convs.values())  # every conv is ours
    _assert_scheduled(built.manifest)
    if net is _TinyMobileNet:
        epilogues = [layer["attributes"]["epilogue"] for layer in convs.values()]
        assert [["clip", 0.0, 6.0]] in epilogues and [["silu"]] in epilogues and [["sigmoid"]] in epilogues
        assert any(e and e[0][0] == "hardswish" for e in epilogues) and any(e and e[0][0] == "hardsigmoid" for e in epilogues)
        assert sum(layer["kernel"] == "depthwise" for layer in convs.values()) == 2
        assert [["residual"]] in epilogues  # x + project(...): the skip is the add's first operand
    if net is _TinyImageNetResNet:  # x + a(x) and b(x) + shortcut(x): both adds fused, either order
        epilogues = [layer["attributes"]["epilogue"] for layer in convs.values()]
        assert epilogues.count([["residual"], ["relu"]]) == 2
    if target == "x86":  # a second input, checked here against onnxruntime
        image = np.random.default_rng(1).standard_normal((1, 3, 37, 45)).astype(np.float32)
        expected = onnxruntime_session(path.read_bytes()).run(None, {"image": image})[0]
        np.testing.assert_allclose(run_images(built.library, image), expected, atol=1e-4, rtol=1e-4)


def test_a_one_feature_classifier_is_not_miscompiled(tmp_path):
    """Regression (found by test_compile_property): inlining the bias add of a matmul whose
    reduction has extent 1 into the reduction added the bias twice."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "fc"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "fcb")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "g.onnx")
    built = compile_model(tmp_path / "g.onnx", "x86", tmp_path / "g.so", measure=False)
    assert built.manifest["check"]["status"] == "passed" and built.manifest["check"]["max_abs_diff"] < 1e-6
