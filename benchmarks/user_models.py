"""Models written the way users write them (issue 16's idioms), for benchmarks that must not
use tsquant's own model definitions: conv biases, affine BatchNorm, F.relu in forward, and
x.view(x.size(0), -1) before the classifier. Use as ``model.name:
benchmarks.user_models:affine_cnn`` from the repository root."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class AffineCNN(nn.Module):
    """Fashion-MNIST-sized CNN: [conv-BN-relu] x2, max pool, [conv-BN-relu] x2, max pool, fc."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 7 * 7, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def affine_cnn(**kwargs) -> AffineCNN:
    return AffineCNN(**kwargs)


def resnet20_affine(**kwargs) -> nn.Module:
    """tsquant's ResNet-20 with the usual affine BatchNorms (He et al. 2016) instead of the
    TSQ/HWGQ convention's non-affine ones: the FP-recipe comparison of benchmarks/RESULTS.md."""
    from tsquant.models import build_model

    model = build_model("resnet20", **kwargs)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, nn.BatchNorm2d(child.num_features))
    return model
