"""IDX reader: gz/raw, validation errors, split lookup and (offline) download."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tsquant.data import DataError, load_idx_split, read_idx
from tsquant.data import idx as idx_mod


@pytest.mark.parametrize("gz", [True, False])
def test_load_split_gz_and_raw(tmp_path: Path, helpers, gz: bool) -> None:
    images, labels = helpers.write_idx_split(tmp_path, "test", n=7, gz=gz)
    x, y = load_idx_split(tmp_path, "test", dataset="mnist")
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_torchvision_layout_is_found(tmp_path: Path, helpers) -> None:
    helpers.write_idx_split(tmp_path / "FashionMNIST" / "raw", "train", n=4, gz=True)
    x, _ = load_idx_split(tmp_path, "train", dataset="fashion_mnist")
    assert len(x) == 4


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(
            [np.uint8, np.int8, np.dtype(">i2"), np.dtype(">i4"), np.dtype(">f4"), np.dtype(">f8")]
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    )
)
def test_parse_roundtrip(helpers, arr: np.ndarray) -> None:
    out = idx_mod.parse_idx(helpers.idx_bytes(arr))
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_truncated_raw_file(tmp_path: Path, helpers) -> None:
    helpers.write_idx_split(tmp_path, "test", n=5, gz=False)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"truncated IDX file .*re-download"):
        read_idx(f)


def test_truncated_gz_file(tmp_path: Path, helpers) -> None:
    helpers.write_idx_split(tmp_path, "test", n=5, gz=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"truncated or corrupt"):
        load_idx_split(tmp_path, "test", dataset="mnist")


def test_gz_with_truncated_payload(tmp_path: Path, helpers) -> None:
    blob = helpers.idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-1]
    f = tmp_path / "x.gz"
    f.write_bytes(gzip.compress(blob))
    with pytest.raises(DataError, match="truncated IDX file"):
        read_idx(f)


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01x", "bad IDX magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "bad IDX magic"),
        (b"\x00\x00", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "header cut short"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01xy", "trailing bytes"),
    ],
)
def test_malformed(tmp_path: Path, blob: bytes, match: str) -> None:
    f = tmp_path / "bad"
    f.write_bytes(blob)
    with pytest.raises(DataError, match=match):
        read_idx(f)


def test_count_mismatch(tmp_path: Path, helpers) -> None:
    helpers.write_idx_split(tmp_path, "test", n=5, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(helpers.idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_idx_split(tmp_path, "test", dataset="mnist")


def test_missing_fashion_mnist_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_idx_split(tmp_path, "train", dataset="fashion_mnist")
    msg = str(exc.value)
    assert "Fashion-MNIST files not found under" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.root" in msg


def test_bad_split_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown IDX split"):
        load_idx_split(tmp_path, "valid", dataset="mnist")
    with pytest.raises(DataError, match="unknown IDX dataset"):
        load_idx_split(tmp_path, "train", dataset="kmnist")


def _serve_from(monkeypatch: pytest.MonkeyPatch, mirror: Path, md5: dict[str, str]) -> None:
    spec = dataclasses.replace(
        idx_mod.IDX_DATASETS["mnist"], url_base=mirror.as_uri() + "/", md5=md5
    )
    monkeypatch.setitem(idx_mod.IDX_DATASETS, "mnist", spec)


def test_download_into_cache(tmp_path: Path, helpers, monkeypatch, isolated_cache) -> None:
    mirror = tmp_path / "mirror"
    images, _ = helpers.write_idx_split(mirror, "test", n=3, gz=True)
    _serve_from(monkeypatch, mirror, md5={})
    empty = tmp_path / "empty"
    empty.mkdir()
    x, _ = load_idx_split(empty, "test", dataset="mnist", download=True)
    np.testing.assert_array_equal(x[..., 0], images)
    assert (isolated_cache / "downloads" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert list(empty.iterdir()) == []  # never written next to the user's root


def test_download_md5_mismatch(tmp_path: Path, helpers, monkeypatch, isolated_cache) -> None:
    mirror = tmp_path / "mirror"
    helpers.write_idx_split(mirror, "test", n=3, gz=True)
    _serve_from(monkeypatch, mirror, md5={"t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DataError, match="corrupt"):
        load_idx_split(tmp_path / "nowhere", "test", dataset="mnist", download=True)
    leftovers = list((isolated_cache / "downloads" / "mnist").iterdir())
    assert leftovers == []  # no partial file left behind


def test_download_failure_is_clear(tmp_path: Path, monkeypatch) -> None:
    _serve_from(monkeypatch, tmp_path / "no-such-mirror", md5={})
    with pytest.raises(DataError, match=r"download of .* failed .*data.root"):
        load_idx_split(tmp_path, "train", dataset="mnist", download=True)
