"""Step 2: transformation-function learning for one layer (TSQ-METHOD.md, "Step 2").

For every output channel at once, with pre-activation p = alpha * X w + bias + offset:

    minimise ||y - Q(z)||^2 + lam * ||z - p||^2   over alpha > 0, w on a low-bit grid, z

by alternating the closed-form alpha step, coordinate descent on w and the element-wise z step.
Pure tensor math: no module, no model. ``offset`` is the known residual shortcut (spec,
"Residual networks"); ``bias``/``init`` carry the folded non-affine BN (spec, "BN").

Two variants:
- ``paper``: the plain alternation of the spec (z may sit exactly on a bin edge, bias fixed).
- ``tsquant`` (default): started from the step-1 weights rounded in output space
  (rounding.py) instead of OTWA, z kept ``margin * d`` inside its bin, bias updated in closed form,
  lam grown geometrically so the relaxation tightens, alpha and bias re-fitted after every w
  step on the squared distance of p to the target bins (convex, Newton), the best iterate on
  the true objective kept, and a final per-channel search of alpha and bias on the true
  objective ||y - Q(p)||^2. README, "Step 2: the solver and its two variants", has the figures.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..options import check_choices, option
from ..quantizers.activation import SparseQuantizer, count_edges_below
from ..quantizers.weight import WeightGrid
from .rounding import output_space_rounding, weight_space_rounding
from .rows import RowStore, as_row_store
from .statistics import gram


@dataclass(frozen=True)
class SolverConfig:
    """Options of the step-2 solver, method ``tsq`` (TSQ-METHOD.md, "Step 2")."""

    weight_bits: str | int = option(
        "ternary",
        "weight format of the layer (solve_layer's own; in transform() it is set per layer by "
        "TransformConfig.weight_bits / layer_formats)",
    )
    lam: float = option(3.0, "lambda of the relaxed objective")
    iters: int = option(20, "alternations per layer")
    variant: Literal["tsquant", "paper"] = option(
        "tsquant",
        "tsquant (margin, bias step, hinge alpha fit, refinement) or paper (the spec's plain "
        "alternation, from the OTWA start)",
    )
    start: Literal["gptq", "otwa"] | None = option(
        None,
        "rounding of the step-1 weights the alternation starts from: gptq (output space, scale "
        "search) or otwa (weight space, the paper's); unset: the variant's (tsquant gptq, "
        "paper otwa)",
    )
    cd_sweeps: int = option(4, "coordinate-descent sweeps per w step (stops when nothing changes)")
    margin: float = option(0.05, "tsquant: z stays this fraction of a bin inside its bin")
    lam_growth: float = option(1.3, "tsquant: lam multiplied by this after every alternation")
    learn_bias: bool = option(True, "tsquant: closed-form bias step (paper: the BN bias, fixed)")
    fit_scale: bool = option(True, "tsquant: alpha/bias by the squared-hinge fit after each w step")
    refine: bool = option(True, "tsquant: final alpha/bias search on the true objective")
    # with an init: the first alternations aim z near its bin centre (small lam, wide margin),
    # a target not anchored at the current pre-activation, so w steps repair codes
    repair_iters: int = option(6, "tsquant: alternations aimed at the bin centres first")
    repair_margin: float = option(0.45, "tsquant: margin of the repair alternations")
    repair_lam: float = option(0.3, "tsquant: lam of the repair alternations")
    patience: int = option(
        3,
        "tsquant: after the repair phase, stop when the per-channel best iterate has not "
        "improved (by 1e-4 relative) for this many alternations; 0: run until w stops moving",
    )
    refine_points: int = option(9, "tsquant: grid points per round of the final search")
    refine_rounds: int = option(2, "tsquant: rounds of the final search")
    ridge: float = option(1e-4, "relative ridge of the least-squares initialisation")
    keep_best: Literal["error", "agreement"] = option(
        "error",
        "tsquant: per channel, the iterate kept is the best seen (the start included) on error "
        "(the true objective ||y - Q(p)||^2) or agreement (codes reproduced)",
    )
    linear_ridge: float = option(
        0.0,
        "linear targets (no quantizer after the layer): ridge toward the start weights, "
        "relative to the mean diagonal of X'X, for heads with fewer rows than inputs; 0: none",
    )
    chunk_rows: int = option(16384, "rows per chunk of the streamed passes (memory, not results)")

    def __post_init__(self):
        check_choices(self)
        WeightGrid.from_spec(self.weight_bits)
        if self.variant == "paper" and self.start == "gptq":
            raise ValueError(
                "variant paper starts from the paper's otwa rounding, not start gptq: drop start "
                "or use variant tsquant"
            )
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam!r}: try lam=3.0")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an integer >= 0, got {self.iters!r}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {self.margin!r}")
        if self.lam_growth < 1:
            raise ValueError(f"lam_growth must be >= 1, got {self.lam_growth!r}")
        if not (math.isfinite(self.linear_ridge) and self.linear_ridge >= 0):
            raise ValueError(f"linear_ridge must be >= 0, got {self.linear_ridge!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {self.patience!r}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be an integer >= 1, got {self.chunk_rows!r}")

    @property
    def effective(self) -> SolverConfig:
        """The options as run: the paper variant switches every addition off; the start is
        the variant's when unset."""
        if self.variant == "paper":
            return replace(
                self,
                start="otwa",
                margin=0.0,
                lam_growth=1.0,
                learn_bias=False,
                fit_scale=False,
                refine=False,
                repair_iters=0,
                patience=0,
            )
        return self if self.start else replace(self, start="gptq")


