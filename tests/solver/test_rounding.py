from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant.quantizers.weight import WeightGrid
from tsquant.solver import SolverConfig, solve_layer
from tsquant.solver.rounding import gptq_round, output_space_rounding, weight_space_rounding

TERNARY = WeightGrid.from_spec("ternary")


def correlated_inputs(seed: int, m: int = 2000, n: int = 24, mix: float = 0.8) -> torch.Tensor:
    """Rows whose columns share a common factor: where output- and weight-space rounding differ."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(m, 1, generator=gen, dtype=torch.float64)
    return mix * common + (1 - mix) * torch.randn(m, n, generator=gen, dtype=torch.float64)


def output_error(x, weights_t, codes_t, alpha):
    """||X (alpha w - w_fp)||^2 per channel."""
    return ((x @ (codes_t * alpha[None, :] - weights_t)) ** 2).sum(0)


def test_identity_gram_is_plain_rounding():
    targets = torch.randn(10, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes = gptq_round(torch.eye(10, dtype=torch.float64), targets * 1.5, TERNARY, damp=0.0)
    assert torch.equal(codes, TERNARY.round(targets * 1.5))


def test_rounding_errors_are_carried_to_later_coordinates():
    # two identical inputs: the output sees only w0 + w1, so 0.6 + 0.6 should become 1 + 0 (or
    # 0 + 1), which plain rounding (1 + 1) misses
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    codes = gptq_round(x.T @ x, torch.tensor([[0.6], [0.6]], dtype=torch.float64), TERNARY, 1e-6)
    assert float(codes.sum()) == 1.0


@pytest.mark.parametrize("bits", ["ternary", 2, 3, "narrow:3"])
def test_output_space_rounding_beats_weight_space_rounding_on_correlated_inputs(bits):
    grid = WeightGrid.from_spec(bits)
    x = correlated_inputs(seed=1)
    weights_t = torch.randn(24, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    codes, alpha = output_space_rounding(x.T @ x, weights_t, grid)
    assert codes.shape == (24, 8) and alpha.shape == (8,) and bool((alpha > 0).all())
    assert bool(((codes >= grid.low) & (codes <= grid.high)).all())
    ours = output_error(x, weights_t, codes, alpha)
    codes0, alpha0 = weight_space_rounding(weights_t.T, grid)
    theirs = output_error(x, weights_t, codes0, alpha0)
    assert float(ours.sum()) < 0.7 * float(theirs.sum())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    c=st.integers(1, 5),
    mix=st.floats(0.0, 0.95),
    bits=st.sampled_from(["ternary", 2, "narrow:3"]),
)
def test_never_worse_than_weight_space_rounding_in_output_space(seed, n, c, mix, bits):
    grid = WeightGrid.from_spec(bits)
    x = correlated_inputs(seed, m=200, n=n, mix=mix)
    gen = torch.Generator().manual_seed(seed + 1)
    weights_t = torch.randn(n, c, generator=gen, dtype=torch.float64)
    codes, alpha = output_space_rounding(x.T @ x, weights_t, grid)
    codes0, alpha0 = weight_space_rounding(weights_t.T, grid)
    # the weight-space codes with their least-squares alpha, as the search scores them
    gram_matrix = x.T @ x
    cross = (codes0 * (gram_matrix @ weights_t)).sum(0)
    quad = (codes0 * (gram_matrix @ codes0)).sum(0)
    alpha_ls = torch.where((quad > 0) & (cross > 0), cross / quad.clamp_min(1e-300), alpha0)
    ours = output_error(x, weights_t, codes, alpha)
    theirs = output_error(x, weights_t, codes0, alpha_ls)
    assert bool((ours <= theirs * (1 + 1e-9) + 1e-9).all())


def test_zero_inputs_keep_the_weight_space_rounding():
    weights_t = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    codes, alpha = output_space_rounding(torch.zeros(6, 6, dtype=torch.float64), weights_t, TERNARY)
    codes0, alpha0 = weight_space_rounding(weights_t.T, TERNARY)
    assert torch.equal(codes, codes0) and torch.allclose(alpha, alpha0)


def test_solver_start_is_validated_and_the_paper_variant_starts_from_otwa():
    with pytest.raises(ValueError, match="start must be one of gptq, otwa"):
        SolverConfig(start="nearest")
    with pytest.raises(ValueError, match="variant paper starts from"):
        SolverConfig(variant="paper", start="gptq")
    assert SolverConfig(variant="paper").effective.start == "otwa"
    assert SolverConfig().effective.start == "gptq"


def test_output_space_start_keeps_more_codes_of_a_layer_with_correlated_inputs():
    """Step 2 from the step-1 weights (init): the output-space start agrees more, before and
    after the alternation, than the OTWA start on inputs that share a common factor."""
    from tsquant import SparseQuantizer

    quantizer = SparseQuantizer(bits=2, eps=0.3, step=1.0)
    x = correlated_inputs(seed=3, m=6000, n=32, mix=0.7).float().clamp_min(0)
    gen = torch.Generator().manual_seed(4)
    w_fp = torch.randn(8, 32, generator=gen) * 0.4
    y = quantizer(x @ w_fp.T + 0.2 * torch.randn(6000, 8, generator=gen))
    gptq = solve_layer(x, y, quantizer, init=w_fp, config=SolverConfig(start="gptq"))
    otwa = solve_layer(x, y, quantizer, init=w_fp, config=SolverConfig(start="otwa"))
    assert gptq.agreement_init > otwa.agreement_init + 0.03
    assert gptq.agreement > otwa.agreement
