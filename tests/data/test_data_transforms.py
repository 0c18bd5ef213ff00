"""Batch transforms: shapes, determinism, zero padding, normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant.data import (
    DataError,
    build_transform,
    center_crop,
    normalize,
    random_crop,
    random_hflip,
)


def _batch(n: int = 5, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, h, w, c), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normalize_values_and_layout() -> None:
    x = _batch(2, 4, 5, 3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    y = normalize(x, mean, std)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - m) / s
    assert y.shape == (2, 3, 4, 5) and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ycl = normalize(x, mean, std, channels_last=True)
    assert ycl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ycl, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(DataError, match="1 means"):
        normalize(x, (0.5,), (0.2,))
    with pytest.raises(DataError, match="NHWC"):
        normalize(x[0], mean, std)


def _reference_crop(x: torch.Tensor, size: int, padding: int, seed: int) -> torch.Tensor:
    """Per-sample loop with the same random draws as the vectorised version."""
    xp = F.pad(x, (0, 0, padding, padding, padding, padding))
    g = _gen(seed)
    n, hp, wp, _ = xp.shape
    oy = torch.randint(0, hp - size + 1, (n,), generator=g)
    ox = torch.randint(0, wp - size + 1, (n,), generator=g)
    return torch.stack([xp[i, oy[i] : oy[i] + size, ox[i] : ox[i] + size] for i in range(n)])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 6),
    size=st.integers(1, 8),
    padding=st.integers(0, 4),
    seed=st.integers(0, 2**31),
)
def test_random_crop_matches_loop(n: int, size: int, padding: int, seed: int) -> None:
    x = _batch(n, 8, 8, 2, seed=seed % 7)
    out = random_crop(x, size, padding, _gen(seed))
    assert out.shape == (n, size, size, 2) and out.dtype == torch.uint8
    torch.testing.assert_close(out, _reference_crop(x, size, padding, seed))


def test_random_crop_pads_with_zeros_and_is_deterministic() -> None:
    x = torch.full((64, 8, 8, 3), 255, dtype=torch.uint8)
    out = random_crop(x, 8, 4, _gen(1))
    assert (out == 0).any() and (out == 255).any()  # some windows reach into the padding
    # every row/column is either entirely padding (0) or entirely image (255)
    per_pixel = out.amax(dim=3)
    assert set(per_pixel.unique().tolist()) <= {0, 255}
    torch.testing.assert_close(out, random_crop(x, 8, 4, _gen(1)))
    assert not torch.equal(out, random_crop(x, 8, 4, _gen(2)))
    with pytest.raises(DataError, match="larger than padded"):
        random_crop(x, 20, 1, _gen(0))


def test_random_hflip() -> None:
    x = _batch(32)
    torch.testing.assert_close(random_hflip(x, _gen(0), p=1.0), x.flip(2))
    torch.testing.assert_close(random_hflip(x, _gen(0), p=0.0), x)
    out = random_hflip(x, _gen(3))
    flipped = [torch.equal(out[i], x[i].flip(1)) for i in range(32)]
    kept = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)
    torch.testing.assert_close(out, random_hflip(x, _gen(3)))


def test_center_crop() -> None:
    x = _batch(2, 8, 10)
    out = center_crop(x, 4)
    assert out.shape == (2, 4, 4, 3)
    torch.testing.assert_close(out, x[:, 2:6, 3:7])
    with pytest.raises(DataError, match="larger than image"):
        center_crop(x, 9)


def test_build_transform_train_and_eval() -> None:
    x = _batch(4, 32, 32)
    train = build_transform("crop_flip", 32, (0.5,) * 3, (0.25,) * 3, train=True)
    evalt = build_transform("crop_flip", 32, (0.5,) * 3, (0.25,) * 3, train=False)
    a, b = train(x, _gen(0)), train(x, _gen(0))
    assert a.shape == (4, 3, 32, 32)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(evalt(x, _gen(0)), normalize(x, (0.5,) * 3, (0.25,) * 3))
    assert "RandomCrop(size=32, padding=4)" in repr(train)
    with pytest.raises(DataError, match="unknown augmentation policy"):
        build_transform("autoaugment", 32, (0.5,), (0.5,))
