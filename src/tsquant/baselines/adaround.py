"""AdaRound-style learned rounding of one layer, on step 2's own problem (a speed/quality baseline).

Same rows X, targets, residual offsets, BN-folded bias and weight grid as the TSQ solver
(`tsquant.solver.solve_layer`): per channel the scale alpha comes from rounding the BN-folded
step-1 weights to the grid (OTWA for ternary) and stays fixed, as in AdaRound; each weight picks
floor or ceil of w / alpha on the grid through a learned soft mask h(V) (rectified sigmoid),
trained with Adam on the activation-aware reconstruction error

    || clip(alpha X w + bias + offset, 0, top level) - y ||^2     (coded layers: y = step-1 codes)
    || alpha X w + bias - t ||^2                                  (linear targets)

plus the annealed rounding regulariser lambda * sum(1 - |2h - 1|^beta) (Nagel et al., ICML 2020,
"Up or Down? Adaptive Rounding for Post-Training Quantization": 10,000 iterations, batches of 32
images, lambda 0.01, beta 20 -> 2 after a 20 % warm-up, Adam 1e-3). Here a batch is
``batch_rows`` sampled rows of the layer's stored rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..options import option
from ..quantizers.activation import SparseQuantizer
from ..quantizers.weight import WeightGrid, quantize_to_grid
from ..solver import LayerProblem, LayerSolution
from ..solver.rows import RowStore, as_row_store

ZETA, GAMMA = 1.1, -0.1  # rectified-sigmoid stretch (AdaRound)


@dataclass(frozen=True)
class AdaRoundConfig:
    """Options of method ``adaround`` (defaults: the AdaRound paper's)."""

    iters: int = option(10_000, "Adam iterations per layer")
    batch_rows: int = option(2048, "rows per Adam step (32 images x 64 sampled positions)")
    lr: float = option(1e-3, "Adam learning rate")
    reg_weight: float = option(0.01, "weight lambda of the rounding regulariser")
    beta_start: float = option(20.0, "regulariser exponent beta at the end of the warm-up")
    beta_end: float = option(2.0, "regulariser exponent beta at the last iteration")
    warmup: float = option(0.2, "fraction of the iterations without the regulariser")

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"adaround iters must be an integer >= 1, got {self.iters!r}")
        if self.batch_rows < 1 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise ValueError("adaround needs batch_rows >= 1, lr > 0 and 0 <= warmup < 1")


def _soft(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _sample(store: RowStore, rows: torch.Tensor) -> torch.Tensor:
    """Rows (global indices, sorted) of a store, decoded."""
    out, start = [], 0
    for i, n in enumerate(store.block_rows):
        picked = rows[(rows >= start) & (rows < start + n)] - start
        if picked.numel():
            out.append(store.rows_at(i, picked))
        start += n
    return torch.cat(out)


def adaround_layer(
    X: torch.Tensor | RowStore,
    Y: torch.Tensor | RowStore,
    quantizer: SparseQuantizer | None,
    init: torch.Tensor,
    weight_bits: str | int = "ternary",
    bias: torch.Tensor | None = None,
    offset: torch.Tensor | RowStore | None = None,
    config: AdaRoundConfig | None = None,
    chunk_rows: int = 16384,
    seed: int = 0,
) -> LayerSolution:
    """Learned rounding of init (c, n) on the grid; quantizer None: a linear-target layer."""
    start = time.perf_counter()
    cfg = config or AdaRoundConfig()
    grid = WeightGrid.from_spec(weight_bits)
    xs, ys = as_row_store(X, chunk_rows), as_row_store(Y, chunk_rows)
    offs = None if offset is None else as_row_store(offset, chunk_rows)
    device = xs.device
    c = ys.width
    init = init.reshape(c, -1).to(device)
    codes0, alpha = quantize_to_grid(init, grid)
    alpha = alpha.to(device).float()
    bias = torch.zeros(c, device=device) if bias is None else bias.to(device).float()
    # grid positions k = (code - low) / spacing in [0, top]; w / alpha between floor and floor + 1
    top = (grid.high - grid.low) // grid.spacing
    position = (init / alpha[:, None] - grid.low) / grid.spacing
    floor = position.floor().clamp(0, top - 1)
    rest = (position - floor).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()
    opt = torch.optim.Adam([v], lr=cfg.lr)
    level_top = (2**quantizer.bits - 1) * quantizer.step if quantizer is not None else None
    gen = torch.Generator().manual_seed(seed)
    warm = int(cfg.warmup * cfg.iters)
    batch = min(cfg.batch_rows, xs.rows)

    def weights(h):
        return (grid.low + grid.spacing * (floor + h).clamp(0, top)) * alpha[:, None]

    for it in range(cfg.iters):
        rows = torch.randperm(xs.rows, generator=gen)[:batch].sort().values.to(device)
        x, y = _sample(xs, rows), _sample(ys, rows)
        h = _soft(v)
        pre = x @ weights(h).T + bias
        if offs is not None:
            pre = pre + _sample(offs, rows)
        out = pre.clamp(0, level_top) if quantizer is not None else pre
        loss = (out - y).pow(2).sum(1).mean()
        if it >= warm:  # rounding regulariser with beta annealed from beta_start to beta_end
            frac = (it - warm) / max(1, cfg.iters - warm)
            beta = cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (
                1 + math.cos(math.pi * frac)
            )
            loss = loss + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        hard = (v >= 0).float()  # h(V) > 0.5: round up
        codes = (grid.low + grid.spacing * (floor + hard).clamp(0, top)).to(grid.code_dtype)
    solution = LayerSolution(weight_codes=codes, alpha=alpha, bias=bias)
    _score(solution, xs, ys, offs, quantizer, codes0.to(device), chunk_rows)
    solution.seconds = time.perf_counter() - start
    return solution


def _score(solution, xs, ys, offs, quantizer, codes0, chunk_rows) -> None:
    """Agreement (coded layers) or relative error (linear), before (plain rounding) and after."""
    alpha, bias = solution.alpha.double(), solution.bias.double()
    if quantizer is not None:
        problem = LayerProblem(xs, ys, quantizer, offs, chunk_rows)
        for codes, field in ((codes0, "agreement_init"), (solution.weight_codes, "agreement")):
            _, agree = problem.true_error(problem.projections(codes.double()), alpha, bias)
            setattr(solution, field, float(agree.sum()) / (problem.m * ys.width))
        return
    mean = sum(t.sum(0, dtype=torch.float64) for t in ys.blocks()) / ys.rows
    spread = sum(float(((t.double() - mean) ** 2).sum()) for t in ys.blocks())
    for codes, field in (
        (codes0, "relative_error_init"),
        (solution.weight_codes, "relative_error"),
    ):
        w = codes.double().T * alpha
        err = 0.0
        for x, t in zip(xs.blocks(), ys.blocks(), strict=True):
            err += float(((t.double() - x.double() @ w - bias) ** 2).sum())
        setattr(solution, field, err / max(spread, 1e-12))
