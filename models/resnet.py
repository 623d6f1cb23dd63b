"""ResNets: He et al.'s CIFAR ResNet-20/32/56, ClickTrain's wide 4-stage "ResNet-32", and the
ImageNet ResNet-18/50.

The CIFAR family has 3 stages of 16/32/64 channels. ClickTrain's experiments call a different
network "ResNet-32": BasicBlocks [3, 4, 5, 3] at 64/128/256/512 channels with a 3x3 stem and no
max-pool (about 20M conv weights); it is registered as ``resnet32_wide``.

``resnet18`` and ``resnet50`` are torchvision's definitions (7x7 stride-2 stem, 3x3 stride-2
max-pool, stages of 64/128/256/512 planes; ResNet-50's Bottlenecks stride on the 3x3, "v1.5"),
with torchvision's module names, so its state dicts load into them.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import IMAGENET_MEAN, IMAGENET_STD, register_model


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


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels)


@register_model("resnet20", input_size=(3, 32, 32))
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(20, num_classes, in_channels)


@register_model("resnet32", input_size=(3, 32, 32))
def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(32, num_classes, in_channels)


@register_model("resnet56", input_size=(3, 32, 32))
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(56, num_classes, in_channels)


@register_model("resnet32_wide", input_size=(3, 32, 32))
def resnet32_wide(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ClickTrain's "ResNet-32": BasicBlocks [3, 4, 5, 3] at 64/128/256/512 channels."""
    return ResNet([3, 4, 5, 3], [64, 128, 256, 512], num_classes, in_channels)


# ImageNet ResNets (torchvision layout and module names).


class ImageNetBasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN plus identity or
    ``downsample`` (1x1 conv + BN)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (v1.5): conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1 to
    4 x planes-BN, plus identity or ``downsample``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ImageNetResNet(nn.Module):
    """Stem conv7x7/2-BN-ReLU, max-pool 3x3/2, four stages (layer1..layer4; stages 2-4 halve H
    and W), global average pool, ``fc``: torchvision's ResNet.

    Input (N, in_channels, H, W), H and W >= 1 (224 by default: 7x7 before the pool); output
    logits (N, num_classes).
    """

    def __init__(self, block: type[ImageNetBasicBlock] | type[Bottleneck], blocks: list[int],
                 num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for i, (count, planes) in enumerate(zip(blocks, [64, 128, 256, 512])):
            layers = []
            for j in range(count):
                layers.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return self.fc(self.avgpool(x).flatten(1))


_IMAGENET = dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)


@register_model("resnet18", **_IMAGENET)
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2]; 11,689,512 parameters at 1000 classes, 3 planes."""
    return ImageNetResNet(ImageNetBasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register_model("resnet50", **_IMAGENET)
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3]; 25,557,032 parameters at 1000 classes, 3 planes."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)
