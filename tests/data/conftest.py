"""Shared fixtures for tsquant.data tests: isolated cache dir and tiny on-disk datasets."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tsquant.data import CIFAR10_CLASSES

IDX_CODES = {"uint8": 0x08, "int8": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache dir."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TSQUANT_CACHE", str(cache))
    return cache


def idx_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array in IDX format (big-endian payload)."""
    dt = np.dtype(arr.dtype)
    key = dt.name if dt.itemsize == 1 else ">" + dt.str[1:]
    code = IDX_CODES[key]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(dt.newbyteorder(">")).tobytes()


def write_idx_split(
    root: Path, split: str, n: int, gz: bool, seed: int = 0, hw: tuple[int, int] = (28, 28)
) -> tuple[np.ndarray, np.ndarray]:
    """Write <prefix>-images-idx3-ubyte[.gz] and labels; return the arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    root.mkdir(parents=True, exist_ok=True)
    for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
        blob = idx_bytes(arr)
        name = f"{prefix}-{kind}-idx{nd}-ubyte"
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)
    return images, labels


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random CHW-flattened CIFAR rows (n, 3072) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar_bin(root: Path, per_batch: int = 3) -> Path:
    """cifar-10-batches-bin/ with 5 train batches + test batch of `per_batch` records."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for i, name in enumerate(names):
        data, labels = cifar_arrays(per_batch, seed=i)
        rec = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        (d / name).write_bytes(rec.tobytes())
    (d / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return d


def write_cifar_py(root: Path, per_batch: int = 3, protocol: int = 2) -> Path:
    """cifar-10-batches-py/ pickled like the official files (bytes keys, ndarray data)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        data, labels = cifar_arrays(per_batch, seed=i)
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072}
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return d


def make_tarball(src_dir: Path, tar_path: Path, arcname: str | None = None) -> Path:
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src_dir, arcname=arcname or src_dir.name)
    return tar_path


def write_image(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)


def write_imagefolder(
    root: Path,
    sizes: Callable[[int], tuple[int, int]] | None = None,
    splits: tuple[str, ...] = ("train",),
    per_class: int = 3,
) -> Path:
    """root/<split>/{cat,dog}/ with PNG and JPEG (plus a grayscale one) images."""
    k = 0
    for split in splits:
        for cls in ("dog", "cat"):  # written unsorted on purpose
            for j in range(per_class):
                w, h = sizes(k) if sizes else (12, 10)
                ext = ".png" if j % 2 == 0 else ".JPEG"
                write_image(
                    root / split / cls / f"{j:03d}{ext}",
                    w,
                    h,
                    seed=k,
                    mode="L" if j == 2 else "RGB",
                )
                k += 1
            (root / split / cls / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "folder", splits=("train", "val"))


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The writer helpers above, as a fixture (no sys.path-dependent imports in tests)."""
    return SimpleNamespace(
        idx_bytes=idx_bytes,
        write_idx_split=write_idx_split,
        cifar_arrays=cifar_arrays,
        write_cifar_bin=write_cifar_bin,
        write_cifar_py=write_cifar_py,
        make_tarball=make_tarball,
        write_image=write_image,
        write_imagefolder=write_imagefolder,
    )
