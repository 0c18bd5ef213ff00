"""ImageNet-style ResNet-18 (BasicBlock, 1x1-conv+BN projection shortcuts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .common import BasicBlock, ConvBNReLU, init_weights

__all__ = ["ResNet", "ResNet18", "resnet18"]

SMALL_STEM_BELOW = 128
"""Default ``image_size`` threshold under which :class:`ResNet` uses the small stem."""


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` for ImageFolder inputs.

    Stem: for ``image_size >= 128`` the standard ``conv7x7 s2 p3 -BN-ReLU-
    MaxPool(3, 2, 1)``; for smaller inputs (CIFAR / Tiny-ImageNet sizes) a
    ``conv3x3 s1 -BN-ReLU`` stem without max pool. ``small_stem`` overrides the
    automatic choice. Four stages with ``width * (1, 2, 4, 8)`` channels (64..512
    by default), stride 2 at the first block of stages 2-4 and shortcut
    ``Sequential(Conv2d 1x1 bias=False, BatchNorm2d(affine=False))`` where the
    shape changes (identity otherwise), global average pool and a
    ``Linear(8*width, num_classes)`` ``classifier``.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        width: int = 64,
        small_stem: bool | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be 4 positive ints, got {tuple(blocks)}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if small_stem is None:
            small_stem = image_size < SMALL_STEM_BELOW
        self.image_size = image_size
        self.small_stem = small_stem
        if small_stem:
            self.stem = ConvBNReLU(in_channels, width, 3, stride=1)
            self.maxpool: nn.Module | None = None
        else:
            self.stem = ConvBNReLU(in_channels, width, 7, stride=2, padding=3)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width * m for m in (1, 2, 4, 8)]
        in_ch = width
        stages = []
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_ch, w, stride, shortcut="B")]
            layers += [BasicBlock(w, w, 1, shortcut="B") for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if self.maxpool is not None:  # structural (module attribute), fx-safe
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


class ResNet18(ResNet):
    """ResNet-18: :class:`ResNet` with ``blocks=(2, 2, 2, 2)``."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        width: int = 64,
        small_stem: bool | None = None,
    ) -> None:
        super().__init__((2, 2, 2, 2), num_classes, in_channels, image_size, width, small_stem)


def resnet18(
    num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, **kwargs
) -> ResNet18:
    return ResNet18(num_classes, in_channels, image_size, **kwargs)
