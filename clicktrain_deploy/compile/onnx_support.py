"""What TVM 0.27's ONNX importer (``tvm.relax.frontend.onnx.from_onnx``) honours, as data, and
``check_supported``, which refuses a model before import when it holds anything else.

Rule of the project: never a silently wrong result. Every op below was audited against its
converter (``onnx_frontend.py``, the ``_impl_vN`` it picks for each opset) and against
onnxruntime on small models (tests/test_onnx_support.py). For each op, every attribute the ONNX
schema defines (opsets 1-28) is listed:

* ``ANY``: the converter reads it and every valid value agrees with onnxruntime;
* an :class:`Only` rule: only the listed values are honoured; any other value is refused, with
  ``kind`` saying why:
  ``ignored``  the converter never reads the attribute, so its value is silently dropped;
  ``wrong``    the converter reads it, but the result disagrees with onnxruntime;
  ``rejected`` TVM raises on it (an assert or an unrelated error deep in the import); refusing it
               here names the node and attribute instead;
  ``policy``   TVM may handle it, but this compiler builds float32 inference models only.

An attribute on a node that is not in the table (not defined by ONNX for the op, or added by a
newer opset than was audited) is refused too, and so is any op not in :data:`ATTRIBUTES`:
those that TVM's importer lacks (checked against its convert map at call time) and those it has
but that were not audited here. Conditions that depend on several attributes, on input shapes or
on constant inputs are listed in :data:`CONDITIONS` and checked by the function named there.

Model inputs, initializers and Constant/ConstantOfShape values must be float32 (or integer/bool
for shapes and indices): the compiler builds float32 models only. Nodes outside the standard
domain are refused, since TVM's importer ignores ``node.domain``. Subgraphs of If are walked
(TVM's own unsupported-op check looks at the top graph only); Loop and Scan have no converter.

Constant ``value_int(s)``/``value_float(s)`` are let through: TVM's converter rejects them loudly,
and the frontend's constant folding turns them into initializers before import. Everything this
module checks is a property of the ONNX file, so it is meant to run on the model as given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import CompileError

ANY = None  # every valid value is honoured


@dataclass(frozen=True)
class Only:
    """Only ``safe`` values are honoured (an empty tuple: the attribute must be absent)."""

    safe: tuple
    kind: str  # ignored | wrong | rejected | policy
    why: str


_LEGACY_AXIS = Only((), "ignored", "legacy (opset < 7) broadcast axis; the converter broadcasts "
                    "numpy-style and never reads it")
_ACT = {"consumed_inputs": ANY}  # opset-1 memory hint, no effect on the result

# Cast targets the float32 compiler can build: float32 itself, integers and bool (shape and index
# arithmetic). Other float types (float16, double, bfloat16, float8*), strings and complex are not.
_CAST_OK = tuple(sorted({TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16,
                         TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
                         TensorProto.UINT32, TensorProto.UINT64}))

_RESIZE_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                  "tf_half_pixel_for_nn", "tf_crop_and_resize")

#: op -> attribute -> ANY or Only(...): every attribute ONNX defines for the op (opsets 1-28).
ATTRIBUTES: dict[str, dict[str, Only | None]] = {
    "Conv": {"auto_pad": ANY, "dilations": ANY, "group": ANY, "kernel_shape": ANY, "pads": ANY,
             "strides": ANY},
    "ConvTranspose": {
        "auto_pad": ANY, "dilations": ANY, "group": ANY, "kernel_shape": ANY, "pads": ANY,
        "strides": ANY, "output_padding": ANY,
        "output_shape": Only((), "ignored", "the converter never reads output_shape, so the "
                             "output keeps the size that strides/pads/output_padding give"),
    },
    "BatchNormalization": {
        "epsilon": ANY, "momentum": ANY, "consumed_inputs": ANY, "is_test": ANY,
        "spatial": Only((1,), "ignored", "per-activation statistics (spatial=0) are not read; "
                        "the converter always normalises per channel"),
        "training_mode": Only((0,), "policy", "training-mode batch statistics; this compiler "
                              "builds inference models"),
    },
    "InstanceNormalization": {"epsilon": ANY, "consumed_inputs": ANY},
    "LayerNormalization": {"axis": ANY, "epsilon": ANY, "stash_type": ANY},
    "Relu": dict(_ACT), "Sigmoid": dict(_ACT), "Tanh": dict(_ACT), "Sqrt": dict(_ACT),
    "Exp": dict(_ACT), "Neg": dict(_ACT), "Abs": dict(_ACT), "PRelu": dict(_ACT),
    "LeakyRelu": {"alpha": ANY, **_ACT},
    "Elu": {"alpha": ANY, **_ACT},
    "Selu": {"alpha": ANY, "gamma": ANY, **_ACT},
    "HardSigmoid": {"alpha": ANY, "beta": ANY, **_ACT},
    "HardSwish": {},
    "Clip": {"min": ANY, "max": ANY, **_ACT},
    "Softmax": {"axis": ANY},
    "LogSoftmax": {"axis": ANY},
    "Add": {"axis": _LEGACY_AXIS, "broadcast": ANY, **_ACT},
    "Sub": {"axis": _LEGACY_AXIS, "broadcast": ANY, **_ACT},
    "Mul": {"axis": _LEGACY_AXIS, "broadcast": ANY, **_ACT},
    "Div": {"axis": _LEGACY_AXIS, "broadcast": ANY, **_ACT},
    "Pow": {"axis": _LEGACY_AXIS, "broadcast": ANY},
    "Equal": {"axis": _LEGACY_AXIS, "broadcast": ANY},
    "Less": {"axis": _LEGACY_AXIS, "broadcast": ANY},
    "Greater": {"axis": _LEGACY_AXIS, "broadcast": ANY},
    "MaxPool": {
        "auto_pad": ANY, "ceil_mode": ANY, "dilations": ANY, "kernel_shape": ANY, "pads": ANY,
        "strides": ANY,
        "storage_order": Only((0,), "ignored", "the converter never reads storage_order"),
    },
    "AveragePool": {"auto_pad": ANY, "ceil_mode": ANY, "count_include_pad": ANY, "dilations": ANY,
                    "kernel_shape": ANY, "pads": ANY, "strides": ANY},
    "GlobalAveragePool": {},
    "GlobalMaxPool": {},
    "ReduceMean": {"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
    "ReduceMax": {"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
    "ReduceSum": {"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
    "Gemm": {"alpha": ANY, "beta": ANY, "transA": ANY, "transB": ANY, "broadcast": ANY},
    "MatMul": {},
    "Flatten": {"axis": ANY},
    "Reshape": {"allowzero": ANY, **_ACT,
                "shape": Only((), "ignored", "Reshape-1 shape attribute; the converter reads the "
                              "shape input only")},
    "Transpose": {"perm": ANY},
    "Squeeze": {"axes": ANY},
    "Unsqueeze": {"axes": ANY},
    "Concat": {"axis": ANY},
    "Split": {"axis": ANY, "split": ANY, "num_outputs": ANY},
    "Slice": {a: Only((), "ignored", "Slice-1 attribute; the converter reads the starts/ends/axes "
                      "inputs only") for a in ("starts", "ends", "axes")},
    "Gather": {"axis": ANY},
    "Pad": {"mode": ANY, "pads": ANY, "value": ANY,
            "paddings": Only((), "rejected", "Pad-1 attribute; the converter reads pads")},
    "Resize": {
        "mode": ANY, "nearest_mode": ANY, "cubic_coeff_a": ANY, "exclude_outside": ANY,
        "extrapolation_value": ANY,
        "coordinate_transformation_mode": Only(_RESIZE_COORDS, "rejected", "TVM's resize has no "
                                               "half_pixel_symmetric"),
        "antialias": Only((0,), "ignored", "the converter never reads antialias"),
        "axes": Only((), "rejected", "the converter reads scales/sizes as covering every axis"),
        "keep_aspect_ratio_policy": Only(("stretch",), "ignored", "the converter never reads "
                                         "keep_aspect_ratio_policy"),
    },
    "Upsample": {
        "mode": Only(("linear",), "wrong", "nearest picks different pixels than onnxruntime "
                     "(asymmetric rounding instead of floor)"),
        "scales": ANY,
        "height_scale": Only((), "rejected", "Upsample-1 attribute; the converter reads scales"),
        "width_scale": Only((), "rejected", "Upsample-1 attribute; the converter reads scales"),
    },
    "Shape": {"start": ANY, "end": ANY},
    "Constant": {
        # value_float(s)/value_int(s): TVM's converter reads only ``value`` and raises 'no value
        # in Constant' (loud, not silent); the frontend's constant folding rewrites them as
        # initializers before import, so they are let through here.
        "value": ANY, "value_float": ANY, "value_floats": ANY, "value_int": ANY, "value_ints": ANY,
        **{a: Only((), "rejected", "the converter reads only a value tensor, and turns string "
                   "tensors into int64 zeros") for a in ("sparse_value", "value_string",
                                                         "value_strings")},
    },
    "ConstantOfShape": {"value": ANY},
    "Cast": {"to": Only(_CAST_OK, "policy", "the compiler builds float32 models only"),
             "saturate": ANY, "round_mode": ANY},  # both matter for float8 targets only
    "Identity": {},
    "Dropout": {"ratio": ANY, "seed": ANY, "is_test": ANY, **_ACT},
    "Expand": {},
    "Tile": {},
    "Where": {},
    "Min": dict(_ACT), "Max": dict(_ACT), "Sum": dict(_ACT), "Mean": dict(_ACT),
    "ArgMax": {"axis": ANY, "keepdims": ANY, "select_last_index": ANY},
    "TopK": {"axis": ANY, "k": ANY, "largest": ANY,
             "sorted": Only((1,), "rejected", "the converter raises 'TopK sorted must be 1'")},
    "Erf": {},
    "Gelu": {"approximate": ANY},
    "DepthToSpace": {"blocksize": ANY, "mode": ANY},
    "SpaceToDepth": {"blocksize": ANY,
                     "mode": Only(("DCR",), "ignored", "SpaceToDepth-28 mode; the converter "
                                  "always uses DCR order")},
    # Beyond the vision list: cheap unary/compare/reduce ops also audited against onnxruntime.
    "Log": dict(_ACT), "Reciprocal": dict(_ACT), "Floor": dict(_ACT), "Ceil": dict(_ACT),
    "Round": {}, "Softplus": {}, "Softsign": {}, "Mish": {}, "Sin": {}, "Cos": {}, "Sign": {},
    "LessOrEqual": {}, "GreaterOrEqual": {},
    "ThresholdedRelu": {"alpha": ANY},
    "LRN": {"alpha": ANY, "beta": ANY, "bias": ANY, "size": ANY},
    "ArgMin": {"axis": ANY, "keepdims": ANY, "select_last_index": ANY},
    "ReduceMin": {"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
    # Control flow: If is converted in TVM's graph walker (both branches are checked here);
    # Loop and Scan are not in TVM's convert map at all.
    "If": {"then_branch": ANY, "else_branch": ANY},
}

#: op -> [(first opset, last opset, kind, why)]: opsets whose signature the converter misreads.
OPSETS: dict[str, list[tuple[int, int, str, str]]] = {
    "TopK": [(10, 10, "wrong", "TopK-10 takes k as an input, but TVM converts opset 10 with its "
              "opset-1 converter, which reads the k attribute and silently uses k=1")],
    "Resize": [(10, 10, "rejected", "Resize-10 (X, scales) is converted as Resize-11+ "
                "(X, roi, scales, sizes) and fails")],
    "Upsample": [(1, 6, "rejected", "Upsample-1 height_scale/width_scale are not read"),
                 (9, 10, "rejected", "Upsample-9 takes scales as an input, the converter reads a "
                  "scales attribute")],
    "Tile": [(1, 5, "ignored", "Tile-1 (tiles, axis) inputs are read as Tile-6 repeats")],
    "Reshape": [(1, 4, "ignored", "Reshape-1 shape attribute is not read")],
    "Slice": [(1, 9, "ignored", "Slice-1 starts/ends/axes attributes are not read")],
    "Pad": [(1, 1, "rejected", "Pad-1 paddings attribute is not read")],
    "Concat": [(1, 3, "wrong", "Concat-1 axis defaults to 1, the converter defaults to 0")],
    "Split": [(1, 1, "ignored", "Split-1 split input is not read")],
    "Selu": [(1, 5, "wrong", "Selu-1 defaults (alpha=1.6732, gamma=1.0507) differ from Selu-6's, "
              "which the converter always uses")],
}

#: op -> {output index: (output, kind, why)}: outputs that must not be used (empty name or absent).
OUTPUTS: dict[str, dict[int, tuple[str, str, str]]] = {
    "MaxPool": {1: ("Indices", "rejected", "the converter produces no Indices output")},
    "LayerNormalization": {
        1: ("Mean", "wrong", "the converter returns a float32 scalar 0 placeholder"),
        2: ("InvStdDev", "wrong", "the converter returns a float32 scalar 0 placeholder")},
    "Dropout": {1: ("mask", "wrong", "the converter returns a float32 tensor, not a bool mask")},
    "BatchNormalization": {i: (name, "policy", "training-mode statistics; this compiler builds "
                               "inference models")
                           for i, name in enumerate(("mean", "var", "saved_mean", "saved_var"), 1)},
}

#: Conditions on several attributes, input shapes or constant inputs: (op, check, kind, why).
#: ``check`` names a function in this module, ``_cond_<check>``.
CONDITIONS: list[tuple[str, str, str, str]] = [
    ("MaxPool", "same_lower_stride", "wrong",
     "auto_pad=SAME_LOWER with a stride that does not divide the input: TVM sizes the output "
     "floor(in/stride), ONNX ceil(in/stride)"),
    ("MaxPool", "same_dilation", "wrong",
     "auto_pad=SAME_* with dilations != 1: TVM and onnxruntime give different output sizes"),
    ("Resize", "fractional_scales", "wrong",
     "scales whose product with the input size is not an integer: TVM maps coordinates with "
     "output/input instead of the scale"),
    ("Upsample", "fractional_scales", "wrong",
     "scales whose product with the input size is not an integer: TVM maps coordinates with "
     "output/input instead of the scale"),
    ("Resize", "scales_and_sizes", "rejected",
     "both scales (even an empty tensor) and sizes are given; the converter asserts that only "
     "one is; leave the scales input name empty"),
    ("Resize", "align_corners_size1", "rejected",
     "align_corners with an output size of 1 divides by zero in TVM's resize"),
    ("LayerNormalization", "gamma_rank", "rejected",
     "Scale must have rank(X) - axis dims: the converter derives the normalised axes from it"),
    ("Dropout", "training_mode", "policy",
     "training_mode must be absent or a constant false: this compiler builds inference models"),
    ("Softmax", "legacy_rank", "wrong",
     "opset < 13 with an input of unknown rank: the converter falls back to softmax over one "
     "axis instead of flattening axes [axis:]"),
    ("LogSoftmax", "legacy_rank", "wrong",
     "opset < 13 with an input of unknown rank: the converter falls back to log_softmax over "
     "one axis instead of flattening axes [axis:]"),
    ("Pow", "exponent_dtype", "rejected",
     "an exponent whose dtype differs from the base: TVM's power needs both the same"),
]

KIND_TEXT = {"ignored": "TVM's importer ignores it", "wrong": "TVM's importer gets it wrong",
             "rejected": "TVM's importer cannot import it", "policy": "this compiler cannot build it"}

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_FLOAT_TYPES |= {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                                   "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "FLOAT8E8M0")
                 if hasattr(TensorProto, n)}
_BAD_TENSOR_TYPES = (_FLOAT_TYPES - {TensorProto.FLOAT}) | {
    TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128, TensorProto.UNDEFINED}


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return str(elem_type)


def _fmt(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, TensorProto):
        return f"<{_type_name(value.data_type)} tensor {list(value.dims)}>"
    if isinstance(value, onnx.GraphProto):
        return f"<graph {value.name!r}>"
    return str(value)


def _plain(value):
    """An attribute value as a comparable Python value (bytes -> str, lists -> tuples)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