@dataclass
class LayerSolution:
    """Result of :func:`solve_layer`: output = Q(X @ (weight_codes * alpha[:, None]).T + bias)."""

    weight_codes: torch.Tensor  # (c, n) int8 (int16 for 8-bit mid-rise grids)
    alpha: torch.Tensor  # (c,)
    bias: torch.Tensor  # (c,)
    history: list[dict] = field(default_factory=list)
    agreement_init: float = float("nan")  # code agreement of the initial (quantized init) weights
    agreement: float = float("nan")  # final code agreement on the true quantized output
    relative_error_init: float = float("nan")  # linear targets: ||t - p||^2 / ||t - mean t||^2
    relative_error: float = float("nan")
    seconds: float = 0.0

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_codes.float() * self.alpha[:, None].float()


class LayerProblem:
    """One layer's data, read block by block (TSQ-METHOD.md, step 2).

    X, the targets and the residual offsets are :class:`RowStore` s with the same blocks; every
    per-row quantity (projections s = X W', pre-activations, z) is formed one block at a time and
    only sums over rows are kept, except the float32 projections s, which are reused by the many
    passes of the alpha/bias fits. The target codes are kept as uint8.
    """

    def __init__(self, x, targets, quantizer: SparseQuantizer, offset, chunk_rows):
        self.x = as_row_store(x, chunk_rows)
        self.chunk_rows = chunk_rows
        self.step = quantizer.step
        self.bits = quantizer.bits
        device = self.x.device
        # per-element work is float32 (as the model computes it); sums are accumulated in float64
        self.edges = quantizer.thresholds().to(device=device, dtype=torch.float32)
        target_store = as_row_store(targets, chunk_rows)
        self.offset = None if offset is None else as_row_store(offset, chunk_rows)
        for other in (target_store, self.offset):
            if other is not None and other.block_rows != self.x.block_rows:
                raise ValueError("X, targets and offsets must be stored in the same row blocks")
        self.code_blocks = [
            quantizer.encode(t).to(device=device, dtype=torch.uint8) for t in target_store.blocks()
        ]
        self.m = self.x.rows
        self._projections: torch.Tensor | None = None  # (m, c) buffer behind projections()

    @functools.cached_property
    def gram(self) -> torch.Tensor:
        """X'X in float64, built on first use (scoring a solution needs no Gram)."""
        return gram(self.x).gram

    @property
    def target_codes(self) -> torch.Tensor:
        """All target codes (m, c) as int64 (for tests and small problems)."""
        return torch.cat(self.code_blocks).long()

    def bin_bounds(self, margin: float) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per block, the target bin of every element shrunk by margin * d, minus the residual
        offset: bounds on alpha s + bias, (lower, upper).

        The alpha/bias fit reads them in every one of its passes, so they are kept while the
        problem's cache budget allows (None: formed again on each pass). Forming them on every
        pass instead, to leave the budget to the decoded inputs, made step 2 of ResNet-20's
        layer3.0.conv1 at 4,096 images twice as slow."""
        if getattr(self, "_bounds_margin", None) != margin:
            for kept in getattr(self, "_bounds", []):
                if kept is not None:
                    self.x.cache.release(8 * kept[0].numel())
            delta = margin * self.step
            inf = self.edges.new_tensor([math.inf])
            self.bound_tables = (
                torch.cat([-inf, self.edges + delta]),
                torch.cat([self.edges - delta, inf]),
            )
            self._bounds = [
                self._bounds_of(i) if self.x.cache.take(8 * codes.numel()) else None
                for i, codes in enumerate(self.code_blocks)
            ]
            self._bounds_margin = margin
        return self._bounds

    def _bounds_of(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.code_blocks[block].int()  # int32 indices: half the temporary of int64
        lower_of, upper_of = self.bound_tables
        lower, upper = lower_of[codes], upper_of[codes]
        if self.offset is not None:  # p = alpha s + bias + offset lies in the bin
            offset = self.offset.block(block, keep=False)
            lower, upper = lower.sub_(offset), upper.sub_(offset)
        return lower, upper

    def codes_of(self, pre: torch.Tensor) -> torch.Tensor:
        return self._codes(pre).long()

    def _codes(self, pre: torch.Tensor) -> torch.Tensor:
        return count_edges_below(pre, self.edges)  # uint8

    def _code_diff(self, pre: torch.Tensor, block: int) -> torch.Tensor:
        return self._codes(pre).to(torch.int16) - self.code_blocks[block]

    def projections(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """S = X W' per block, float32, as views of one (m, c) buffer that every call overwrites:
        the previous call's projections are gone. One long-lived allocation instead of a new
        set of block-sized ones per alternation, which the heap scattered among the passes'
        temporaries (README, "Step 2 at scale")."""
        w = weights.T.float()
        if self._projections is None or self._projections.shape[1] != w.shape[1]:
            self._projections = None  # the old buffer goes before the new one comes
            self._projections = torch.empty(
                self.m, w.shape[1], dtype=torch.float32, device=w.device
            )
        views, start = [], 0
        for i, rows in enumerate(self.x.block_rows):
            view = self._projections[start : start + rows]
            torch.matmul(self.x.block(i), w, out=view)
            views.append(view)
            start += rows
        return views

    def pre_activation(self, s, alpha, bias, block: int | None = None):
        """alpha s + bias (+ the block's residual offset)."""
        p = torch.addcmul(bias.float()[None, :], s, alpha.float()[None, :])
        if self.offset is None:
            return p
        if block is None:
            raise ValueError("this problem has residual offsets: name the block")
        return p + self.offset.block(block)

    def true_error(self, s_blocks, alpha, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: sum of (y - Q(p))^2 and count of agreeing codes."""
        err = torch.zeros(len(alpha), dtype=torch.float64, device=self.edges.device)
        agree = torch.zeros(len(alpha), dtype=torch.int64, device=self.edges.device)
        for i, s in enumerate(s_blocks):
            diff = self._code_diff(self.pre_activation(s, alpha, bias, i), i)
            err += (diff * diff).sum(0).double()
            agree += (diff == 0).sum(0)
        return err * self.step**2, agree

    def z_step(self, pre, lam, margin, block: int | None = None):
        """Element-wise exact minimiser of (y - q_k)^2 + lam (z - p)^2 over bins k.

        pre holds the rows of one block (or of all rows when block is None)."""
        codes = self.target_codes if block is None else self.code_blocks[block]
        target = codes.float() * self.step
        best_cost = best_z = None
        delta = margin * self.step
        for k in range(len(self.edges) + 1):
            lo = self.edges[k - 1] + delta if k > 0 else -math.inf
            hi = self.edges[k] - delta if k < len(self.edges) else math.inf
            # right-closed bins: without a margin the bin's upper edge itself belongs to it
            z = pre.clamp(min=float(lo), max=float(hi)) if k > 0 else pre.clamp(max=float(hi))
            if k > 0 and delta == 0:
                # an open lower edge: nudge the clipped value just inside (t_k, t_{k+1}]
                z = torch.where(z <= lo, torch.nextafter(torch.full_like(z, float(lo)), z + 1), z)
            # (y - q_k)^2 + lam (z - p)^2, in place on fresh temporaries
            cost = torch.sub(z, pre).square_().mul_(lam)
            cost.add_(torch.sub(target, k * self.step).square_())
            if best_cost is None:
                best_cost, best_z = cost, z
                continue
            better = cost < best_cost
            torch.where(better, z, best_z, out=best_z)
            torch.minimum(best_cost, cost, out=best_cost)
        return best_z, best_cost.sum(dtype=torch.float64)

    def z_pass(self, s_blocks, alpha, bias, lam, margin) -> dict:
        """One pass over the blocks at the current (w, alpha, bias): the z step, then the
        statistics the next alternation needs: b = X'(z - bias - offset) and the column sums of
        z - offset (bias step), with the relaxed objective and the true error."""
        n, c = self.x.width, len(alpha)
        device = self.edges.device
        b = torch.zeros(n, c, dtype=torch.float64, device=device)
        shift_sum = torch.zeros(c, dtype=torch.float64, device=device)
        relaxed = torch.zeros((), dtype=torch.float64, device=device)
        err = torch.zeros(c, dtype=torch.float64, device=device)
        agree = torch.zeros(c, dtype=torch.int64, device=device)
        for i, s in enumerate(s_blocks):
            pre = self.pre_activation(s, alpha, bias, i)
            z, cost = self.z_step(pre, lam, margin, i)
            relaxed += cost
            diff = self._code_diff(pre, i)
            err += (diff * diff).sum(0).double()
            agree += (diff == 0).sum(0)
            residual = z - bias.float()[None, :]
            shift = z
            if self.offset is not None:
                offset = self.offset.block(i)
                residual, shift = residual - offset, z - offset
            # float32 product per block (X holds codes * step), summed over blocks in float64
            b += (self.x.block(i).T @ residual).double()
            shift_sum += shift.sum(0, dtype=torch.float64)
        return {
            "b": b,
            "shift_sum": shift_sum,
            "relaxed": relaxed,
            "true_error": err * self.step**2,
            "agree": agree,
        }


_CD_BLOCK = 128  # coordinates per block of the w step's coordinate descent


def coordinate_descent_wstep(
    gram_matrix,
    b,
    weights_t,
    alpha,
    grid: WeightGrid,
    sweeps: int,
    block: int = _CD_BLOCK,
    products: torch.Tensor | None = None,
):
    """Coordinate descent on alpha^2 w'Aw - 2 alpha w'b for all channels at once.

    weights_t: (n, c) codes as float64 (updated in place); b: (n, c) = X'r; alpha: (c,).
    For coordinate j the 1-D minimiser is u_j = (b_j / alpha - sum_{i != j} A_ji w_i) / A_jj,
    and the best grid value is u_j rounded and clipped (spec, step 2.2).

    The coordinates are visited in order, as in plain coordinate descent, but the running
    products g = A W' are brought up to date once per block of ``block`` coordinates, by one
    (n, block) x (block, c) product, instead of a rank-1 update of all n rows after every
    coordinate; inside a block only its own rows of g are updated. The same updates, in
    another summation order: a wide layer's sweep costs its arithmetic (n = 4,608: a rank-1
    update of 18 MB per coordinate before). ``block=1`` is the per-coordinate form.

    ``products``: A W' kept by the caller across steps (updated in place here), so the
    alternation forms it once instead of once per step (an (n, n) x (n, c) product each).
    """
    n = gram_matrix.shape[0]
    diag = gram_matrix.diagonal()
    usable = (diag > 0).tolist()  # an all-zero column of X: its weight does not matter
    g = gram_matrix @ weights_t if products is None else products  # (n, c): A W'
    b_over_alpha = b / alpha[None, :]
    total_changes = 0
    for _ in range(sweeps):
        changes = 0
        for start in range(0, n, block):
            stop = min(start + block, n)
            local = gram_matrix[start:stop, start:stop]
            g_block = g[start:stop].clone()  # kept current coordinate by coordinate
            before = weights_t[start:stop].clone()
            for k in range(stop - start):
                j = start + k
                if not usable[j]:
                    continue
                old = weights_t[j]
                u = (b_over_alpha[j] - g_block[k]) / diag[j] + old
                new = grid.round(u)
                g_block[k + 1 :].addr_(local[k + 1 :, k], new - old)  # rows still to visit
                weights_t[j] = new
            delta = weights_t[start:stop] - before
            moved = int(torch.count_nonzero(delta))
            if moved:
                g.addmm_(gram_matrix[:, start:stop], delta)
                changes += moved
        total_changes += changes
        if changes == 0:
            break
    return total_changes


def alpha_step(gram_matrix, b, weights_t, alpha, products: torch.Tensor | None = None):
    """alpha = (w'b) / (w'Aw) per channel; a negative ratio flips w (the grid is symmetric).

    ``products``: A W' when the caller keeps it (flipped with w here)."""
    g = gram_matrix @ weights_t if products is None else products
    quad = (weights_t * g).sum(0)
    lin = (weights_t * b).sum(0)
    ok = quad > 0
    new_alpha = torch.where(ok, lin / quad.clamp_min(1e-300), alpha)
    flip = new_alpha < 0
    weights_t[:, flip] *= -1
    if products is not None:
        products[:, flip] *= -1
    return torch.where(ok, new_alpha.abs().clamp_min(1e-12), alpha)


def _alpha_w_alpha(gram_matrix, b, weights_t, alpha, grid, cfg, products):
    """The alpha step, the coordinate-descent w step, the alpha step again (TSQ-METHOD.md,
    "Step 2", items 1-2), ``products`` = A W' kept current. Returns (alpha, weights changed)."""
    alpha = alpha_step(gram_matrix, b, weights_t, alpha, products)
    changes = coordinate_descent_wstep(
        gram_matrix, b, weights_t, alpha, grid, cfg.cd_sweeps, products=products
    )
    return alpha_step(gram_matrix, b, weights_t, alpha, products), changes


def _ridge_solve(gram_matrix, rhs, relative_ridge: float):
    """Least-squares weights (A + r I)^-1 rhs with r relative to the mean diagonal of A."""
    ridge = relative_ridge * gram_matrix.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram_matrix.shape[0], dtype=gram_matrix.dtype, device=gram_matrix.device)
    return torch.linalg.solve(gram_matrix + ridge * eye, rhs)


