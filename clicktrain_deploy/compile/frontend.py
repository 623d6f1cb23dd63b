"""ONNX file -> Relax module through TVM's own importer, ``tvm.relax.frontend.onnx.from_onnx``.

The graph is normalised with well-kept tools: every input dimension fixed (the model's own, or
the caller's ``input_shapes`` for symbolic ones), ONNX shape inference, and onnxscript's
optimizer (constant folding), which turns run-time shape subgraphs (Shape -> Gather -> Concat ->
Reshape) into constants the importer can read; then checked against what the importer honours
(``onnx_support``: an op or attribute it would drop or get wrong is refused, naming node, op and
attribute). BatchNorm folding and the rest happen on the Relax module
(``passes.prepare``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax

from ..contract import PatternMetadata, load_onnx, read_metadata
from .errors import CompileError
from .onnx_support import check_supported

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str = "float32"


@dataclass
class ImportedModel:
    """The original model, its normalised form, the Relax module, and what the manifest states."""

    original: onnx.ModelProto = field(repr=False)
    normalised: onnx.ModelProto = field(repr=False)
    module: tvm.IRModule = field(repr=False)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    conv_names: list[str]  # every Conv with a constant weight, in graph order: its weight's module
    # (a torch export's "<module>.weight" initializer) or else its node name
    metadata: PatternMetadata | None
    opset: int


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs (old exporters also list initializers as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def resolve_input_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | list[int] | None,
                         batch: int | None) -> list[TensorInfo]:
    """Each input's fixed shape: the model's dims, with ``input_shapes`` (one shape for a single
    input, or by name) for symbolic ones, and ``batch`` (default 1) for a symbolic first dim; refuses an input
    left with a symbolic dim or a given shape that contradicts the model, naming the input."""
    inputs = graph_inputs(model)
    if isinstance(input_shapes, (list, tuple)):
        if len(inputs) != 1:
            raise CompileError(f"the model has {len(inputs)} inputs {[i.name for i in inputs]}: "
                               "give each input's shape by name (NAME=N,C,H,W)")
        input_shapes = {inputs[0].name: list(input_shapes)}
    input_shapes = dict(input_shapes or {})
    unknown = set(input_shapes) - {i.name for i in inputs}
    if unknown:
        raise CompileError(f"input shape given for {sorted(unknown)}, but the model's inputs are {[i.name for i in inputs]}")
    resolved = []
    for value in inputs:
        tensor = value.type.tensor_type
        dtype = ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise CompileError(f"input {value.name!r}: element type {onnx.TensorProto.DataType.Name(tensor.elem_type)} "
                               "is not supported")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in tensor.shape.dim]
        given = input_shapes.get(value.name)
        if given is not None:
            if len(given) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims, given)):
                raise CompileError(f"input {value.name!r}: shape {list(given)} contradicts the model's {dims}")
            shape = [int(g) for g in given]
        else:
            shape = list(dims)
            if shape and not isinstance(shape[0], int):
                shape[0] = 1 if batch is None else batch
            symbolic = [d for d in shape if not isinstance(d, int)]
            if symbolic:
                raise CompileError(f"input {value.name!r} has symbolic dims {dims}: give its shape "
                                   f"(--input-shape {value.name}=N,C,H,W, or the recipe's compile.input_shape)")
        if batch is not None and shape and shape[0] != batch and given is None:
            raise CompileError(f"input {value.name!r}: the model fixes batch {shape[0]}, not {batch}")
        resolved.append(TensorInfo(value.name, shape, dtype))
    return resolved


def normalise(model: onnx.ModelProto, inputs: list[TensorInfo]) -> onnx.ModelProto:
    """A copy with the inputs' dims fixed, shapes inferred and constants folded (onnxscript)."""
    import onnxscript.optimizer

    fixed = copy.deepcopy(model)
    shapes = {i.name: i.shape for i in inputs}
    for value in fixed.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
        fixed = onnxscript.optimizer.optimize(fixed)
    except Exception as error:  # noqa: BLE001 (onnx and onnxscript raise many kinds)
        raise CompileError(f"the model cannot be normalised at input shapes {shapes}: {error}") from error
    _drop_empty_resize_scales(fixed)
    return fixed


def _drop_empty_resize_scales(model: onnx.ModelProto) -> None:
    """A Resize given ``sizes`` with an empty ``scales`` tensor (torch's opset-11 export of
    interpolate(size=...)) means "no scales": say so with an empty input name, as ONNX allows
    and the importer expects."""
    empty = {t.name for t in model.graph.initializer if 0 in t.dims}
    for node in model.graph.node:
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3] and node.input[2] in empty:
            node.input[2] = ""


def _conv_names(model: onnx.ModelProto) -> list[str]:
    constants = {t.name for t in model.graph.initializer} | \
        {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    return [n.input[1].removesuffix(".weight") if n.input[1].endswith(".weight") else n.name or n.output[0]
            for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in constants]


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def import_onnx(model: str | Path | onnx.ModelProto, input_shapes: dict[str, list[int]] | list[int] | None = None,
                batch: int | None = None) -> ImportedModel:
    """Check, normalise and import an ONNX model (a path or a ModelProto) into Relax."""
    from tvm.relax.frontend.onnx import from_onnx

    original = load_onnx(model) if not isinstance(model, onnx.ModelProto) else model
    opset = opset_of(original)
    metadata = read_metadata(original)
    inputs = resolve_input_shapes(original, input_shapes, batch)
    normalised = normalise(original, inputs)
    check_supported(normalised, opset)  # what the importer will read (node names are kept)
    try:
        module = from_onnx(normalised, shape_dict={i.name: i.shape for i in inputs}, opset=opset,
                           keep_params_in_input=False)
    except Exception as error:  # noqa: BLE001 (the importer raises TVMError, ValueError, ...)
        raise CompileError(f"TVM's ONNX importer rejected the model: {str(error).strip().splitlines()[-1]}") from error
    returned = module["main"].ret_ty
    fields = returned.fields if isinstance(returned, relax.TupleType) else [returned]
    outputs = [TensorInfo("", [int(d) for d in out.shape], str(out.dtype)) for out in fields]
    for info, value in zip(outputs, original.graph.output):
        info.name = value.name
    names = _conv_names(normalised)
    original_names = _conv_names(original)  # the user's node names, where normalising kept every conv
    return ImportedModel(original, normalised, module, inputs, outputs,
                         original_names if len(original_names) == len(names) else names, metadata, opset)


def random_inputs(inputs: list[TensorInfo], seed: int = 0) -> list[np.ndarray]:
    """Deterministic random inputs, standard normal (integers 0..9), for the numerical gate."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(i.shape).astype(np.float32) if i.dtype == "float32"
            else rng.integers(0, 10, i.shape).astype(i.dtype) for i in inputs]
