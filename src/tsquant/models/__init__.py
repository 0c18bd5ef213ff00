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
