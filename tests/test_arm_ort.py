"""onnxruntime's own aarch64 build under qemu-aarch64 -cpu cortex-a72 with the counting plugin.

Small conv -> relu -> global pool -> gemm models built with onnx.helper, with 8, 16 and 32 conv
channels; each measure is two processes (1 and 11 session.run calls), about 4 s each under qemu.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clicktrain_deploy.bench.arm import measure_onnxruntime_arm
from clicktrain_deploy.compile.arm.ort import ort_arm_available, ort_root

CHANNELS = (8, 16, 32)
#: Two measures of one model agree to this fraction (seen: under 0.05 %; CPython start-up is
#: not bit-exact from process to process, by up to ~2,000 of ~475 M instructions).
REPEAT_TOLERANCE = 0.005


def tiny_cnn(channels: int, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
               for name, shape, scale in (("w", (channels, 3, 3, 3), 0.3), ("b", (channels,), 0.1),
                                          ("fw", (10, channels), 0.3), ("fb", (10,), 0.1))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, f"tiny_cnn_{channels}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    if not ort_arm_available():
        pytest.fail(f"{ort_root()}: aarch64 onnxruntime missing; run scripts/setup.sh")
    folder = tmp_path_factory.mktemp("ort_arm")
    image = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    paths = {}
    for channels in CHANNELS:
        paths[channels] = folder / f"tiny_cnn_{channels}.onnx"
        onnx.save(tiny_cnn(channels), paths[channels])
    jobs = [CHANNELS[0], *CHANNELS]  # the smallest twice, for repeatability
    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(lambda c: measure_onnxruntime_arm(paths[c], [image]), jobs))
    return {"image": image, "paths": paths, "repeat": counts[0], **dict(zip(CHANNELS, counts[1:]))}


def test_outputs_match_x86_onnxruntime(measured):
    for channels in CHANNELS:
        session = ort.InferenceSession(str(measured["paths"][channels]), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {"x": measured["image"]})
        (got,) = measured[channels].outputs
        assert got.shape == expected.shape == (1, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_count_is_positive_and_repeatable(measured):
    first, again = measured[CHANNELS[0]], measured["repeat"]
    assert first.per_inference > 10_000
    assert abs(first.per_inference - again.per_inference) <= REPEAT_TOLERANCE * first.per_inference
    # the process start-up (CPython, numpy, onnxruntime import, session) dwarfs one inference
    assert first.totals[1] > 100 * first.per_inference


def test_count_grows_linearly_with_conv_channels(measured):
    small, middle, large = (measured[c].per_inference for c in CHANNELS)
    assert small < middle < large
    assert large > 1.5 * small  # 4x the conv work costs clearly more
    # equal steps in work (8 -> 16 -> 32 channels: +8, +16) give proportional steps in count
    ratio = (large - middle) / (middle - small)
    assert 1.5 < ratio < 2.5, ratio
