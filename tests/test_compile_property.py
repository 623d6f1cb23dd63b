"""Property: any small graph of the ops a CNN uses compiles for x86 and matches onnxruntime.

Hypothesis draws a chain of convs (kernel 1-5, strides, asymmetric pads, dilation, groups incl.
depthwise, with or without bias), activations, residual adds, pools and a classifier head, built
with onnx.helper; ``compile_model``'s own gate runs the library against onnxruntime, and a second
input is checked here.
"""
from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from clicktrain_deploy.compile.build import compile_model, run_images
from clicktrain_deploy.export.check import onnxruntime_session

ACTIVATIONS = ["Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "none"]


@st.composite
def graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels, height, width = draw(st.integers(1, 6)), draw(st.integers(5, 12)), draw(st.integers(5, 12))
    shape = [1, channels, height, width]
    nodes, initializers, current, count = [], [], "input", 0

    def const(name, array):
        initializers.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    for _ in range(draw(st.integers(1, 4))):
        count += 1
        kernel = draw(st.sampled_from([1, 3, 5]))
        stride = draw(st.sampled_from([1, 1, 2]))
        dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
        span = dilation * (kernel - 1) + 1
        if span > min(shape[2], shape[3]):
            kernel, dilation, span = 1, 1, 1
        pads = [draw(st.integers(0, kernel // 2 + 1)) for _ in range(4)] if kernel > 1 else [0, 0, 0, 0]
        depthwise = draw(st.booleans()) and shape[1] > 1
        groups = shape[1] if depthwise else 1
        out = shape[1] if depthwise else draw(st.integers(1, 20))
        inputs = [current, const(f"w{count}", rng.standard_normal((out, shape[1] // groups, kernel, kernel)) * 0.4)]
        if draw(st.booleans()):
            inputs.append(const(f"b{count}", rng.standard_normal(out)))
        nodes.append(helper.make_node("Conv", inputs, [f"c{count}"], name=f"conv{count}", kernel_shape=[kernel] * 2,
                                      strides=[stride] * 2, pads=pads, dilations=[dilation] * 2, group=groups))
        previous_shape = list(shape)
        shape = [1, out, (shape[2] + pads[0] + pads[2] - span) // stride + 1,
                 (shape[3] + pads[1] + pads[3] - span) // stride + 1]
        current = f"c{count}"
        activation = draw(st.sampled_from(ACTIVATIONS))
        if activation == "Clip":
            nodes.append(helper.make_node("Clip", [current, const(f"lo{count}", np.array(0.0)),
                                                   const(f"hi{count}", np.array(6.0))], [f"a{count}"]))
        elif activation != "none":
            nodes.append(helper.make_node(activation, [current], [f"a{count}"]))
        current = f"a{count}" if activation != "none" else current
        if shape == previous_shape and draw(st.booleans()):  # a residual add of the conv's input
            source = nodes[-2].input[0] if activation != "none" else nodes[-1].input[0]
            nodes.append(helper.make_node("Add", [current, source], [f"r{count}"]))
            current = f"r{count}"
        if shape[2] >= 4 and shape[3] >= 4 and draw(st.integers(0, 3)) == 0:
            ceil = draw(st.sampled_from([0, 1]))
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            nodes.append(helper.make_node(op, [current], [f"p{count}"], kernel_shape=[2, 2], strides=[2, 2],
                                          ceil_mode=ceil))
            shape = [1, shape[1], -(-shape[2] // 2) if ceil else shape[2] // 2, -(-shape[3] // 2) if ceil else shape[3] // 2]
            current = f"p{count}"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["g"]))
    nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", const("fc", rng.standard_normal((4, shape[1]))), const("fcb", rng.standard_normal(4))],
                                  ["logits"], transB=1, alpha=float(draw(st.sampled_from([1.0, 0.5])))))
    graph = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, channels, height, width])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(model=graphs())
def test_random_graphs_compile_and_match_onnxruntime(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("random")
    onnx.checker.check_model(model)
    onnx.save(model, folder / "m.onnx")
    built = compile_model(folder / "m.onnx", "x86", folder / "m.so", measure=False)
    assert built.manifest["check"]["status"] == "passed"
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    image = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    expected = onnxruntime_session(model.SerializeToString()).run(None, {"input": image})[0]
    np.testing.assert_allclose(run_images(built.library, image), expected, atol=1e-4, rtol=1e-4)
