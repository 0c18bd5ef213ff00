"""AdaRound-style baseline on step 2's layer problem (tsquant.baselines.adaround)."""

from __future__ import annotations

import pytest
import torch

from tsquant import SparseQuantizer, TransformConfig, WeightGrid
from tsquant.baselines.adaround import AdaRoundConfig, adaround_layer
from tsquant.quantizers.weight import quantize_to_grid


def planted(seed, m=4000, n=32, c=8):
    gen = torch.Generator().manual_seed(seed)
    x = SparseQuantizer.from_gaussian(bits=2, eps=0.32)(torch.randn(m, n, generator=gen))
    w = torch.randint(-1, 2, (c, n), generator=gen).float() * 0.2
    s = x @ w.T
    bias = -s.mean(0)
    quantizer = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    y = quantizer(s + bias)
    init = w + 0.08 * torch.randn(c, n, generator=gen)  # FP weights near a ternary solution
    return x, y, quantizer, init, bias


def test_learned_rounding_beats_plain_rounding_and_stays_on_the_grid():
    x, y, quantizer, init, bias = planted(0)
    cfg = AdaRoundConfig(iters=1500, batch_rows=512, lr=1e-2)
    sol = adaround_layer(x, y, quantizer, init, "ternary", bias=bias, config=cfg)
    assert set(sol.weight_codes.unique().tolist()) <= {-1, 0, 1}
    _, alpha = quantize_to_grid(init, WeightGrid.from_spec("ternary"))
    assert torch.equal(sol.alpha, alpha.float())  # AdaRound keeps the scale
    assert sol.agreement > sol.agreement_init + 0.01
    again = adaround_layer(x, y, quantizer, init, "ternary", bias=bias, config=cfg)
    assert torch.equal(again.weight_codes, sol.weight_codes)  # deterministic on the CPU


def test_linear_targets_reduce_the_relative_error():
    x, _, _, init, bias = planted(1)
    target = x @ (init.round().clamp(-1, 1) * 0.2).T
    sol = adaround_layer(
        x, target, None, init, "ternary", config=AdaRoundConfig(iters=600, batch_rows=512, lr=1e-2)
    )
    assert sol.relative_error < sol.relative_error_init


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="iters"):
        AdaRoundConfig(iters=0)
    with pytest.raises(ValueError, match="method must be one of tsq, adaround, otwa"):
        TransformConfig(method="gptq")
