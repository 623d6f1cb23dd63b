"""PruneTrain (Lym et al., SC'19): channel group lasso during training, with physical shrinking.

The loss gets a group lasso over the output channels and input channels of every conv and the
input neurons of the classifier, its coefficient fixed at the first step so that the penalty is
``penalty_ratio`` of the loss (of the global batch under torchrun: the ranks' losses are averaged
first, so every rank fixes the same coefficient). Every ``interval`` epochs (and after the last) every channel whose
weights are all below ``threshold`` in every layer touching it is removed: the model becomes a
smaller dense model, its parameters keep their identity (so optimizer and LR schedule go on) and
the optimizer state is sliced with them. Which channels touch which layers is traced from the
model with torch.fx (``models/channels.py``: any model fx can trace; channels it cannot follow one
to one stay, listed in ``refused`` with the reason); residual stages keep the union of live
channels.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import PruningError
from ..models.channels import ChannelNode, trace_channel_graph
from .config import PruningConfig
from .method import PRUNING_METHODS, EpochContext
from .report import SparsityReport, build_report


def _take(param: nn.Parameter, dim: int, index: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Keep ``index`` along ``dim`` of a parameter and of optimizer state shaped like it."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    index = index.to(param.device)
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            state[key] = value.index_select(dim, index)
    param.data = param.data.index_select(dim, index)
    param.grad = None


def reader_channel_norms(reader: nn.Conv2d | nn.Linear) -> Tensor:
    """Largest |w| per input channel of a conv (C_out, C_in, k, k) or linear (out, C_in): (C_in,)."""
    return reader.weight.detach().abs().transpose(0, 1).flatten(1).amax(1)


def channel_strength(node: ChannelNode) -> Tensor:
    """(C,): the largest |w| of each channel over every layer of the node: output channels of its
    writers (depthwise convs included), input channels of its readers."""
    strength = torch.zeros(node.width)
    for layer, _ in node.producers:
        strength = torch.maximum(strength, layer.weight.detach().abs().flatten(1).amax(1).cpu())
    for reader in node.consumers:
        strength = torch.maximum(strength, reader_channel_norms(reader).cpu())
    return strength


def live_channels(node: ChannelNode, threshold: float) -> Tensor:
    """bool (C,): channels with a weight of magnitude >= ``threshold`` in any layer of the node."""
    return channel_strength(node) >= threshold


def _take_norm(norm: nn.Module, keep: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    for param in (norm.weight, norm.bias):
        if param is not None:
            _take(param, 0, keep, optimizer)
    if norm.running_mean is not None:
        norm.running_mean = norm.running_mean[keep.to(norm.running_mean.device)]
        norm.running_var = norm.running_var[keep.to(norm.running_var.device)]
    norm.num_features = len(keep)


@torch.no_grad()
def remove_channels(node: ChannelNode, keep: Tensor,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Shrink every layer of ``node`` to channels ``keep`` (int64, ascending), in place."""
    for layer, norm in node.producers:
        _take(layer.weight, 0, keep, optimizer)
        if layer.bias is not None:
            _take(layer.bias, 0, keep, optimizer)
        if isinstance(layer, nn.Linear):
            layer.out_features = len(keep)
        else:
            layer.out_channels = len(keep)
            if layer.groups > 1:  # depthwise: in = out = groups
                layer.in_channels = layer.groups = len(keep)
    for norm in node.all_norms():
        _take_norm(norm, keep, optimizer)
    for reader in node.consumers:
        _take(reader.weight, 1, keep, optimizer)
        if isinstance(reader, nn.Linear):
            reader.in_features = len(keep)
        else:
            reader.in_channels = len(keep)


def channel_group_lasso(nodes: list[ChannelNode]) -> Tensor:
    """Sum of sqrt(sum w^2 + 1e-8) over every output channel of every writer (depthwise convs
    included) and every input channel of every reader (the stem's image planes are read by no
    node, so they are free)."""
    total = 0.0
    for node in nodes:
        for layer, _ in node.producers:
            total = total + layer.weight.pow(2).flatten(1).sum(1).add(1e-8).sqrt().sum()
        for reader in node.consumers:
            total = total + reader.weight.pow(2).transpose(0, 1).flatten(1).sum(1).add(1e-8).sqrt().sum()
    return total


def _expand(tensor: Tensor, dim: int, ids: Tensor, width: int) -> Tensor:
    shape = list(tensor.shape)
    shape[dim] = width
    return tensor.new_zeros(shape).index_copy_(dim, ids.to(tensor.device), tensor)


