"""MobileNetV2 (Sandler et al., 2018), torchvision's definition at width 1.0.

Inverted residuals: 1x1 expansion (x6, none in the first block), depthwise 3x3, linear 1x1
projection, ReLU6 after the first two; a residual add where stride is 1 and the widths match.
The module names are torchvision's (``features.<i>.conv...``, ``classifier.1``), so its state
dicts load.

ClickTrain finds no conv to pattern-prune here but the stem: every other 3x3 is depthwise
(groups = channels), and a recipe's default ``skip_first_conv`` skips the stem. PruneTrain's
channel graph (traced, ``models/channels.py``) covers the stem, the block outputs (the residual
streams), every block's expanded channels (the depthwise conv is cut with them: it ties its input
and output channels) and the last 1x1 conv.
"""
from __future__ import annotations

from torch import Tensor, nn

from . import IMAGENET_MEAN, IMAGENET_STD, register_model

# (expansion t, output channels c, blocks n, first stride s) per stage.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class ConvBNReLU6(nn.Sequential):
    """Conv (k x k, no bias, 'same' padding) - BN - ReLU6, as torchvision's Conv2dNormActivation."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_planes), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6,] depthwise 3x3(stride)-BN-ReLU6, 1x1 project-BN; + x where
    ``use_res_connect``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_planes * expand_ratio))
        self.use_res_connect = stride == 1 and in_planes == out_planes
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_planes, hidden, 1))
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_planes

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv3x3/2 (32), 17 inverted residuals to 320 channels, conv1x1 to 1280, global average
    pool, Dropout(0.2) + Linear: torchvision's mobilenet_v2 at width 1.0.

    Input (N, in_channels, H, W), H and W >= 1 (224 by default: 7x7 before the pool); output
    logits (N, num_classes).
    """

    def __init__(self, num_classes: int, in_channels: int, last_channel: int = 1280,
                 dropout: float = 0.2) -> None:
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU6(in_channels, 32, 3, 2)]
        width = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(width, c, s if i == 0 else 1, t))
                width = c
        features.append(ConvBNReLU6(width, last_channel, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("mobilenet_v2", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 at width 1.0: 3,504,872 parameters at 1000 classes, 3 planes."""
    return MobileNetV2(num_classes, in_channels)
