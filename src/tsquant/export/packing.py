"""Bit packing of low-bit integer codes for the export file.

A grid code ``c`` (ternary {-1, 0, 1}, or any :class:`WeightGrid`) is stored as its level index
``(c - low) / spacing`` in ``bits`` bits, little-endian within each byte: ternary and 2-bit
grids take 2 bits, so four weights share one byte. Activation codes 0..2^b-1 use the same path
with ``low = 0, spacing = 1``.
"""

from __future__ import annotations

import numpy as np
import torch


class PackingError(ValueError):
    """Codes that cannot be packed (off the grid) or a packed buffer of the wrong size."""


def bits_for_levels(num_levels: int) -> int:
    if num_levels < 2:
        raise PackingError(f"a grid needs at least 2 levels, got {num_levels}")
    return (num_levels - 1).bit_length()


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def grid_bits(low: int, high: int, spacing: int) -> int:
    if spacing < 1 or high < low or (high - low) % spacing:
        raise PackingError(f"no grid from {low} to {high} with spacing {spacing}")
    bits = bits_for_levels((high - low) // spacing + 1)
    if bits > 8:
        raise PackingError(f"grids of up to 256 levels are packable, this one needs {bits} bits")
    return bits


def pack_codes(codes: torch.Tensor, low: int, high: int, spacing: int) -> torch.Tensor:
    """Integer codes on the grid ``low, low + spacing, ..., high`` -> packed uint8 (1-D)."""
    bits = grid_bits(low, high, spacing)
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    index = flat - low
    if flat.numel() and ((index % spacing != 0).any() or index.min() < 0 or flat.max() > high):
        raise PackingError(
            f"codes lie off the grid {low}..{high} (spacing {spacing}): "
            "is this a quantized layer's weight_codes?"
        )
    levels = (index // spacing).numpy().astype(np.uint8)
    # one row of `bits` binary digits per code (least significant first), then 8 digits per byte
    digits = (levels[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    packed = np.packbits(digits.reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_codes(
    packed: torch.Tensor, shape: tuple[int, ...], low: int, high: int, spacing: int
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns int8 codes (int16 beyond the int8 range)."""
    bits = grid_bits(low, high, spacing)
    count = int(np.prod(shape, dtype=np.int64))
    buffer = packed.detach().reshape(-1).cpu()
    if buffer.dtype != torch.uint8 or buffer.numel() != packed_nbytes(count, bits):
        raise PackingError(
            f"packed buffer has {buffer.numel()} {buffer.dtype} entries, expected "
            f"{packed_nbytes(count, bits)} uint8 for {count} codes of {bits} bits: "
            "the file is damaged or was not written by tsquant export"
        )
    digits = np.unpackbits(buffer.numpy(), bitorder="little", count=count * bits)
    weights = (1 << np.arange(bits, dtype=np.int64))[None, :]
    levels = (digits.reshape(count, bits).astype(np.int64) * weights).sum(1)
    codes = low + spacing * levels
    if count and codes.max() > high:
        raise PackingError(f"packed codes exceed the grid's top level {high}: the file is damaged")
    dtype = torch.int8 if max(abs(low), abs(high)) <= 127 else torch.int16
    return torch.from_numpy(codes).to(dtype).reshape(shape)
