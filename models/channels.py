"""Channel graph of a model: which layers produce and which read each set of feature channels.

Channel pruning (PruneTrain) removes a channel from a node together with every layer touching it,
so a model that supports it describes its nodes through a ``channel_nodes()`` method. A residual
stage is one node: its shortcut adds tie the stem or projection, every block's last conv and all
readers to the same channels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ChannelNode:
    """One set of feature channels.

    producers: (conv, BN) pairs writing the node: the conv's output channels (dim 0 of its
    weight (C, C_in, k, k)) and the BN's features. consumers: convs (weight dim 1) and linear
    layers (weight dim 1, after global pooling) reading it.
    """

    name: str
    producers: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = field(default_factory=list)
    consumers: list[nn.Conv2d | nn.Linear] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.producers[0][0].out_channels
