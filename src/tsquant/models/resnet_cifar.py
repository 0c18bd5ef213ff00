"""CIFAR ResNets (He et al. 2016, Sec. 4.2): ResNet-20/32/56 with option-A shortcuts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import BasicBlock, ConvBNReLU, init_weights

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2``.

    ``conv3x3(16)-BN-ReLU``, then three stages of ``n`` :class:`BasicBlock`
    with 16/32/64 channels (``width`` scales the base 16; the first block of
    stages 2 and 3 has stride 2), parameter-free option-A shortcuts, global
    average pooling and a ``Linear(64, num_classes)`` ``classifier``.

    The network is fully convolutional up to the global pool, so ``image_size``
    is accepted for API uniformity but does not change the architecture.
    ResNet-20 with 10 classes has 268,346 parameters (BatchNorm has no affine
    parameters; the usual 0.27M figure includes them).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        n = (depth - 2) // 6
        self.depth = depth
        self.image_size = image_size
        widths = (width, 2 * width, 4 * width)
        self.stem = ConvBNReLU(in_channels, widths[0])
        self.layer1 = self._make_stage(widths[0], widths[0], n, stride=1)
        self.layer2 = self._make_stage(widths[0], widths[1], n, stride=2)
        self.layer3 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[2], num_classes)
        init_weights(self)

    @staticmethod
    def _make_stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride, shortcut="A")]
        layers += [BasicBlock(out_ch, out_ch, 1, shortcut="A") for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def resnet20(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels, image_size, **kwargs)


def resnet32(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels, image_size, **kwargs)


def resnet56(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kwargs
) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels, image_size, **kwargs)
