"""Chunked second-order statistics equal the unchunked ones."""

from __future__ import annotations

import pytest
import torch

from tsquant.solver import GramAccumulator, cross, gram


@pytest.mark.parametrize("m", [1, 7, 50, 51])
def test_gram_chunked_equals_unchunked(m):
    x = torch.randn(m, 6, generator=torch.Generator().manual_seed(m))
    one = gram(x, chunk_rows=max(m, 1))
    chunked = gram(x, chunk_rows=7)
    exact = x.double().T @ x.double()
    assert chunked.rows == one.rows == m
    assert chunked.gram.dtype == torch.float64
    assert torch.allclose(chunked.gram, one.gram, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked.gram, exact, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked.column_sum, x.double().sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [3, 50, 64])
def test_cross_chunked_equals_unchunked(m):
    gen = torch.Generator().manual_seed(m)
    x, r = torch.randn(m, 5, generator=gen), torch.randn(m, 3, generator=gen)
    one, chunked = cross(x, r, chunk_rows=m), cross(x, r, chunk_rows=7)
    assert chunked.shape == (5, 3) and chunked.dtype == torch.float64
    assert torch.allclose(chunked, one, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked, x.double().T @ r.double(), rtol=1e-12, atol=1e-12)


def test_accumulator_over_explicit_chunks():
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    acc = GramAccumulator(4)
    for part in (x[:3], x[3:3], x[3:17], x[17:]):
        acc.update(part)
    assert acc.rows == 20
    assert torch.allclose(acc.gram, x.double().T @ x.double(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.column_sum, x.double().sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [5, 50, 64])
def test_target_sums_chunked_equal_unchunked(m):
    gen = torch.Generator().manual_seed(m)
    x, t = torch.randn(m, 5, generator=gen), torch.randn(m, 3, generator=gen)
    acc = gram(x, chunk_rows=7, targets=t)
    x64, t64 = x.double(), t.double()
    assert torch.allclose(acc.cross, x64.T @ t64, rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.target_sum, t64.sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(acc.target_square_sum, (t64 * t64).sum(0), rtol=1e-12, atol=1e-12)