def _round_given_weights(gram_matrix, weights, grid: WeightGrid, config: SolverConfig):
    """Grid codes (n, c) float64 and alpha (c,) from given full-precision (step-1) weights
    (c, n), by the configured start.

    A least-squares start is always rounded in weight space instead: it has absorbed the
    missing intercept into its weights, and rounding it faithfully keeps that basin (planted
    problem on code inputs: 0.81 agreement vs 1.0 from the weight-space rounding)."""
    if config.effective.start == "gptq":
        return output_space_rounding(gram_matrix, weights.to(gram_matrix.device).T, grid)
    return weight_space_rounding(weights, grid)


def initial_weights(problem: LayerProblem, init, bias, grid, config, c):
    if init is not None:
        return _round_given_weights(problem.gram, init.reshape(c, -1), grid, config)
    # least-squares fit to a pre-activation placed inside each target code's bin
    step, edges = problem.step, problem.edges
    rhs = torch.zeros(problem.x.width, c, dtype=torch.float64, device=edges.device)
    for i, codes in enumerate(problem.code_blocks):
        z0 = codes.double() * step
        z0 = torch.where(codes == 0, torch.as_tensor(float(edges[0]) - step / 2), z0)
        r = z0 - bias[None, :]
        if problem.offset is not None:
            r = r - problem.offset.block(i)
        rhs.addmm_(problem.x.block(i, torch.float64).T, r)
    w_ls = _ridge_solve(problem.gram, rhs, config.ridge)  # (n, c)
    return weight_space_rounding(w_ls.T, grid)


