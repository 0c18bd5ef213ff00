"""CIFAR-10 binary / python formats, tarballs, restricted unpickling, download errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tsquant.data import CIFAR10_CLASSES, DataError, load_cifar10, load_dataset
from tsquant.data import cifar as cifar_mod


def _expected(helpers, seeds: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [helpers.cifar_arrays(n, s) for s in seeds]
    chw = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    return chw.transpose(0, 2, 3, 1), np.concatenate([p[1] for p in parts])


def test_binary_format(tmp_path: Path, helpers) -> None:
    helpers.write_cifar_bin(tmp_path, per_batch=3)
    x, y, classes = load_cifar10(tmp_path, "train")
    ex, ey = _expected(helpers, [0, 1, 2, 3, 4], 3)
    assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, ex)  # CHW records -> HWC
    np.testing.assert_array_equal(y, ey)
    assert classes == list(CIFAR10_CLASSES)
    xt, yt, _ = load_cifar10(tmp_path / "cifar-10-batches-bin", "test")  # batch dir as root
    assert xt.shape == (3, 32, 32, 3)


def test_binary_truncated(tmp_path: Path, helpers) -> None:
    d = helpers.write_cifar_bin(tmp_path, per_batch=2)
    f = d / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"truncated CIFAR binary file .*3073-byte"):
        load_cifar10(tmp_path, "test")


def test_missing_batch_file(tmp_path: Path, helpers) -> None:
    d = helpers.write_cifar_bin(tmp_path, per_batch=1)
    (d / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="data_batch_4.bin is missing"):
        load_cifar10(tmp_path, "train")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python_format(tmp_path: Path, helpers, protocol: int) -> None:
    helpers.write_cifar_py(tmp_path, per_batch=2, protocol=protocol)
    x, y, classes = load_cifar10(tmp_path, "train")
    ex, ey = _expected(helpers, [0, 1, 2, 3, 4], 2)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    assert classes == [f"class{k}" for k in range(10)]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path, helpers) -> None:
    d = helpers.write_cifar_py(tmp_path, per_batch=1)
    marker = tmp_path / "pwned"
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|nt)\.system"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval),  # builtins.eval
        pickle.dumps(Path("x")),  # pathlib objects are not data either
    ],
)
def test_other_globals_refused(tmp_path: Path, payload: bytes) -> None:
    f = tmp_path / "batch"
    f.write_bytes(payload)
    with pytest.raises(DataError, match="refusing to unpickle"):
        cifar_mod.restricted_load(f)


def test_truncated_pickle(tmp_path: Path, helpers) -> None:
    d = helpers.write_cifar_py(tmp_path, per_batch=2)
    f = d / "test_batch"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_cifar10(tmp_path, "test")


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_official_tarball(tmp_path: Path, helpers, isolated_cache, fmt: str) -> None:
    src = tmp_path / "src"
    writer = helpers.write_cifar_bin if fmt == "bin" else helpers.write_cifar_py
    batch_dir = writer(src, per_batch=2)
    root = tmp_path / "root"
    root.mkdir()
    name = "cifar-10-binary.tar.gz" if fmt == "bin" else "cifar-10-python.tar.gz"
    helpers.make_tarball(batch_dir, root / name)
    x, y, _ = load_cifar10(root, "test")
    assert x.shape == (2, 32, 32, 3)
    assert sorted(p.name for p in root.iterdir()) == [name]  # nothing extracted next to it
    assert any((isolated_cache / "extracted").iterdir())


def test_not_found_and_download_failure(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(DataError, match=r"CIFAR-10 not found under .*data.root"):
        load_cifar10(tmp_path, "train")
    monkeypatch.setattr(cifar_mod, "CIFAR10_BIN_URL", (tmp_path / "nope.tar.gz").as_uri())
    with pytest.raises(DataError, match=r"download of .* failed"):
        load_cifar10(tmp_path, "train", download=True)


def test_load_dataset_cifar_binary_is_cached(tmp_path: Path, helpers, monkeypatch) -> None:
    helpers.write_cifar_bin(tmp_path, per_batch=2)
    ds = load_dataset("cifar10", "train", root=tmp_path)
    assert len(ds) == 10 and ds.classes == list(CIFAR10_CLASSES) and ds.title == "CIFAR-10"

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cifar_mod, "read_cifar_bin", boom)
    again = load_dataset("cifar10", "train", root=tmp_path)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(ds.images))
    with pytest.raises(DataError, match="image_size=64 is not supported"):
        load_dataset("cifar10", "train", root=tmp_path, image_size=64)


def _jpeg_copy(tmp_path: Path, helpers) -> Path:
    """A miniature cifar10-jpeg.tar.gz (ImageFolder with train/test, 32x32 JPEGs)."""
    src = helpers.write_imagefolder(
        tmp_path / "cifar10-jpeg", sizes=lambda k: (32, 32), splits=("train", "test"), per_class=2
    )
    shared = tmp_path / "shared"
    shared.mkdir()
    return helpers.make_tarball(src, shared / "cifar10-jpeg.tar.gz")


def test_cifar_jpeg_copy_from_shared_dir(tmp_path: Path, helpers, monkeypatch) -> None:
    tar = _jpeg_copy(tmp_path, helpers)
    monkeypatch.setenv("TSQUANT_DATA", str(tar.parent))  # default discovery
    ds = load_dataset("cifar10", "test", progress=False)
    assert ds.image_shape == (32, 32, 3) and len(ds) == 4
    assert ds.title == "CIFAR-10 (JPEG q75 copy)" and ds.classes == ["cat", "dog"]
    assert len(load_dataset("cifar10", "train", root=tar.parent, progress=False)) == 4
    assert len(load_dataset("cifar10", "train", root=tar, progress=False)) == 4


def test_cifar_nothing_found(tmp_path: Path, monkeypatch) -> None:
    from tsquant.data import datasets as ds_mod

    monkeypatch.setattr(ds_mod, "shared_data_dirs", lambda: [])
    with pytest.raises(DataError, match=r"CIFAR-10 not found .*data.root.*data.download"):
        load_dataset("cifar10", "train")
