"""Output-space rounding of full-precision weights onto the grid: the tsquant start of step 2.

The spec starts step 2 from OTWA (TSQ-METHOD.md, step 2, "Initialisation"): each filter is
rounded to the nearest grid vector in weight space. What step 2 fits is the layer's output
X w, so this start rounds in output space instead, minimising ||X (alpha w - w_fp)||^2 per
channel: GPTQ's sequential rounding with error feedback (Frantar et al., ICLR 2023) rounds one
coordinate at a time and spreads its rounding error over the coordinates not yet rounded,
through the upper Cholesky factor U of (A + damping)^-1, A = X'X. Every channel, and every
candidate scale, shares A, so one pass rounds them all; a search over multiples of the
weight-space scale keeps, per channel, the rounding with the lowest output error.
"""

from __future__ import annotations

import torch

from ..quantizers.weight import WeightGrid, quantize_to_grid

# multiples of the weight-space (OTWA / grid-search) scale tried per channel
DEFAULT_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
_BLOCK = 128  # coordinates rounded between two matrix-product updates of the rest


def weight_space_rounding(
    weights: torch.Tensor, grid: WeightGrid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's start: codes (n, c) float64 and alpha (c,) float64 nearest to weights (c, n)
    in weight space (OTWA for ternary, quantize_to_grid)."""
    codes, alpha = quantize_to_grid(weights, grid)
    return codes.double().T.contiguous(), alpha.double()


def gptq_round(
    gram_matrix: torch.Tensor, targets_t: torch.Tensor, grid: WeightGrid, damp: float = 0.01
) -> torch.Tensor:
    """Grid codes (n, k) for targets_t (n, k), in grid units (w / alpha), by sequential
    rounding with error feedback on the quadratic (w - u)' A (w - u).

    damp: ridge added to A relative to its mean diagonal (A may be singular). Raises
    torch.linalg.LinAlgError when A + ridge is not positive definite."""
    n = gram_matrix.shape[0]
    a = gram_matrix.double()
    ridge = damp * a.diagonal().mean().clamp_min(1e-300)
    h = a + ridge * torch.eye(n, dtype=a.dtype, device=a.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = targets_t.double().clone()
    codes = torch.empty_like(work)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        block = work[start:stop]
        errors = torch.empty_like(block)
        for j in range(stop - start):
            row = start + j
            codes[row] = grid.round(block[j])
            errors[j] = (block[j] - codes[row]) / upper[row, row]
            block[j + 1 :] -= upper[row, row + 1 : stop, None] * errors[j][None, :]
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return codes


def output_space_rounding(
    gram_matrix: torch.Tensor,
    weights_t: torch.Tensor,
    grid: WeightGrid,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (n, c) float64 and alpha (c,) for full-precision weights_t (n, c), minimising the
    output error ||X (alpha w - w_fp)||^2 per channel over the candidate scales.

    Falls back to the weight-space rounding (OTWA for ternary) where A carries no information
    (all-zero inputs) or is numerically unusable."""
    weights_t = weights_t.double()
    c = weights_t.shape[1]
    codes0, alpha0 = weight_space_rounding(weights_t.T, grid)
    a = gram_matrix.double()
    if not bool(a.diagonal().sum() > 0):
        return codes0, alpha0
    scaled = torch.cat([alpha0 * s for s in scales]).clamp_min(1e-12)  # (S c,)
    try:
        codes = gptq_round(a, weights_t.repeat(1, len(scales)) / scaled[None, :], grid, damp)
    except torch.linalg.LinAlgError:
        return codes0, alpha0
    # the weight-space rounding competes too: the result is never worse in output space
    codes = torch.cat([codes0, codes], dim=1)  # (n, (S + 1) c)
    candidates = len(scales) + 1
    # per candidate: least-squares alpha for its codes; output error up to a constant
    cross = (codes * (a @ weights_t).repeat(1, candidates)).sum(0)  # w' A w_fp
    quad = (codes * (a @ codes)).sum(0)  # w' A w
    usable = (quad > 0) & (cross > 0)
    alpha = torch.where(usable, cross / quad.clamp_min(1e-300), torch.cat([alpha0, scaled]))
    error = torch.where(usable, -(cross * cross) / quad.clamp_min(1e-300), 0.0)
    best = error.view(candidates, c).argmin(0)  # ties: the earliest, the weight-space rounding
    pick = best * c + torch.arange(c, device=best.device)
    return codes[:, pick].contiguous(), alpha[pick]
