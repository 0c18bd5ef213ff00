"""Streaming second-order statistics of a layer input (TSQ-METHOD.md, step 2, "w" step).

The w step needs only A = X'X and b = X'r. Both are sums over rows of X, so they are
accumulated chunk by chunk in float64 and X never has to be held whole to build them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .rows import RowStore, as_row_store


class GramAccumulator:
    """Accumulates X'X, X'1 and the row count over chunks of rows of X (each (rows, n))."""

    def __init__(self, n: int, device: torch.device | str = "cpu", dtype=torch.float64):
        self.gram = torch.zeros(n, n, dtype=dtype, device=device)
        self.column_sum = torch.zeros(n, dtype=dtype, device=device)
        self.rows = 0

    def update(self, chunk: torch.Tensor) -> None:
        x = chunk.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.column_sum += x.sum(0)
        self.rows += x.shape[0]


def row_chunks(m: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, m, chunk_rows):
        yield slice(start, min(start + chunk_rows, m))


def gram(x: torch.Tensor | RowStore, chunk_rows: int = 16384) -> GramAccumulator:
    """X'X, X'1 and the row count, one block of rows at a time."""
    store = as_row_store(x, chunk_rows)
    acc = GramAccumulator(store.width, device=store.device)
    for i in range(store.num_blocks):  # one pass: not worth a place in the cache
        acc.update(store.block(i, keep=False))
    return acc


def cross(x: torch.Tensor, r: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
    """X'R in float64, chunked over rows: (n, c)."""
    out = torch.zeros(x.shape[1], r.shape[1], dtype=torch.float64, device=x.device)
    for rows in row_chunks(x.shape[0], chunk_rows):
        out.addmm_(x[rows].double().T, r[rows].double())
    return out
