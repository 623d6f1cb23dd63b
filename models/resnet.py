"""ResNets: He et al.'s CIFAR ResNet-20/32/56 and ClickTrain's wide 4-stage "ResNet-32".

The CIFAR family has 3 stages of 16/32/64 channels. ClickTrain's experiments call a different
network "ResNet-32": BasicBlocks [3, 4, 5, 3] at 64/128/256/512 channels with a 3x3 stem and no
max-pool (about 20M conv weights); it is registered as ``resnet32_wide``.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import MODELS
from .channels import ChannelNode


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN where the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 -> stages of BasicBlocks -> global average pool -> linear classifier.

    Input (N, in_channels, H, W); output logits (N, num_classes). Stage i > 0 halves H and W.
    """

    def __init__(
        self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_planes = [], widths[0]
        for i, (count, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))

    def channel_nodes(self) -> list[ChannelNode]:
        """The stem and each stage's residual stream (one node per stage), and every block's
        inner conv1 -> conv2 channels."""
        stream = ChannelNode("conv1", [(self.conv1, self.bn1)])
        nodes = []
        for s, stage in enumerate(self.layers):
            for j, block in enumerate(stage):
                stream.consumers.append(block.conv1)
                if not isinstance(block.shortcut, nn.Identity):
                    stream.consumers.append(block.shortcut[0])
                    nodes.append(stream)
                    stream = ChannelNode(f"layers.{s}", [(block.shortcut[0], block.shortcut[1])])
                nodes.append(ChannelNode(f"layers.{s}.{j}.conv1", [(block.conv1, block.bn1)],
                                         [block.conv2]))
                stream.producers.append((block.conv2, block.bn2))
        stream.consumers.append(self.fc)
        return [*nodes, stream]


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels)


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(20, num_classes, in_channels)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(32, num_classes, in_channels)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(56, num_classes, in_channels)


@MODELS.register("resnet32_wide")
def resnet32_wide(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ClickTrain's "ResNet-32": BasicBlocks [3, 4, 5, 3] at 64/128/256/512 channels."""
    return ResNet([3, 4, 5, 3], [64, 128, 256, 512], num_classes, in_channels)
