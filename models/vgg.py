"""VGG-11/16 with BatchNorm, as in ClickTrain's CIFAR code (3-layer classifier with dropout).

Pools use ceil mode, so odd and small maps (28x28 input: 28-14-7-4-2-1) stay valid.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import MODELS
from .channels import ChannelNode

_CONFIGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """Conv3x3-BN-ReLU stacks with 2x2 max-pools, global average pool, 512-512-classes MLP.

    Input (N, in_channels, H, W); output logits (N, num_classes).
    """

    def __init__(self, config: list, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1, bias=False),
                           nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(in_channels, 512), nn.ReLU(inplace=True),
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))

    def channel_nodes(self) -> list[ChannelNode]:
        """One node per conv: its output channels, read by the next conv or the classifier."""
        convs = [(n, m) for n, m in self.features.named_children() if isinstance(m, nn.Conv2d)]
        norms = [m for m in self.features if isinstance(m, nn.BatchNorm2d)]
        readers = [conv for _, conv in convs[1:]] + [self.classifier[1]]
        return [ChannelNode(f"features.{name}", [(conv, norm)], [reader])
                for (name, conv), norm, reader in zip(convs, norms, readers)]


@MODELS.register("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg11_bn"], num_classes, in_channels)


@MODELS.register("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg16_bn"], num_classes, in_channels)
