"""Model zoo for Two-Step Quantization (TSQ).

All models follow the conventions documented in :mod:`tsquant.models.common`
(conv/linear without bias -> ``BatchNorm(affine=False)`` -> (residual add) ->
distinct ``nn.ReLU`` -> optional pooling; a final ``nn.Linear`` named
``classifier`` with bias; ``torch.fx`` traceable), so that the fx-based
model-surgery pass can locate every quantisable conv/linear -> BN -> ReLU chain.

Use :func:`build_model` with one of :func:`model_names`::

    model = build_model("resnet20", num_classes=10, in_channels=3, image_size=32)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from .alexnet_bn import AlexNetBN, alexnet_bn
from .common import (
    BasicBlock,
    ConvBNReLU,
    LinearBNReLU,
    OptionAShortcut,
    init_weights,
)
from .resnet_cifar import CifarResNet, resnet20, resnet32, resnet56
from .resnet_imagenet import ResNet, ResNet18, resnet18
from .small_cnn import SmallCNN, small_cnn
from .vgg_small import VGGSmall, vgg_small

__all__ = [
    "MODELS",
    "AlexNetBN",
    "BasicBlock",
    "CifarResNet",
    "ConvBNReLU",
    "LinearBNReLU",
    "ModelBuilder",
    "OptionAShortcut",
    "ResNet",
    "ResNet18",
    "SmallCNN",
    "VGGSmall",
    "build_model",
    "init_weights",
    "model_names",
]

ModelBuilder = Callable[..., nn.Module]
"""``builder(num_classes, in_channels, image_size, **kwargs) -> nn.Module``."""

MODELS: dict[str, ModelBuilder] = {
    "small_cnn": small_cnn,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg_small": vgg_small,
    "alexnet_bn": alexnet_bn,
    "resnet18": resnet18,
}


def model_names() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODELS)


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs,
) -> nn.Module:
    """Build a registered model.

    ``name`` is matched case-insensitively (``-`` is treated as ``_``). Extra
    keyword arguments (e.g. ``width``, ``fc_width``, ``small_stem``) go to the
    model constructor. An unknown name raises ``ValueError`` whose one-line
    message lists the valid names and the nearest match.
    """
    key = str(name).strip().lower().replace("-", "_")
    builder = MODELS.get(key)
    if builder is None:
        valid = model_names()
        nearest = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(valid)}{hint}")
    return builder(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )


def is_factory_spec(name: str) -> bool:
    """``package.module:factory`` names a user's model factory instead of a built-in model."""
    return ":" in str(name)


def build_user_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """``package.module:factory`` -> ``factory(**kwargs)``, a user's own model.

    The module is imported from the Python path (the current directory included, as tools that
    take ``module:attribute`` do); every failure is a one-line ``ValueError`` saying what to fix.
    """
    import importlib
    import os
    import sys

    module_name, _, attr = str(spec).partition(":")
    if not module_name or not attr:
        raise ValueError(f"model.name {spec!r}: write it as package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError or an error inside the user's module
        raise ValueError(
            f"model.name {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); put it on "
            "PYTHONPATH or run tsquant from the folder that holds it"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ValueError(
            f"model.name {spec!r}: {module_name} has no callable {attr!r}: name a function or "
            "class that returns the nn.Module"
        )
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise ValueError(
            f"model.name {spec!r} rejected model.kwargs {kwargs or {}} ({exc}): give the "
            "arguments its signature takes"
        ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model.name {spec!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
