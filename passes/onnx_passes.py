"""ONNX graph passes (onnx-graphsurgeon): fold BatchNorm, annotate, verify and strip patterns.

Each pass takes and returns an ``onnx.ModelProto``; none writes files.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from clicktrain_deploy import contract
from clicktrain_deploy.contract import METADATA_KEY, MetadataError, PatternMetadata, read_metadata

__all__ = ["annotate", "conv_weights", "fold_batchnorm", "read_metadata", "strip", "verify"]


def _copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> onnx.ModelProto:
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
    return target


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold every inference BatchNormalization that directly follows a Conv into the Conv.

    W' = W * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output
    channel, computed in float64. Zero weights stay exactly zero, so the deployed conv carries the
    pruning. The folded weight keeps its initializer name; the new bias is named after it.
    """
    graph = gs.import_onnx(model)
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producers = bn.inputs[0].inputs
        if len(producers) != 1 or producers[0].op != "Conv" or len(bn.inputs[0].outputs) != 1:
            continue
        conv = producers[0]
        params = [conv.inputs[1], *bn.inputs[1:5]] + ([conv.inputs[2]] if len(conv.inputs) > 2 else [])
        if len(bn.outputs) != 1 or not all(isinstance(t, gs.Constant) for t in params):
            continue
        weight = conv.inputs[1]
        gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
        scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        bias = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros_like(mean)
        folded = (weight.values.astype(np.float64) * scale[:, None, None, None]).astype(weight.values.dtype)
        stem = weight.name[: -len("weight")] if weight.name.endswith("weight") else f"{weight.name}."
        conv.inputs[1] = gs.Constant(weight.name, folded)
        new_bias = gs.Constant(f"{stem}bias", ((bias - mean) * scale + beta).astype(folded.dtype))
        if len(conv.inputs) > 2:
            conv.inputs[2] = new_bias
        else:
            conv.inputs.append(new_bias)
        conv.outputs = bn.outputs
        bn.outputs = []
    graph.cleanup().toposort()
    return _copy_metadata(model, gs.export_onnx(graph))


def annotate(model: onnx.ModelProto, metadata: PatternMetadata) -> onnx.ModelProto:
    """Store ``metadata`` in the model's ``metadata_props`` (replacing earlier pattern metadata)."""
    strip(model)
    model.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())
    return model


def strip(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the pattern metadata: a plain dense-shaped model for users who want none of it."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    return model


def conv_weights(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, np.ndarray]]:
    """Constant Conv weights by initializer name, each with the Conv node that uses it."""
    initializers = {t.name: t for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            found[node.input[1]] = (node, numpy_helper.to_array(initializers[node.input[1]]))
    return found


def verify(model: onnx.ModelProto) -> PatternMetadata | None:
    """Check that every weight conforms exactly to the model's pattern metadata.

    Raises ``MetadataError`` naming the first layer and kernel that violates it: a listed
    initializer that is missing or not a 3x3 Conv weight, a shape that differs, or a non-zero
    weight in a removed kernel or outside its kernel's pattern. Returns the metadata (None for a
    model without any).
    """
    metadata = read_metadata(model)
    if metadata is None:
        return None
    convs = conv_weights(model)
    for entry in metadata.layers:
        where = f"layer {entry.module!r} (initializer {entry.initializer!r})"
        if entry.initializer not in convs:
            raise MetadataError(f"{where}: no Conv in the graph uses this initializer as its weight")
        node, weight = convs[entry.initializer]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if list(weight.shape) != entry.shape or group != 1:
            raise MetadataError(f"{where}: the Conv weight is {list(weight.shape)} with group "
                                f"{group}; the metadata says {entry.shape} with group 1")
        contract.check_weight(entry, weight, metadata.library, where)
    return metadata
