"""Checkpoint -> ONNX: BN folded into the convs, pattern metadata, verified, gated in onnxruntime.

The exported model keeps dense shapes, so any ONNX runtime runs it; its pruned convs carry exact
zeros and the metadata (schema in ``clicktrain_deploy.contract``) states the pattern structure.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from ..config import parse_recipe
from ..contract import MODEL_INFO_KEY, LayerEntry, MetadataError, PatternMetadata
from ..data import BatchIterator, load_data
from ..errors import ExportError
from ..fileio import atomic_write
from ..passes.onnx_passes import annotate, conv_weights, fold_batchnorm, verify
from ..pruning.report import SparsityReport, build_report, layer_report
from ..train import load_checkpoint, restore_model
from .check import Agreement, compare_with_torch

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "ExportError", "ExportResult", "export_onnx",
           "inspect_onnx", "reference_batches"]

DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class ExportResult:
    path: Path
    metadata: PatternMetadata | None
    agreement: Agreement


def reference_batches(saved: dict, images: int, batch_size: int = 256) -> BatchIterator:
    """The first ``images`` real test images of the checkpoint's dataset, normalised as in training."""
    recipe = parse_recipe(saved["recipe"], saved["path"])
    d = recipe.data
    data = load_data(d.name, d.root, None, recipe.seed, **d.loader_options())
    split = data.test
    split.images, split.labels = split.images[:images], split.labels[:images]
    info = saved["data"]
    return BatchIterator(split, batch_size, info["mean"], info["std"], train=False)


def _to_onnx(model: torch.nn.Module, input_shape: list[int], opset: int) -> onnx.ModelProto:
    import onnx_ir
    import onnxscript.optimizer

    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, optimize=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},))
    ir_model = onnx_ir.from_proto(program.model_proto)
    onnxscript.optimizer.fold_constants(ir_model)  # constant sub-graphs only; BN stays for our pass
    onnxscript.optimizer.remove_unused_nodes(ir_model)
    return onnx_ir.to_proto(ir_model)


def export_onnx(checkpoint: str | Path, output: str | Path, *, opset: int = DEFAULT_OPSET,
                check_images: int = 256, atol: float = 1e-4, rtol: float = 1e-4,
                with_metadata: bool = True) -> ExportResult:
    """Export a trained checkpoint (file or run folder) to ``output``.

    Steps: PyTorch -> ONNX (opset ``opset``, dynamic batch, input ``input``, output ``logits``);
    BatchNorm folded into the convs; pattern metadata annotated and verified against the weights;
    onnxruntime compared with PyTorch on ``check_images`` real test images. Beyond
    atol + rtol * max|logit| it raises ``ExportError`` and writes nothing; otherwise the file is
    written atomically.
    """
    saved = load_checkpoint(checkpoint)
    model, pruner = restore_model(saved)
    model.eval()
    proto = fold_batchnorm(_to_onnx(model, saved["data"]["input_shape"], opset))
    metadata = None
    if with_metadata and pruner.masks:
        metadata = PatternMetadata(pruner.library.cpu().numpy(), [
            LayerEntry(f"{name}.weight", name, mask.to_contract()) for name, mask in pruner.masks.items()])
        annotate(proto, metadata)
    spec = saved["recipe"]["model"]
    info = {**saved["data"], "model": spec.get("name") or spec.get("factory") or Path(str(spec.get("file"))).name,
            "epoch": saved["epoch"]}
    proto.metadata_props.add(key=MODEL_INFO_KEY, value=json.dumps(info))
    proto.producer_name = "clicktrain-deploy"
    try:
        verify(proto)
    except MetadataError as exc:
        raise ExportError(f"export of {saved['path']} is inconsistent: {exc}") from None
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    agreement = compare_with_torch(data, model, reference_batches(saved, check_images).epoch(0))
    if not agreement.within(atol, rtol):
        raise ExportError(f"{output}: onnxruntime disagrees with PyTorch: max |diff| "
                          f"{agreement.max_abs_diff:.3g} > {atol} + {rtol} * {agreement.max_abs_logit:.3g}; "
                          "nothing written")
    atomic_write(output, lambda f: f.write(data))
    return ExportResult(Path(output), metadata, agreement)


def inspect_onnx(model: onnx.ModelProto) -> tuple[SparsityReport, PatternMetadata | None]:
    """Sparsity of an ONNX model from its weights and (verified) pattern metadata.

    A model without metadata is reported as dense: no pruned layers, compression from zeros only.
    """
    metadata = verify(model)
    convs = {name: torch.from_numpy(weight.copy()) for name, (_, weight) in conv_weights(model).items()}
    layers = []
    if metadata is not None:
        layers = [layer_report(e.module, convs[e.initializer], e.mask, metadata.library)
                  for e in metadata.layers]
    parameters = [torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
                  if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)]
    return build_report(layers, list(convs.values()), parameters,
                        metadata.library if metadata else None), metadata
