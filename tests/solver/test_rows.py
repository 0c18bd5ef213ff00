"""RowStore: exact compact storage of step 2's rows (TSQ-METHOD.md, step 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant import SparseQuantizer
from tsquant.solver import gram, solve_layer, solve_linear_layer
from tsquant.solver.rows import RowStore


def blocks_of(values: torch.Tensor, sizes, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return [values[torch.randint(len(values), (rows, width), generator=gen)] for rows in sizes]


@settings(max_examples=60, deadline=None)
@given(
    palette=st.integers(1, 300),
    width=st.integers(1, 13),
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_round_trip_is_exact_for_any_palette_width_and_blocks(palette, width, sizes, seed):
    values = torch.randn(palette, generator=torch.Generator().manual_seed(seed))
    blocks = blocks_of(values, sizes, width, seed)
    store = RowStore()
    for b in blocks:
        store.append(b)
    assert store.rows == sum(sizes) and store.block_rows == sizes and store.width == width
    for i, b in enumerate(blocks):
        assert torch.equal(store.block(i), b)
        assert torch.equal(store.block(i, torch.float64), b.double())
    assert torch.equal(store.to_tensor(), torch.cat(blocks))


def test_codes_are_packed_four_per_byte_and_grow_to_bytes_then_floats():
    step = 0.37
    store = RowStore()
    codes = torch.randint(0, 4, (100, 9), generator=torch.Generator().manual_seed(0))
    store.append(codes.float() * step)
    assert store.nbytes == 100 * 3  # ceil(9 / 4) bytes per row: 4 levels in 2 bits
    more = torch.tensor([[5 * step] * 9])  # a fifth value: indices become whole bytes
    store.append(more)
    assert store.nbytes == 101 * 9
    assert torch.equal(store.to_tensor(), torch.cat([codes.float() * step, more]))
    wide = torch.randn(10, 9)  # 90 new values: past 256 distinct values, the store keeps floats
    store.append(torch.cat([wide, wide + 1, wide + 2]))
    assert store.palette is None
    assert torch.equal(store.block(0), codes.float() * step)
    assert store.nbytes == (101 + 30) * 9 * 4


def test_bad_blocks_are_refused():
    store = RowStore()
    store.append(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="columns"):
        store.append(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        store.append(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match=r"\(rows, k\)"):
        store.append(torch.zeros(3))


def test_gram_over_stored_blocks_equals_the_unchunked_one():
    codes = torch.randint(0, 4, (1000, 20), generator=torch.Generator().manual_seed(1))
    x = codes.float() * 0.25
    store = RowStore()
    for start in range(0, 1000, 97):
        store.append(x[start : start + 97])
    chunked, whole = gram(store), gram(x, chunk_rows=1000)
    assert chunked.rows == 1000
    assert torch.equal(chunked.gram, x.double().T @ x.double())  # small integers: exact
    assert torch.allclose(chunked.gram, whole.gram, rtol=1e-12, atol=0)
    assert torch.allclose(chunked.column_sum, x.double().sum(0), rtol=1e-12, atol=0)


def planted_code_problem(seed, m=3000, n=24, c=6):
    gen = torch.Generator().manual_seed(seed)
    q_in = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    x = q_in(torch.randn(m, n, generator=gen))  # layer inputs are codes * step
    w = torch.randint(-1, 2, (c, n), generator=gen).float()
    s = x @ w.T
    pre = (s - s.mean(0)) / s.std(0)
    quantizer = SparseQuantizer.from_gaussian(bits=2, eps=0.32)
    offset = q_in(torch.randn(m, c, generator=gen))
    return x, quantizer(pre + offset), quantizer, offset, w * 0.3 / s.std(0)[:, None]


def stored(t: torch.Tensor, rows: int) -> RowStore:
    store = RowStore()
    for start in range(0, t.shape[0], rows):
        store.append(t[start : start + rows])
    return store


def test_solver_on_row_stores_equals_the_solver_on_tensors():
    x, y, quantizer, offset, init = planted_code_problem(0)
    from tsquant import SolverConfig

    cfg = SolverConfig(chunk_rows=700, iters=6)
    on_tensors = solve_layer(x, y, quantizer, init=init, offset=offset, config=cfg)
    on_stores = solve_layer(
        stored(x, 700), stored(y, 700), quantizer, init=init, offset=stored(offset, 700), config=cfg
    )
    assert torch.equal(on_tensors.weight_codes, on_stores.weight_codes)
    assert torch.equal(on_tensors.alpha, on_stores.alpha)
    assert torch.equal(on_tensors.bias, on_stores.bias)
    assert str(on_tensors.history) == str(on_stores.history)  # str: nan == nan
    assert on_stores.agreement > on_stores.agreement_init


def test_linear_solver_on_row_stores_equals_the_solver_on_tensors():
    x, _, _, _, init = planted_code_problem(1)
    target = x @ init.T + 0.01 * torch.randn(x.shape[0], init.shape[0])
    from tsquant import SolverConfig

    cfg = SolverConfig(chunk_rows=512, iters=5)
    a = solve_linear_layer(x, target, init=init, config=cfg)
    b = solve_linear_layer(stored(x, 512), stored(target, 512), init=init, config=cfg)
    assert torch.equal(a.weight_codes, b.weight_codes) and torch.equal(a.alpha, b.alpha)
    assert a.relative_error == b.relative_error < a.relative_error_init


def test_misaligned_blocks_are_refused():
    x, y, quantizer, _, _ = planted_code_problem(2, m=100)
    with pytest.raises(ValueError, match="same row blocks"):
        solve_layer(stored(x, 30), stored(y, 40), quantizer)


def test_decoded_blocks_are_cached_up_to_the_budget_only():
    codes = torch.randint(0, 4, (30, 8), generator=torch.Generator().manual_seed(3)).float()
    store = RowStore(cache_bytes=10 * 8 * 4)  # room for one decoded block of 10 rows
    for start in (0, 10, 20):
        store.append(codes[start : start + 10])
    first = store.block(0)
    assert store.block(0) is first and store.cached_bytes == 10 * 8 * 4
    assert store.block(1) is not store.block(1)  # over the budget: decoded every time
    assert torch.equal(store.to_tensor(), codes)
    assert store.nbytes == 30 * 2  # the packed codes; the cache is not counted


def test_warm_decodes_blocks_in_order_until_the_budget_is_spent():
    codes = torch.randint(0, 4, (30, 8), generator=torch.Generator().manual_seed(4)).float()
    store = RowStore(cache_bytes=2 * 10 * 8 * 4 + 4)  # room for two decoded blocks of 10 rows
    for start in (0, 10, 20):
        store.append(codes[start : start + 10])
    store.warm()
    assert store.cached_bytes == 2 * 10 * 8 * 4
    assert store.block(0) is store.block(0) and store.block(1) is store.block(1)
    assert store.block(2) is not store.block(2)  # no room left: decoded every time
    floats = RowStore(compress=False, cache_bytes=1 << 20)
    floats.append(codes + 0.5)
    floats.warm()  # float blocks are read as they are: nothing to decode
    assert floats.cached_bytes == 0


def test_projections_are_views_of_one_buffer_that_each_call_overwrites():
    from tsquant.solver import LayerProblem

    x, y, quantizer, offset, init = planted_code_problem(5)
    problem = LayerProblem(x, y, quantizer, offset, chunk_rows=300)
    first = problem.projections(init)
    expected = [block @ init.T.float() for block in problem.x.blocks()]
    assert [b.shape for b in first] == [e.shape for e in expected]
    assert all(torch.equal(b, e) for b, e in zip(first, expected, strict=True))
    second = problem.projections(-init)
    assert second[0].data_ptr() == first[0].data_ptr()  # no second (m, c) allocation
    assert torch.equal(torch.cat(first), -torch.cat(expected))  # the old views see the new S


@pytest.mark.parametrize("budget", [0, 40_000])
def test_a_small_cache_budget_changes_memory_not_results(budget):
    from tsquant import SolverConfig
    from tsquant.solver.rows import CacheBudget

    x, y, quantizer, offset, init = planted_code_problem(3)
    cfg = SolverConfig(chunk_rows=500, iters=4)

    def stores(limit):
        cache = CacheBudget(limit)
        xs, offs = RowStore(cache=cache), RowStore(cache=cache)
        for start in range(0, x.shape[0], 500):
            xs.append(x[start : start + 500])
            offs.append(offset[start : start + 500])
        return xs, offs, cache

    xs, offs, cache = stores(budget)
    small = solve_layer(xs, stored(y, 500), quantizer, init=init, offset=offs, config=cfg)
    assert cache.used <= budget
    xs, offs, cache = stores(1 << 40)
    large = solve_layer(xs, stored(y, 500), quantizer, init=init, offset=offs, config=cfg)
    assert cache.used > budget
    assert torch.equal(small.weight_codes, large.weight_codes)
    assert torch.equal(small.alpha, large.alpha) and torch.equal(small.bias, large.bias)


_MMAP_PROBE = """
import os, sys, torch
from tsquant.solver.rows import set_mmap_threshold