_FIT_TOLERANCE = 1e-6  # relative loss decrease that keeps the alpha/bias fit going


def _fit_alpha_bias(problem: LayerProblem, s_blocks, alpha, bias, margin: float, iters: int = 10):
    """Per-channel (alpha, bias) minimising the squared distance of p to its target bin.

    This is the lam -> 0 limit of the relaxed objective restricted to (alpha, bias): a convex
    squared hinge, minimised by Newton steps on the rows outside their bins (active set) with
    backtracking, so unlike the plain alpha step it does not stall with p parked on bin edges.
    """
    bounds = problem.bin_bounds(margin)

    def hinge(a, b, newton: bool):
        """Loss per channel and, with newton, the sums of the Newton step: h11 h12 h22 g1 g2.

        Per-element work and per-block sums in float32 (a block is at most a calibration
        batch of rows), blocks summed in float64."""
        loss = torch.zeros_like(a, dtype=torch.float64)
        sums = torch.zeros(5, len(a), dtype=torch.float64, device=a.device)
        a32, b32 = a.float()[None, :], b.float()[None, :]
        for i, s in enumerate(s_blocks):
            lower, upper = bounds[i] if bounds[i] is not None else problem._bounds_of(i)
            pre = torch.addcmul(b32, s, a32)  # the offset is in the bounds
            gap = pre.sub_(pre.clamp(lower, upper))  # 0 inside the bin
            loss += torch.linalg.vecdot(gap, gap, dim=0)
            if newton:
                active = (gap != 0).float()
                s_a = s * active
                for k, term in enumerate(  # gap = 0 off the active set
                    (
                        torch.linalg.vecdot(s_a, s, dim=0),
                        s_a.sum(0),
                        active.sum(0),
                        torch.linalg.vecdot(s, gap, dim=0),
                        gap.sum(0),
                    )
                ):
                    sums[k] += term
        return loss, sums

    # One evaluation per iteration: the channels are independent, so each channel takes its
    # Newton step when the loss does not rise, and otherwise halves its own step for the next
    # iteration (backtracking spread over iterations; a trial's sums serve the channels that
    # took it).
    loss, sums = hinge(alpha, bias, True)
    step = torch.ones_like(alpha)
    for _ in range(iters):
        h11, h12, h22, g1, g2 = sums
        det = h11 * h22 - h12 * h12
        ok = det > 1e-9 * (h11 * h22).clamp_min(1e-300)
        det = det.clamp_min(1e-300)
        # Newton step on the active rows: theta -= H^-1 g
        new_a = torch.where(ok, alpha - (h22 * g1 - h12 * g2) / det, alpha)
        new_b = torch.where(ok, bias - (h11 * g2 - h12 * g1) / det, bias)
        cand_a, cand_b = alpha + step * (new_a - alpha), bias + step * (new_b - bias)
        cand_loss, cand_sums = hinge(cand_a, cand_b, True)
        good = (cand_loss <= loss) & (cand_a > 0)
        improved = good & (cand_loss < loss * (1 - _FIT_TOLERANCE))
        alpha, bias = torch.where(good, cand_a, alpha), torch.where(good, cand_b, bias)
        loss = torch.where(good, cand_loss, loss)
        sums = torch.where(good[None, :], cand_sums, sums)
        step = torch.where(good, 1.0, step / 2)
        retrying = ~good & (step >= 2**-6)  # six halvings at most, as a line search would
        if not bool((improved | retrying).any()):
            break
    return alpha, bias


