"""ClickTrain: pattern + connectivity pruning during training (Zhang et al., ICS 2021).

``ClickTrainPruner`` is the frontend half of the contract: it decides, per selected 3x3 conv,
which pattern each kernel group keeps and which groups go (``LayerMask``), and keeps the weights
on those masks. The trainer calls it at phase boundaries and around each optimizer step.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import PruningError
from .config import PruningConfig
from .masks import (REMOVED, LayerMask, block_sum, group_lasso, group_tap_importance, removal_count,
                    removal_order, select_layer_mask)
from .method import PRUNING_METHODS, EpochContext
from .patterns import PATTERN_LIBRARIES, PATTERN_NONZEROS, generate_library, validate_library
from .report import SparsityReport, counted_by_paper, sparsity_report

AUTO_BLOCK_SIZES = (16, 8, 4, 2, 1)


@dataclass
class PrunedLayer:
    """A conv chosen for pruning, with its resolved block size and removal ratio."""

    name: str
    module: nn.Conv2d
    block_size: int
    ratio: float


def _first_match(name: str, table: dict[str, float] | dict[str, int]):
    return next((value for glob, value in table.items() if fnmatch.fnmatch(name, glob)), None)


def _auto_block_size(out_channels: int) -> int:
    return next(b for b in AUTO_BLOCK_SIZES if out_channels % b == 0)


@dataclass(frozen=True)
class ConvChoice:
    """One conv of the model and whether pattern pruning took it: ``reason`` says why (taken:
    its block size and ratio; left: depthwise, grouped, 1x1 or other kernel, dilated, not a
    Conv2d, not matched by ``include``, excluded by an ``exclude`` glob, or the skipped stem)."""

    name: str
    shape: tuple[int, ...]  # the weight's: (C_out, C_in / groups, kh, kw)
    taken: bool
    reason: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "taken": self.taken, "reason": self.reason}


def structural_reasons(module: nn.Module) -> list[str]:
    """Why ``module`` cannot take 3x3 patterns (empty: it can): only a plain nn.Conv2d with a
    3x3 kernel, groups=1 and dilation 1 does."""
    if not isinstance(module, nn.Conv2d):
        return [f"{type(module).__name__}: only Conv2d takes patterns"]
    reasons = []
    if module.groups > 1:
        if module.groups == module.in_channels:
            reasons.append(f"depthwise (groups = C_in = {module.groups})")
        else:
            reasons.append(f"grouped (groups = {module.groups})")
    if module.kernel_size == (1, 1):
        reasons.append("1x1")
    elif module.kernel_size != (3, 3):
        reasons.append(f"kernel {module.kernel_size[0]}x{module.kernel_size[1]}: only 3x3 takes patterns")
    if module.dilation != (1, 1):
        reasons.append(f"dilated (dilation {module.dilation[0]}x{module.dilation[1]})")
    return reasons


def _is_pattern_conv(module: nn.Module) -> bool:
    return not structural_reasons(module)


def _block_and_ratio(name: str, module: nn.Conv2d, config: PruningConfig) -> tuple[int, float]:
    block = _first_match(name, config.layer_block_sizes) or config.block_size
    block = _auto_block_size(module.out_channels) if block == "auto" else min(block, module.out_channels)
    ratio = _first_match(name, config.layer_ratios)
    return block, config.connectivity_ratio if ratio is None else ratio


def conv_selection(model: nn.Module, config: PruningConfig) -> list[ConvChoice]:
    """Every conv of ``model`` (any ``nn.modules.conv._ConvNd``) in module order, taken or left
    with the reason; what ``resolve_layers`` prunes is exactly the taken ones."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    conv2d = [n for n, m in convs if isinstance(m, nn.Conv2d)]
    first = conv2d[0] if conv2d and config.skip_first_conv else None
    choices = []
    for name, module in convs:
        shape = tuple(module.weight.shape)
        structural = structural_reasons(module)
        excluded = next((g for g in config.exclude if fnmatch.fnmatch(name, g)), None)
        if structural:
            reason = "; ".join(structural)
        elif not any(fnmatch.fnmatch(name, g) for g in config.include):
            reason = f"not matched by pruning.include {config.include}"
        elif excluded is not None:
            reason = f"excluded by pruning.exclude {excluded!r}"
        elif name == first:
            reason = "stem (first conv) skipped: pruning.skip_first_conv"
        else:
            block, ratio = _block_and_ratio(name, module, config)
            share = f"ratio {ratio:g}" if config.allocation == "uniform" else f"ratio allocated ({config.allocation})"
            choices.append(ConvChoice(name, shape, True, f"3x3, block {block}, {share}"))
            continue
        choices.append(ConvChoice(name, shape, False, reason))
    return choices


