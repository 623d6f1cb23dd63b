"""Whole-model TVM compile: x86 outputs against onnxruntime on real images, aarch64 libraries."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from clicktrain_deploy.compile.build import compile_model, run_on_host
from clicktrain_deploy.compile.lower import CompileError
from clicktrain_deploy.errors import ClickTrainError
from clicktrain_deploy.export.check import onnxruntime_session


def _real_inputs(fmnist, count):
    images = (fmnist.test.images[:count].float() / 255 - 0.2860) / 0.3530
    return images.numpy()


@pytest.mark.parametrize("sparse", [True, False])
def test_x86_build_matches_onnxruntime_on_real_images(exported, fmnist, tmp_path, sparse):
    _, result = exported
    built = compile_model(result.path, "x86", tmp_path / "model.so", measure=False, sparse=sparse)
    manifest = json.loads((tmp_path / "model.json").read_text())
    convs = [l for l in manifest["layers"] if l["op"] == "conv"]
    assert len(convs) == 21  # stem, 18 block convs, 2 shortcuts
    kinds = {l["kernel"] for l in convs}
    assert kinds <= {"dense", "pointwise", "connectivity", "pattern"}
    assert ("connectivity" in kinds or "pattern" in kinds) == sparse
    assert manifest["inputs"][0]["shape"] == [1, 1, 28, 28] and built.manifest["target"] == "x86"
    session = onnxruntime_session(result.path.read_bytes())
    for image in _real_inputs(fmnist, 5):
        got = run_on_host(built.library, image[None])
        expected = session.run(None, {"input": image[None]})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_arm64_build_is_an_aarch64_library(exported, tmp_path):
    _, result = exported
    built = compile_model(result.path, "cortex-a72", tmp_path / "model_arm.so")
    header = built.library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    convs = [l for l in built.manifest["layers"] if l["op"] == "conv"]
    # B=4 matches NEON's 4 lanes: the pattern kernel, chosen by its multiply-add saving
    assert sum(l["kernel"] == "pattern" for l in convs) == 18
    assert all("fewer multiply-adds" in l["reason"] for l in convs if l["kernel"] == "pattern")


def test_unknown_ops_and_targets_are_clear_errors(tmp_path):
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 1, 3, 3], np.ones(36, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["c"], ["logits"], name="squash")],
        "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              tmp_path / "sig.onnx")
    with pytest.raises(CompileError, match="'squash' \\(Sigmoid\\): not supported"):
        compile_model(tmp_path / "sig.onnx", "x86", tmp_path / "sig.so", measure=False)
    assert not (tmp_path / "sig.so").exists()
    with pytest.raises(KeyError, match="unknown target 'riscv'"):
        compile_model(tmp_path / "sig.onnx", "riscv", tmp_path / "x.so")


def test_metadata_that_contradicts_the_weights_stops_the_build(exported, tmp_path):
    from onnx import numpy_helper

    from clicktrain_deploy.passes.onnx_passes import read_metadata

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
    assert instructions_per_inference(dense.library, image) > 1.5 * first


def test_layout_follows_the_models_block_size():
    from clicktrain_deploy.compile.targets import TARGETS

    arm = TARGETS.get("cortex-a72")()
    assert arm.layout_for([16, 16]).lanes == 16  # four NEON vectors per kernel block
    assert arm.layout_for([16, 8]).lanes == 8
    assert arm.layout_for([4]).lanes == 4
    assert arm.layout_for([1]).lanes == 4  # per-kernel patterns: the connectivity kernel, narrowest
    assert arm.layout_for([]) == arm.dense_layout


def test_maxpool_between_convs_stays_blocked_and_matches_onnxruntime(tmp_path):
    """A VGG-like graph without metadata: conv-relu, 2x2 max pool (odd 7x9 map), conv-relu, pool, Gemm."""
    rng = np.random.default_rng(0)
    tensors = {"w1": rng.standard_normal((16, 3, 3, 3)), "b1": rng.standard_normal(16),
               "w2": rng.standard_normal((20, 16, 3, 3)), "b2": rng.standard_normal(20),
               "fc": rng.standard_normal((10, 20)), "fcb": rng.standard_normal(10)}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2],
                              ceil_mode=1),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "vgg", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 7, 9])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, tmp_path / "vgg.onnx")
    built = compile_model(tmp_path / "vgg.onnx", "x86", tmp_path / "vgg.so", measure=False)
    assert [l["kernel"] for l in built.manifest["layers"]] == ["dense", "dense", "maxpool", "avgpool", "dense"]
    from tvm import relax

    from clicktrain_deploy.compile.lower import lower_onnx
    from clicktrain_deploy.compile.targets import TARGETS

    module, _, _ = lower_onnx(model, None, TARGETS.get("x86")())
    kernels = []
    relax.analysis.post_order_visit(module["main"], lambda e: kernels.append(e.args[0].name_hint.rstrip(
        "0123456789")) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    assert kernels == ["pack", "conv", "maxpool", "conv", "avgpool", "dense"]  # no unpack/pack in between
    image = rng.standard_normal((1, 3, 7, 9)).astype(np.float32)
    expected = onnxruntime_session(model.SerializeToString()).run(None, {"input": image})[0]
    np.testing.assert_allclose(run_on_host(built.library, image), expected, atol=1e-4, rtol=1e-4)