def _refine_alpha_bias(problem: LayerProblem, s_blocks, alpha, bias, config):
    """Per-channel coordinate grid search of alpha and bias on the true error ||y - Q(p)||^2."""
    best_err, _ = problem.true_error(s_blocks, alpha, bias)
    alpha, bias = alpha.clone(), bias.clone()
    width_alpha, width_bias = 0.3, 0.5 * problem.step
    offsets = torch.linspace(-1, 1, config.refine_points, dtype=torch.float64)
    for _ in range(config.refine_rounds):
        for which in ("alpha", "bias"):
            for t in offsets:
                cand_alpha = alpha * (1 + width_alpha * t) if which == "alpha" else alpha
                cand_bias = bias + width_bias * t if which == "bias" else bias
                err, _ = problem.true_error(s_blocks, cand_alpha, cand_bias)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                alpha = torch.where(better, cand_alpha, alpha)
                bias = torch.where(better, cand_bias, bias)
        width_alpha, width_bias = width_alpha / 4, width_bias / 4
    return alpha, bias


def solve_layer(
    X: torch.Tensor | RowStore,
    Y: torch.Tensor | RowStore,
    quantizer: SparseQuantizer,
    weight_bits: str | int | None = None,
    lam: float | None = None,
    iters: int | None = None,
    init: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    offset: torch.Tensor | RowStore | None = None,
    config: SolverConfig | None = None,
    verbose: bool = False,
) -> LayerSolution:
    """Learn low-bit weights so that Q(X W' + bias + offset) reproduces the target codes.

    X: (m, n) layer inputs (rows = samples/positions). Y: (m, c) targets on the quantizer's
    levels. init: optional full-precision weights (c, n) in pre-activation units (BN already
    folded in); without it a least-squares fit starts the solver. ``weight_bits``, ``lam`` and
    ``iters`` override the fields of ``config`` (default :class:`SolverConfig`). bias: (c,) fixed/initial
    bias (folded BN: -mu/sigma); offset: (m, c) known additive term (residual shortcut).
    """
    start = time.perf_counter()
    overrides = {"weight_bits": weight_bits, "lam": lam, "iters": iters}
    config = replace(
        config or SolverConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    cfg = config.effective
    grid = WeightGrid.from_spec(cfg.weight_bits)
    _check_inputs(X, Y, init, bias, offset)
    problem = LayerProblem(X, Y, quantizer, offset, cfg.chunk_rows)
    m, c = problem.m, _shape(Y)[1]
    # the cache budget goes first to what most passes read (bin bounds, offsets), then to X;
    # all formed up front, before the passes' temporaries, so they do not fragment the heap
    if cfg.fit_scale:  # read in every pass of the fits
        problem.bin_bounds(cfg.margin)
    if problem.offset is not None:
        problem.offset.warm()
    problem.x.warm()
    device = problem.edges.device
    bias = (
        torch.zeros(c, dtype=torch.float64, device=device)
        if bias is None
        else bias.detach().double().to(device).clone()
    )
    weights_t, alpha = initial_weights(problem, init, bias, grid, cfg, c)
    lam_now = cfg.lam
    # the repair phase moves away from a given init; a least-squares start is already fitted
    # to the bin centres, and polishing it directly does better (planted problems)
    repairing = cfg.repair_iters > 0 and init is not None

    def z_pass(s, alpha, bias):
        if repairing:  # z near the centre of its target bin: not anchored at the current p
            return problem.z_pass(s, alpha, bias, cfg.repair_lam, cfg.repair_margin)
        return problem.z_pass(s, alpha, bias, lam_now, cfg.margin)

    s = problem.projections(weights_t.T)
    zp = z_pass(s, alpha, bias)
    agreement_init = float(zp["agree"].sum()) / (m * c)
    history = [
        {
            "iter": 0,
            "objective": float("nan"),
            "true_error": float(zp["true_error"].sum()) / m,
            "agreement": agreement_init,
            "changes": 0,
            "lam": cfg.lam,
        }
    ]
    best = _BestIterate(cfg.keep_best, zp, weights_t, alpha, bias)
    still = 0
    stalled, reference = 0, best.total()  # alternations since the best iterates last improved
    products = problem.gram @ weights_t  # A W', kept current by the w and alpha steps
    for it in range(1, cfg.iters + 1):
        b = zp["b"]  # X'(z - bias - offset) at the z of the previous alternation
        alpha, changes = _alpha_w_alpha(problem.gram, b, weights_t, alpha, grid, cfg, products)
        s = problem.projections(weights_t.T)  # overwrites the previous projections
        if cfg.learn_bias:  # mean over rows of z - offset - alpha s
            scaled = sum(
                (block * alpha.float()[None, :]).sum(0, dtype=torch.float64) for block in s
            )
            bias = (zp["shift_sum"] - scaled) / m
        if cfg.fit_scale:
            alpha, bias = _fit_alpha_bias(problem, s, alpha, bias, cfg.margin)
        zp = z_pass(s, alpha, bias)
        err = float(zp["true_error"].sum())
        best.offer(zp, weights_t, alpha, bias)
        history.append(
            {
                "iter": it,
                "objective": float(zp["relaxed"]) / m,
                "true_error": err / m,
                "agreement": float(zp["agree"].sum()) / (m * c),
                "changes": changes,
                "lam": cfg.repair_lam if repairing else lam_now,
            }
        )
        if verbose:
            h = history[-1]
            print(
                f"  iter {it:3d} relaxed {h['objective']:.5f} true {h['true_error']:.5f} "
                f"agree {h['agreement']:.4f} changes {changes}"
            )
        still = still + 1 if changes == 0 else 0
        if repairing and (still >= 2 or it >= cfg.repair_iters):
            repairing, still = False, 0  # repair phase over: polish with the tight relaxation
            stalled, reference = 0, best.total()
            zp = z_pass(s, alpha, bias)
            continue
        if still >= 2:
            break  # w has not moved for two alternations: the iterate is (close to) a fixed point
        if not repairing and cfg.patience:  # the paper variant runs with patience 0
            if best.total() - reference > _PATIENCE_TOLERANCE * abs(reference):
                stalled, reference = 0, best.total()
            else:
                stalled += 1
            if stalled >= cfg.patience:
                break  # what is kept is the best iterate, and it has stopped improving
        lam_now *= cfg.lam_growth

    if cfg.variant == "tsquant":  # per channel, the best iterate seen (the start included)
        if not torch.equal(best.weights_t, weights_t):
            weights_t, s = best.weights_t, problem.projections(best.weights_t.T)
        alpha, bias = best.alpha, best.bias
    if cfg.refine:
        refined_alpha, refined_bias = _refine_alpha_bias(problem, s, alpha, bias, cfg)
        if cfg.keep_best == "agreement":  # the refinement minimises the error: keep it only
            _, before = problem.true_error(s, alpha, bias)  # where agreement does not drop
            _, after = problem.true_error(s, refined_alpha, refined_bias)
            keep = after >= before
            refined_alpha = torch.where(keep, refined_alpha, alpha)
            refined_bias = torch.where(keep, refined_bias, bias)
        alpha, bias = refined_alpha, refined_bias
    _, agree = problem.true_error(s, alpha, bias)
    return LayerSolution(
        weight_codes=weights_t.T.contiguous().to(grid.code_dtype),
        alpha=alpha.float(),
        bias=bias.float(),
        history=history,
        agreement_init=agreement_init,
        agreement=float(agree.sum()) / (m * c),
        seconds=time.perf_counter() - start,
    )


_PATIENCE_TOLERANCE = 1e-4  # relative gain of the best iterates that counts as progress


class _BestIterate:
    """Per output channel, the best (w, alpha, bias) seen so far on the chosen measure (the
    channels of a layer are independent problems, so each keeps its own best iterate)."""

    def __init__(self, measure: str, zp: dict, weights_t, alpha, bias):
        self.measure = measure
        self.score = self._score(zp)
        self.weights_t, self.alpha, self.bias = weights_t.clone(), alpha.clone(), bias.clone()

    def _score(self, zp: dict) -> torch.Tensor:  # higher is better
        return zp["agree"].double() if self.measure == "agreement" else -zp["true_error"]

    def total(self) -> float:
        """The measure summed over channels (higher is better)."""
        return float(self.score.sum())

    def offer(self, zp: dict, weights_t, alpha, bias) -> None:
        score = self._score(zp)
        better = score > self.score
        if bool(better.any()):
            self.score = torch.where(better, score, self.score)
            self.weights_t[:, better] = weights_t[:, better]
            self.alpha = torch.where(better, alpha, self.alpha)
            self.bias = torch.where(better, bias, self.bias)


def _shape(a) -> tuple[int, int]:
    if isinstance(a, RowStore):
        return a.rows, a.width
    return tuple(a.shape) if a.dim() == 2 else (-1, -1)


def _check_inputs(X, Y, init, bias, offset):
    (mx, n), (my, c) = _shape(X), _shape(Y)
    if mx < 0 or my < 0 or mx != my:
        shapes = [a.shape if torch.is_tensor(a) else _shape(a) for a in (X, Y)]
        raise ValueError(
            f"X must be (m, n) and Y (m, c) with the same m; got {tuple(shapes[0])} and {tuple(shapes[1])}"
        )
    if mx == 0:
        raise ValueError("no calibration rows: X is empty; give the solver at least one sample")
    tensors = [a for a in (X, Y) if torch.is_tensor(a)]  # row stores were checked on append
    if any(not torch.isfinite(a).all() for a in tensors):
        raise ValueError("X or Y contains NaN/Inf: check the calibration data and the step-1 model")
    if init is not None and init.reshape(init.shape[0], -1).shape != (c, n):
        raise ValueError(f"init must have shape ({c}, {n}), got {tuple(init.shape)}")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"bias must have shape ({c},), got {tuple(bias.shape)}")
    if offset is not None and _shape(offset) != (my, c):
        raise ValueError(f"offset must have the shape of Y {(my, c)}, got {_shape(offset)}")


