"""Model definitions, created by name through ``create_model``.

Every model takes ``num_classes`` and ``in_channels`` so that Fashion-MNIST (1x28x28),
CIFAR-10 (3x32x32) and users' image folders use the same definitions.
"""
from __future__ import annotations

from torch import nn

from clicktrain_deploy.registry import Registry

MODELS: Registry = Registry("model")


def create_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build registered model ``name`` for ``num_classes`` classes and ``in_channels`` input planes."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


from . import resnet, vgg  # noqa: E402,F401  (registers the models)

__all__ = ["MODELS", "create_model"]
