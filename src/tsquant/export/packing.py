"""Packing of low-bit integer codes for the export file.

A grid code ``c`` (ternary {-1, 0, 1}, or any :class:`WeightGrid`) is stored as its level index
``(c - low) / spacing``. Two layouts, whichever takes fewer bits per code for the grid's number
of levels L (both writer and reader derive it from L):

- radix: k = floor(log_L 256) codes per byte, byte = sum_i level_i * L^i (code i of the group
  in digit i). Ternary: 5 codes per byte (3^5 = 243), 1.6 bits per weight instead of 2; five
  levels: 3 per byte.
- bits: ``ceil(log2 L)`` bits per code, little-endian within each byte (2-bit grids: four per
  byte), for the grids radix packing does not beat.
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


def layout(num_levels: int) -> tuple[str, int]:
    """("radix", codes per byte) or ("bits", bits per code): the smaller for L levels."""
    bits = bits_for_levels(num_levels)
    per_byte = 1
    while num_levels ** (per_byte + 1) <= 256:
        per_byte += 1
    return ("radix", per_byte) if 8 / per_byte < bits else ("bits", bits)


def bits_per_code(num_levels: int) -> float:
    kind, k = layout(num_levels)
    return 8 / k if kind == "radix" else float(k)


def packed_nbytes(count: int, num_levels: int) -> int:
    kind, k = layout(num_levels)
    return -(-count // k) if kind == "radix" else (count * k + 7) // 8


def grid_levels(low: int, high: int, spacing: int) -> int:
    """The number of levels of the grid ``low, low + spacing, ..., high`` (checked packable)."""
    if spacing < 1 or high < low or (high - low) % spacing:
        raise PackingError(f"no grid from {low} to {high} with spacing {spacing}")
    num_levels = (high - low) // spacing + 1
    bits = bits_for_levels(num_levels)
    if bits > 8:
        raise PackingError(f"grids of up to 256 levels are packable, this one needs {bits} bits")
    return num_levels


def pack_codes(codes: torch.Tensor, low: int, high: int, spacing: int) -> torch.Tensor:
    """Integer codes on the grid ``low, low + spacing, ..., high`` -> packed uint8 (1-D)."""
    num_levels = grid_levels(low, high, spacing)
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    index = flat - low
    if flat.numel() and ((index % spacing != 0).any() or index.min() < 0 or flat.max() > high):
        raise PackingError(
            f"codes lie off the grid {low}..{high} (spacing {spacing}): "
            "is this a quantized layer's weight_codes?"
        )
    levels = (index // spacing).numpy().astype(np.int64)
    kind, k = layout(num_levels)
    if kind == "radix":  # groups of k codes, code i of a group in base-L digit i
        groups = np.zeros(-(-levels.size // k) * k, dtype=np.int64)
        groups[: levels.size] = levels
        digits = num_levels ** np.arange(k, dtype=np.int64)
        return torch.from_numpy((groups.reshape(-1, k) @ digits).astype(np.uint8))
    # one row of `bits` binary digits per code (least significant first), then 8 digits per byte
    digits = (levels.astype(np.uint8)[:, None] >> np.arange(k, dtype=np.uint8)) & 1
    packed = np.packbits(digits.reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_codes(
    packed: torch.Tensor, shape: tuple[int, ...], low: int, high: int, spacing: int
) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns int8 codes (int16 beyond the int8 range)."""
    num_levels = grid_levels(low, high, spacing)
    count = int(np.prod(shape, dtype=np.int64))
    expected = packed_nbytes(count, num_levels)
    buffer = packed.detach().reshape(-1).cpu()
    if buffer.dtype != torch.uint8 or buffer.numel() != expected:
        raise PackingError(
            f"packed buffer has {buffer.numel()} {buffer.dtype} entries, expected {expected} "
            f"uint8 for {count} codes of {num_levels} levels: the file is damaged or was not "
            "written by this version of tsquant export"
        )
    kind, k = layout(num_levels)
    if kind == "radix":
        groups = buffer.numpy().astype(np.int64)
        if groups.size and groups.max() >= num_levels**k:
            raise PackingError(
                f"packed byte {groups.max()} exceeds the grid's top level: the file is damaged"
            )
        digits = num_levels ** np.arange(k, dtype=np.int64)
        levels = ((groups[:, None] // digits[None, :]) % num_levels).reshape(-1)[:count]
    else:
        bits_raw = np.unpackbits(buffer.numpy(), bitorder="little", count=count * k)
        weights = (1 << np.arange(k, dtype=np.int64))[None, :]
        levels = (bits_raw.reshape(count, k).astype(np.int64) * weights).sum(1)
    codes = low + spacing * levels
    if count and codes.max() > high:
        raise PackingError(f"packed codes exceed the grid's top level {high}: the file is damaged")
    dtype = torch.int8 if max(abs(low), abs(high)) <= 127 else torch.int16
    return torch.from_numpy(codes).to(dtype).reshape(shape)
