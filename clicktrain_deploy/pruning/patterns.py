"""Pattern libraries: sets of 3x3 masks with 4 non-zeros that kept kernels must match.

A library is a bool tensor (K, 9), taps numbered row-major (tap 4 is the centre); the string form
and the checks are ``clicktrain_deploy.contract``'s, shared with export and compile. Fixed libraries
are the paper's 4/8/12 sets (ClickTrain's ``gen_pattern_dic``); ``generate_library`` builds one
from the model's own importance at selection time, which the released code lacks.
"""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .. import contract
from ..contract import CENTRE_TAP, PATTERN_NONZEROS, TAPS, format_pattern
from ..registry import Registry

__all__ = ["CENTRE_TAP", "PATTERN_LIBRARIES", "PATTERN_NONZEROS", "TAPS", "candidate_patterns",
           "clicktrain4", "clicktrain8", "clicktrain12", "format_pattern", "generate_library",
           "parse_pattern", "validate_library"]

PATTERN_LIBRARIES: Registry = Registry("pattern library")

# ClickTrain's 12 hand-written patterns, in the order of its code (P1-P4 are the corner squares).
_CLICKTRAIN_PATTERNS = [
    "...|.XX|.XX", "...|XX.|XX.", ".XX|.XX|...", "XX.|XX.|...",
    "...|..X|XXX", "...|XXX|.X.", ".X.|.XX|.X.", ".X.|XX.|.X.",
    "XXX|.X.|...", "...|X..|XXX", "XXX|X..|...", "...|X.X|.XX",
]


def parse_pattern(text: str) -> Tensor:
    """'...|.XX|.XX' (rows top to bottom, X = kept) -> bool (9,); ``contract.parse_pattern`` as torch."""
    return torch.from_numpy(contract.parse_pattern(text))


def validate_library(library: Tensor) -> Tensor:
    """Check a library is bool (K, 9), unique rows, each with exactly 4 taps
    (``contract.validate_library``); return the tensor itself."""
    contract.validate_library(library.detach().cpu() if isinstance(library, Tensor) else library)
    return library


def _fixed(count: int) -> Tensor:
    return torch.stack([parse_pattern(p) for p in _CLICKTRAIN_PATTERNS[:count]])


@PATTERN_LIBRARIES.register("clicktrain4")
def clicktrain4() -> Tensor:
    """The four 2x2 corner squares (every one keeps the centre); most paper configs."""
    return _fixed(4)


@PATTERN_LIBRARIES.register("clicktrain8")
def clicktrain8() -> Tensor:
    return _fixed(8)


@PATTERN_LIBRARIES.register("clicktrain12")
def clicktrain12() -> Tensor:
    """All twelve; the paper's VGG-16 / CIFAR-10 config."""
    return _fixed(12)


def candidate_patterns(require_centre: bool) -> Tensor:
    """Every 4-of-9 shape (126), or the 56 that keep the centre tap: bool (C, 9)."""
    rows = []
    for taps in itertools.combinations(range(TAPS), PATTERN_NONZEROS):
        if require_centre and CENTRE_TAP not in taps:
            continue
        row = torch.zeros(TAPS, dtype=torch.bool)
        row[list(taps)] = True
        rows.append(row)
    return torch.stack(rows)


def generate_library(group_importance: list[Tensor], size: int, require_centre: bool = True) -> Tensor:
    """Choose ``size`` patterns that keep the most importance over the model's own kernels.

    group_importance: per layer a float tensor (G, 9), the importance of each tap of each kernel
    group. Each group's importance is normalised to sum 1, so every group votes equally whatever
    its layer's scale. The objective is the sum over groups of the share kept by the group's best
    library pattern, which is what the per-group choice then maximises. It is built greedily
    (facility location) and then improved by swapping one pattern at a time until no swap helps.
    Returns bool (size, 9), the most used pattern first.
    """
    candidates = candidate_patterns(require_centre)
    if not 1 <= size <= len(candidates):
        raise ValueError(f"library size must be 1..{len(candidates)}, got {size}")
    scores = []
    for imp in group_importance:
        imp = imp.double()
        share = imp / imp.sum(1, keepdim=True).clamp_min(1e-30)
        scores.append(share @ candidates.double().T)  # (G, C) share kept by each candidate
    score = torch.cat(scores)
    chosen: list[int] = []
    best = torch.zeros(len(score), dtype=torch.float64)
    for _ in range(size):
        gain = torch.maximum(score, best[:, None]).sum(0)
        gain[chosen] = -1.0
        chosen.append(int(gain.argmax()))
        best = torch.maximum(best, score[:, chosen[-1]])
    improved = True
    while improved:
        improved = False
        for slot in range(size):
            others = [c for i, c in enumerate(chosen) if i != slot]
            rest = score[:, others].max(1).values if others else torch.zeros(len(score), dtype=torch.float64)
            totals = torch.maximum(score, rest[:, None]).sum(0)
            totals[others] = -1.0
            pick = int(totals.argmax())
            if totals[pick] > totals[chosen[slot]] * (1 + 1e-12):
                chosen[slot] = pick
                improved = True
    usage = torch.bincount(score[:, chosen].argmax(1), minlength=size)
    order = torch.argsort(usage, descending=True, stable=True)
    return candidates[[chosen[int(i)] for i in order]]
