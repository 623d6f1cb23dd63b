"""Model definitions, created by name through ``create_model``.

Every model takes ``num_classes`` and ``in_channels`` so that Fashion-MNIST (1x28x28),
CIFAR-10 (3x32x32) and users' image folders use the same definitions.

Each registered factory also carries its default input configuration (timm style), reported by
``default_config(name)``: the input size the model was designed for and, for the ImageNet
models, the normalisation their published weights expect (``None``: the dataset's own).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from clicktrain_deploy.registry import Registry

MODELS: Registry = Registry("model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelDefaults:
    """A model's default input: ``input_size`` (C, H, W); ``mean``/``std`` per channel, or None
    for the dataset's own statistics (what the trainer uses either way)."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def register_model(name: str, *, input_size: tuple[int, int, int],
                   mean: tuple[float, ...] | None = None,
                   std: tuple[float, ...] | None = None) -> Callable:
    """``MODELS.register(name)`` that also records the factory's ``default_config``."""
    def decorate(factory: Callable) -> Callable:
        factory.default_config = ModelDefaults(input_size, mean, std)  # type: ignore[attr-defined]
        return MODELS.register(name)(factory)

    return decorate


def default_config(name: str) -> ModelDefaults:
    """The default input configuration of registered model ``name``."""
    return MODELS.get(name).default_config


def create_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build registered model ``name`` for ``num_classes`` classes and ``in_channels`` input planes."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def build_model(*, name: str | None = None, factory: str | None = None, file: str | None = None,
                kwargs: dict | None = None, num_classes: int, in_channels: int) -> nn.Module:
    """A registered model by ``name``, or a user's callable by ``factory``
    ("package.module:callable") or ``file`` ("path/net.py:callable") called with ``kwargs``
    (see ``models.user``: the data's ``num_classes``/``in_channels`` are passed where the
    callable's signature names them)."""
    if name is not None:
        if kwargs:
            raise ValueError("kwargs are for factory/file models only")
        return create_model(name, num_classes, in_channels)
    from .user import create_user_model

    return create_user_model(factory=factory, file=file, kwargs=kwargs, num_classes=num_classes,
                             in_channels=in_channels)


from . import mobilenet, resnet, vgg  # noqa: E402,F401  (registers the models)

__all__ = ["MODELS", "ModelDefaults", "build_model", "create_model", "default_config", "register_model"]