def resolve_layers(model: nn.Module, config: PruningConfig,
                   selection: list[ConvChoice] | None = None) -> list[PrunedLayer]:
    """The convs that ``config`` selects, in module order, with block size and ratio each.

    Wildcard globs skip convs that cannot take 3x3 patterns (1x1 shortcuts, depthwise, grouped,
    dilated), each with its reason in ``conv_selection``; naming such a conv exactly is an error,
    as is a glob that selects nothing.
    """
    selection = conv_selection(model, config) if selection is None else selection
    modules = dict(model.named_modules())
    for choice in selection:
        if not choice.taken and choice.name in config.include and structural_reasons(modules[choice.name]):
            raise PruningError(f"pruning.include names layer {choice.name!r} ({choice.reason}); "
                               "only 3x3 convs with groups=1 and no dilation take patterns")
    layers = []
    for choice in selection:
        if choice.taken:
            module = modules[choice.name]
            layers.append(PrunedLayer(choice.name, module, *_block_and_ratio(choice.name, module, config)))
    names = [layer.name for layer in layers]
    for field, globs in (("include", config.include), ("layer_ratios", config.layer_ratios),
                         ("layer_block_sizes", config.layer_block_sizes)):
        for glob in globs:
            if not any(fnmatch.fnmatch(n, glob) for n in names):
                raise PruningError(f"pruning.{field}: {glob!r} selects no prunable 3x3 conv; "
                                   f"convs in the model: {_described(selection)}")
    if not layers:
        raise PruningError("pruning selects no layer: the model has no prunable 3x3 conv; "
                           f"convs in the model: {_described(selection)}")
    return layers


def _described(selection: list[ConvChoice]) -> str:
    return ", ".join(f"{c.name} ({c.reason})" for c in selection) or "none"


