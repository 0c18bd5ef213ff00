"""The conventions checker itself must reject models that break the conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Good(nn.Module):
    def __init__(self, bn_affine=False, conv_bias=False, hidden_bias=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=conv_bias)
        self.bn = nn.BatchNorm2d(4, affine=bn_affine)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 8, bias=hidden_bias)
        self.bn_fc = nn.BatchNorm1d(8, affine=False)
        self.relu_fc = nn.ReLU()
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = self.relu_fc(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class ReusedRelu(Good):
    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = self.relu(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class SharedReluInstance(Good):
    def __init__(self):
        super().__init__()
        self.relu_fc = self.relu


class FunctionalRelu(Good):
    def __init__(self):
        super().__init__()
        del self.relu_fc

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv(x))))
        x = F.relu(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class PoolBeforeRelu(Good):
    def forward(self, x):
        x = self.relu(self.pool(self.bn(self.conv(x))))
        x = self.relu_fc(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class ReluOnConv(Good):
    def forward(self, x):
        x = self.pool(self.relu(self.conv(x)))
        x = self.relu_fc(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class AddAfterRelu(Good):
    """Residual add after the ReLU (post-activation add): not allowed."""

    def forward(self, x):
        h = self.bn(self.conv(x))
        x = self.pool(self.relu(h) + h)
        x = self.relu_fc(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class Good2(Good):
    def forward(self, x):
        h = self.conv(x)
        x = self.pool(self.relu(self.bn(h) + x[:, :1]))
        x = self.relu_fc(self.bn_fc(self.fc(torch.flatten(x, 1))))
        return self.classifier(x)


class BnAfterClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(4, 3)
        self.bn_out = nn.BatchNorm1d(3, affine=False)

    def forward(self, x):
        x = torch.flatten(self.relu(self.bn(self.conv(x))).mean((2, 3), keepdim=True), 1)
        return self.bn_out(self.classifier(x))


def test_checker_accepts_conforming_models(check_conventions):
    check_conventions(Good())
    check_conventions(Good2())


@pytest.mark.parametrize(
    "model, pattern",
    [
        (Good(bn_affine=True), "affine=False"),
        (Good(conv_bias=True), "bias=False"),
        (Good(hidden_bias=True), "bias=False"),
        (ReusedRelu(), "more than once|never called"),
        (SharedReluInstance(), "reused"),
        (FunctionalRelu(), "functional relu"),
        (PoolBeforeRelu(), "pooling input|ReLU input"),
        (ReluOnConv(), "ReLU input|followed directly"),
        (AddAfterRelu(), "ReLU input|followed directly|add"),
        (BnAfterClassifier(), "bias=False|output"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_checker_rejects_violations(model, pattern, check_conventions):
    with pytest.raises(AssertionError, match=pattern):
        check_conventions(model)
