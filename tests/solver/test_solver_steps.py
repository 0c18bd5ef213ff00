"""Each closed-form step of the step-2 alternation against brute force (TSQ-METHOD.md, step 2)."""

from __future__ import annotations

import math

import pytest
import torch

from tsquant import SparseQuantizer, WeightGrid
from tsquant.solver.alternation import (
    LayerProblem,
    alpha_step,
    coordinate_descent_wstep,
    initial_weights,
)
from tsquant.solver.statistics import cross

# --- w step: coordinate descent -----------------------------------------------------------------


def w_objective(gram, b, w, alpha):
    """alpha^2 w'Aw - 2 alpha w'b = ||r - alpha X w||^2 - ||r||^2, per channel."""
    return alpha**2 * (w * (gram @ w)).sum(0) - 2 * alpha * (w * b).sum(0)


def reference_cd(gram, b, w0, alpha, grid: WeightGrid, sweeps: int):
    """Per channel, per coordinate in order: try every grid value, keep the minimiser.

    Returns the codes and whether any 1-D choice was a (near) tie."""
    values = grid.values().tolist()
    out, tie = w0.clone(), False
    for ch in range(w0.shape[1]):
        w, a, bc = out[:, ch].clone(), float(alpha[ch]), b[:, ch]
        for _ in range(sweeps):
            moved = False
            for j in range(w.shape[0]):
                costs = []
                for v in values:
                    w[j] = v
                    costs.append(float(a * a * w @ gram @ w - 2 * a * w @ bc))
                order = sorted(range(len(values)), key=costs.__getitem__)
                tie |= costs[order[1]] - costs[order[0]] < 1e-9 * (1 + abs(costs[order[0]]))
                old = float(out[j, ch])
                w[j] = values[order[0]]
                moved |= values[order[0]] != old
                out[j, ch] = w[j]
            if not moved:
                break
    return out, tie


def random_wstep_problem(seed, grid: WeightGrid, m=40, n=6, c=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, dtype=torch.float64, generator=gen)
    r = torch.randn(m, c, dtype=torch.float64, generator=gen) * 3
    values = grid.values()
    w0 = values[torch.randint(len(values), (n, c), generator=gen)]
    alpha = torch.rand(c, dtype=torch.float64, generator=gen) * 1.5 + 0.1
    return x.T @ x, x.T @ r, w0, alpha


@pytest.mark.parametrize("spec", ["ternary", 2, "narrow:3"])
@pytest.mark.parametrize("seed", range(4))
def test_one_sweep_equals_brute_force_coordinate_updates(spec, seed):
    grid = WeightGrid.from_spec(spec)
    gram, b, w0, alpha = random_wstep_problem(seed, grid)
    w = w0.clone()
    changes = coordinate_descent_wstep(gram, b, w, alpha, grid, sweeps=1)
    ref, tie = reference_cd(gram, b, w0, alpha, grid, sweeps=1)
    assert torch.allclose(
        w_objective(gram, b, w, alpha), w_objective(gram, b, ref, alpha), rtol=1e-9, atol=1e-9
    )
    if not tie:
        assert torch.equal(w, ref)
    assert changes == int((w != w0).sum())
    assert bool(torch.isin(w, grid.values()).all())


@pytest.mark.parametrize("spec", ["ternary", 3])
@pytest.mark.parametrize("seed", range(3))
def test_vectorised_coordinate_descent_equals_per_channel_loop(spec, seed):
    grid = WeightGrid.from_spec(spec)
    gram, b, w0, alpha = random_wstep_problem(100 + seed, grid, n=8, c=6)
    w = w0.clone()
    coordinate_descent_wstep(gram, b, w, alpha, grid, sweeps=4)
    ref, tie = reference_cd(gram, b, w0, alpha, grid, sweeps=4)
    assert torch.allclose(
        w_objective(gram, b, w, alpha), w_objective(gram, b, ref, alpha), rtol=1e-9, atol=1e-9
    )
    if not tie:
        assert torch.equal(w, ref)
    # never worse than where it started
    assert bool((w_objective(gram, b, w, alpha) <= w_objective(gram, b, w0, alpha) + 1e-9).all())


