"""Small 4-conv CNN for 28x28 grayscale inputs (MNIST / Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .common import ConvBNReLU, init_weights, pooled_size

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """``[conv3x3(w)-BN-ReLU] x2 - MP2 - [conv3x3(2w)-BN-ReLU] x2 - MP2 - Linear``.

    With the default ``width=32`` the channels are 32/32/64/64 and, for
    ``image_size=28``, the classifier is ``Linear(64*7*7, num_classes)``. Other
    input sizes are accepted; the classifier input is
    ``2*width * (image_size//4)**2``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        side = pooled_size(image_size, 2, "SmallCNN")
        self.image_size = image_size
        self.conv1 = ConvBNReLU(in_channels, width)
        self.conv2 = ConvBNReLU(width, width)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = ConvBNReLU(width, 2 * width)
        self.conv4 = ConvBNReLU(2 * width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.classifier = nn.Linear(2 * width * side * side, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.pool2(self.conv4(self.conv3(x)))
        return self.classifier(torch.flatten(x, 1))


def small_cnn(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs
) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, image_size, **kwargs)