def estimate_importance(model: nn.Module, layers: list[PrunedLayer],
                        batches: Iterable[tuple[Tensor, Tensor]],
                        loss_fn: Callable[[Tensor, Tensor], Tensor],
                        gradient_only: bool = False) -> dict[str, Tensor]:
    """Per-weight importance sum over batches of (w * dL/dw)^2 (``gradient_only``: of
    (dL/dw)^2, what a zero weight would gain), float (C_out, C_in, 3, 3) each.

    Gradients are taken in training mode (as during training); BatchNorm running statistics are
    restored afterwards, so the estimate leaves the model exactly as it found it. Under
    torch.distributed the sums are averaged over ranks (each rank may score its own shard, or a
    DDP-wrapped ``model`` whose gradients are already averaged), so every rank gets the same
    scores; they are returned on the CPU.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    importance = {layer.name: torch.zeros_like(layer.module.weight) for layer in layers}
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs), labels).backward()
        for layer in layers:
            weight = layer.module.weight
            importance[layer.name] += (weight.grad if gradient_only else weight.detach() * weight.grad).pow(2)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    model.train(was_training)
    distributed.average_(importance.values())
    return {name: score.cpu() for name, score in importance.items()}


def _kept_budget(model: nn.Module, layers: list[PrunedLayer], target: float) -> tuple[int, int, float]:
    """(weights of the convs the paper counts, non-zeros of those not pruned here, non-zeros the
    pruned layers may keep for ``target`` compression)."""
    pruned = {layer.name for layer in layers}
    convs = [(n, m.weight.detach()) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and counted_by_paper(m.weight)]
    total = sum(w.numel() for _, w in convs)
    fixed = sum(int(w.ne(0).sum()) for n, w in convs if n not in pruned)
    return total, fixed, total / target - fixed


def _unreachable(config: PruningConfig, total: int, fixed: int, most: float, least: float) -> PruningError:
    return PruningError(
        f"pruning.target_compression {config.target_compression:g}x is out of reach: with "
        f"min_layer_ratio {config.min_layer_ratio:g} and max_layer_ratio "
        f"{config.max_layer_ratio:g}, allocation {config.allocation!r} gives "
        f"{total / (fixed + most):.2f}x to {total / (fixed + least):.2f}x")


def allocate_ratios(model: nn.Module, layers: list[PrunedLayer], importance: dict[str, Tensor],
                    config: PruningConfig) -> dict[str, float]:
    """Per-layer removal ratios that bring the convs the paper counts (``counted_by_paper``) to
    ``config.target_compression``, from one ranking of kernel groups over all pruned layers.

    A group's score is its importance divided by the mean group importance of its layer. Raw
    importance differs between layers by orders of magnitude (depth, width, BatchNorm scale), so
    a raw ranking would empty the small-scale layers; the relative score removes, in every layer,
    the groups below one common share of their layer's average, so layers whose importance sits
    in few groups give up more. Each layer removes between ``min_layer_ratio`` and
    ``max_layer_ratio`` of its groups (``removal_count``); within those bounds the lowest-scored
    groups go until the kept non-zeros (4 per kept kernel, the other counted convs' own) meet
    the target: the first group count that reaches it. ``importance`` as ``estimate_importance``
    returns it. Raises ``PruningError`` when the bounds cannot reach the target.
    """
    total, fixed, budget = _kept_budget(model, layers, config.target_compression)
    groups, floors, kept_at_floors, scores, costs, owners = [], [], 0.0, [], [], []
    for index, layer in enumerate(layers):
        group = group_tap_importance(importance[layer.name], layer.block_size).sum(-1).flatten()
        lengths = block_sum(torch.ones(layer.module.out_channels, dtype=torch.float64), layer.block_size)
        cost = (PATTERN_NONZEROS * lengths).repeat_interleave(layer.module.in_channels)
        order = removal_order(group)
        score = group[order] / group.mean().clamp_min(torch.finfo(torch.float64).tiny)
        low = removal_count(len(group), config.min_layer_ratio)
        high = max(low, removal_count(len(group), config.max_layer_ratio))
        groups.append(len(group))
        floors.append(low)
        kept_at_floors += float(cost[order[low:]].sum())
        scores.append(score[low:high])
        costs.append(cost[order[low:high]])
        owners.append(torch.full((high - low,), index))
    ranking = torch.argsort(torch.cat(scores), stable=True)
    # kept[r]: non-zeros the pruned layers keep once the r lowest-ranked candidates are removed
    kept = kept_at_floors - torch.cat([torch.zeros(1, dtype=torch.float64),
                                       torch.cat(costs)[ranking].cumsum(0)])
    if not kept[-1] <= budget < kept[0]:
        raise _unreachable(config, total, fixed, float(kept[0]), float(kept[-1]))
    removed = int(torch.nonzero(kept <= budget)[0])
    extra = torch.bincount(torch.cat(owners)[ranking[:removed]], minlength=len(layers))
    return {layer.name: (floors[i] + int(extra[i])) / groups[i] for i, layer in enumerate(layers)}


def erk_ratios(model: nn.Module, layers: list[PrunedLayer], config: PruningConfig) -> dict[str, float]:
    """Per-layer removal ratios from the layers' shapes (Erdos-Renyi, as RigL allocates sparse
    layers): the share of kernels a layer keeps is proportional to (C_in + C_out) / (C_in * C_out),
    so narrow layers, which hold few weights but every channel of their stage, keep more of their
    kernels and wide ones give up more, scaled so the convs the paper counts reach
    ``config.target_compression`` (the smallest compression at or above it), each layer removing
    between ``min_layer_ratio`` and ``max_layer_ratio`` of its kernel groups. No importance: the
    shapes decide the ratios, the importance still decides which groups go. Raises ``PruningError``
    when the bounds cannot reach the target.
    """
    total, fixed, budget = _kept_budget(model, layers, config.target_compression)
    shapes = [(layer.module.out_channels, layer.module.in_channels,
               math.ceil(layer.module.out_channels / layer.block_size) * layer.module.in_channels)
              for layer in layers]

    def ratios(scale: float) -> list[float]:
        density = [scale * (c_in + c_out) / (c_in * c_out) for c_out, c_in, _ in shapes]
        return [min(config.max_layer_ratio, max(config.min_layer_ratio, 1.0 - d)) for d in density]

    def kept(scale: float) -> float:  # non-zeros the pruned layers keep
        return sum(PATTERN_NONZEROS * c_out * c_in * (1 - removal_count(g, r) / g)
                   for (c_out, c_in, g), r in zip(shapes, ratios(scale)))

    # kept(scale) grows with scale: from every layer at max_layer_ratio (scale 0) to every layer
    # at min_layer_ratio (scale high); bisect for the largest scale that keeps within the budget
    low, high = 0.0, max(c_in * c_out / (c_in + c_out) for c_out, c_in, _ in shapes)
    if not kept(low) <= budget < kept(high):
        raise _unreachable(config, total, fixed, kept(high), kept(low))
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle) <= budget else (low, middle)
    return {layer.name: removal_count(g, r) / g for layer, (_, _, g), r in zip(layers, shapes, ratios(low))}


def lasso_coefficient(config: PruningConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The group-lasso coefficient at ``step`` (0-based) of ``epoch``: ``lasso``, or with the
    "ramp" schedule lasso * (k + 1) / K at step k of the K steps of the lasso phase, so the pull
    starts near 0 while the weights to be removed still carry accuracy and reaches ``lasso`` at
    the phase's last step."""
    if config.lasso_schedule == "constant":
        return config.lasso
    phase_steps = (config.hard_prune_epoch - config.select_epoch) * steps_per_epoch
    done = (epoch - config.select_epoch) * steps_per_epoch + step
    return config.lasso * min(1.0, (done + 1) / phase_steps)


