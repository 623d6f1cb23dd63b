"""Benchmark models without training: random weights, ClickTrain-style block-shared pattern masks.

Speed does not depend on the weights' values, only on the masks' structure, so a real-size model
(ResNet-18 at 224x224) is benchmarked with random weights: every 3x3 conv with groups=1 gets
B-block-shared pattern ids (one library pattern of 4 taps per block of B output channels and
input channel) and loses a random share of its (block, input channel) groups so that its
multiply-adds shrink by ``compression`` (8x: 4/9 of the taps kept by the patterns, 28% of each
block's input channels kept, at least one); BatchNorm gets random statistics. The torch model is exported as our export does
(dynamo, BN folded into the convs) and carries our pattern metadata, which it satisfies exactly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


@dataclass
class SyntheticModel:
    onnx: Path
    state_dict: Path  # the masked torch weights, for torch's side of the benchmark
    pruned_layers: int
    compression: float  # dense / kept multiply-adds of the pruned convs


def pattern_masks(net, block_size: int = 16, compression: float = 8.0, library=None, seed: int = 0) -> dict:
    """{module name: contract.LayerMask} for every 3x3 groups=1 conv of ``net``."""
    import torch

    from ..contract import LayerMask, TAPS

    library = _library(library)
    keep = min(1.0, TAPS / (library.sum(1).mean() * compression))
    rng = np.random.default_rng(seed)
    masks = {}
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and module.groups == 1:
            blocks, cin = math.ceil(module.out_channels / block_size), module.in_channels
            ids = rng.integers(0, len(library), (blocks, cin))
            remove = min(cin - 1, int(round((1 - keep) * cin)))  # every block keeps an input channel
            for row in ids:
                row[rng.permutation(cin)[:remove]] = -1
            masks[name] = LayerMask(module.out_channels, block_size, ids)
    return masks


def _library(library):
    if library is None:
        from ..pruning.patterns import PATTERN_LIBRARIES

        library = PATTERN_LIBRARIES.get("clicktrain4")()
    return np.asarray(library, dtype=bool)


def pattern_pruned_onnx(net, input_shape: tuple[int, ...], output: str | Path, *, block_size: int = 16,
                        compression: float = 8.0, library=None, seed: int = 0, opset: int = 18) -> SyntheticModel:
    """Randomise ``net`` (weights, BN statistics), mask its 3x3 groups=1 convs (:func:`pattern_masks`),
    export it to ``output`` with our pattern metadata (verified), and save the masked state dict
    beside it (``output`` with suffix .pt). ``input_shape``: (C, H, W)."""
    import torch

    from ..contract import LayerEntry, PatternMetadata
    from ..passes.onnx_passes import annotate, fold_batchnorm, verify

    torch.manual_seed(seed)
    library = _library(library)
    net = net.eval()
    masks = pattern_masks(net, block_size, compression, library, seed)
    modules = dict(net.named_modules())
    with torch.no_grad():
        for module in modules.values():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for name, mask in masks.items():
            modules[name].weight.mul_(torch.from_numpy(mask.dense(library)))
    proto = fold_batchnorm(_export(net, input_shape, opset))
    weights = {t.name for t in proto.graph.initializer}
    entries = []
    for name, mask in masks.items():
        initializer = f"{name}.weight"
        if initializer not in weights:
            raise ValueError(f"{name}: the exported graph has no initializer {initializer!r}")
        entries.append(LayerEntry(initializer, name, mask))
    annotate(proto, PatternMetadata(library, entries))
    verify(proto)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(output))
    state = output.with_suffix(".pt")
    torch.save(net.state_dict(), state)
    dense = kept = 0
    for name, mask in masks.items():
        taps = mask.dense(library)
        dense, kept = dense + taps.size, kept + int(taps.sum())
    return SyntheticModel(output, state, len(masks), dense / max(kept, 1))


def _export(net, input_shape: tuple[int, ...], opset: int) -> onnx.ModelProto:
    """torch -> ONNX as ``export.onnx_export`` does it: dynamo, dynamic batch, constants folded."""
    import onnx_ir
    import onnxscript.optimizer
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (torch.zeros(1, *input_shape),), dynamo=True, optimize=False, verbose=False,
            input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},))
    ir_model = onnx_ir.from_proto(program.model_proto)
    onnxscript.optimizer.fold_constants(ir_model)
    onnxscript.optimizer.remove_unused_nodes(ir_model)
    return onnx_ir.to_proto(ir_model)
