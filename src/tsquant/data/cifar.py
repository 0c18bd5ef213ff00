"""CIFAR-10 in the official binary and python formats (and their tarballs), no torchvision.

The python format is pickled; it is read with a restricted unpickler that only resolves the
numpy globals needed to rebuild arrays, so a malicious file cannot execute code.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .cache import cache_dir, extract_tarball, is_tarball
from .download import download_url
from .errors import DataError

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_BIN_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BIN_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_PY_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz
BIN_DIR, PY_DIR = "cifar-10-batches-bin", "cifar-10-batches-py"
BIN_TARBALL, PY_TARBALL = "cifar-10-binary.tar.gz", "cifar-10-python.tar.gz"

_SIDE, _CH = 32, 3
_RECORD = 1 + _CH * _SIDE * _SIDE  # 1 label byte + 3072 CHW pixel bytes
_SPLIT_FILES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
_HINT = (
    "set data.root to a directory holding cifar-10-batches-bin/ or cifar-10-binary.tar.gz, "
    "or set data.download=true"
)


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


def _numpy_global(submodule: str, name: str) -> Any:
    """numpy internal reachable under numpy._core (numpy>=2) or numpy.core (numpy 1.x)."""
    for mod in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {submodule}.{name}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import codecs

    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol-2 pickles of bytes written by py3
    }
    for sub, name in (
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    ):
        obj = _numpy_global(sub, name)
        for pkg in ("numpy.core", "numpy._core"):
            table[(f"{pkg}.{sub}", name)] = obj
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in CIFAR "
                "python batches; use the official cifar-10-python files or the binary format"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing to unpickle a persistent id: not an official CIFAR batch file")


def restricted_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle a file with RestrictedUnpickler (latin1 for py2-era numpy payloads)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found: check data.root") from exc
    except Exception as exc:  # UnpicklingError, EOFError, ValueError from numpy setstate ...
        raise DataError(
            f"cannot read pickle {path} ({type(exc).__name__}: {exc}): the file is truncated or "
            "corrupt; re-download it"
        ) from exc


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"{path} does not hold a dict: not a CIFAR python batch; check data.root")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"{path} has labels outside 0..9: not a CIFAR-10 file; check data.root")
    return labels.astype(np.int64)


def read_cifar_bin(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch -> (uint8 (N, 32, 32, 3), int64 (N,))."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DataError(
            f"truncated CIFAR binary file {path}: {raw.size} bytes is not a multiple of the "
            f"{_RECORD}-byte record; re-download it"
        )
    rec = raw.reshape(-1, _RECORD)
    images = rec[:, 1:].reshape(-1, _CH, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), _check_labels(rec[:, 0], path)


def read_cifar_py(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """One python (pickled) batch -> (uint8 (N, 32, 32, 3), int64 (N,))."""
    path = Path(path)
    d = _str_keys(restricted_load(path), path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path} lacks 'data'/'labels': not a CIFAR-10 batch; check data.root")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _RECORD - 1:
        raise DataError(
            f"{path} 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072): "
            "corrupt file; re-download it"
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{path} has {data.shape[0]} images but {labels.size} labels: corrupt; re-download it"
        )
    images = data.reshape(-1, _CH, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), _check_labels(labels, path)


def _classes_bin(d: Path) -> list[str]:
    meta = d / "batches.meta.txt"
    if meta.is_file():
        names = [ln.strip() for ln in meta.read_text().splitlines() if ln.strip()]
        if len(names) == len(CIFAR10_CLASSES):
            return names
    return list(CIFAR10_CLASSES)


def _classes_py(d: Path) -> list[str]:
    meta = d / "batches.meta"
    if meta.is_file():
        names = _str_keys(restricted_load(meta), meta).get("label_names")
        if isinstance(names, list) and len(names) == len(CIFAR10_CLASSES):
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return list(CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------
# Locating the data
# ---------------------------------------------------------------------------------------------


def _batch_dir_format(d: Path) -> str | None:
    if (d / "data_batch_1.bin").is_file() or (d / "test_batch.bin").is_file():
        return "bin"
    if (d / "data_batch_1").is_file() or (d / "test_batch").is_file():
        return "py"
    return None


def _scan(base: Path) -> tuple[str, Path] | None:
    """Official batch dir directly in (or one level under) `base`."""
    for d in (base / BIN_DIR, base / PY_DIR, base):
        if d.is_dir() and (fmt := _batch_dir_format(d)):
            return fmt, d
    return None


def find_cifar10(
    root: str | os.PathLike[str] | None, *, progress: bool = True
) -> tuple[str, Path] | None:
    """('bin'|'py', batch dir) of an official CIFAR-10 copy, extracting tarballs; else None."""
    bases: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        if r.is_file() and is_tarball(r):
            return _scan(extract_tarball(r, progress=progress))
        bases.append(r)
    bases.append(cache_dir() / "downloads" / "cifar10")
    for base in bases:
        if (hit := _scan(base)) is not None:
            return hit
        for name in (BIN_TARBALL, PY_TARBALL):
            if (base / name).is_file():
                return _scan(extract_tarball(base / name, progress=progress))
    return None


def locate_cifar10(
    root: str | os.PathLike[str] | None,
    *,
    download: bool = False,
    timeout: float = 15.0,
    progress: bool = True,
) -> tuple[str, Path]:
    """Like find_cifar10 but downloads when allowed and raises a DataError otherwise."""
    found = find_cifar10(root, progress=progress)
    if found is not None:
        return found
    if download:
        tar = cache_dir() / "downloads" / "cifar10" / BIN_TARBALL
        download_url(CIFAR10_BIN_URL, tar, md5=CIFAR10_BIN_MD5, timeout=timeout, hint=_HINT)
        if (hit := _scan(extract_tarball(tar, progress=progress))) is not None:
            return hit
        raise DataError(f"{tar} does not contain {BIN_DIR}/: corrupt download; delete it, retry")
    where = root if root is not None else cache_dir() / "downloads" / "cifar10"
    raise DataError(f"CIFAR-10 not found under {where}: {_HINT}")


def cifar10_split_files(fmt: str, batch_dir: Path, split: str) -> list[Path]:
    """Batch files of a split; DataError naming the first missing one."""
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown CIFAR-10 split {split!r}: use 'train' or 'test'")
    suffix = ".bin" if fmt == "bin" else ""
    files = [batch_dir / (n + suffix) for n in _SPLIT_FILES[split]]
    for f in files:
        if not f.is_file():
            raise DataError(f"CIFAR-10 file {f} is missing: re-extract or re-download CIFAR-10")
    return files


def read_cifar10_split(
    fmt: str, batch_dir: Path, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read all batches of a split from a located batch dir."""
    files = cifar10_split_files(fmt, batch_dir, split)
    reader: Callable[[Path], tuple[np.ndarray, np.ndarray]]
    reader = read_cifar_bin if fmt == "bin" else read_cifar_py
    parts = [reader(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    classes = _classes_bin(batch_dir) if fmt == "bin" else _classes_py(batch_dir)
    return images, labels, classes


def load_cifar10(
    root: str | os.PathLike[str] | None,
    split: str,
    *,
    download: bool = False,
    timeout: float = 15.0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a CIFAR-10 split: (uint8 (N, 32, 32, 3), int64 (N,), class names). Uncached."""
    fmt, batch_dir = locate_cifar10(root, download=download, timeout=timeout, progress=progress)
    return read_cifar10_split(fmt, batch_dir, split)
