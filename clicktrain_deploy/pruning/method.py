"""The contract between the training loop and a pruning method, and the registry of methods.

The trainer knows no method by name: it builds one with ``create_method`` from ``pruning.method``
and calls the hooks of ``PruningMethod`` at fixed points of every epoch and step. Methods:
``clicktrain`` (pattern pruning during training), ``prunetrain`` (channel group lasso with
physical shrinking), ``admm`` (pattern pruning after training) and ``dense`` (none).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..registry import Registry
from .config import PruningConfig
from .masks import LayerMask
from .report import SparsityReport, sparsity_report


@dataclass
class EpochContext:
    """What a method may use at an epoch boundary.

    batches(limit): the epoch's training batches, (N, C, H, W) float images and (N,) int64 labels,
    at most ``limit`` of them; loss_fn(logits (N, classes), labels (N,)) -> scalar;
    steps_per_epoch: optimizer steps in every epoch.
    """

    epoch: int
    epochs: int
    steps_per_epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[int | None], Iterable[tuple[Tensor, Tensor]]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]


class PruningMethod(Protocol):
    """Hooks the trainer calls, in this order: ``begin_epoch``; per step ``penalty_term`` (added
    to the loss before backward) and ``after_step`` (after ``optimizer.step()``); ``end_epoch``.

    ``load_state_dict`` runs before the model's weights are loaded, so a method that changes the
    model's shapes (PruneTrain) rebuilds them first. ``masks``/``library`` describe pattern-pruned
    convs for export (empty/None when the method leaves no patterns). A method may also have
    ``epoch_metrics() -> dict``, merged into every epoch's metrics line (ClickTrain: what its
    accuracy levers did).
    """

    masks: dict[str, LayerMask]
    library: Tensor | None

    def phase(self, epoch: int) -> str: ...

    def begin_epoch(self, context: EpochContext) -> None: ...

    def penalty_term(self, loss: Tensor, phase: str) -> Tensor | None: ...

    def after_step(self, optimizer: torch.optim.Optimizer) -> None: ...

    def end_epoch(self, context: EpochContext) -> None: ...

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict | None) -> None: ...

    def report(self, model: nn.Module) -> SparsityReport: ...


MethodFactory = Callable[[nn.Module, PruningConfig], PruningMethod]
PRUNING_METHODS: Registry[MethodFactory] = Registry("pruning method")


def create_method(model: nn.Module, config: PruningConfig) -> PruningMethod:
    """The method ``config.method`` names, bound to ``model``."""
    return PRUNING_METHODS.get(config.method)(model, config)


@PRUNING_METHODS.register("dense")
class DenseTraining:
    """No pruning: every hook does nothing; the baseline every method is compared with."""

    masks: dict[str, LayerMask] = {}
    library: Tensor | None = None

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        self.config = config

    def phase(self, epoch: int) -> str:
        return "dense"

    def begin_epoch(self, context: EpochContext) -> None:
        pass

    def penalty_term(self, loss: Tensor, phase: str) -> Tensor | None:
        return None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def end_epoch(self, context: EpochContext) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def report(self, model: nn.Module) -> SparsityReport:
        return sparsity_report(model, {}, None)
