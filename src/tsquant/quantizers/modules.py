"""Thin modules for layers whose weights live on a low-bit grid (the output of step 2).

The weight parameter is kept as latent full precision so a short STE fine-tune can move it;
the forward pass always uses ``alpha * round_to_grid(weight / alpha)``, so the layer computes
with exactly ternary (or k-bit) weights times a per-channel scale at any moment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activation import QParamsModule
from .weight import WeightGrid


class _RoundToGridSTE(torch.autograd.Function):
    """Round to the grid; straight-through inside the grid's range, zero outside (the clip's
    gradient, as in LSQ). Passing gradient outside the range lets d/d alpha grow like w / alpha
    and blows alpha up for channels whose alpha is small (seen on ResNet-20: top-1 76 % -> 16 %
    in one fine-tune epoch)."""

    @staticmethod
    def forward(ctx, u, grid: WeightGrid):
        ctx.save_for_backward((u >= grid.low) & (u <= grid.high))
        return grid.round(u)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside.to(grad_out.dtype), None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient times ``factor``."""
    return x * factor + (x - x * factor).detach()


class _GridWeightMixin:
    """Shared by QuantizedConv2d and QuantizedLinear: the grid, per-channel alpha and codes."""

    def _init_grid(self, grid: WeightGrid | str | int) -> None:
        grid = WeightGrid.from_spec(grid)
        self.alpha = nn.Parameter(torch.ones(self.out_channels_))
        # a buffer, so the grid travels with the (safetensors) state dict
        self.register_buffer("grid_bounds", torch.tensor([grid.low, grid.high, grid.spacing]))

    @property
    def grid(self) -> WeightGrid:
        return WeightGrid.from_bounds(*(int(v) for v in self.grid_bounds))

    @property
    def out_channels_(self) -> int:
        return self.weight.shape[0]

    def _alpha_view(self) -> torch.Tensor:
        return self.alpha.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def set_quantized(self, codes: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None):
        with torch.no_grad():
            self.alpha.copy_(alpha.reshape(-1))
            self.weight.copy_(
                codes.reshape(self.weight.shape).to(self.weight.dtype) * self._alpha_view()
            )
            if bias is not None:
                self.bias.copy_(bias)

    @property
    def weight_codes(self) -> torch.Tensor:
        with torch.no_grad():
            return self.grid.round(self.weight / self._alpha_view()).to(self.grid.code_dtype)

    def quantized_weight(self) -> torch.Tensor:
        """alpha * round(w / alpha); alpha's gradient scaled by 1 / sqrt(fan_in * top level)
        as LSQ does for its step, so the scale moves at the pace of the weights."""
        grid = self.grid
        factor = (self.weight[0].numel() * grid.high) ** -0.5
        alpha = scale_grad(self.alpha, factor).reshape(self._alpha_view().shape)
        return _RoundToGridSTE.apply(self.weight / alpha, grid) * alpha


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Constructor arguments of a conv with the shape and arithmetic of ``conv`` (no bias flag)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
    }


class QuantizedConv2d(_GridWeightMixin, nn.Conv2d):
    def __init__(self, *args, grid: WeightGrid | str | int = "ternary", **kwargs):
        kwargs["bias"] = True
        super().__init__(*args, **kwargs)
        self._init_grid(grid)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, grid) -> QuantizedConv2d:
        return cls(**conv_geometry(conv), grid=grid).to(device=conv.weight.device)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", grid={self.grid.name}"


class QuantizedLinear(_GridWeightMixin, nn.Linear):
    def __init__(self, in_features, out_features, grid: WeightGrid | str | int = "ternary"):
        super().__init__(in_features, out_features, bias=True)
        self._init_grid(grid)

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid) -> QuantizedLinear:
        new = cls(linear.in_features, linear.out_features, grid=grid)
        return new.to(device=linear.weight.device)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", grid={self.grid.name}"


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, top: int):
        return torch.round(x / scale).clamp(-top, top) * scale

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None


class InputQuantizer(QParamsModule):
    """Symmetric signed k-bit quantization of the network's input (default 8 bits): value =
    code * scale with integer codes in [-(2^(k-1) - 1), 2^(k-1) - 1]. Put in front of an int8
    first layer, it makes the network integer from its input scaling on."""

    def __init__(self, scale: float = 1.0, bits: int = 8):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"input bits must be in 2..8, got {bits!r}")
        if not scale > 0:
            raise ValueError(f"input scale must be > 0, got {scale!r}")
        self.register_buffer("qparams", torch.tensor([bits, scale], dtype=torch.float64))

    @property
    def scale(self) -> float:
        return float(self.qparams[1])

    @property
    def top(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @classmethod
    def from_data(cls, max_abs: float, bits: int = 8) -> InputQuantizer:
        """The scale that maps the largest input magnitude seen to the largest code."""
        top = 2 ** (bits - 1) - 1
        return cls(max(float(max_abs), 1e-12) / top, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RoundSTE.apply(x, self.scale, self.top)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.scale).clamp(-self.top, self.top).to(torch.int32)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:.4g}"
