"""solve_layer / solve_linear_layer end to end: planted problems, history, input validation."""

from __future__ import annotations

import pytest
import torch

from tsquant import LayerSolution, SolverConfig, SparseQuantizer, solve_layer, ternarize
from tsquant.solver import solve_linear_layer

QUANTIZER = SparseQuantizer.from_gaussian(bits=2, eps=0.32)


def planted(values, m=8000, n=36, c=16, seed=0, offset=False):
    """X ~ N(0,1), w* uniform on `values`, alpha* = 1/std(X w*), bias* = -mean/std,
    y = Q(alpha* X w* + bias* [+ offset])."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=gen)
    w = torch.tensor(values)[torch.randint(len(values), (c, n), generator=gen)]
    s = x @ w.T
    alpha, bias = 1 / s.std(0), -s.mean(0) / s.std(0)
    shift = torch.randn(m, c, generator=gen) * 0.5 if offset else None
    pre = s * alpha + bias + (shift if offset else 0)
    return x, QUANTIZER(pre), w, alpha, bias, shift


def own_agreement(x, y, sol, offset=None):
    pre = x @ (sol.weight_codes.float() * sol.alpha[:, None]).T + sol.bias
    if offset is not None:
        pre = pre + offset
    return float((QUANTIZER.codes(pre) == QUANTIZER.codes(y)).float().mean())


def test_planted_ternary_problem_is_solved():
    x, y, w, _, _, _ = planted([-1.0, 0.0, 1.0])
    sol = solve_layer(x, y, QUANTIZER, weight_bits="ternary")
    assert isinstance(sol, LayerSolution)
    assert sol.weight_codes.shape == (16, 36) and sol.weight_codes.dtype == torch.int8
    assert sol.alpha.shape == (16,) and sol.bias.shape == (16,)
    assert bool((sol.alpha > 0).all())
    assert isinstance(sol.history, list) and all(isinstance(h, dict) for h in sol.history)
    assert {"iter", "objective", "agreement"} <= set(sol.history[-1])
    assert sol.agreement >= 0.99
    assert own_agreement(x, y, sol) >= 0.99
    assert own_agreement(x, y, sol) == pytest.approx(sol.agreement, abs=1e-3)
    assert float((sol.weight_codes.float() == w).float().mean()) >= 0.95
    assert sol.agreement >= sol.agreement_init
    assert torch.equal(sol.weight, sol.weight_codes.float() * sol.alpha[:, None])


def planted_on_codes(seed, m=8000, n=36, c=16):
    """Like the network sees it: X = Q(N(0,1)) is non-negative and sparse, so the planted
    bias* = -mean/std is far from zero."""
    gen = torch.Generator().manual_seed(seed)
    x = QUANTIZER(torch.randn(m, n, generator=gen))
    w = torch.randint(-1, 2, (c, n), generator=gen).float()
    s = x @ w.T
    bias = -s.mean(0) / s.std(0)
    return x, QUANTIZER(s / s.std(0) + bias), w, bias


def test_planted_problem_on_non_negative_code_inputs():
    x, y, w, bias = planted_on_codes(seed=0)
    assert float(bias.abs().mean()) > 0.3
    sol = solve_layer(x, y, QUANTIZER)
    assert own_agreement(x, y, sol) >= 0.93
    assert float((sol.weight_codes.float() == w).float().mean()) >= 0.97
    assert sol.agreement > sol.agreement_init + 0.1


def test_planted_problem_on_non_negative_code_inputs_is_solved_exactly():
    x, y, w, _ = planted_on_codes(seed=0)
    sol = solve_layer(x, y, QUANTIZER)
    assert own_agreement(x, y, sol) >= 0.99


def test_planted_two_bit_mid_rise_problem_is_solved():
    x, y, w, _, _, _ = planted([-3.0, -1.0, 1.0, 3.0], seed=1)
    sol = solve_layer(x, y, QUANTIZER, weight_bits=2)
    assert sol.weight_codes.dtype == torch.int8
    assert set(sol.weight_codes.unique().tolist()) <= {-3, -1, 1, 3}
    assert sol.agreement >= 0.97
    assert own_agreement(x, y, sol) >= 0.97
    assert float((sol.weight_codes.float() == w).float().mean()) >= 0.9


def test_planted_residual_problem_with_known_offset():
    x, y, w, _, _, shift = planted([-1.0, 0.0, 1.0], m=4000, n=20, c=8, seed=2, offset=True)
    sol = solve_layer(x, y, QUANTIZER, offset=shift)
    assert own_agreement(x, y, sol, shift) >= 0.99
    assert float((sol.weight_codes.float() == w).float().mean()) >= 0.95
    # ignoring the offset makes the same problem markedly harder to fit
    assert own_agreement(x, y, sol) < 0.95


def test_planted_problem_from_an_init_and_a_bias():
    """The transform() path: FP init weights (BN folded) and the folded bias."""
    x, y, w, alpha, bias, _ = planted([-1.0, 0.0, 1.0], m=4000, n=20, c=8, seed=3)
    gen = torch.Generator().manual_seed(9)
    init = (w + 0.1 * torch.randn(w.shape, generator=gen)) * alpha[:, None]
    sol = solve_layer(x, y, QUANTIZER, init=init, bias=bias)
    assert sol.agreement >= 0.99
    assert float((sol.weight_codes.float() == w).float().mean()) >= 0.95


def test_alternation_repairs_wrong_codes_of_a_noisy_init():
    init_ok, final_ok = [], []
    for seed in range(5):
        x, y, w, alpha, bias, _ = planted([-1.0, 0.0, 1.0], m=4000, n=20, c=8, seed=seed)
        gen = torch.Generator().manual_seed(9)
        init = (w + 0.3 * torch.randn(w.shape, generator=gen)) * alpha[:, None]
        init_ok.append(float((ternarize(init)[0].float() == w).float().mean()))
        sol = solve_layer(x, y, QUANTIZER, init=init, bias=bias)
        final_ok.append(float((sol.weight_codes.float() == w).float().mean()))
    wrong_before = 1 - sum(init_ok) / 5
    wrong_after = 1 - sum(final_ok) / 5
    assert wrong_before > 0.05  # the init really is noisy
    assert wrong_after <= 0.5 * wrong_before, (init_ok, final_ok)


def test_paper_variant_runs_and_its_relaxed_objective_never_increases():
    x, y, _, _, bias, _ = planted([-1.0, 0.0, 1.0], m=3000, n=24, c=8, seed=4)
    runs = 0
    for lam in (0.3, 1.0, 3.0):
        init = torch.randn(8, 24, generator=torch.Generator().manual_seed(int(lam * 10))) * 0.2
        config = SolverConfig(variant="paper", lam=lam, iters=30)
        sol = solve_layer(x, y, QUANTIZER, init=init, bias=bias, config=config)
        assert sol.weight_codes.dtype == torch.int8 and sol.weight_codes.shape == (8, 24)
        assert set(sol.weight_codes.unique().tolist()) <= {-1, 0, 1}
        assert 0 <= sol.agreement <= 1
        assert all(h["lam"] == lam for h in sol.history)  # lam_growth is 1 for "paper"
        objective = [h["objective"] for h in sol.history[1:]]
        for before, after in zip(objective, objective[1:], strict=False):
            assert after <= before * (1 + 1e-6), objective
        runs += len(objective) > 3
    assert runs >= 1  # at least one run alternated long enough to mean something


def test_default_variant_beats_paper_variant_on_the_planted_problem():
    x, y, _, _, _, _ = planted([-1.0, 0.0, 1.0], m=3000, n=24, c=8, seed=5)
    ours = solve_layer(x, y, QUANTIZER)
    paper = solve_layer(x, y, QUANTIZER, config=SolverConfig(variant="paper"))
    assert ours.agreement > paper.agreement


def test_solve_linear_layer_recovers_planted_ternary_weights():
    gen = torch.Generator().manual_seed(6)
    m, n, c = 3000, 20, 8
    x = torch.randn(m, n, generator=gen)
    w = torch.randint(-1, 2, (c, n), generator=gen).float()
    alpha = torch.rand(c, generator=gen) + 0.5
    bias = torch.randn(c, generator=gen)
    target = x @ (w * alpha[:, None]).T + bias + 0.05 * torch.randn(m, c, generator=gen)
    sol = solve_linear_layer(x, target)
    assert sol.weight_codes.dtype == torch.int8
    assert torch.equal(sol.weight_codes.float(), w)
    assert torch.allclose(sol.alpha, alpha, rtol=0.02)
    assert torch.allclose(sol.bias, bias, atol=0.02)
    assert sol.relative_error < 0.01
    assert sol.relative_error <= sol.relative_error_init + 1e-12
    # the error the solver reports from its accumulated sums is the error of what it returns
    fit = x.double() @ (sol.weight_codes.double() * sol.alpha.double()[:, None]).T
    residual = target.double() - fit - sol.bias.double()
    spread = ((target.double() - target.double().mean(0)) ** 2).sum()
    assert sol.relative_error == pytest.approx(float((residual**2).sum() / spread), rel=1e-4)


# --- validation ---------------------------------------------------------------------------------


def small_problem():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, 6, generator=gen)
    return x, QUANTIZER(torch.randn(50, 3, generator=gen))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: (x, y[:-1]), "same m"),
        (lambda x, y: (x[:, 0], y), "same m"),
        (lambda x, y: (x[:0], y[:0]), "empty"),
        (lambda x, y: (x.clone().index_fill_(0, torch.tensor([3]), float("nan")), y), "NaN"),
        (lambda x, y: (x, y.clone().index_fill_(0, torch.tensor([1]), float("inf"))), "NaN"),
    ],
)
def test_bad_inputs_raise_value_error(make, match):
    x, y = make(*small_problem())
    with pytest.raises(ValueError, match=match):
        solve_layer(x, y, QUANTIZER)
    with pytest.raises(ValueError, match=match):
        solve_linear_layer(x, y)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_lambda_raises(lam):
    x, y = small_problem()
    with pytest.raises(ValueError, match="lam"):
        solve_layer(x, y, QUANTIZER, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        SolverConfig(lam=lam)


def test_bad_shapes_of_init_bias_offset_and_bad_options():
    x, y = small_problem()
    with pytest.raises(ValueError, match="init"):
        solve_layer(x, y, QUANTIZER, init=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="bias"):
        solve_layer(x, y, QUANTIZER, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="offset"):
        solve_layer(x, y, QUANTIZER, offset=torch.zeros(50, 2))
    with pytest.raises(ValueError, match="variant"):
        SolverConfig(variant="fast")
    with pytest.raises(ValueError, match="weight format"):
        solve_layer(x, y, QUANTIZER, weight_bits="binary")
    with pytest.raises(ValueError, match="iters"):
        SolverConfig(iters=-1)
    with pytest.raises(ValueError, match="levels"):  # targets that are not quantizer outputs
        solve_layer(x, y + 10.0, QUANTIZER)


@pytest.mark.parametrize("seed", range(3))
def test_best_iterate_per_channel_never_ends_below_any_iterate(seed):
    """Each channel keeps its best iterate (the start included), so the layer ends at least as
    good as every iterate it went through, on the measure chosen; the agreement setting also
    refuses a refinement that loses codes."""
    x, y, w, alpha, bias, shift = planted(
        [-1.0, 0.0, 1.0], m=3000, n=24, c=8, seed=seed, offset=True
    )
    gen = torch.Generator().manual_seed(seed)
    init = (w + 0.6 * torch.randn(w.shape, generator=gen)) * alpha[:, None]  # a poor start
    for measure in ("agreement", "error"):
        cfg = SolverConfig(keep_best=measure, iters=6)
        sol = solve_layer(x, y, QUANTIZER, init=init, bias=bias, offset=shift, config=cfg)
        if measure == "agreement":
            assert sol.agreement >= max(h["agreement"] for h in sol.history) - 1e-12
            assert sol.agreement >= sol.agreement_init
        pre = x @ (sol.weight_codes.float() * sol.alpha[:, None]).T + sol.bias + shift
        error = float(((QUANTIZER(pre) - y) ** 2).sum(0).sum()) / len(x)
        if measure == "error":
            assert error <= min(h["true_error"] for h in sol.history) * (1 + 1e-4) + 1e-9
    with pytest.raises(ValueError, match="keep_best"):
        SolverConfig(keep_best="codes")


def test_linear_ridge_pulls_an_underdetermined_fit_toward_the_start():
    """Fewer rows than inputs: plain least squares moves the weights to fit the rows; a strong
    ridge toward the start keeps the start's codes, and the objective it reports is the true,
    unregularised error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen)
    w_true = torch.randn(4, 64, generator=gen)
    t = x @ w_true.T
    init = w_true + 0.3 * torch.randn(w_true.shape, generator=gen)
    base = SolverConfig(weight_bits="narrow:8", iters=5)
    free = solve_linear_layer(x, t, init=init, config=base)
    held = solve_linear_layer(
        x, t, init=init, config=SolverConfig(**{**base.__dict__, "linear_ridge": 1e6})
    )
    start = solve_linear_layer(
        x, t, init=init, config=SolverConfig(**{**base.__dict__, "iters": 0})
    )
    assert free.relative_error < start.relative_error_init  # fits the 40 rows better

    def distance(sol):  # from the start's full-precision weights
        return float(((sol.weight - init) ** 2).mean())

    assert distance(held) < 0.2 * distance(free)  # the ridge keeps it at the start weights
    with pytest.raises(ValueError, match="linear_ridge"):
        SolverConfig(linear_ridge=-1.0)


