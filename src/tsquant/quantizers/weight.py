"""Low-bit weight grids and per-output-channel weight quantizers (TSQ-METHOD.md, "Step 2").

A weight of one output channel is ``alpha * code`` with integer codes on a uniform grid:

- ``ternary``: {-1, 0, +1};
- ``k`` bits (2..8): the symmetric mid-rise grid of 2^k levels, the odd integers
  {-(2^k - 1), ..., -3, -1, 1, 3, ..., 2^k - 1} (so 2 bits = {-3, -1, 1, 3}, four levels);
- ``narrow:k``: the symmetric grid with zero, {-(2^(k-1) - 1), ..., 2^(k-1) - 1}.

On every such grid the 1-D least-squares minimiser is "round u to the grid, then clip", which is
what the coordinate descent of the solver relies on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightGrid:
    low: int
    high: int
    spacing: int  # 1 for grids containing 0, 2 for the mid-rise (odd) grids
    name: str

    @classmethod
    def from_spec(cls, spec: str | int) -> WeightGrid:
        """``"ternary"``, an int 2..8 (mid-rise, 2^k levels) or ``"narrow:k"`` (with zero)."""
        if isinstance(spec, WeightGrid):
            return spec
        text = str(spec).strip().lower()
        if text == "ternary":
            return cls(-1, 1, 1, "ternary")
        narrow = text.startswith("narrow:")
        bits_text = text.split(":", 1)[1] if narrow else text
        if not bits_text.isdigit() or not 2 <= int(bits_text) <= 8:
            raise ValueError(
                f"unknown weight format {spec!r}: use 'ternary', an integer number of bits 2..8, "
                "or 'narrow:k' (symmetric with zero, 2^k - 1 levels)"
            )
        bits = int(bits_text)
        if narrow:
            top = 2 ** (bits - 1) - 1
            return cls(-top, top, 1, f"narrow:{bits}")
        top = 2**bits - 1
        return cls(-top, top, 2, f"{bits}bit")

    @classmethod
    def from_bounds(cls, low: int, high: int, spacing: int) -> WeightGrid:
        if (low, high, spacing) == (-1, 1, 1):
            return cls.from_spec("ternary")
        bits = (high + 1).bit_length() - 1 if spacing == 2 else (high + 1).bit_length()
        grid = cls.from_spec(f"narrow:{bits}" if spacing == 1 else bits)
        if (grid.low, grid.high, grid.spacing) != (low, high, spacing):
            raise ValueError(f"no weight grid with bounds {(low, high, spacing)}")
        return grid

    @property
    def num_levels(self) -> int:
        return (self.high - self.low) // self.spacing + 1

    @property
    def bits(self) -> int:
        return max(1, (self.num_levels - 1).bit_length())

    @property
    def information_bits(self) -> float:
        """log2 of the number of levels: ternary 1.585, k-bit k, narrow:k log2(2^k - 1); what a
        size budget counts (storage packs ternary into 2 bits)."""
        return math.log2(self.num_levels)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.high <= 127 else torch.int16

    def values(self) -> torch.Tensor:
        return torch.arange(self.low, self.high + 1, self.spacing, dtype=torch.float64)

    def round(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest grid integer (as float), ties away from the lower neighbour's side arbitrary."""
        if self.spacing == 1:
            r = torch.round(u)
        else:  # nearest odd integer
            r = 2 * torch.floor(u / 2) + 1
        return r.clamp(self.low, self.high)


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ternary approximation per output channel (OTWA).

    For each row w (weight reshaped to (c, n)) minimise ||w - alpha t||^2 over alpha > 0 and
    t in {-1,0,1}^n: with |w| sorted descending and S_r the sum of the top r, the best support
    is the top r maximising S_r^2 / r and alpha = S_r / r. Returns (codes int8 (c, n), alpha (c,)).
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    magnitude, order = w.abs().sort(dim=1, descending=True)
    sums = magnitude.cumsum(dim=1)
    counts = torch.arange(1, w.shape[1] + 1, dtype=w.dtype, device=w.device)
    best = (sums**2 / counts).argmax(dim=1)  # r - 1
    alpha = sums.gather(1, best[:, None]).squeeze(1) / (best + 1).to(w.dtype)
    keep_sorted = counts[None, :] <= (best + 1)[:, None].to(w.dtype)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    codes = (torch.sign(w) * keep).to(torch.int8)
    zero_rows = magnitude[:, 0] == 0
    alpha = torch.where(zero_rows, torch.ones_like(alpha), alpha)
    return codes, alpha.to(weight.dtype if weight.is_floating_point() else torch.float32)


def quantize_to_grid(
    weight: torch.Tensor, grid: WeightGrid | str | int, search_points: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and grid codes minimising ||w - alpha * code||^2.

    Ternary uses the exact OTWA rule; other grids alternate "codes = round(w / alpha)" and the
    closed-form alpha after a grid search over scales, which is exact up to the search grid.
    Returns (codes (c, n) in the grid's dtype, alpha (c,)).
    """
    grid = WeightGrid.from_spec(grid)
    if grid.name == "ternary":
        return ternarize(weight)
    w = weight.detach().reshape(weight.shape[0], -1).double()
    max_abs = w.abs().amax(dim=1).clamp_min(1e-12)

    def scan(fractions):
        """Best scan scale per channel (codes = round(w / scale), then least-squares alpha)."""
        best_err = torch.full_like(max_abs, float("inf"))
        best_scale = max_abs / grid.high
        for f in fractions:
            scale = max_abs * f / grid.high
            codes = grid.round(w / scale[:, None])
            alpha_ls = (w * codes).sum(1) / (codes * codes).sum(1).clamp_min(1e-12)
            err = ((w - alpha_ls[:, None] * codes) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
        return best_scale

    # the best scale may leave the top level unused, hence fractions above 1
    coarse = torch.linspace(0.05, 1.5, search_points, dtype=w.dtype)
    spacing = float(coarse[1] - coarse[0])
    best = scan(coarse)
    fine = torch.linspace(-spacing, spacing, 41, dtype=w.dtype)
    best = scan([(best * grid.high / max_abs) + t for t in fine])
    codes = grid.round(w / best[:, None])
    alpha = (w * codes).sum(1) / (codes * codes).sum(1).clamp_min(1e-12)
    return codes.to(grid.code_dtype), alpha.to(torch.float32)


def dequantize(codes: torch.Tensor, alpha: torch.Tensor, shape: torch.Size | None = None):
    w = codes.float() * alpha.float().reshape(-1, *([1] * (codes.dim() - 1)))
    return w.reshape(shape) if shape is not None else w
