"""AlexNet with BatchNorm in the style of the HWGQ / TSQ releases (ImageFolder inputs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ConvBNReLU, LinearBNReLU, init_weights

__all__ = ["AlexNetBN", "alexnet_bn"]

SMALL_STEM_BELOW = 128
"""Default ``image_size`` threshold under which :class:`AlexNetBN` uses the small stem."""


def _out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class AlexNetBN(nn.Module):
    """AlexNet-BN: no biases, ``BatchNorm(affine=False)`` after every conv / fc
    except the classifier, ReLU before pooling, no dropout, no LRN, no groups.

    Layout (``features`` then ``fc6``, ``fc7``, ``classifier``)::

        conv1 96  -BN-ReLU-MaxPool(3,2)
        conv2 256 5x5 p2 -BN-ReLU-MaxPool(3,2)
        conv3 384 3x3 p1 -BN-ReLU
        conv4 384 3x3 p1 -BN-ReLU
        conv5 256 3x3 p1 -BN-ReLU-AdaptiveMaxPool(6x6)
        fc6 (256*6*6 -> fc_width) -BN1d-ReLU
        fc7 (fc_width -> fc_width) -BN1d-ReLU
        classifier Linear(fc_width -> num_classes, bias=True)

    Stem: for ``image_size >= 128`` conv1 is the standard 11x11 stride 4
    (padding 2); for smaller inputs (e.g. 64x64 Tiny-ImageNet style) it is
    5x5 stride 2 (padding 2), which gives roughly the same feature-map sizes
    as the standard stem at twice the resolution (112 -> 13x13 at conv5 like
    224). ``small_stem`` overrides the automatic choice.

    The last pooling is ``AdaptiveMaxPool2d((6, 6))``: at 13x13 (224 input) it
    uses exactly the windows of ``MaxPool2d(3, 2)``, so the standard model is
    reproduced, while other input sizes still give a fixed 256x6x6 feature
    (feature maps smaller than 6x6, e.g. 128 -> 7, 100 -> 3, are pooled or
    replicated by the adaptive pool).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        image_size: int = 224,
        fc_width: int = 4096,
        small_stem: bool | None = None,
    ) -> None:
        super().__init__()
        if fc_width < 1:
            raise ValueError(f"fc_width must be >= 1, got {fc_width}")
        if small_stem is None:
            small_stem = image_size < SMALL_STEM_BELOW
        k, s = (5, 2) if small_stem else (11, 4)
        # feature-map size before pool2 must be >= 3 for the (3, 2) max pools
        side = _out(image_size, k, s, 2)
        side = _out(side, 3, 2) if side >= 3 else 0
        if side < 3:
            raise ValueError(
                f"AlexNetBN: image_size={image_size} too small for the "
                f"{'small' if small_stem else 'standard'} stem"
            )
        self.image_size = image_size
        self.small_stem = small_stem
        self.features = nn.Sequential(
            ConvBNReLU(in_channels, 96, k, stride=s, padding=2),
            nn.MaxPool2d(3, 2),
            ConvBNReLU(96, 256, 5, padding=2),
            nn.MaxPool2d(3, 2),
            ConvBNReLU(256, 384, 3),
            ConvBNReLU(384, 384, 3),
            ConvBNReLU(384, 256, 3),
            nn.AdaptiveMaxPool2d((6, 6)),
        )
        self.fc6 = LinearBNReLU(256 * 6 * 6, fc_width)
        self.fc7 = LinearBNReLU(fc_width, fc_width)
        self.classifier = nn.Linear(fc_width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(self.fc7(self.fc6(x)))


def alexnet_bn(
    num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, **kwargs
) -> AlexNetBN:
    return AlexNetBN(num_classes, in_channels, image_size, **kwargs)