@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_blocked_coordinate_descent_visits_coordinates_in_order(block):
    """Blocks only change when g is brought up to date, not the order of the updates: any block
    size gives the codes of the per-coordinate form and of the brute-force reference."""
    grid = WeightGrid.from_spec("ternary")
    gram, b, w0, alpha = random_wstep_problem(7, grid, m=60, n=11, c=4)
    w = w0.clone()
    changes = coordinate_descent_wstep(gram, b, w, alpha, grid, sweeps=3, block=block)
    per_coordinate = w0.clone()
    coordinate_descent_wstep(gram, b, per_coordinate, alpha, grid, sweeps=3, block=1)
    ref, tie = reference_cd(gram, b, w0, alpha, grid, sweeps=3)
    assert torch.equal(w, per_coordinate) and changes > 0
    if not tie:
        assert torch.equal(w, ref)


def test_coordinate_of_an_all_zero_column_is_left_alone():
    grid = WeightGrid.from_spec("ternary")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 4, dtype=torch.float64, generator=gen)
    x[:, 2] = 0
    r = torch.randn(30, 3, dtype=torch.float64, generator=gen)
    w = torch.tensor([[0.0, 1, -1], [1, 1, 0], [-1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    before = w.clone()
    coordinate_descent_wstep(
        x.T @ x, x.T @ r, w, torch.ones(3, dtype=torch.float64), grid, sweeps=3
    )
    assert torch.equal(w[2], before[2])
    assert not torch.equal(w, before)


def test_alpha_step_is_the_least_squares_scale():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(50, 5, dtype=torch.float64, generator=gen)
    r = torch.randn(50, 4, dtype=torch.float64, generator=gen)
    w = torch.tensor(
        [[1.0, -1, 0, 1], [0, 1, 1, 1], [-1, 0, 1, 0], [1, 1, -1, 0], [0, -1, 0, 1]],
        dtype=torch.float64,
    )
    w_before = w.clone()
    alpha = alpha_step(x.T @ x, x.T @ r, w, torch.ones(4, dtype=torch.float64))
    assert bool((alpha > 0).all())
    for ch in range(4):
        s = x @ w_before[:, ch]
        best = float(s @ r[:, ch] / (s @ s))
        assert float(alpha[ch]) == pytest.approx(abs(best), rel=1e-9)
        # a negative optimal scale flips the channel's codes instead
        sign = 1.0 if best > 0 else -1.0
        assert torch.equal(w[:, ch], sign * w_before[:, ch])


# --- z step -------------------------------------------------------------------------------------


def make_problem(seed, quantizer, m=30, n=4, c=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen)
    codes = torch.randint(0, 2**quantizer.bits, (m, c), generator=gen)
    y = codes.float() * quantizer.step
    pre = torch.rand(m, c, generator=gen) * 4 - 1  # in [-1, 3]
    edges = quantizer.thresholds().float()
    pre[0, : min(c, len(edges))] = edges[: min(c, len(edges))]  # exactly on edges
    return LayerProblem(x, y, quantizer, None, chunk_rows=8), pre, y


def elementwise_cost(problem, z, pre, y, lam):
    q = problem.codes_of(z).double() * problem.step
    return (y.double() - q) ** 2 + lam * (z.double() - pre.double()) ** 2


@pytest.mark.parametrize("lam", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("bits,eps", [(2, 0.32), (2, 0.0), (3, 0.2), (1, 0.1)])
def test_z_step_equals_brute_force_over_a_fine_grid(lam, bits, eps):
    quantizer = SparseQuantizer.from_gaussian(bits=bits, eps=eps)
    problem, pre, y = make_problem(bits * 10 + int(lam * 10), quantizer)
    z, total = problem.z_step(pre, lam, margin=0.0)
    cost = elementwise_cost(problem, z, pre, y, lam)
    assert float(total) == pytest.approx(float(cost.sum()), rel=1e-5, abs=1e-6)

    grid = torch.linspace(-2.0, 4.0 + 2**bits * quantizer.step, 20001)  # float32, like the solver
    h = float(grid[1] - grid[0])
    grid_codes = problem.codes_of(grid)  # (G,)
    p, t = pre.reshape(-1, 1).double(), y.reshape(-1, 1).double()
    brute = (t - grid_codes.double() * problem.step) ** 2 + lam * (grid.double() - p) ** 2
    brute_min, brute_arg = brute.min(1)
    ours = cost.reshape(-1)
    tol = lam * (2 * (z.reshape(-1).double() - p[:, 0]).abs() * h + h * h) + 1e-5
    assert bool((ours <= brute_min + 1e-5).all()), "the z step is beaten by a grid point"
    assert bool((brute_min <= ours + tol).all()), "the z step is worse than the grid optimum"

    # Q(z) agrees with the grid argmin wherever the best bin is not a near tie
    per_code = torch.stack(
        [
            torch.where(grid_codes == k, brute, torch.full_like(brute, math.inf)).min(1).values
            for k in range(2**bits)
        ],
        dim=1,
    )
    two = per_code.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 2 * tol + 1e-5
    assert float(clear.float().mean()) > 0.8
    ours_codes = problem.codes_of(z).reshape(-1)
    assert torch.equal(ours_codes[clear], grid_codes[brute_arg][clear])


@pytest.mark.parametrize("margin", [0.05, 0.2])
def test_z_step_keeps_the_margin_inside_the_bin(margin):
    quantizer = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    problem, pre, y = make_problem(7, quantizer, m=200)
    z, _ = problem.z_step(pre, 1.0, margin=margin)
    codes = problem.codes_of(z)
    edges = problem.edges
    delta = margin * quantizer.step
    inner = codes > 0
    assert bool((z[inner] >= edges[codes[inner] - 1] + delta - 1e-6).all())
    below_top = codes < len(edges)
    assert bool((z[below_top] <= edges[codes[below_top]] - delta + 1e-6).all())
    # an element that already sits deep inside its target bin is left where it is
    deep = (problem.codes_of(pre) == problem.target_codes) & (
        problem.codes_of(pre - delta) == problem.codes_of(pre + delta)
    )
    assert bool(deep.any())
    assert torch.equal(z[deep], pre[deep])


# --- the relaxed objective never increases (paper variant) --------------------------------------


def relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam):
    pre = (x.double() @ weights_t) * alpha + bias
    return float(elementwise_cost(problem, z, pre, y, lam).sum())


@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_paper_alternation_never_increases_the_relaxed_objective(lam, seed):
    """Re-run the paper variant's loop from the solver's own steps and evaluate
    ||y - Q(z)||^2 + lam ||z - (alpha X w + bias)||^2 after every single update."""
    gen = torch.Generator().manual_seed(seed)
    m, n, c = 1500, 16, 6
    x = torch.randn(m, n, generator=gen)
    w_true = torch.randint(-1, 2, (c, n), generator=gen).float()
    s = x @ w_true.T
    alpha_true, bias = 1 / s.std(0), -s.mean(0) / s.std(0)
    quantizer = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    y = quantizer(s * alpha_true + bias)
    problem = LayerProblem(x, y, quantizer, None, chunk_rows=512)
    grid = WeightGrid.from_spec("ternary")
    bias = bias.double()
    init = torch.randn(c, n, generator=gen) * 0.2
    from tsquant import SolverConfig

    weights_t, alpha = initial_weights(problem, init, bias, grid, SolverConfig().effective, c)
    pre = problem.pre_activation(torch.cat(problem.projections(weights_t.T)), alpha, bias)
    z, _ = problem.z_step(pre, lam, 0.0)
    values = [relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam)]
    moved = 0
    for _ in range(8):
        b = cross(x, z - bias.float()[None, :], 512)
        alpha = alpha_step(problem.gram, b, weights_t, alpha)
        values.append(relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam))
        moved += coordinate_descent_wstep(problem.gram, b, weights_t, alpha, grid, 4)
        values.append(relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam))
        alpha = alpha_step(problem.gram, b, weights_t, alpha)
        values.append(relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam))
        pre = problem.pre_activation(torch.cat(problem.projections(weights_t.T)), alpha, bias)
        z, _ = problem.z_step(pre, lam, 0.0)
        values.append(relaxed_objective(problem, x, y, z, weights_t, alpha, bias, lam))
    for before, after in zip(values, values[1:], strict=False):
        assert after <= before * (1 + 1e-6) + 1e-9, values
    assert values[-1] < 0.9 * values[0]
    if lam < 1:
        assert moved > 0  # the loop did exercise the w step