@PRUNING_METHODS.register("clicktrain")
class ClickTrainPruner:
    """Selects masks, regularizes toward them, then keeps weights on them.

    Usage by a training loop: ``select`` at the start of ``config.select_epoch`` (and, with
    ``reselect_every``, ``reselect`` every that many lasso epochs); add ``penalty()`` to the loss
    while ``phase(epoch) == "regularize"``; ``harden(optimizer)`` at the start of
    ``config.hard_prune_epoch`` and ``enforce(optimizer)`` after every step from then on. The
    ``PruningMethod`` hooks (``begin_epoch``, ``penalty_term``, ``after_step``) do exactly this
    for the trainer, and ``epoch_metrics`` says what the accuracy levers did.
    """

    def __init__(self, model: nn.Module, config: PruningConfig) -> None:
        self.config = config
        self.conv_selection = conv_selection(model, config)
        self.layers = resolve_layers(model, config, self.conv_selection)
        self.library: Tensor | None = None
        self.masks: dict[str, LayerMask] = {}
        self.hard = False
        self._mask_tensors: dict[str, Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Where the next step is (begin_epoch sets it, after_step counts) for the lasso schedule;
        # this epoch's last coefficient and re-selection, for its metrics line.
        self._epoch, self._step, self._steps_per_epoch = config.select_epoch, 0, 1
        self._coefficient = 0.0
        self._reselected: int | None = None
        self._regrown: int | None = None

    @property
    def selected(self) -> bool:
        return bool(self.masks)

    def phase(self, epoch: int) -> str:
        """'dense', 'regularize' or 'hard' for a (0-based) epoch."""
        if epoch >= self.config.hard_prune_epoch:
            return "hard"
        return "regularize" if epoch >= self.config.select_epoch else "dense"

    def select(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
               loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Estimate importance over ``batches``, build or take the library, allocate the
        per-layer ratios (``allocation``), choose every mask."""
        importance = estimate_importance(model, self.layers, batches, loss_fn)
        library = self.choose_library(importance)
        ratios = self.allocate(model, importance)
        self.assign(library, {l.name: select_layer_mask(importance[l.name], library, l.block_size,
                                                        ratios[l.name]) for l in self.layers})

    def allocate(self, model: nn.Module, importance: dict[str, Tensor]) -> dict[str, float]:
        """Removal ratio per pruned layer, as ``config.allocation`` says."""
        if self.config.allocation == "global":
            return allocate_ratios(model, self.layers, importance, self.config)
        if self.config.allocation == "erk":
            return erk_ratios(model, self.layers, self.config)
        return {layer.name: layer.ratio for layer in self.layers}

    def reselect(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                 loss_fn: Callable[[Tensor, Tensor], Tensor]) -> int:
        """``select`` again on the current weights (before the hard prune: the weights the lasso
        pulls may still be chosen back); returns how many kernel groups changed, i.e. keep other
        taps (another pattern, or removed where kept or the reverse)."""
        before = self._group_taps()
        self.select(model, batches, loss_fn)
        after = self._group_taps()
        return sum(int((before[name] != after[name]).any(-1).sum()) for name in after)

    def reselects_at(self, epoch: int) -> bool:
        """Whether ``epoch`` starts with a re-selection: every ``reselect_every`` epochs after
        ``select_epoch``, before ``hard_prune_epoch``."""
        every, start = self.config.reselect_every, self.config.select_epoch
        return bool(every) and start < epoch < self.config.hard_prune_epoch and (epoch - start) % every == 0

    def regrow_share(self, epoch: int, epochs: int) -> float:
        """Share of each layer's kept groups ``regrow`` swaps at the start of ``epoch`` (0: no
        regrowth then): ``regrow_fraction`` * (1 + cos(pi * k / K)) / 2 at the k-th of the K
        epochs after the hard prune, every ``regrow_every`` of them."""
        every, hard = self.config.regrow_every, self.config.hard_prune_epoch
        if not every or epoch <= hard or (epoch - hard) % every:
            return 0.0
        return self.config.regrow_fraction * (1 + math.cos(math.pi * (epoch - hard) / (epochs - hard))) / 2

    def regrow(self, model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
               loss_fn: Callable[[Tensor, Tensor], Tensor], share: float,
               optimizer: torch.optim.Optimizer) -> int:
        """In the hard phase: per layer, drop the ``share`` of kept kernel groups with the least
        squared weight and grow as many removed groups, those whose best library pattern holds
        the largest squared gradient of the loss (over ``batches``, gradients not masked), with
        that pattern; grown weights start at 0, dropped ones and their optimizer state are
        zeroed. Kept groups keep their pattern. Returns the number of groups dropped (= grown)."""
        assert self.library is not None and self.hard
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        try:
            gradients = estimate_importance(model, self.layers, batches, loss_fn, gradient_only=True)
        finally:
            self._register_gradient_masks()
        masks, swapped = {}, 0
        for layer in self.layers:
            mask = self.masks[layer.name]
            ids = mask.pattern_ids.clone().flatten()
            kept = ids != REMOVED
            count = min(int(share * int(kept.sum())), int((~kept).sum()))
            weight = layer.module.weight.detach().cpu()
            magnitude = group_tap_importance(weight.pow(2), layer.block_size).sum(-1).flatten()
            fit = group_tap_importance(gradients[layer.name], layer.block_size) @ self.library.double().T
            gain, pattern = fit.flatten(0, 1).max(-1)
            drop = removal_order(torch.where(kept, magnitude, torch.inf))[:count]
            grow = removal_order(torch.where(kept, torch.inf, -gain))[:count]
            ids[drop] = REMOVED
            ids[grow] = pattern[grow]
            masks[layer.name] = LayerMask(mask.out_channels, mask.block_size, ids.view_as(mask.pattern_ids))
            swapped += count
        self.assign(self.library, masks)
        self.enforce(optimizer)
        return swapped

    def choose_library(self, importance: dict[str, Tensor]) -> Tensor:
        """The configured fixed library, or one generated from per-weight ``importance``
        (float (C_out, C_in, 3, 3) per pruned layer): bool (K, 9)."""
        if self.config.patterns != "dynamic":
            return validate_library(PATTERN_LIBRARIES.get(self.config.patterns)())
        groups = [_group_tap_importance(importance[l.name], l.block_size) for l in self.layers]
        return validate_library(generate_library(groups, self.config.library_size,
                                                 self.config.require_centre))

    def assign(self, library: Tensor, masks: dict[str, LayerMask]) -> None:
        """Take a library and one mask per pruned layer (chosen here or by another method)."""
        self.library = validate_library(library)
        self.masks = masks
        distributed.check_identical("pattern library and masks", [self.library] + [
            m.pattern_ids for m in self.masks.values()])
        self._cache_masks()

    def penalty(self) -> Tensor:
        """This step's ``lasso_coefficient`` * group lasso of every weight the masks will remove
        (a scalar with grad)."""
        total = sum(group_lasso(l.module.weight, 1.0 - self._mask_tensors[l.name], l.block_size)
                    for l in self.layers)
        self._coefficient = lasso_coefficient(self.config, self._epoch, self._step, self._steps_per_epoch)
        return self._coefficient * total

    @torch.no_grad()
    def harden(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the removed weights and their optimizer state; mask their gradients from now on."""
        self.hard = True
        self.enforce(optimizer)
        self._register_gradient_masks()

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the weights, and any optimizer state shaped like them, back on the masks."""
        for layer in self.layers:
            mask = self._mask_tensors[layer.name]
            weight = layer.module.weight
            weight.mul_(mask)
            for value in optimizer.state.get(weight, {}).values():
                if isinstance(value, Tensor) and value.shape == weight.shape:
                    value.mul_(mask)

    def begin_epoch(self, context: EpochContext) -> None:
        """Select at the first non-dense epoch, re-select where ``reselects_at``, harden at the
        first hard one, regrow where ``regrow_share`` says."""
        phase = self.phase(context.epoch)
        self._epoch, self._step, self._steps_per_epoch = context.epoch, 0, context.steps_per_epoch
        self._coefficient, self._reselected, self._regrown = 0.0, None, None
        batches = self.config.importance_batches
        if phase != "dense" and not self.selected:
            self.select(context.model, context.batches(batches), context.loss_fn)
        elif self.reselects_at(context.epoch):
            self._reselected = self.reselect(context.model, context.batches(batches), context.loss_fn)
        if phase == "hard" and not self.hard:
            self.harden(context.optimizer)
        share = self.regrow_share(context.epoch, context.epochs)
        if share and self.hard:
            self._regrown = self.regrow(context.model, context.batches(batches), context.loss_fn, share,
                                        context.optimizer)

    def penalty_term(self, loss: Tensor, phase: str) -> Tensor | None:
        return self.penalty() if phase == "regularize" else None

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._step += 1
        if self.hard:
            self.enforce(optimizer)

    def end_epoch(self, context: EpochContext) -> None:
        pass

    def epoch_metrics(self) -> dict:
        """What the accuracy levers did this epoch, for its metrics line: the allocation and the
        share of kernel groups each layer removes (empty before selection), the lasso schedule and
        its last coefficient (0 outside the lasso phase), and how many groups this epoch's
        re-selection changed (None: none ran)."""
        c = self.config
        return {
            "allocation": c.allocation,
            "target_compression": c.target_compression if c.allocation != "uniform" else None,
            "layer_ratios": {name: float((m.pattern_ids == REMOVED).double().mean())
                             for name, m in self.masks.items()},
            "lasso_schedule": c.lasso_schedule, "lasso_coefficient": self._coefficient,
            "reselect_every": c.reselect_every, "reselection_changed_groups": self._reselected,
            "regrow_every": c.regrow_every, "regrown_groups": self._regrown,
        }

    def report(self, model: nn.Module) -> SparsityReport:
        return sparsity_report(model, self.masks, self.library)

    def pattern_layers(self) -> dict[str, tuple[nn.Conv2d, np.ndarray, int]]:
        """Once hard: per pruned conv, (module, pattern ids int (G, C_in) with -1 removed, block
        size), what the training kernels need; empty before the hard prune (masks still move)."""
        if not self.hard:
            return {}
        return {l.name: (l.module, self.masks[l.name].pattern_ids.numpy(), l.block_size) for l in self.layers}

    def state_dict(self) -> dict:
        """Library, masks and phase; enough to rebuild the pruner on the same model."""
        return {
            "library": self.library,
            "hard": self.hard,
            "masks": {name: {"block_size": m.block_size, "pattern_ids": m.pattern_ids}
                      for name, m in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.library = state["library"]
        self.masks = {}
        for layer in self.layers:
            if not state["masks"]:
                break
            entry = state["masks"].get(layer.name)
            if entry is None or entry["block_size"] != layer.block_size:
                raise PruningError(f"layer {layer.name!r}: the saved masks do not match the recipe")
            self.masks[layer.name] = LayerMask(layer.module.out_channels, entry["block_size"],
                                               entry["pattern_ids"])
        if self.masks:
            self._cache_masks()
        if state["hard"] and not self.hard:
            self.hard = True
            self._register_gradient_masks()

    def _cache_masks(self) -> None:
        assert self.library is not None
        device = self.layers[0].module.weight.device
        self._mask_tensors = {name: m.dense(self.library).to(device) for name, m in self.masks.items()}

    def _group_taps(self) -> dict[str, Tensor]:
        """The taps every kernel group keeps: bool (G_out, C_in, 9) per layer, none if removed."""
        assert self.library is not None
        return {name: self.library[m.pattern_ids.clamp_min(0)] & (m.pattern_ids != REMOVED)[..., None]
                for name, m in self.masks.items()}

    def _register_gradient_masks(self) -> None:
        """Mask every pruned weight's gradient with the layer's current mask (regrowth moves it)."""
        for layer in self.layers:
            self._hooks.append(layer.module.weight.register_hook(
                lambda g, name=layer.name: g * self._mask_tensors[name]))


def _group_tap_importance(importance: Tensor, block_size: int) -> Tensor:
    """(C_out, C_in, 3, 3) -> per (block, input channel) group, per tap: (G, 9)."""
    out_channels, in_channels = importance.shape[:2]
    return block_sum(importance.reshape(out_channels, in_channels, 9), block_size).reshape(-1, 9)
