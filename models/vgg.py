"""VGG-11/16 with BatchNorm, as in ClickTrain's CIFAR code (3-layer classifier with dropout), and
the ImageNet VGG-16 with BatchNorm.

Pools use ceil mode, so odd and small maps (28x28 input: 28-14-7-4-2-1) stay valid.

``vgg11_bn`` and ``vgg16_bn`` are the CIFAR variants (global average pool, 512-512 MLP, ~15M
parameters for VGG-16). ``vgg16_bn_imagenet`` is torchvision's ``vgg16_bn`` (conv biases, 7x7
adaptive average pool, 4096-4096 classifier; 138,365,992 parameters at 1000 classes) with
torchvision's module names; its pools use ceil mode too, the same as torchvision's at any input
whose side is a multiple of 32 (224 included).
"""
from __future__ import annotations

from torch import Tensor, nn

from . import IMAGENET_MEAN, IMAGENET_STD, register_model

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


@register_model("vgg11_bn", input_size=(3, 32, 32))
def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg11_bn"], num_classes, in_channels)


@register_model("vgg16_bn", input_size=(3, 32, 32))
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(_CONFIGS["vgg16_bn"], num_classes, in_channels)


class ImageNetVGG(nn.Module):
    """torchvision's VGG with BatchNorm: Conv3x3(bias)-BN-ReLU stacks with 2x2 max-pools,
    adaptive average pool to 7x7, Linear(512*7*7, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-
    Dropout-Linear(4096, classes).

    Input (N, in_channels, H, W), H and W >= 1 (224 by default: 7x7 maps reach the pool, which
    is then the identity); output logits (N, num_classes). Smaller maps are spread over the 7x7
    grid by the adaptive pool, as in torchvision. The TorchScript ONNX exporter (``dynamo=False``)
    refuses that pool unless the map's side is a multiple of 7 (inputs of 224, 448, ...); the
    dynamo exporter, which the project's export uses, decomposes it and exports any size.
    """

    def __init__(self, config: list, num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1),
                           nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model("vgg16_bn_imagenet", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
def vgg16_bn_imagenet(num_classes: int = 1000, in_channels: int = 3) -> ImageNetVGG:
    """torchvision's vgg16_bn: 138,365,992 parameters at 1000 classes, 3 planes."""
    return ImageNetVGG(_CONFIGS["vgg16_bn"], num_classes, in_channels)
