"""Every runtime reduced to zero-argument callables with inputs (and outputs) bound beforehand.

- onnxruntime: ``run_with_iobinding`` on an IOBinding whose input and output OrtValues are made
  once (outputs pre-allocated at their shapes), so a call allocates nothing and converts nothing;
- ours (TVM): the whole model is the Relax VM's ``main`` on a pre-made tensor; one conv is its
  kernel's PackedFunc from the library, called with the very arguments (copied) that the VM
  passes it in a real inference, captured once through the VM's instrument hook;
- torch: the module (or ``F.conv2d``) on a pre-made tensor, parameters frozen
  (``requires_grad=False``), so no autograd graph is recorded; the bench processes also turn
  grad mode off.

Each runtime's floor is the same call path on a trivial one-op model (a ReLU of one float):
``floor_callables`` returns it at the model level (session / VM ``main`` / module call) and at
the op level (a kernel's PackedFunc / ``torch.relu``; onnxruntime has one level only).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Call = Callable[[], object]


# -- onnxruntime ---------------------------------------------------------------------------------
def onnxruntime_session(model: onnx.ModelProto | bytes, threads: int | None, spinning: bool = True):
    """A CPU session with ``threads`` intra-op threads (None: onnxruntime's default), one inter-op
    thread, spin-waiting as ``spinning`` says (onnxruntime's default is on)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnxruntime_callable(session, feeds: dict[str, np.ndarray]) -> Call:
    """``session`` bound to ``feeds`` and to output buffers allocated once."""
    import onnxruntime as ort

    outputs = session.run(None, feeds)
    binding = session.io_binding()
    keep = []
    for name, value in feeds.items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)))
        binding.bind_ortvalue_input(name, keep[-1])
    for meta, value in zip(session.get_outputs(), outputs):
        keep.append(ort.OrtValue.ortvalue_from_numpy(np.empty_like(value)))
        binding.bind_ortvalue_output(meta.name, keep[-1])
    run = session.run_with_iobinding

    def call(binding=binding, keep=keep):
        run(binding)

    return call


# -- ours (TVM) ----------------------------------------------------------------------------------
def tvm_vm(library: str | Path):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())


def tvm_model_callable(library: str | Path, x: np.ndarray) -> Call:
    """The library's ``main`` on a pre-made input tensor."""
    import tvm

    main, tensor = tvm_vm(library)["main"], tvm.runtime.tensor(np.ascontiguousarray(x))

    def call():
        main(tensor)

    return call


def tvm_kernel_callables(library: str | Path, x: np.ndarray, functions: set[str] | None = None) -> dict[str, Call]:
    """The library's kernels (PackedFuncs) by name, each bound to copies of the arguments the VM
    passes it during one inference of ``x``; ``functions``: the names wanted (None: every kernel
    that is not a VM builtin). A kernel the VM calls twice keeps its first call's arguments."""
    import tvm

    vm = tvm_vm(library)
    captured: dict[str, tuple] = {}

    def instrument(func, name, before_run, ret_value, *args):
        name = str(name)
        wanted = functions is None and not name.startswith("vm.") or functions is not None and name in functions
        if before_run and wanted and name not in captured:
            copies = [tvm.runtime.tensor(a.numpy()) if isinstance(a, tvm.runtime.Tensor) else a for a in args]
            captured[name] = (func, copies)
        return 0

    vm.set_instrument(instrument)
    vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
    calls = {}
    for name, (func, args) in captured.items():
        def call(func=func, args=args):
            func(*args)

        calls[name] = call
    return calls


# -- torch ---------------------------------------------------------------------------------------
def torch_callable(module, x: np.ndarray) -> Call:
    """``module`` (eval mode, parameters frozen) on a pre-made tensor."""
    import torch

    module.eval().requires_grad_(False)
    tensor = torch.from_numpy(np.ascontiguousarray(x))

    def call():
        module(tensor)

    return call


def torch_conv_callable(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None, x: np.ndarray) -> Call:
    """``torch.nn.functional.conv2d`` with the ONNX Conv's attributes (asymmetric pads padded first)."""
    import torch
    import torch.nn.functional as F

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if (top, left) != (bottom, right):
        tensor, padding = F.pad(tensor, (left, right, top, bottom)), (0, 0)
    else:
        padding = (top, left)
    w = torch.from_numpy(np.ascontiguousarray(weight))
    b = torch.from_numpy(np.ascontiguousarray(bias)) if bias is not None else None
    stride, dilation = tuple(attrs.get("strides", [1, 1])), tuple(attrs.get("dilations", [1, 1]))
    groups, conv2d = attrs.get("group", 1), F.conv2d

    def call():
        conv2d(tensor, w, b, stride, padding, dilation, groups)

    return call


# -- the trivial model behind every floor -------------------------------------------------------
def trivial_onnx() -> onnx.ModelProto:
    """One Relu of one float: input "x", output "y"."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "floor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def trivial_tvm_library(output: str | Path) -> Path:
    """The trivial model as a Relax VM library for this host (built once per path)."""
    import tvm
    from tvm import relax

    output = Path(output)
    if not output.is_file():
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1,), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.relu(x))
            bb.emit_func_output(y)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp.so")
        tvm.compile(bb.get(), target="llvm").export_library(str(tmp))
        tmp.replace(output)
    return output


def floor_callables(runtime: str, threads: int | None, work_dir: str | Path) -> dict[str, Call]:
    """The empty-call floor of ``runtime`` ("ours", "onnxruntime", "torch"): {"model": ..., "op": ...}
    (onnxruntime: {"model": ...}), the same call paths as the real measurements."""
    x = np.ones(1, np.float32)
    if runtime == "onnxruntime":
        return {"model": onnxruntime_callable(onnxruntime_session(trivial_onnx(), threads), {"x": x})}
    if runtime == "ours":
        library = trivial_tvm_library(Path(work_dir) / "floor_host.so")
        kernels = tvm_kernel_callables(library, x)
        return {"model": tvm_model_callable(library, x), "op": next(iter(kernels.values()))}
    if runtime == "torch":
        import torch

        tensor = torch.from_numpy(x)
        relu = torch.relu
        return {"model": torch_callable(torch.nn.Sequential(torch.nn.ReLU()), x),
                "op": lambda: relu(tensor)}
    raise ValueError(f"unknown runtime {runtime!r}")


def single_conv_onnx(node: onnx.NodeProto, model: onnx.ModelProto, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    """An ONNX model holding just this Conv (its weight, its bias or zeros), input "x" at
    ``input_shape``, output "y"."""
    weights = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(weights[node.input[1]])
    bias = (numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2]
            else np.zeros(weight.shape[0], np.float32))
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name=node.name,
                            **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph(
        [conv], "single_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
