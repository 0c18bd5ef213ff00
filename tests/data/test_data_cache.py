"""Decoded-array cache: hits, invalidation, atomic writes, cache dir selection."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from tsquant.data import DataError, cache_dir, load_dataset
from tsquant.data import cache as cache_mod
from tsquant.data import imagefolder as imf


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = imf.decode_image

    def counting(path, resize=None, size=None, channels=3):
        calls.append(str(path))
        return real(path, resize, size, channels)

    monkeypatch.setattr(imf, "decode_image", counting)
    return calls


def test_second_load_hits_cache(imagefolder_root: Path, count_decodes: list[str]) -> None:
    first = load_dataset(
        "imagefolder", "train", root=imagefolder_root, image_size=8, progress=False, workers=0
    )
    assert len(count_decodes) == 6
    t0 = time.perf_counter()
    second = load_dataset(
        "imagefolder", "train", root=imagefolder_root, image_size=8, progress=False, workers=0
    )
    assert time.perf_counter() - t0 < 1.0
    assert len(count_decodes) == 6  # not decoded again
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(second.images))
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.classes == ["cat", "dog"]
    # other decode params -> other cache entry
    load_dataset(
        "imagefolder", "train", root=imagefolder_root, image_size=6, progress=False, workers=0
    )
    assert len(count_decodes) == 12


def test_tarball_cache_hit_skips_extraction(
    tmp_path: Path, helpers, imagefolder_root: Path, count_decodes: list[str], monkeypatch
) -> None:
    tar = helpers.make_tarball(imagefolder_root, tmp_path / "f.tar.gz")
    load_dataset("imagefolder", "val", root=tar, image_size=8, progress=False, workers=0)

    def no_extract(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(imf, "extract_tarball", no_extract)
    ds = load_dataset("imagefolder", "val", root=tar, image_size=8, progress=False, workers=0)
    assert len(ds) == 6 and len(count_decodes) == 6


def test_source_change_invalidates(
    imagefolder_root: Path, helpers, count_decodes: list[str]
) -> None:
    load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    cat = imagefolder_root / "train" / "cat"
    helpers.write_image(cat / "new.png", 12, 10, seed=99)
    st = cat.stat()
    os.utime(cat, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # robust to coarse mtimes
    ds = load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    assert len(ds) == 7 and len(count_decodes) == 6 + 7


def test_interrupted_write_leaves_no_entry(
    imagefolder_root: Path, monkeypatch, count_decodes: list[str]
) -> None:
    real = cache_mod.save_json_atomic

    def killed(*a, **k):
        raise KeyboardInterrupt  # dies after the arrays, before the commit marker

    monkeypatch.setattr(cache_mod, "save_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    monkeypatch.setattr(cache_mod, "save_json_atomic", real)
    ds = load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    assert len(ds) == 6 and len(count_decodes) == 12  # rebuilt, not trusted


def test_cache_arrays_are_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "d" / "a.npy"
    cache_mod.save_npy_atomic(target, np.arange(3))
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [p.name for p in target.parent.iterdir()] == ["a.npy"]  # no temp file left


def test_corrupt_entry_is_rebuilt(imagefolder_root: Path, count_decodes: list[str]) -> None:
    load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    entry = next((cache_dir() / "arrays" / "imagefolder").iterdir())
    (entry / "images.npy").write_bytes(b"junk")
    ds = load_dataset("imagefolder", "train", root=imagefolder_root, image_size=8, progress=False)
    assert len(ds) == 6 and len(count_decodes) == 12


def test_cache_dir_env(tmp_path: Path, monkeypatch, isolated_cache: Path) -> None:
    assert cache_dir() == isolated_cache
    monkeypatch.delenv("TSQUANT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tsquant"
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TSQUANT_CACHE", str(blocker / "sub"))
    with pytest.raises(DataError, match="set TSQUANT_CACHE"):
        cache_dir()


def test_cache_key_depends_on_inputs(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"1")
    k = cache_mod.cache_key([f], "train", size=8)
    assert k == cache_mod.cache_key([f], "train", size=8)
    assert k != cache_mod.cache_key([f], "test", size=8)
    assert k != cache_mod.cache_key([f], "train", size=9)
    f.write_bytes(b"12")
    assert k != cache_mod.cache_key([f], "train", size=8)