def solve_linear_layer(
    X: torch.Tensor | RowStore,
    T: torch.Tensor | RowStore,
    init: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: SolverConfig | None = None,
) -> LayerSolution:
    """Low-bit weights for a layer with no quantizer after it (a projection shortcut that is
    added into a coded chain, or a quantized last layer): minimise ||T - (alpha X w + bias)||^2
    by the same alpha step and coordinate descent, with z fixed to the target T."""
    start = time.perf_counter()
    cfg = (config or SolverConfig()).effective
    grid = WeightGrid.from_spec(cfg.weight_bits)
    _check_inputs(X, T, init, bias, None)
    m, c = _shape(T)
    # one pass over the rows: every later quantity is a function of these sums
    stats = gram(X, cfg.chunk_rows, targets=T)
    device = stats.gram.device
    mean = stats.target_sum / m
    spread = (stats.target_square_sum - m * mean * mean).sum().clamp_min(1e-12)
    bias = (
        torch.zeros(c, dtype=torch.float64, device=device)
        if bias is None
        else bias.double().to(device).clone()
    )

    def cross_residual():  # X'(T - bias)
        return stats.cross - torch.outer(stats.column_sum, bias)

    if init is None:  # a least-squares start: weight space (see _round_given_weights)
        least_squares = _ridge_solve(stats.gram, cross_residual(), cfg.ridge)
        weights_t, alpha = weight_space_rounding(least_squares.T, grid)
    else:
        weights_t, alpha = _round_given_weights(stats.gram, init.reshape(c, -1), grid, cfg)
    # the alternation's quadratic: ||T - X v - bias||^2 + r ||v - v0||^2 in v = alpha w, with v0
    # the start's full-precision weights (a ridge toward them; r = 0: plain least squares)
    gram_fit, toward = stats.gram, None
    if cfg.linear_ridge > 0 and init is not None:
        r = cfg.linear_ridge * stats.gram.diagonal().mean().clamp_min(1e-12)
        gram_fit = stats.gram + r * torch.eye(
            stats.gram.shape[0], dtype=stats.gram.dtype, device=device
        )
        toward = r * init.reshape(c, -1).T.double().to(device)

    def relative_error():
        """||T - alpha X w - bias||^2 / ||T - mean||^2, expanded in the accumulated sums."""
        wgw = (weights_t * (stats.gram @ weights_t)).sum(0)
        wxt = (weights_t * stats.cross).sum(0)
        xw_sum = stats.column_sum @ weights_t
        per_channel = (
            stats.target_square_sum
            + alpha * alpha * wgw
            + m * bias * bias
            - 2 * alpha * wxt
            - 2 * bias * stats.target_sum
            + 2 * alpha * bias * xw_sum
        )
        return float(per_channel.clamp_min(0).sum() / spread)

    error_init = relative_error()
    history = [{"iter": 0, "relative_error": error_init}]
    products = gram_fit @ weights_t  # kept current by the w and alpha steps
    for it in range(1, cfg.iters + 1):
        b = cross_residual() if toward is None else cross_residual() + toward
        alpha, changes = _alpha_w_alpha(gram_fit, b, weights_t, alpha, grid, cfg, products)
        # closed-form bias: mean residual, from the column sums of X
        bias = mean - alpha * (stats.column_sum @ weights_t) / m
        history.append({"iter": it, "relative_error": relative_error(), "changes": changes})
        if changes == 0 and it > 1:
            break
    return LayerSolution(
        weight_codes=weights_t.T.contiguous().to(grid.code_dtype),
        alpha=alpha.float(),
        bias=bias.float(),
        history=history,
        relative_error_init=error_init,
        relative_error=history[-1]["relative_error"],
        seconds=time.perf_counter() - start,
    )
