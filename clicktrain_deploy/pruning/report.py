"""Sparsity report: per-layer density, kernels kept, pattern use; whole-model compression.

Counts come from the weights themselves (exact zeros), so the report tells what a deployed
model really carries, whatever the masks intended.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .masks import REMOVED, LayerMask
from .patterns import format_pattern


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    block_size: int
    weights: int
    nonzeros: int
    kernels: int
    kernels_kept: int
    pattern_histogram: dict[str, int] = field(default_factory=dict)

    @property
    def density(self) -> float:
        return self.nonzeros / self.weights


@dataclass
class SparsityReport:
    """Per pruned layer and whole-model figures.

    Compression is weights / non-zeros over: the pruned layers; the convs the paper counts (every
    conv except 1x1 ones, i.e. without shortcut projections, stem included dense); all convs; and
    every parameter of the model (BN and classifier included).
    """

    layers: list[LayerReport]
    library: list[str]
    compression: dict[str, float]

    def to_dict(self) -> dict:
        out = asdict(self)
        for entry, layer in zip(out["layers"], self.layers):
            entry["density"] = layer.density
        return out


def _ratio(total: int, nonzeros: int) -> float:
    return total / nonzeros if nonzeros else (1.0 if total == 0 else float("inf"))


def sparsity_report(model: nn.Module, masks: dict[str, LayerMask],
                    library: torch.Tensor | None) -> SparsityReport:
    """Measure ``model``; ``masks`` (may be empty before selection) name the pruned layers."""
    modules = dict(model.named_modules())
    layers = []
    for name, mask in masks.items():
        weight = modules[name].weight.detach()
        kernel_nonzero = weight.flatten(2).ne(0).any(-1)
        ids = mask.kernel_pattern_ids()
        counts = torch.bincount(ids[ids != REMOVED], minlength=len(library))
        histogram = {format_pattern(library[i]): int(c) for i, c in enumerate(counts)}
        layers.append(LayerReport(name, list(weight.shape), mask.block_size, weight.numel(),
                                  int(weight.ne(0).sum()), ids.numel(),
                                  int(kernel_nonzero.sum()), histogram))
    totals = {"pruned_layers": [0, 0], "paper_convs": [0, 0], "all_convs": [0, 0],
              "all_weights": [0, 0]}
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            scopes = ["all_convs"] + (["paper_convs"] if module.kernel_size != (1, 1) else [])
            for scope in scopes:
                totals[scope][0] += module.weight.numel()
                totals[scope][1] += int(module.weight.ne(0).sum())
    for p in model.parameters():
        totals["all_weights"][0] += p.numel()
        totals["all_weights"][1] += int(p.ne(0).sum())
    totals["pruned_layers"] = [sum(l.weights for l in layers), sum(l.nonzeros for l in layers)]
    compression = {scope: _ratio(*pair) for scope, pair in totals.items()}
    library_text = [format_pattern(p) for p in library] if library is not None else []
    return SparsityReport(layers, library_text, compression)
