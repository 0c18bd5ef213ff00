"""Compact row storage for step 2's passes over a layer's data (TSQ-METHOD.md, step 2).

The solver reads X (layer inputs), the targets and the residual offsets only in passes over
rows, so they are appended block by block and decoded one block at a time. In a TSQ network the
inputs of a quantized layer are step-1 codes (a few levels times the step) plus zero padding, so
a block is kept as uint8 indices into a palette of at most 256 float32 values, packed four to a
byte while the palette has at most four values: 16x smaller than float32, and decoding is exact.
Data with more distinct values (an FP first layer's output, linear targets) stays float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

MAX_PALETTE = 256
_SAMPLE = 1 << 16  # values looked at to guess the palette of the first block
_ENCODE_ROWS = 2048  # rows encoded at a time


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim). Between passes that free
    many block-sized temporaries, glibc would keep those pages, scattered among the long-lived
    blocks, and resident memory would grow with the number of blocks."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
            pass


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve heap allocations of nbytes or more by mmap (glibc mallopt M_MMAP_THRESHOLD).

    glibc raises this threshold by itself, up to 32 MB, after large blocks are freed; block-sized
    temporaries (a decoded block, a batch's activations) then come from the heap, among the
    long-lived row blocks, and the heap's high-water mark grows with the number of blocks. A
    fixed threshold sends them to mmap, returned to the OS as soon as they are freed. The
    setting is process-wide (:func:`mmap_threshold` restores it). Returns whether it was set (glibc only)."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):  # not glibc
        return False


# once set, glibc's threshold stops adapting; its dynamic maximum on 64-bit is 32 MiB, where it
# ends up anyway after large blocks are freed, so that is where it is left
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 2**20


@contextlib.contextmanager
def mmap_threshold(nbytes: int):
    """:func:`set_mmap_threshold` for the duration of a block, then glibc's dynamic maximum
    (setting the threshold ends glibc's adjustment; 0: the allocator is left alone)."""
    applied = set_mmap_threshold(nbytes)
    try:
        yield applied
    finally:
        if applied:
            set_mmap_threshold(_GLIBC_MAX_MMAP_THRESHOLD)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


class CacheBudget:
    """Bytes that one layer problem may keep in decoded rows and per-row helpers (speed for
    memory): shared by its row stores and the solver, so peak memory stays bounded however many
    calibration rows there are."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used = limit_bytes, 0

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.limit

    def take(self, nbytes: int) -> bool:
        if not self.fits(nbytes):
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class RowStore:
    """Rows of an (m, k) matrix, appended in blocks (each (rows, k)) and read back block by block."""

    def __init__(
        self, compress: bool = True, cache_bytes: int = 0, cache: CacheBudget | None = None
    ):
        self.compress = compress
        # decoded float32 blocks kept for reuse while the budget allows
        self.cache = cache if cache is not None else CacheBudget(cache_bytes)
        self._cache: dict[int, torch.Tensor] = {}
        self.palette: torch.Tensor | None = None  # sorted float32 values, None: float32 blocks
        self.width: int | None = None
        self.block_rows: list[int] = []
        self._blocks: list[torch.Tensor] = []
        self._packed = False  # indices packed four per byte (palette of <= 4 values)
        self._decided = not compress  # palette or floats: decided on the first non-empty block

    @classmethod
    def from_tensor(cls, x: torch.Tensor, block_rows: int = 16384) -> RowStore:
        """Wrap a whole (m, k) tensor as float32 blocks (views where x is float32 already)."""
        if x.dim() != 2:
            raise ValueError(f"a row store holds (rows, k) matrices, got shape {tuple(x.shape)}")
        store = cls(compress=False, cache=CacheBudget(1 << 62))  # held whole already: no limit
        store.width = x.shape[1]
        for start in range(0, x.shape[0], block_rows):
            block = x[start : start + block_rows].float()
            store._blocks.append(block)
            store.block_rows.append(block.shape[0])
        return store

    # --- reading ---------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return sum(self.block_rows)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def device(self) -> torch.device:
        return self._blocks[0].device if self._blocks else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._blocks)

    def block(self, i: int, dtype: torch.dtype = torch.float32, keep: bool = True) -> torch.Tensor:
        """Block i decoded to (rows_i, k) of dtype (float32: the values as stored); keep: cache
        the decoded block while the budget allows."""
        if i in self._cache:
            return self._cache[i].to(dtype)
        decoded = self._decode(self._blocks[i], dtype)
        if (
            keep
            and self.palette is not None
            and dtype == torch.float32
            and self.cache.take(4 * decoded.numel())
        ):
            self._cache[i] = decoded = decoded.contiguous()
        return decoded

    def warm(self) -> None:
        """Decode blocks into the cache, in order, while the budget allows. Called before a
        solver's passes, so the long-lived decoded blocks are allocated before the passes'
        temporaries and are not scattered among them in the heap, where the freed temporaries
        around them raised the peak (README, "Step 2 at scale")."""
        if self.palette is None:
            return  # float blocks are read as they are
        for i in range(self.num_blocks):
            if i in self._cache:
                continue
            if not self.cache.fits(4 * self.block_rows[i] * (self.width or 0)):
                return
            self.block(i)

    @property
    def cached_bytes(self) -> int:
        return sum(4 * t.numel() for t in self._cache.values())

    def rows_at(self, i: int, index: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Rows `index` of block i, decoded (only those rows are decoded)."""
        return self._decode(self._blocks[i][index], dtype)

    def _decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored rows (palette indices, packed or not, or floats) -> (rows, k) values."""
        if self.palette is None or stored.shape[0] == 0:
            return stored.to(dtype).reshape(stored.shape[0], self.width)
        decoded = F.embedding(stored.int(), self._table(dtype)).view(stored.shape[0], -1)
        return decoded[:, : self.width] if self._packed else decoded  # packed: 4 values a byte

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        """Decoding table: palette values (P, 1), or for packed bytes all 256 bytes' 4 values."""
        key = (dtype, self._packed, self.palette.numel())
        if getattr(self, "_table_key", None) != key:
            values = self.palette.to(dtype)
            if self._packed:
                byte = torch.arange(256, device=values.device)
                index = torch.stack([(byte >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1)
                values = torch.cat([values, values.new_zeros(4 - values.numel())])
                self._table_value = values[index]  # (256, 4)
            else:
                self._table_value = values[:, None]
            self._table_key = key
        return self._table_value

    def blocks(self) -> Iterator[torch.Tensor]:
        for i in range(self.num_blocks):
            yield self.block(i)

    def to_tensor(self) -> torch.Tensor:
        return torch.cat(list(self.blocks())) if self._blocks else torch.empty(0, self.width or 0)

    # --- writing ---------------------------------------------------------------------------------

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        if rows.dim() != 2:
            raise ValueError(f"append takes (rows, k) blocks, got shape {tuple(rows.shape)}")
        if self.width is None:
            self.width = rows.shape[1]
        elif rows.shape[1] != self.width:
            raise ValueError(f"block has {rows.shape[1]} columns, the store {self.width}")
        if not torch.isfinite(rows).all():
            raise ValueError("rows contain NaN or Inf: check the calibration data and the model")
        rows = rows.float()
        if rows.shape[0] == 0:
            self.block_rows.append(0)
            self._blocks.append(rows.new_zeros(0, self.width))
            return
        if not self._decided:
            self._decided = True
            flat = rows.reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLE)]
            candidates = torch.unique(sample)
            if candidates.numel() <= MAX_PALETTE:
                self.palette = candidates
                self._packed = candidates.numel() <= 4
        self.block_rows.append(rows.shape[0])
        if self.palette is None:
            self._blocks.append(rows.contiguous())
            return
        indices = self._encode(rows)
        if indices is None:  # more than MAX_PALETTE distinct values: store floats
            self._blocks.append(rows.contiguous())
        else:
            self._blocks.append(self._encoded(indices))

    def _encode(self, rows: torch.Tensor) -> torch.Tensor | None:
        indices = torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
        misses = []
        top = self.palette.numel() - 1
        for start in range(0, rows.shape[0], _ENCODE_ROWS):  # bounded int32 temporaries
            flat = rows[start : start + _ENCODE_ROWS].reshape(-1)
            index = torch.searchsorted(self.palette, flat, out_int32=True).clamp_(max=top)
            hit = self.palette[index] == flat
            if bool(hit.all()):
                indices[start : start + _ENCODE_ROWS] = index.view(-1, rows.shape[1])
            else:
                misses.append(torch.unique(flat[~hit]))
        if not misses:
            return indices
        merged = torch.unique(torch.cat([self.palette, *misses]))
        if merged.numel() > MAX_PALETTE:
            self._to_float()
            return None
        self._repalette(merged)
        return self._encode(rows)

    def _repalette(self, merged: torch.Tensor) -> None:
        old = [self._indices(i) for i in range(self.num_blocks)]
        remap = torch.searchsorted(merged, self.palette).to(torch.uint8)
        self.palette, self._packed = merged, merged.numel() <= 4
        self._blocks = [self._encoded(remap[idx.long()]) for idx in old]

    def _to_float(self) -> None:
        self._blocks = [self._decode(stored, torch.float32) for stored in self._blocks]
        self.cache.release(self.cached_bytes)  # float blocks are read as they are
        self._cache.clear()
        self.palette, self._packed = None, False

    def _indices(self, i: int) -> torch.Tensor:
        stored = self._blocks[i]
        if stored.shape[0] == 0:
            return torch.zeros(0, self.width, dtype=torch.uint8, device=stored.device)
        return self._unpack(stored, self.width) if self._packed else stored

    def _encoded(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.shape[0] == 0:
            return indices.new_zeros(0, self.width)  # empty blocks carry no data in any format
        return self._pack(indices) if self._packed else indices

    @staticmethod
    def _pack(indices: torch.Tensor) -> torch.Tensor:
        rows, k = indices.shape
        pad = (-k) % 4
        if pad:
            indices = torch.cat([indices, indices.new_zeros(rows, pad)], dim=1)
        q = indices.view(rows, -1, 4)
        return q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)

    @staticmethod
    def _unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
        parts = [(packed >> shift) & 3 for shift in (0, 2, 4, 6)]
        return torch.stack(parts, dim=2).view(packed.shape[0], -1)[:, :k]


def as_row_store(x: torch.Tensor | RowStore, block_rows: int) -> RowStore:
    return x if isinstance(x, RowStore) else RowStore.from_tensor(x, block_rows)
