"""Sparsity report: per-layer density, kernels kept, pattern use; whole-model compression.

Counts come from the weights themselves (exact zeros), so the report tells what a deployed
model really carries, whatever the masks intended.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .. import contract
from ..contract import REMOVED, format_pattern
from .masks import LayerMask


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


def layer_report(name: str, weight: torch.Tensor, mask: contract.LayerMask, library) -> LayerReport:
    """Figures of one pruned conv: weight (C_out, C_in, 3, 3) as stored, mask as stated
    (the contract's numpy mask; library bool (K, 9), numpy or torch)."""
    ids = np.asarray(mask.kernel_pattern_ids())
    counts = np.bincount(ids[ids != REMOVED], minlength=len(library))
    histogram = {format_pattern(library[i]): int(c) for i, c in enumerate(counts)}
    return LayerReport(name, list(weight.shape), mask.block_size, weight.numel(),
                       int(weight.ne(0).sum()), ids.size,
                       int(weight.flatten(2).ne(0).any(-1).sum()), histogram)


def counted_by_paper(weight: torch.Tensor) -> bool:
    """Whether the paper's conv compression counts this conv weight: every conv but 1x1 ones."""
    return tuple(weight.shape[2:]) != (1, 1)


def build_report(layers: list[LayerReport], convs: list[torch.Tensor], parameters: list[torch.Tensor],
                 library) -> SparsityReport:
    """Whole-model figures from pruned-layer reports, every conv weight and every parameter."""
    def count(tensors):
        return sum(t.numel() for t in tensors), sum(int(t.ne(0).sum()) for t in tensors)

    compression = {
        "pruned_layers": _ratio(sum(l.weights for l in layers), sum(l.nonzeros for l in layers)),
        "paper_convs": _ratio(*count([w for w in convs if counted_by_paper(w)])),
        "all_convs": _ratio(*count(convs)),
        "all_weights": _ratio(*count(parameters)),
    }
    library_text = [format_pattern(p) for p in library] if library is not None else []
    return SparsityReport(layers, library_text, compression)


def sparsity_report(model: nn.Module, masks: dict[str, LayerMask],
                    library: torch.Tensor | None) -> SparsityReport:
    """Measure ``model``; ``masks`` (may be empty before selection) name the pruned layers."""
    modules = dict(model.named_modules())
    layers = [layer_report(name, modules[name].weight.detach(), mask.to_contract(), library)
              for name, mask in masks.items()]
    convs = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Conv2d)]
    return build_report(layers, convs, [p.detach() for p in model.parameters()], library)
