"""Streaming second-order statistics of a layer input (TSQ-METHOD.md, step 2, "w" step).

The w step needs only A = X'X and b = X'r. Both are sums over rows of X, so they are
accumulated chunk by chunk in float64 and X never has to be held whole to build them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .rows import RowStore, as_row_store

_CONVERT_ROWS = 4096


class GramAccumulator:
    """Accumulates X'X, X'1 and the row count over chunks of rows of X (each (rows, n)); given
    targets T (rows, c) with each chunk, also X'T, 1'T and the per-column sums of T^2: all a
    least-squares fit of T by X needs (solve_linear_layer)."""

    def __init__(self, n: int, device: torch.device | str = "cpu", dtype=torch.float64):
        self.gram = torch.zeros(n, n, dtype=dtype, device=device)
        self.column_sum = torch.zeros(n, dtype=dtype, device=device)
        self.rows = 0
        self.cross: torch.Tensor | None = None  # X'T (n, c)
        self.target_sum: torch.Tensor | None = None  # (c,)
        self.target_square_sum: torch.Tensor | None = None  # (c,)

    def update(self, chunk: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        if chunk.shape[0] > _CONVERT_ROWS:  # convert a slice at a time: a float64 copy is 2x
            for rows in row_chunks(chunk.shape[0], _CONVERT_ROWS):
                self.update(chunk[rows], None if targets is None else targets[rows])
            return
        x = chunk.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.column_sum += x.sum(0)
        self.rows += x.shape[0]
        if targets is None:
            return
        t = targets.to(self.gram.dtype)
        if self.cross is None:
            c = t.shape[1]
            self.cross = self.gram.new_zeros(x.shape[1], c)
            self.target_sum, self.target_square_sum = self.gram.new_zeros(2, c)
        self.cross.addmm_(x.T, t)
        self.target_sum += t.sum(0)
        self.target_square_sum += (t * t).sum(0)


def row_chunks(m: int, chunk_rows: int) -> Iterator[slice]:
    for start in range(0, m, chunk_rows):
        yield slice(start, min(start + chunk_rows, m))


def gram(
    x: torch.Tensor | RowStore,
    chunk_rows: int = 16384,
    targets: torch.Tensor | RowStore | None = None,
) -> GramAccumulator:
    """X'X, X'1 and the row count (with targets, also X'T and T's sums), one block at a time."""
    store = as_row_store(x, chunk_rows)
    target_store = None if targets is None else as_row_store(targets, chunk_rows)
    if target_store is not None and target_store.block_rows != store.block_rows:
        raise ValueError("X and the targets must be stored in the same row blocks")
    acc = GramAccumulator(store.width, device=store.device)
    for i in range(store.num_blocks):  # one pass: not worth a place in the cache
        t = None if target_store is None else target_store.block(i, keep=False)
        acc.update(store.block(i, keep=False), t)
    return acc


def cross(x: torch.Tensor, r: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
    """X'R in float64, chunked over rows: (n, c)."""
    out = torch.zeros(x.shape[1], r.shape[1], dtype=torch.float64, device=x.device)
    for rows in row_chunks(x.shape[0], chunk_rows):
        out.addmm_(x[rows].double().T, r[rows].double())
    return out
