"""Per-layer pattern/connectivity masks as training holds them (torch), and how they are chosen.

The layout and its semantics are the compiler contract's, ``clicktrain_deploy.contract.LayerMask``
(numpy): ``pattern_ids`` int64 (ceil(C_out / B), C_in), entry (b, c) the library index of the
pattern that the B kernels of output block b use on input channel c, or ``REMOVED``. Training
keeps ``pattern_ids`` as a torch tensor (checkpoints, cross-rank checks, device masks); this
``LayerMask`` converts with ``to_contract()`` and answers every question through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .. import contract
from ..contract import REMOVED, TAPS


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, Tensor) else np.asarray(array)


@dataclass
class LayerMask:
    """Pattern and connectivity of one pruned conv, ``pattern_ids`` a torch int64 tensor."""

    out_channels: int
    block_size: int
    pattern_ids: Tensor

    @property
    def in_channels(self) -> int:
        return self.pattern_ids.shape[1]

    def to_contract(self) -> contract.LayerMask:
        """The same mask as the numpy type export writes and compile reads."""
        return contract.LayerMask(self.out_channels, self.block_size, _numpy(self.pattern_ids))

    def kernel_pattern_ids(self) -> Tensor:
        """Pattern id of every kernel: int64 (C_out, C_in), ``REMOVED`` for removed kernels."""
        return torch.from_numpy(self.to_contract().kernel_pattern_ids())

    def dense(self, library: Tensor) -> Tensor:
        """The 0/1 weight mask, float32 (C_out, C_in, 3, 3)."""
        return torch.from_numpy(self.to_contract().dense(_numpy(library)))

    def block_sizes(self) -> Tensor:
        """Number of output channels in each block: int64 (ceil(C_out / B),)."""
        return torch.from_numpy(self.to_contract().block_sizes())

    def kept_fraction(self) -> float:
        """Share of kernels kept (not removed)."""
        return self.to_contract().kept_fraction()


def block_sum(tensor: Tensor, block_size: int) -> Tensor:
    """Sum dim 0 (C_out) over blocks of ``block_size``: (C_out, ...) -> (ceil(C_out/B), ...)."""
    blocks = math.ceil(tensor.shape[0] / block_size)
    padding = blocks * block_size - tensor.shape[0]
    if padding:
        tensor = torch.cat([tensor, tensor.new_zeros((padding, *tensor.shape[1:]))])
    return tensor.view(blocks, block_size, *tensor.shape[1:]).sum(1)


def removal_count(groups: int, ratio: float) -> int:
    """Groups to remove for a ratio: ceil(ratio * groups), as the paper's code counts."""
    return min(groups, math.ceil(round(ratio * groups, 9)))


def select_layer_mask(importance: Tensor, library: Tensor, block_size: int, ratio: float) -> LayerMask:
    """Choose patterns and removed kernel groups of one layer from its importance.

    importance: float (C_out, C_in, 3, 3), per-weight sum of (w * dL/dw)^2.
    library: bool (K, 9). Each (block, input channel) group takes the pattern that keeps most of
    the block's summed importance; the ``ratio`` share of groups with the least total importance,
    ranked layer-wide, is removed (ties broken by position, so the choice is deterministic).
    """
    group = group_tap_importance(importance, block_size)
    pattern_ids = (group @ library.double().T).argmax(-1)  # (G_out, C_in)
    pattern_ids[~kept_groups(group.sum(-1), ratio)] = REMOVED
    return LayerMask(importance.shape[0], block_size, pattern_ids)


def group_tap_importance(importance: Tensor, block_size: int) -> Tensor:
    """Importance per (block, input channel) group and tap: float (C_out, C_in, 3, 3) ->
    float64 (G_out, C_in, 9); ``.sum(-1)`` is what connectivity ranks."""
    out_channels, in_channels = importance.shape[:2]
    return block_sum(importance.reshape(out_channels, in_channels, TAPS).double(), block_size)


def kept_groups(group_importance: Tensor, ratio: float) -> Tensor:
    """Connectivity: bool (G_out, C_in), False for the ``ratio`` share of groups with the least
    importance, ranked layer-wide (ties broken by position, so the choice is deterministic).

    group_importance: float (G_out, C_in), one total per (output block, input channel) group.
    """
    order = removal_order(group_importance)
    keep = torch.ones(group_importance.numel(), dtype=torch.bool)
    keep[order[: removal_count(len(order), ratio)]] = False
    return keep.view_as(group_importance)


def removal_order(group_importance: Tensor) -> Tensor:
    """Flat group indices in the order connectivity removes them: least importance first, ties
    by position. ``kept_groups`` removes a prefix of it; global allocation ranks along it."""
    return torch.argsort(group_importance.flatten(), stable=True)


def group_lasso(weight: Tensor, removal: Tensor, block_size: int) -> Tensor:
    """Group lasso on the weights a mask will remove, one group per (block, input channel).

    weight: (C_out, C_in, 3, 3); removal: 0/1 same shape, 1 where the mask removes. Each group's
    L2 norm sqrt(sum w^2 + 1e-8) is scaled by sqrt(block length) so the pull per weight does not
    depend on B; with B = 1 this is ClickTrain's per-kernel penalty.
    """
    squares = block_sum((weight * removal).pow(2).sum((2, 3)), block_size)  # (G_out, C_in)
    sizes = torch.full((squares.shape[0], 1), float(block_size), device=weight.device)
    sizes[-1] = weight.shape[0] - block_size * (squares.shape[0] - 1)
    return (squares.add(1e-8).sqrt() * sizes.sqrt()).sum()
