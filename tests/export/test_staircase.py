import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant.export.runtime import integer_thresholds
from tsquant.export.staircase import (
    accumulator_samples,
    fit_line,
    fit_requantized,
    float32_thresholds,
    requantized_codes,
    staircase_codes,
)
from tsquant.quantizers.activation import thresholds


def fit_staircase(limits, bound, first_gap=1.0, spacing=None):
    return fit_line(accumulator_samples(limits, bound), first_gap, spacing)


def every_code(limits: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, 2*bound + 1) accumulators and their true codes, by brute force."""
    values = np.broadcast_to(np.arange(-bound, bound + 1), (limits.shape[0], 2 * bound + 1))
    truth = (values[..., None] > limits[:, None, :]).sum(-1)
    return values, truth


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-300, 300), min_size=1, max_size=7).map(sorted),
    st.integers(1, 400),
)
def test_a_fitted_staircase_gives_the_true_code_on_every_reachable_integer(limits, bound):
    limits = np.array([limits])
    line = fit_staircase(limits, bound)
    if line is not None:
        values, truth = every_code(limits, bound)
        assert (staircase_codes(line, values, limits.shape[1]) == truth).all()


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 2, 3]),
    st.floats(0.002, 0.2),
    st.sampled_from([0.0, 0.32, 0.6]),
)
def test_tsq_sparse_quantizer_thresholds_fit_a_staircase(seed, bits, scale, eps):
    """The sparse quantizer's edges (eps, then (k + 1/2) step) on integer accumulators: the
    line bent to the first gap fits every channel, and is exact."""
    g = torch.Generator().manual_seed(seed)
    step = {1: 0.7979, 2: 0.6487, 3: 0.3352}[bits]
    channels, bound = 16, 864
    alpha_step = torch.rand(channels, generator=g, dtype=torch.float64) * scale + scale / 10
    offset = torch.randn(channels, generator=g, dtype=torch.float64)
    edges = thresholds(step, min(eps, 1.4 * step), bits)
    _, limits = integer_thresholds(alpha_step, offset, edges)
    limits = limits.numpy()
    first_gap = float(edges[1] - edges[0]) / step if bits > 1 else 1.0
    line = fit_staircase(limits, bound, first_gap)
    assert line is not None
    values, truth = every_code(limits, bound)
    assert (staircase_codes(line, values, limits.shape[1]) == truth).all()


def test_thresholds_far_from_uniform_have_no_staircase():
    assert fit_staircase(np.array([[0, 1, 40]]), 100) is None
    assert fit_staircase(np.array([[0, 1, 40], [0, 1, 40]]) * np.array([[0], [1]]), 100) is None


def test_thresholds_beyond_the_reachable_accumulators_still_fit():
    """A channel whose code never changes within [-bound, bound] (e.g. a dead or always-on
    channel, thresholds clamped to +-2^40) needs its crossings only outside that range."""
    limits = np.array([[-(2**40)] * 3, [2**40] * 3, [-3, 3, 9]])
    line = fit_staircase(limits, 100)
    assert line is not None
    values, truth = every_code(limits, 100)
    assert (staircase_codes(line, values, 3) == truth).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 0.2), st.sampled_from([1, 3]))
def test_a_requantized_staircase_gives_the_true_code_with_room_to_spare(seed, scale, weight_max):
    """QLinearConv's requantization, round((factor * v + bias) * scale), checked by brute force
    in float32 and with every accumulator at least the margin away from a rounding boundary."""
    g = torch.Generator().manual_seed(seed)
    channels, bound = 16, 864
    alpha_step = torch.rand(channels, generator=g, dtype=torch.float64) * scale + scale / 10
    offset = torch.randn(channels, generator=g, dtype=torch.float64)
    edges = thresholds(0.6487, 0.32, 2)
    _, limits = integer_thresholds(alpha_step, offset, edges)
    limits = limits.numpy()
    line = fit_requantized(
        accumulator_samples(limits, bound), weight_max, 3, (0.6487 / alpha_step).numpy()
    )
    if line is not None:
        parts = [part for part in line[:2] if part is not None]
        assert all(
            p.factor * weight_max <= 127 and 2 * 3 * p.factor * weight_max < 2**15 for p in parts
        )
        values, truth = every_code(limits, bound)
        codes, distance = requantized_codes(line, values, 3)
        assert (codes == truth).all() and distance.min() >= 1 / 64 * 0.99


def test_most_channels_of_a_2_bit_layer_fit_the_requantized_staircase():
    """At eps = 0.32 the first gap is 1.007 steps: a uniform grid fits the integer jumps of
    nearly every channel while a step spans few integers (the layer keeps the float line
    when one channel does not)."""
    g = torch.Generator().manual_seed(0)
    alpha_step = torch.rand(2000, generator=g, dtype=torch.float64) * 0.04 + 0.02
    offset = torch.randn(2000, generator=g, dtype=torch.float64)
    _, limits = integer_thresholds(alpha_step, offset, thresholds(0.6487, 0.32, 2))
    spacing = (0.6487 / alpha_step).numpy()
    fits = [
        fit_requantized(
            accumulator_samples(limits[c : c + 1].numpy(), 864), 1, 3, spacing[c : c + 1]
        )
        is not None
        for c in range(2000)
    ]
    assert np.mean(fits) > 0.99


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_float32_thresholds_compare_exactly_like_the_float64_stages(seed, stages):
    """y > Y_k in float32 gives the same answer as the float64 stages' f(y) > edge_k, at random
    values and at every threshold's float32 neighbours (where a rounding would show)."""
    rng = np.random.default_rng(seed)
    channels = 6
    chain = [(rng.uniform(0.05, 4, channels), rng.normal(0, 2, channels)) for _ in range(stages)]
    edges = np.sort(rng.normal(0, 2, 3))
    limits = float32_thresholds(chain, edges)
    y = rng.normal(0, 5, (channels, 2000)).astype(np.float32)
    finite = np.where(np.isfinite(limits), limits, 0)
    near = [
        finite,
        np.nextafter(finite, np.float32(np.inf)),
        np.nextafter(finite, np.float32(-np.inf)),
    ]
    y = np.concatenate([y, *near], 1)
    value = y.astype(np.float64)
    for scale, shift in chain:
        value = value * scale[:, None] + shift[:, None]
    for k, edge in enumerate(edges):
        assert ((y > limits[:, k : k + 1]) == (value > edge)).all()
