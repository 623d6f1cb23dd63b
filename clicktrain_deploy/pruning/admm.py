"""Pruning after training, PatDNN style: dense training, ADMM, hard pruning, masked retraining.

Phases by epoch: dense until ``select_epoch``; ADMM until ``hard_prune_epoch``; then the masks are
fixed and enforced (retraining). ADMM splits each pruned conv's weight W into two constraint sets,
each with an auxiliary and a dual variable: Z in the pattern set (every (block, input channel)
kernel group inside one library pattern) and Y in the connectivity set (at most the kept share of
groups non-zero). The loss gets rho/2 (|W - Z + U|^2 + |W - Y + V|^2); every ``update_interval``
steps Z = P_pattern(W + U), U += W - Z, Y = P_conn(W + V), V += W - Y. Libraries, masks and their
enforcement are ClickTrain's (``select_layer_mask``, ``ClickTrainPruner``): only the way to the
masks differs, by magnitude after training instead of importance during it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .clicktrain import ClickTrainPruner
from .config import PruningConfig
from .masks import LayerMask, block_sum, kept_groups, select_layer_mask
from .method import PRUNING_METHODS, EpochContext
from .report import SparsityReport


def project_patterns(weight: Tensor, library: Tensor, block_size: int) -> Tensor:
    """Nearest point of the pattern set: each (block of ``block_size`` output channels, input
    channel) group keeps the library pattern that holds most of its squared magnitude.

    weight: (C_out, C_in, 3, 3); library: bool (K, 9). Returns weight's shape, zeros off pattern.
    """
    mask = select_layer_mask(weight.pow(2), library, block_size, 0.0)
    return weight * mask.dense(library).to(weight.dtype)


def project_connectivity(weight: Tensor, block_size: int, ratio: float) -> Tensor:
    """Nearest point of the connectivity set: the ``ratio`` share of (block, input channel)
    groups with the least L2 norm, ranked layer-wide, set to zero. weight: (C_out, C_in, 3, 3)."""
    keep = kept_groups(block_sum(weight.pow(2).sum((2, 3)), block_size), ratio)  # (G_out, C_in)
    keep = keep.repeat_interleave(block_size, 0)[: weight.shape[0]]
    return weight * keep[..., None, None].to(weight.dtype)


def magnitude_masks(pruner: ClickTrainPruner, library: Tensor) -> dict[str, LayerMask]:
    """Hard masks by magnitude: per group the best library pattern, the weakest groups removed."""
    return {layer.name: select_layer_mask(layer.module.weight.detach().pow(2), library,
                                          layer.block_size, layer.ratio)
            for layer in pruner.layers}


@PRUNING_METHODS.register("admm")
class AdmmPruner:
    """The ADMM method; ``variables`` holds Z, U, Y, V (each like the weight) per pruned conv."""

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        self.config = config
        self.pruner = ClickTrainPruner(model, config)
        self.layers = self.pruner.layers
        self.conv_selection = self.pruner.conv_selection
        self.admm_library: Tensor | None = None
        self.variables: dict[str, dict[str, Tensor]] = {}
        self.steps = 0
        self.active = False

    @property
    def masks(self) -> dict[str, LayerMask]:
        return self.pruner.masks

    @property
    def library(self) -> Tensor | None:
        return self.pruner.library

    def phase(self, epoch: int) -> str:
        if epoch >= self.config.hard_prune_epoch:
            return "hard"
        return "admm" if epoch >= self.config.select_epoch else "dense"

    def begin_epoch(self, context: EpochContext) -> None:
        """Start ADMM at the first ADMM epoch; hard-prune at the first hard one."""
        phase = self.phase(context.epoch)
        if phase != "dense" and self.admm_library is None:
            self.start()
        if phase == "hard" and not self.pruner.hard:
            self.harden(context.optimizer)
        self.active = phase == "admm"

    @torch.no_grad()
    def start(self) -> None:
        """Library from the trained weights' magnitudes (or the fixed one); Z, Y projected, U = V = 0."""
        magnitude = {layer.name: layer.module.weight.detach().pow(2) for layer in self.layers}
        self.admm_library = self.pruner.choose_library(magnitude)
        for layer in self.layers:
            weight = layer.module.weight.detach()
            self.variables[layer.name] = {
                "Z": project_patterns(weight, self.admm_library, layer.block_size),
                "Y": project_connectivity(weight, layer.block_size, layer.ratio),
                "U": torch.zeros_like(weight), "V": torch.zeros_like(weight)}

    def penalty_term(self, loss: Tensor, phase: str) -> Tensor | None:
        """rho/2 * sum over pruned convs of |W - Z + U|^2 + |W - Y + V|^2, while in ADMM."""
        if phase != "admm":
            return None
        total = sum((l.module.weight - v["Z"] + v["U"]).pow(2).sum()
                    + (l.module.weight - v["Y"] + v["V"]).pow(2).sum()
                    for l in self.layers for v in [self.variables[l.name]])
        return 0.5 * self.config.admm.rho * total

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.active:
            self.steps += 1
            if self.steps % self.config.admm.update_interval == 0:
                self.update()
        self.pruner.after_step(optimizer)

    @torch.no_grad()
    def update(self) -> None:
        """One ADMM step of the auxiliary and dual variables."""
        assert self.admm_library is not None
        for layer in self.layers:
            weight, v = layer.module.weight.detach(), self.variables[layer.name]
            v["Z"] = project_patterns(weight + v["U"], self.admm_library, layer.block_size)
            v["U"] += weight - v["Z"]
            v["Y"] = project_connectivity(weight + v["V"], layer.block_size, layer.ratio)
            v["V"] += weight - v["Y"]

    def harden(self, optimizer: torch.optim.Optimizer) -> None:
        """Fix the masks by magnitude and enforce them from now on (ClickTrain's machinery)."""
        assert self.admm_library is not None
        self.pruner.assign(self.admm_library, magnitude_masks(self.pruner, self.admm_library))
        self.pruner.harden(optimizer)
        self.variables = {}

    def end_epoch(self, context: EpochContext) -> None:
        pass

    def state_dict(self) -> dict:
        return {"library": self.admm_library, "variables": self.variables, "steps": self.steps,
                "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.admm_library = state["library"]
        self.variables = state["variables"]
        self.steps = state["steps"]
        self.pruner.load_state_dict(state["pruner"])

    def report(self, model: nn.Module) -> SparsityReport:
        return self.pruner.report(model)