if not set_mmap_threshold(int(sys.argv[1])) and int(sys.argv[1]) > 0:
    sys.exit(3)  # not glibc


def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# The first block also loads code; freeing it is what makes glibc raise its own threshold.
torch.ones(16 << 20, dtype=torch.uint8)
before = resident_mb()
block = torch.ones(16 << 20, dtype=torch.uint8)  # 16 MB, touched
grown = resident_mb() - before
del block
print(grown, resident_mb() - before)
"""


def _resident_growth_mb(threshold_bytes: int) -> tuple[float, float]:
    # A fresh interpreter: in this one, blocks freed by earlier tests may sit in the heap's free
    # lists, and glibc serves a request from those before it considers mmap.
    probe = subprocess.run(
        [sys.executable, "-c", _MMAP_PROBE, str(threshold_bytes)], capture_output=True, text=True
    )
    if probe.returncode == 3:
        pytest.skip("not glibc")
    assert probe.returncode == 0, probe.stderr
    grown, left = map(float, probe.stdout.split())
    return grown, left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_block_sized_allocations_go_back_to_the_os_after_the_threshold_is_set():
    from tsquant.solver.rows import set_mmap_threshold

    assert not set_mmap_threshold(0)  # 0 leaves the allocator alone
    grown, left = _resident_growth_mb(0)
    assert grown > 12 and left > 12  # glibc's own threshold: the freed block stays in the heap
    grown, left = _resident_growth_mb(4 << 20)
    assert grown > 12
    assert left < 4  # unmapped when freed