def test_patience_stops_the_alternation_once_the_best_iterate_stops_improving(monkeypatch):
    """With w reported as still moving (so only patience can stop it), the tsquant variant
    stops `patience` alternations after its best iterates last improved, after the repair
    phase; patience=0 runs every alternation. Stopping early keeps the best iterate, so the
    result matches the full run's."""
    import importlib

    alternation = importlib.import_module("tsquant.solver.alternation")
    real = alternation.coordinate_descent_wstep
    monkeypatch.setattr(
        alternation,
        "coordinate_descent_wstep",
        lambda *args, **kwargs: max(real(*args, **kwargs), 1),  # "w moved"
    )
    x, y, w, alpha, bias, _ = planted([-1.0, 0.0, 1.0], m=3000, n=24, c=8, seed=6)
    init = (w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))) * alpha[
        :, None
    ]
    runs = {
        patience: solve_layer(
            x, y, QUANTIZER, init=init, bias=bias, config=SolverConfig(iters=20, patience=patience)
        )
        for patience in (0, 2)
    }
    assert len(runs[0].history) - 1 == 20
    stopped = len(runs[2].history) - 1
    assert SolverConfig().repair_iters < stopped < 20
    assert runs[2].agreement >= runs[0].agreement - 0.002
    with pytest.raises(ValueError, match="patience"):
        SolverConfig(patience=-1)