@PRUNING_METHODS.register("prunetrain")
class PruneTrain:
    """The PruneTrain method; ``channels`` maps each node to the original ids of its live channels."""

    masks: dict = {}
    library: Tensor | None = None

    def __init__(self, model: nn.Module, config: PruningConfig,
                 example_input: Tensor | None = None) -> None:
        """Traces ``model``'s channel graph (``example_input``: see ``trace_channel_graph``)."""
        self.config = config.prunetrain
        self.model = model
        graph = trace_channel_graph(model, example_input)
        self.nodes = graph.nodes
        self.refused = graph.refused  # channel sets that stay whole, and why
        if not self.nodes:
            raise PruningError(f"model {type(model).__name__}: PruneTrain finds no channels it can "
                               "remove: " + "; ".join(f"{n}: {why}" for n, why in self.refused.items()))
        self.widths = {node.name: node.width for node in self.nodes}
        self.channels = {node.name: torch.arange(node.width) for node in self.nodes}
        self.coefficient: float | None = None

    def phase(self, epoch: int) -> str:
        return "regularize"

    def begin_epoch(self, context: EpochContext) -> None:
        pass

    def penalty_term(self, loss: Tensor, phase: str) -> Tensor:
        """coefficient * channel group lasso; the first call fixes the coefficient from ``loss``."""
        lasso = channel_group_lasso(self.nodes)
        if self.coefficient is None:
            # under torchrun every rank sees its own shard: fix the coefficient from the loss of
            # the global batch (the mean over ranks), so every rank fixes the same one; the lasso
            # is the same on every rank (identical weights)
            ratio = self.config.penalty_ratio
            global_loss = distributed.mean_over_ranks(float(loss.detach()))
            self.coefficient = ratio * global_loss / (float(lasso.detach()) * (1 - ratio))
        return self.coefficient * lasso

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def end_epoch(self, context: EpochContext) -> None:
        if (context.epoch + 1) % self.config.interval == 0 or context.epoch + 1 == context.epochs:
            self.reconfigure(context.optimizer)

    def reconfigure(self, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Remove every channel dead in all layers of its node; returns how many were removed.
        A node keeps at least its strongest channel."""
        removed = 0
        for node in self.nodes:
            live = live_channels(node, self.config.threshold)
            if live.all():
                continue
            if not live.any():
                live[channel_strength(node).argmax()] = True
            keep = live.nonzero().flatten()
            remove_channels(node, keep, optimizer)
            self.channels[node.name] = self.channels[node.name][keep]
            removed += len(live) - len(keep)
        return removed

    def state_dict(self) -> dict:
        return {"coefficient": self.coefficient, "channels": dict(self.channels)}

    def load_state_dict(self, state: dict) -> None:
        """Shrink the (full-size) model to the saved channels; its weights are loaded after."""
        self.coefficient = state["coefficient"]
        unknown = sorted(set(state["channels"]) - set(self.channels))
        if unknown:
            raise PruningError(f"channel nodes {unknown}: saved, but not in this model's channel graph")
        for node in self.nodes:
            saved = state["channels"].get(node.name)
            if saved is None or (len(saved) and int(saved.max()) >= self.widths[node.name]):
                raise PruningError(f"channel node {node.name!r}: the saved channels do not fit the model")
            keep = torch.searchsorted(self.channels[node.name], saved)
            if not torch.equal(self.channels[node.name][keep], saved):
                raise PruningError(f"channel node {node.name!r}: saved channels were already removed")
            if len(keep) < node.width:
                remove_channels(node, keep)
            self.channels[node.name] = saved.clone()

    def report(self, model: nn.Module) -> SparsityReport:
        """Compression against the original widths: removed channels count as zeros."""
        full = {id(p): p.detach() for p in model.parameters()}
        for node in self.nodes:
            ids, width = self.channels[node.name], self.widths[node.name]
            for layer, _ in node.producers:
                for param in (layer.weight, layer.bias):
                    if param is not None:
                        full[id(param)] = _expand(full[id(param)], 0, ids, width)
            for norm in node.all_norms():
                for param in (norm.weight, norm.bias):
                    if param is not None:
                        full[id(param)] = _expand(full[id(param)], 0, ids, width)
            for reader in node.consumers:
                full[id(reader.weight)] = _expand(full[id(reader.weight)], 1, ids, width)
        convs = [full[id(m.weight)] for m in model.modules() if isinstance(m, nn.Conv2d)]
        return build_report([], convs, list(full.values()), None)
