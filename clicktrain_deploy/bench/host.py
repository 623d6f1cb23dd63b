"""Latency on this machine at a fixed thread count, whole model and per conv layer.

Thread pools (TVM's, onnxruntime's, torch's) are sized when they start, so each thread count is
measured in a child process whose environment fixes it; it reads a JSON request on stdin and
prints a JSON answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .flops import LayerWork, layer_work
from .timing import interleaved_medians


_CHILD = "import json, sys; from clicktrain_deploy.bench.host import measure; print(json.dumps(measure(json.load(sys.stdin))))"


def measure_in_child(request: dict, threads: int) -> dict:
    """Run :func:`measure` in a fresh process pinned to ``threads`` threads."""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE"}
    child = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps({**request, "threads": threads}),
                           env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark at {threads} thread(s) failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def measure(request: dict) -> dict:
    """Whole model: ours pattern-sparse, ours dense, onnxruntime, torch (when a checkpoint is given),
    interleaved. Per conv: our candidate kernels alone, onnxruntime and torch on that conv alone.

    request: onnx (path), sparse_lib, dense_lib (host .so paths), checkpoint (path or None),
    threads, rounds. Returns {"whole_ms": {variant: ms}, "layers_us": {layer: {variant: us}}}.
    """
    import onnxruntime as ort
    import torch
    import tvm
    from tvm import relax

    from ..compile.lower import HostTimer, lower_onnx
    from ..compile.targets import TARGETS
    from ..export.check import onnxruntime_session
    from ..contract import load_onnx
    from ..passes.onnx_passes import verify

    threads, rounds = request["threads"], request["rounds"]
    torch.set_num_threads(threads)
    model = load_onnx(request["onnx"])
    metadata = verify(model)
    shape = [1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    session = onnxruntime_session(model.SerializeToString(), threads)
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_output(session.get_outputs()[0].name)
    fns = {"onnxruntime": lambda: session.run_with_iobinding(binding)}
    for name in ("sparse", "dense"):
        vm = relax.VirtualMachine(tvm.runtime.load_module(request[f"{name}_lib"]), tvm.cpu())
        fns[f"ours_{name}"] = lambda vm=vm, t=tvm.runtime.tensor(x): vm["main"](t)
    if request.get("checkpoint"):
        from ..train import load_checkpoint, restore_model

        net, _ = restore_model(load_checkpoint(request["checkpoint"]))
        net.eval()
        tx = torch.from_numpy(x)
        fns["torch"] = lambda: net(tx)
    with torch.no_grad():
        whole = interleaved_medians(fns, rounds)

    target = TARGETS.get("x86")()
    _, kernels, _ = lower_onnx(model, metadata, target, HostTimer(target, every_layer=True))
    ours = {k.layer: k.measured_us for k in kernels if k.op == "conv"}
    layers = {}
    for work in layer_work(model, metadata):
        if work.node.op_type != "Conv":
            continue
        single = _single_conv(work, model)
        conv_session = onnxruntime_session(single.SerializeToString(), threads)
        xi = np.random.default_rng(1).standard_normal(work.input_shape).astype(np.float32)
        attributes = {a.name: helper.get_attribute_value(a) for a in work.node.attribute}
        weight, bias = (torch.from_numpy(numpy_helper.to_array(t)) for t in single.graph.initializer)
        stride, padding = attributes.get("strides", [1, 1]), attributes.get("pads", [0, 0, 0, 0])[:2]
        txi = torch.from_numpy(xi)
        with torch.no_grad():
            times = interleaved_medians({
                "onnxruntime": lambda s=conv_session, a=xi: s.run(None, {"x": a}),
                "torch": lambda a=txi, w=weight, b=bias, s=stride, p=padding:
                    torch.nn.functional.conv2d(a, w, b, s, p),
            }, max(3, rounds // 3), budget_s=0.05)
        layers[work.layer] = {**{f"ours_{k}": v for k, v in ours[work.layer].items()},
                              **{k: v * 1e3 for k, v in times.items()}}
    return {"whole_ms": whole, "layers_us": layers}


def _single_conv(work: LayerWork, model: onnx.ModelProto) -> onnx.ModelProto:
    """An ONNX model holding just this conv (weight, bias), input "x" at batch 1, output "y"."""
    node = work.node
    weights = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(weights[node.input[1]])
    bias = (numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2
            else np.zeros(weight.shape[0], np.float32))
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name=node.name,
                            **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph(
        [conv], "single_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(work.input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)

