"""QuantizedConv2d / QuantizedLinear: layers computing with codes * alpha (+ bias)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tsquant import QuantizedConv2d, QuantizedLinear, WeightGrid


def random_codes(grid: WeightGrid, shape, gen) -> torch.Tensor:
    values = grid.values()
    return values[torch.randint(len(values), shape, generator=gen)].to(grid.code_dtype)


@pytest.mark.parametrize("spec", ["ternary", 2, "narrow:3"])
def test_conv_set_quantized_codes_and_forward(spec):
    gen = torch.Generator().manual_seed(0)
    grid = WeightGrid.from_spec(spec)
    conv = QuantizedConv2d.from_conv(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), grid)
    codes = random_codes(grid, (4, 27), gen)
    alpha = torch.rand(4, generator=gen) + 0.05
    bias = torch.randn(4, generator=gen)
    conv.set_quantized(codes, alpha, bias)
    assert conv.grid == grid
    assert conv.weight_codes.dtype == grid.code_dtype
    assert torch.equal(conv.weight_codes.reshape(4, -1), codes)
    x = torch.randn(2, 3, 9, 9, generator=gen)
    weight = (codes.float() * alpha[:, None]).reshape(4, 3, 3, 3)
    expected = F.conv2d(x, weight, bias, stride=2, padding=1)
    out = conv(x)
    assert out.shape == (2, 4, 5, 5)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["ternary", 3])
def test_linear_set_quantized_codes_and_forward(spec):
    gen = torch.Generator().manual_seed(1)
    grid = WeightGrid.from_spec(spec)
    linear = QuantizedLinear.from_linear(nn.Linear(10, 6), grid)
    codes = random_codes(grid, (6, 10), gen)
    alpha = torch.rand(6, generator=gen) + 0.05
    bias = torch.randn(6, generator=gen)
    linear.set_quantized(codes, alpha, bias)
    assert torch.equal(linear.weight_codes, codes)
    x = torch.randn(5, 10, generator=gen)
    expected = F.linear(x, codes.float() * alpha[:, None], bias)
    assert torch.allclose(linear(x), expected, rtol=1e-6, atol=1e-6)


def test_ste_gradient_reaches_the_latent_weight():
    gen = torch.Generator().manual_seed(2)
    conv = QuantizedConv2d(3, 4, 3, padding=1, grid="ternary")
    codes = random_codes(conv.grid, (4, 27), gen)
    alpha = torch.rand(4, generator=gen) + 0.1
    conv.set_quantized(codes, alpha, torch.zeros(4))
    with torch.no_grad():  # move the latent weight off the grid: the forward still uses codes
        conv.weight.add_(0.2 * alpha.reshape(-1, 1, 1, 1) * (torch.rand(4, 3, 3, 3) - 0.5))
    assert torch.equal(conv.weight_codes.reshape(4, -1), codes)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    upstream = torch.randn(2, 4, 6, 6, generator=gen)
    conv(x).backward(upstream)
    effective = (codes.float() * alpha[:, None]).reshape(4, 3, 3, 3).requires_grad_()
    F.conv2d(x, effective, torch.zeros(4), padding=1).backward(upstream)
    assert conv.weight.grad is not None
    assert conv.weight.grad.abs().sum() > 0
    u = conv.weight.detach() / alpha.reshape(-1, 1, 1, 1)
    inside = ((u >= -1) & (u <= 1)).float()  # the clip passes no gradient outside the grid
    assert 0 < inside.mean() < 1
    assert torch.allclose(conv.weight.grad, effective.grad * inside, rtol=1e-5, atol=1e-5)

    linear = QuantizedLinear(7, 3, grid=2)
    linear.set_quantized(random_codes(linear.grid, (3, 7), gen), torch.ones(3), torch.zeros(3))
    xl = torch.randn(4, 7, generator=gen)
    linear(xl).sum().backward()
    assert torch.allclose(linear.weight.grad, torch.ones(4, 3).T @ xl)


def test_grid_travels_with_the_state_dict():
    gen = torch.Generator().manual_seed(3)
    src = QuantizedConv2d(2, 3, 1, grid=3)
    src.set_quantized(random_codes(src.grid, (3, 2), gen), torch.rand(3) + 0.1, torch.randn(3))
    dst = QuantizedConv2d(2, 3, 1, grid="ternary")
    dst.load_state_dict(src.state_dict())
    assert dst.grid == WeightGrid.from_spec(3)
    assert torch.equal(dst.weight_codes, src.weight_codes)
    x = torch.randn(1, 2, 4, 4, generator=gen)
    assert torch.equal(dst(x), src(x))
    assert "grid=3bit" in repr(dst)


def test_alpha_gradient_stays_bounded_when_alpha_is_tiny():
    """A channel with a tiny scale must not receive a gradient that grows like w / alpha."""
    conv = QuantizedConv2d(2, 2, 1, grid="ternary")
    conv.set_quantized(torch.tensor([[1, -1], [0, 1]]), torch.tensor([1e-6, 0.5]), torch.zeros(2))
    with torch.no_grad():
        conv.weight.add_(1e-3)  # far outside the grid range of channel 0 once divided by alpha
    x = torch.randn(3, 2, 4, 4)
    conv(x).sum().backward()
    bound = x.abs().sum() * 1 * (2 * 1) ** -0.5  # |upstream| * |code| <= 1 * LSQ grad scale
    assert conv.alpha.grad.abs().max() <= bound
    assert conv.weight.grad[0].abs().max() == 0  # channel 0's latent weights are out of range
