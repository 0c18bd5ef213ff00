"""VGG-Small for CIFAR (HWGQ / LQ-Nets): 2x128C3-MP-2x256C3-MP-2x512C3-MP-FC."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ConvBNReLU, init_weights, pooled_size

__all__ = ["VGGSmall", "vgg_small"]


class VGGSmall(nn.Module):
    """VGG-Small as used by HWGQ (Cai et al. 2017) on CIFAR-10.

    ``features`` holds conv3x3-BN-ReLU layers with 128,128 | 256,256 | 512,512
    channels (``width`` scales the base 128) and a ``MaxPool2d(2)`` after each
    pair (ReLU before pooling). The only FC layer is the ``classifier``
    (``Linear(4*width * (image_size//8)**2, num_classes)``; 512*4*4 -> classes
    at 32x32). With 10 classes, 3 input channels and 32x32 inputs the model has
    4,656,522 parameters (BatchNorm has no affine parameters).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 128,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        side = pooled_size(image_size, 3, "VGGSmall")
        self.image_size = image_size
        c1, c2, c3 = width, 2 * width, 4 * width
        self.features = nn.Sequential(
            ConvBNReLU(in_channels, c1),
            ConvBNReLU(c1, c1),
            nn.MaxPool2d(2),
            ConvBNReLU(c1, c2),
            ConvBNReLU(c2, c2),
            nn.MaxPool2d(2),
            ConvBNReLU(c2, c3),
            ConvBNReLU(c3, c3),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c3 * side * side, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def vgg_small(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> VGGSmall:
    return VGGSmall(num_classes, in_channels, image_size, **kwargs)
