"""onnxruntime's own aarch64 build under qemu-aarch64 -cpu cortex-a72 with the counting plugin.

Small conv -> relu -> global pool -> gemm models built with onnx.helper, with 8, 16 and 32 conv
channels; each measure is two processes (1 and 11 session.run calls), 4-5 s each under qemu on
an idle core (the start-up of CPython, numpy and onnxruntime under emulation).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from clicktrain_deploy.bench.arm import measure_onnxruntime_arm
from clicktrain_deploy.compile.arm.ort import ort_arm_available, ort_root, run_onnxruntime_arm

CHANNELS = (8, 16, 32)
#: Two processes doing the same runs agree to this many instructions (of ~450 M). Seen: exactly,
#: in every repeat; the bound is a margin for CPython start-up noise (~1,000 was seen before the
#: driver stopped using .npz, whose zip headers carry the time of day).
REPEAT_BOUND = 5_000


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
    with ThreadPoolExecutor(2) as pool:  # 7 qemu processes, two at a time
        # the smallest model's 11-run process once more, for repeatability
        repeat = pool.submit(run_onnxruntime_arm, paths[CHANNELS[0]], [image], runs=11, count=True)
        counts = list(pool.map(lambda c: measure_onnxruntime_arm(paths[c], [image], runs=(1, 11)), CHANNELS))
        return {"image": image, "paths": paths, "repeat": repeat.result(), **dict(zip(CHANNELS, counts))}


def test_outputs_match_x86_onnxruntime(measured):
    for channels in CHANNELS:
        session = ort.InferenceSession(str(measured["paths"][channels]), providers=["CPUExecutionProvider"])
        (expected,) = session.run(None, {"x": measured["image"]})
        (got,) = measured[channels].outputs
        assert got.shape == expected.shape == (1, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_count_is_positive_and_repeatable(measured):
    first = measured[CHANNELS[0]]
    repeat_outputs, repeat_total = measured["repeat"]
    assert first.per_inference > 10_000
    # a second process with the same 11 runs: same outputs, same total within REPEAT_BOUND, so a
    # per-inference count repeats within 2 * REPEAT_BOUND / 10 (under 0.5 % here)
    np.testing.assert_array_equal(repeat_outputs[0], first.outputs[0])
    assert abs(repeat_total - first.totals[11]) <= REPEAT_BOUND
    assert 2 * REPEAT_BOUND / 10 < 0.005 * first.per_inference
    # the process start-up (CPython, numpy, onnxruntime import, session) dwarfs one inference
    assert first.totals[1] > 100 * first.per_inference


def test_count_grows_linearly_with_conv_channels(measured):
    small, middle, large = (measured[c].per_inference for c in CHANNELS)
    assert small < middle < large
    assert large > 1.5 * small  # 4x the conv work costs clearly more
    # equal steps in work (8 -> 16 -> 32 channels: +8, +16) give proportional steps in count
    ratio = (large - middle) / (middle - small)
    assert 1.5 < ratio < 2.5, ratio
