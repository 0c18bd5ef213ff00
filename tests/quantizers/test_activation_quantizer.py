"""Step 1: the sparse activation quantizer Q (TSQ-METHOD.md, "Step 1").

Q(x) = 0 for x <= eps, k d for (k - 1/2) d < x <= (k + 1/2) d (the k = 1 bin starts at eps),
(2^bits - 1) d above (2^bits - 3/2) d; straight-through gradient 1 on 0 < x < (2^bits - 1) d.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tsquant
from tsquant import SparseQuantizer
from tsquant.quantizers.activation import gaussian_mse, gaussian_optimal_step

NORMAL = NormalDist()


def reference_code(x: float, step: float, eps: float, bits: int) -> int:
    """Q's code written straight from the spec's formula (pure Python, float64)."""
    top = 2**bits - 1
    if x <= eps:
        return 0
    if x > (top - 0.5) * step:  # (2^bits - 3/2) d
        return top
    for k in range(1, top):
        lower = eps if k == 1 else (k - 0.5) * step
        if lower < x <= (k + 0.5) * step:
            return k
    return top  # bits == 1: everything above eps is the single non-zero level


def edge_points(step: float, eps: float, bits: int) -> list[float]:
    """Every threshold of Q, its float64 neighbours, and a few interior points."""
    edges = [eps] + [(k + 0.5) * step for k in range(1, 2**bits - 1)]
    points = [-5.0, -1e-12, 0.0, 5e-324, 0.5 * eps, 100.0 * step]
    for edge in edges:
        points += [math.nextafter(edge, -math.inf), edge, math.nextafter(edge, math.inf)]
    points += [k * step for k in range(2**bits)]
    return points


# --- design -------------------------------------------------------------------------------------


def test_hwgq_step_for_eps_zero():
    q = SparseQuantizer.from_gaussian(bits=2, eps=0.0)
    assert q.bits == 2 and isinstance(q.bits, int)
    assert q.eps == 0.0
    assert q.step == pytest.approx(0.5388, abs=1e-3)
    assert q.sparsity == pytest.approx(0.5, abs=1e-12)


def test_released_alexnet_step_for_eps_032():
    q = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    assert q.bits == 2
    assert q.eps == pytest.approx(0.32, abs=1e-12)
    assert q.step == pytest.approx(0.6487, abs=1e-3)
    assert q.sparsity == pytest.approx(0.6255, abs=1e-4)
    assert q.sparsity == pytest.approx(NORMAL.cdf(0.32), abs=1e-12)


@pytest.mark.parametrize("bits,eps", [(1, 0.0), (2, 0.0), (2, 0.32), (3, 0.5), (4, 0.1)])
def test_designed_step_is_a_local_minimum_of_the_gaussian_mse(bits, eps):
    d = gaussian_optimal_step(bits, eps)
    best = gaussian_mse(d, eps, bits)
    for factor in (0.98, 0.995, 1.005, 1.02):
        assert gaussian_mse(d * factor, eps, bits) > best


@pytest.mark.parametrize(
    "bits,eps,step", [(2, 0.32, 0.6487), (2, 0.0, 0.5388), (1, 0.2, 0.8), (3, 0.4, 0.3)]
)
def test_gaussian_mse_matches_monte_carlo(bits, eps, step):
    gen = torch.Generator().manual_seed(1234 + bits)
    x = torch.randn(1_000_000, dtype=torch.float64, generator=gen)
    q = SparseQuantizer(bits=bits, eps=eps, step=step)
    sq = (q(x) - torch.relu(x)) ** 2
    mc, se = float(sq.mean()), float(sq.std()) / math.sqrt(x.numel())
    analytic = gaussian_mse(step, eps, bits)
    assert abs(analytic - mc) < 5 * se + 1e-9, (analytic, mc, se)


def test_from_gaussian_with_target_sparsity():
    q = SparseQuantizer.from_gaussian(bits=2, sparsity=0.7)
    assert q.eps == pytest.approx(NORMAL.inv_cdf(0.7), abs=1e-9)
    assert q.sparsity == pytest.approx(0.7, abs=1e-9)
    assert q.step == pytest.approx(gaussian_optimal_step(2, NORMAL.inv_cdf(0.7)), abs=1e-9)


def test_from_data_on_gaussian_samples_is_close_to_the_gaussian_design():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(7))
    q = SparseQuantizer.from_data(x, bits=2, eps=0.32)
    assert q.bits == 2 and q.eps == pytest.approx(0.32)
    assert q.step == pytest.approx(0.6487, abs=0.02)
    # the fit follows the scale of the data: 2x the inputs (and eps) gives ~2x the step
    q2 = SparseQuantizer.from_data(2 * x, bits=2, eps=0.64)
    assert q2.step == pytest.approx(2 * 0.6487, abs=0.04)


def test_from_data_rejects_empty_or_nan_samples():
    with pytest.raises(ValueError, match="NaN|empty"):
        SparseQuantizer.from_data(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="NaN|empty"):
        SparseQuantizer.from_data(torch.empty(0))


# --- forward: levels and thresholds -------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,eps,step",
    [
        (1, 0.0, 1.0),
        (1, 0.3, 0.7),
        (2, 0.0, 0.5388),
        (2, 0.32, 0.6487),
        (3, 0.2, 0.25),
        (4, 0.05, 0.1),
        (2, 0.9, 0.61),
    ],
)
def test_levels_and_thresholds_follow_the_formula_exactly(bits, eps, step):
    q = SparseQuantizer(bits=bits, eps=eps, step=step)
    gen = torch.Generator().manual_seed(bits)
    random = (torch.rand(2000, dtype=torch.float64, generator=gen) * 2.2 - 0.2) * 2**bits * step
    points = torch.cat([torch.tensor(edge_points(step, eps, bits), dtype=torch.float64), random])
    expected = torch.tensor([reference_code(float(p), step, eps, bits) for p in points])
    assert torch.equal(q.codes(points).long(), expected)
    assert torch.equal(q(points), expected.double() * step)


def test_right_closed_bins_on_explicit_edges():
    d, eps = 0.5, 0.2
    q = SparseQuantizer(bits=2, eps=eps, step=d)
    x = torch.tensor(
        [eps, math.nextafter(eps, 1), 0.75, math.nextafter(0.75, 1), 0.0, -3.0, 9.0],
        dtype=torch.float64,
    )
    assert q.codes(x).tolist() == [0, 1, 1, 2, 0, 0, 3]  # edges 0.2, 0.75, 1.25
    q3 = SparseQuantizer(bits=3, eps=eps, step=d)  # edges 0.2, 0.75, 1.25, ..., 3.25
    x3 = torch.tensor(
        [1.25, math.nextafter(1.25, 2), 3.25, math.nextafter(3.25, 4)], dtype=torch.float64
    )
    assert q3.codes(x3).tolist() == [2, 3, 6, 7]


def test_float32_inputs_on_the_float32_edges():
    q = SparseQuantizer(bits=2, eps=0.32, step=0.6487)
    edges = torch.tensor([0.32, 1.5 * 0.6487], dtype=torch.float64).float()
    above = torch.nextafter(edges, torch.full_like(edges, 10.0))
    assert q.codes(edges).tolist() == [0, 1]
    assert q.codes(above).tolist() == [1, 2]
    assert q(above).dtype == torch.float32


# --- codes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_codes_round_trip(bits):
    q = SparseQuantizer(bits=bits, eps=0.0, step=0.37)
    codes = torch.arange(2**bits, dtype=torch.uint8)
    values = q.decode(codes)
    assert torch.allclose(values, torch.arange(2**bits) * 0.37)
    assert torch.equal(q.encode(values), codes)  # codes -> values -> codes
    assert torch.equal(q.codes(values), codes)  # levels lie in their own bins
    x = torch.randn(500, generator=torch.Generator().manual_seed(3)) * 2**bits * 0.37
    assert torch.equal(q.encode(q(x)), q.codes(x))  # values -> codes
    assert q.codes(x).dtype == torch.uint8


def test_encode_rejects_values_off_the_levels():
    q = SparseQuantizer(bits=2, eps=0.32, step=0.5)
    with pytest.raises(ValueError, match="levels"):
        q.encode(torch.tensor([0.0, 2.0]))  # 2.0 / 0.5 = code 4 > 3
    with pytest.raises(ValueError, match="levels"):
        q.encode(torch.tensor([-0.5]))


# --- backward: straight-through estimator -------------------------------------------------------


@pytest.mark.parametrize("bits,eps,step", [(2, 0.32, 0.6487), (1, 0.3, 1.0), (3, 0.1, 0.25)])
def test_ste_gradient_mask(bits, eps, step):
    q = SparseQuantizer(bits=bits, eps=eps, step=step)
    upper = (2**bits - 1) * step
    points = [
        -1.0,
        0.0,
        5e-324,
        0.5 * eps,
        eps,
        math.nextafter(eps, 9),
        0.5 * upper,
        math.nextafter(upper, 0),
        upper,
        math.nextafter(upper, 99),
        upper + 1.0,
    ]
    # gradient 1 on the open interval (0, (2^bits - 1) d): the lower edge is 0, not eps
    expected = [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    q(x).backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [3.0 * e for e in expected]


def test_ste_gradient_on_random_inputs():
    q = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    upstream = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    q(x).backward(upstream)
    mask = ((x > 0) & (x < 3 * q.step)).float()
    assert torch.equal(x.grad, upstream * mask)
    assert 0 < mask.mean() < 1  # the data exercises both sides of the mask


@pytest.mark.parametrize("learned", [False, True])
def test_gradient_takes_the_inputs_memory_layout(learned):
    # an NCHW gradient arriving at a channels-last activation (a residual sum, a pooling head)
    # must leave the quantizer channels-last: passed on NCHW it slows every BN backward below
    q = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    if learned:
        q.learn_step()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_()
    upstream = torch.randn(2, 8, 5, 5, generator=gen)  # NCHW-contiguous
    (grad,) = torch.autograd.grad(q(x), x, upstream)  # as computed: .grad would re-lay it out
    assert grad.is_contiguous(memory_format=torch.channels_last)
    mask = ((x > 0) & (x < 3 * q.step)).float()
    assert torch.equal(grad, upstream * mask)


# --- properties ---------------------------------------------------------------------------------

finite = st.floats(min_value=-20.0, max_value=60.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(1, 4),
    step=st.floats(0.05, 3.0),
    eps_fraction=st.floats(0.0, 0.99),
    xs=st.lists(finite, min_size=2, max_size=40),
)
def test_monotone(bits, step, eps_fraction, xs):
    eps = eps_fraction * 1.5 * step
    q = SparseQuantizer(bits=bits, eps=eps, step=step)
    edges = [eps] + [(k + 0.5) * step for k in range(1, 2**bits - 1)]
    near = [math.nextafter(e, s) for e in edges for s in (-math.inf, math.inf)]
    x = torch.tensor(sorted(xs + edges + near), dtype=torch.float64)
    y = q(x)
    assert bool((y[1:] >= y[:-1]).all())
    assert bool((q(x.float())[1:] >= q(x.float())[:-1]).all())


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(1, 4),
    step=st.floats(0.05, 3.0),
    eps_fraction=st.floats(0.0, 0.9, exclude_max=True),
    xs=st.lists(finite, min_size=1, max_size=40),
)
def test_idempotent_when_eps_below_step(bits, step, eps_fraction, xs):
    eps = eps_fraction * step  # eps < 0.9 d: every level k d lies in its own bin
    q = SparseQuantizer(bits=bits, eps=eps, step=step)
    for dtype in (torch.float64, torch.float32):
        x = torch.tensor(xs, dtype=dtype)
        y = q(x)
        assert torch.equal(q(y), y)
        assert torch.equal(q.codes(y), q.codes(x))


# --- validation and serialisation ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits.*1\.\.8"):
        SparseQuantizer.from_gaussian(bits=bits, eps=0.32)
    with pytest.raises(ValueError, match="bits"):
        SparseQuantizer(bits=bits, eps=0.0, step=0.5)


def test_negative_eps():
    with pytest.raises(ValueError, match="eps must be .*>= 0"):
        SparseQuantizer.from_gaussian(bits=2, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        SparseQuantizer(bits=2, eps=-1e-9, step=0.5)
    with pytest.raises(ValueError, match="eps"):
        SparseQuantizer(bits=2, eps=float("nan"), step=0.5)


@pytest.mark.parametrize("eps", [0.75, 0.9, 3.0])
def test_eps_at_or_above_second_threshold(eps):
    with pytest.raises(ValueError, match=r"eps=.*1\.5\*d"):
        SparseQuantizer(bits=2, eps=eps, step=0.5)
    SparseQuantizer(bits=2, eps=math.nextafter(0.75, 0), step=0.5)  # just below is fine


def test_bad_sparsity_and_ambiguous_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        SparseQuantizer.from_gaussian(bits=2, sparsity=0.3)
    with pytest.raises(ValueError, match="either eps or sparsity"):
        SparseQuantizer.from_gaussian(bits=2, eps=0.3, sparsity=0.7)
    with pytest.raises(ValueError, match="step"):
        SparseQuantizer(bits=2, eps=0.1, step=0.0)


def test_state_dict_round_trip(tmp_path):
    q = SparseQuantizer.from_gaussian(bits=3, eps=0.5)
    state = q.state_dict()
    assert set(state) == {"qparams"}
    other = SparseQuantizer(bits=2, eps=0.0)
    assert other.step != pytest.approx(q.step)
    other.load_state_dict(state)
    assert (other.bits, other.eps, other.step) == (3, 0.5, q.step)
    path = tmp_path / "q.safetensors"
    save_file(state, str(path))
    third = SparseQuantizer(bits=1, eps=0.0, step=1.0)
    third.load_state_dict(load_file(str(path)))
    assert (third.bits, third.eps, third.step) == (3, 0.5, q.step)
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(third(x), q(x))


def test_public_api_exports_the_quantizer():
    assert tsquant.SparseQuantizer is SparseQuantizer
    assert "bits=2" in repr(SparseQuantizer.from_gaussian(bits=2, eps=0.32))


# --- learned step (beyond the paper: codes.learn_step) ----------------------------------------


def test_learned_step_gradients_are_lsqs_when_eps_is_half_a_step():
    """With eps = d/2 the sparse bins are round-to-nearest on [0, 3d], so Q and both gradients
    must equal LSQ's unsigned 2-bit quantizer (the QAT baseline's own implementation)."""
    from tsquant.baselines.lsq import lsq_quantize

    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 1.5).requires_grad_()
    upstream = torch.randn_like(x)
    q = SparseQuantizer(bits=2, eps=0.35, step=0.7).double().learn_step()
    q.learned_step.data = q.learned_step.data.double()
    q(x).mul(upstream).sum().backward()
    ours = (x.grad.clone(), q.learned_step.grad.clone())

    x.grad = None
    step = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    scale = 1 / math.sqrt(x[0].numel() * 3)
    lsq_quantize(x, step, 0, 3, scale).mul(upstream).sum().backward()
    torch.testing.assert_close(q(x), lsq_quantize(x, step, 0, 3, scale))
    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], step.grad)


def test_learned_step_trains_and_freezes_into_the_design():
    torch.manual_seed(0)
    q = SparseQuantizer(bits=2, eps=0.32).learn_step()
    assert [n for n, _ in q.named_parameters()] == ["learned_step"]
    optimizer = torch.optim.SGD(q.parameters(), lr=0.05)
    x = torch.randn(64, 8) * 3  # wider than the N(0, 1) design: the MSE wants a larger step
    for _ in range(50):
        optimizer.zero_grad()
        (q(x) - x.clamp_min(0)).pow(2).mean().backward()
        optimizer.step()
    learned = q.step
    assert learned > 1.2 * gaussian_optimal_step(2, 0.32)
    q.freeze_step()
    assert list(q.parameters()) == [] and "learned_step" not in q.state_dict()
    assert q.step == pytest.approx(learned) and q.eps == pytest.approx(0.32)
    assert torch.equal(
        q.codes(x), tsquant.quantizers.activation.quantize_codes(x, learned, 0.32, 2)
    )


def test_learned_step_never_empties_level_one():
    q = SparseQuantizer(bits=2, eps=0.6).learn_step()
    q.learned_step.data.fill_(0.1)  # as if an optimizer step overshot: eps >= 1.5 d
    out = q(torch.linspace(-1, 3, 50))
    assert q.step >= 0.6 / 1.5 and torch.isfinite(out).all()
    assert q.freeze_step().step == pytest.approx(q.min_step)
