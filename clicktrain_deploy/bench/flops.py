"""Multiply-adds of a model's convs and Gemms, dense and on non-zero weights: the FLOP-reduction
limit that a sparse kernel's speed-up is measured against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from ..contract import PatternMetadata


def load_model(path) -> onnx.ModelProto:
    """An ONNX file, weights included (no checks: the benchmark reads what it compiled)."""
    return onnx.load(str(path))


@dataclass(frozen=True)
class LayerWork:
    """One Conv or Gemm at batch 1: its name as the compile manifest gives it, multiply-adds."""

    layer: str
    node: onnx.NodeProto
    input_shape: tuple[int, ...]
    dense_macs: int
    kept_macs: int

    @property
    def limit(self) -> float:
        return self.dense_macs / max(self.kept_macs, 1)


def layer_work(model: onnx.ModelProto, metadata: PatternMetadata | None) -> list[LayerWork]:
    """Every Conv and Gemm with a constant weight, in graph order, shapes inferred at batch 1."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    modules = {entry.initializer: entry.module for entry in (metadata.layers if metadata else [])}
    work = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        pixels = int(np.prod(shapes[node.output[0]][2:])) if node.op_type == "Conv" else 1
        layer = modules.get(node.input[1], node.input[1].removesuffix(".weight")) \
            if node.op_type == "Conv" else node.name
        work.append(LayerWork(layer, node, shapes[node.input[0]], weight.size * pixels,
                              int(np.count_nonzero(weight)) * pixels))
    return work


def flop_reduction_limit(work: list[LayerWork]) -> float:
    """Dense multiply-adds of the whole model / those on non-zero weights."""
    return sum(w.dense_macs for w in work) / max(sum(w.kept_macs for w in work), 1)