@dataclass
class _Ctx:
    """Everything the walk knows: the opset, constant tensors, inferred types and shapes."""

    opset: int
    consts: dict = field(default_factory=dict)   # name -> numpy array
    types: dict = field(default_factory=dict)    # name -> elem_type
    shapes: dict = field(default_factory=dict)   # name -> [int | None] (None: unknown dim)
    problems: list = field(default_factory=list)

    def rank(self, name):
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def _label(node: onnx.NodeProto, where: str) -> str:
    name = node.name or (node.output[0] if node.output else "")
    return f"{where}{name}"


def _attr_dict(node):
    return {a.name: _plain(helper.get_attribute_value(a)) for a in node.attribute}


def _collect_info(graph: onnx.GraphProto, ctx: _Ctx) -> None:
    for init in graph.initializer:
        ctx.types[init.name] = init.data_type
        ctx.shapes[init.name] = list(init.dims)
        try:
            ctx.consts[init.name] = numpy_helper.to_array(init)
        except Exception:  # pylint: disable=broad-except  # external data etc.: shape is enough
            pass
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        if t.elem_type:
            ctx.types.setdefault(vi.name, t.elem_type)
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            ctx.shapes.setdefault(vi.name, dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    ctx.types[node.output[0]] = a.t.data_type
                    ctx.shapes[node.output[0]] = list(a.t.dims)
                    try:
                        ctx.consts[node.output[0]] = numpy_helper.to_array(a.t)
                    except Exception:  # pylint: disable=broad-except
                        pass
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect_info(a.g, ctx)
            for g in a.graphs:
                _collect_info(g, ctx)


def _inp(node, i):
    return node.input[i] if len(node.input) > i and node.input[i] else None


# ---- conditions -------------------------------------------------------------------------------

def _cond_same_lower_stride(node, attrs, ctx):
    if _plain(attrs.get("auto_pad", "NOTSET")) != "SAME_LOWER":
        return None
    strides = attrs.get("strides") or ()
    shape = ctx.shapes.get(node.input[0]) or []
    for i, s in enumerate(strides):
        dim = shape[2 + i] if len(shape) > 2 + i else None
        if s > 1 and (dim is None or dim % s):
            return f"auto_pad=SAME_LOWER with strides={_fmt(list(strides))}"
    return None


def _cond_same_dilation(node, attrs, ctx):
    if _plain(attrs.get("auto_pad", "NOTSET")) in ("SAME_UPPER", "SAME_LOWER") and any(
            d != 1 for d in attrs.get("dilations") or ()):
        return (f"auto_pad={attrs['auto_pad']} with dilations={_fmt(list(attrs['dilations']))}")
    return None


def _cond_fractional_scales(node, attrs, ctx):
    if node.op_type == "Upsample":
        scales = attrs.get("scales")
        name = "scales"
    else:
        name = _inp(node, 2)
        scales = ctx.consts.get(name) if name else None
        if name and scales is None:
            return f"a scales input {name!r} that is not a constant"
    if scales is None or len(scales) == 0:
        return None
    scales = [float(s) for s in np.asarray(scales).reshape(-1)]
    shape = ctx.shapes.get(node.input[0]) or [None] * len(scales)
    for s, dim in zip(scales, shape):
        product = s * dim if dim is not None else None
        if (product is None and s != int(s)) or (product is not None and
                                                 abs(product - round(product)) > 1e-6):
            return f"scales={_fmt(scales)} on an input of shape {_fmt(shape)}"
    return None


def _cond_scales_and_sizes(node, attrs, ctx):
    if _inp(node, 2) and _inp(node, 3):
        return f"scales {node.input[2]!r} together with sizes {node.input[3]!r}"
    return None


def _cond_align_corners_size1(node, attrs, ctx):
    if attrs.get("coordinate_transformation_mode") != "align_corners":
        return None
    sizes = ctx.consts.get(_inp(node, 3)) if _inp(node, 3) else None
    if sizes is not None and any(int(s) == 1 for s in np.asarray(sizes).reshape(-1)[2:]):
        return f"align_corners with sizes={_fmt([int(s) for s in np.asarray(sizes).reshape(-1)])}"
    return None


def _cond_gamma_rank(node, attrs, ctx):
    rank, gamma_rank = ctx.rank(node.input[0]), ctx.rank(_inp(node, 1))
    if rank is None or gamma_rank is None:
        return None
    axis = attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    if gamma_rank != rank - axis:
        return f"axis={attrs.get('axis', -1)} with a rank-{gamma_rank} Scale on a rank-{rank} input"
    return None


def _cond_training_mode(node, attrs, ctx):
    name = _inp(node, 2)
    if not name:
        return None
    value = ctx.consts.get(name)
    if value is None or bool(np.asarray(value).any()):
        return f"a training_mode input {name!r} that is not a constant false"
    return None


def _cond_legacy_rank(node, attrs, ctx):
    if ctx.opset >= 13 or ctx.rank(node.input[0]) is not None:
        return None
    if attrs.get("axis", 1) == -1:
        return None
    return f"axis={attrs.get('axis', 1)} on an input of unknown rank at opset {ctx.opset}"


def _cond_exponent_dtype(node, attrs, ctx):
    base, exp = ctx.types.get(node.input[0]), ctx.types.get(_inp(node, 1))
    if base and exp and base != exp:
        return f"a {_type_name(exp)} exponent on a {_type_name(base)} base"
    return None


# ---- the walk ---------------------------------------------------------------------------------

def _convert_map_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend  # pylint: disable=import-outside-toplevel

    return set(onnx_frontend._get_convert_map())  # pylint: disable=protected-access


def _check_tensor(where: str, what: str, elem_type: int, ctx: _Ctx) -> None:
    if elem_type in _BAD_TENSOR_TYPES:
        ctx.problems.append(f"{where}{what} is {_type_name(elem_type)}: the compiler builds "
                            f"float32 models only")


def _check_node(node, ctx, where, tvm_ops):
    label, op = _label(node, where), node.op_type
    head = f"node {label!r} ({op})"
    if node.domain not in ("", "ai.onnx"):
        ctx.problems.append(f"{head}: domain {node.domain!r} is not supported (TVM's importer "
                            f"ignores the domain and would convert it as the standard op)")
        return
    if op not in ATTRIBUTES:
        if op not in tvm_ops:
            ctx.problems.append(f"{head}: op {op} is not supported (TVM's ONNX importer has no "
                                f"converter for it)")
        else:
            ctx.problems.append(f"{head}: op {op} is not supported (not audited for this "
                                f"compiler: see compile/onnx_support.py)")
        return
    if op != "If" and op not in tvm_ops:
        ctx.problems.append(f"{head}: op {op} is not supported (TVM's ONNX importer has no "
                            f"converter for it)")
        return
    for first, last, kind, why in OPSETS.get(op, ()):
        if first <= ctx.opset <= last:
            ctx.problems.append(f"{head}: opset {ctx.opset} is not supported "
                                f"({KIND_TEXT[kind]}: {why})")
    rules = ATTRIBUTES[op]
    attrs = {}
    for a in node.attribute:
        value = _plain(helper.get_attribute_value(a))
        attrs[a.name] = value
        if a.name not in rules:
            ctx.problems.append(f"{head}: attribute {a.name}={_fmt(value)} is not supported "
                                f"(not an attribute this compiler audited for {op})")
            continue
        rule = rules[a.name]
        if rule is not None and value not in rule.safe:
            shown = _fmt(value) + (f" ({_type_name(value)})" if op == "Cast" and a.name == "to"
                                   else "")
            ctx.problems.append(f"{head}: attribute {a.name}={shown} is not supported "
                                f"({KIND_TEXT[rule.kind]}: {rule.why})")
    for index, (name, kind, why) in OUTPUTS.get(op, {}).items():
        if len(node.output) > index and node.output[index]:
            ctx.problems.append(f"{head}: output {name} ({node.output[index]!r}) is not supported "
                                f"({KIND_TEXT[kind]}: {why})")
    for cop, check, kind, why in CONDITIONS:
        if cop == op:
            found = globals()[f"_cond_{check}"](node, attrs, ctx)
            if found:
                ctx.problems.append(f"{head}: {found} is not supported ({KIND_TEXT[kind]}: {why})")
    # dtypes: Constant / ConstantOfShape values, Cast targets (via the table above)
    if op in ("Constant", "ConstantOfShape"):
        for a in node.attribute:
            if a.name == "value" and a.HasField("t"):
                _check_tensor(f"{head}: attribute ", f"value", a.t.data_type, ctx)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            _check_graph(a.g, ctx, f"{label}/{a.name}/", tvm_ops)
        for g in a.graphs:
            _check_graph(g, ctx, f"{label}/{a.name}/", tvm_ops)


def _check_graph(graph, ctx, where, tvm_ops):
    for init in graph.initializer:
        _check_tensor("", f"initializer {where}{init.name!r}", init.data_type, ctx)
    for node in graph.node:
        _check_node(node, ctx, where, tvm_ops)


def check_supported(model: onnx.ModelProto, opset: int) -> None:
    """Raise CompileError unless TVM's ONNX importer converts every node of ``model`` faithfully.

    The message names each offending node (its name, or its first output when unnamed), the op
    and the attribute with its value, e.g. ``node 'pool1' (MaxPool): attribute storage_order=1
    is not supported (TVM's importer ignores it: ...)``. Subgraphs of If nodes are walked too.
    """
    ctx = _Ctx(opset=opset)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # pylint: disable=broad-except  # shapes are a help, not a requirement
        inferred = model
    _collect_info(model.graph, ctx)
    _collect_info(inferred.graph, ctx)
    initializers = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else None
        if elem != TensorProto.FLOAT:
            kind = _type_name(elem) if elem is not None else "not a tensor"
            ctx.problems.append(f"model input {vi.name!r} is {kind}: the compiler builds float32 "
                                f"models only")
    _check_graph(model.graph, ctx, "", _convert_map_ops())
    if ctx.problems:
        raise CompileError("the ONNX model holds what TVM's importer cannot honour:\n  "
                           + "\n  ".join(ctx.problems))


__all__ = ["ATTRIBUTES", "CONDITIONS", "OPSETS", "OUTPUTS", "Only", "check_supported"]

