"""Shared building blocks for the ``tsquant.models`` zoo.

Every model in this package follows the conventions that the TSQ model-surgery
pass (``torch.fx`` based) relies on:

* each Conv2d / Linear that feeds an activation has ``bias=False`` and is
  followed *directly* by ``BatchNorm2d`` / ``BatchNorm1d`` with ``affine=False``
  (as in the TSQ authors' released AlexNet), then by an ``nn.ReLU`` module;
* every ReLU call site owns a distinct ``nn.ReLU`` instance (never reused and
  never the functional ``F.relu``);
* pooling, if any, comes *after* the ReLU (activation before pooling);
* residual blocks compute ``relu_out(bn2(conv2(h)) + shortcut(x))``, i.e. the
  add sits between the BatchNorm and the ReLU;
* the first layer is a Conv2d and the last layer is an ``nn.Linear`` with
  ``bias=True`` named ``classifier`` with no BatchNorm after it;
* models are ``torch.fx.symbolic_trace``-able (no Python control flow on tensor
  values in ``forward``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "ConvBNReLU",
    "LinearBNReLU",
    "OptionAShortcut",
    "bn1d",
    "bn2d",
    "init_weights",
    "pooled_size",
]


def bn2d(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d without learnable affine parameters (TSQ/HWGQ convention)."""
    return nn.BatchNorm2d(channels, affine=False)


def bn1d(features: int) -> nn.BatchNorm1d:
    """BatchNorm1d without learnable affine parameters (TSQ/HWGQ convention)."""
    return nn.BatchNorm1d(features, affine=False)


class ConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d(affine=False) -> ReLU``.

    Submodules are named ``conv``, ``bn`` and ``relu`` (a fresh ``nn.ReLU`` per
    instance). Being a ``nn.Sequential`` subclass defined outside ``torch.nn`` it
    is traced through by ``torch.fx`` (not treated as a leaf).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
    ) -> None:
        if padding is None:
            padding = kernel_size // 2
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = bn2d(out_channels)
        self.relu = nn.ReLU()


class LinearBNReLU(nn.Sequential):
    """``Linear(bias=False) -> BatchNorm1d(affine=False) -> ReLU``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features, bias=False)
        self.bn = bn1d(out_features)
        self.relu = nn.ReLU()


class OptionAShortcut(nn.Module):
    """Parameter-free "option A" shortcut of He et al. (2016) for CIFAR ResNets.

    Spatially subsamples by ``stride`` (``x[:, :, ::s, ::s]``) and zero-pads the
    channel dimension from ``in_channels`` to ``out_channels`` (split evenly
    between front and back, as in the common reference implementation). All
    amounts are Python ints fixed at construction time, so the module traces
    cleanly with ``torch.fx.symbolic_trace`` (it is inlined as a ``getitem`` and
    a ``pad`` node).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option-A shortcut cannot reduce channels ({in_channels} -> {out_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        extra = out_channels - in_channels
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        x = x[:, :, ::s, ::s]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu_out(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` selects the projection used when the shape changes:

    * ``"A"``: parameter-free :class:`OptionAShortcut` (CIFAR ResNets);
    * ``"B"``: ``nn.Sequential(Conv2d 1x1 bias=False, BatchNorm2d(affine=False))``
      (ImageNet ResNets).

    When input and output shapes agree the shortcut is ``nn.Identity``.
    """

    expansion = 1

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = bn2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = OptionAShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn2d(out_channels),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu_out(self.bn2(self.conv2(h)) + self.shortcut(x))


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan_out, ReLU gain) init for every Conv2d; Linear keeps
    PyTorch's default init. BatchNorm layers are ``affine=False`` and have no
    parameters to initialise. Returns ``model`` for chaining."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def pooled_size(image_size: int, num_pools: int, model: str) -> int:
    """Spatial size after ``num_pools`` ``MaxPool2d(2)`` layers (floor division),
    raising ``ValueError`` when the input is too small."""
    if not isinstance(image_size, int) or image_size < 2**num_pools:
        raise ValueError(f"{model} needs image_size >= {2**num_pools}, got {image_size!r}")
    size = image_size
    for _ in range(num_pools):
        size //= 2
    return size
