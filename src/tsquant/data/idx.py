"""IDX file reader (MNIST / Fashion-MNIST format), gzipped or raw, with strict validation."""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .download import download_url
from .errors import DataError

# IDX type codes -> numpy dtypes (multi-byte types are big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse an in-memory IDX blob; validates magic, dims and payload length."""
    if len(data) < 4:
        raise DataError(f"{source} is not an IDX file (only {len(data)} bytes): re-download it")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES:
        raise DataError(
            f"{source} has a bad IDX magic {data[:4].hex()} (want 0000<type><ndim>): "
            "the file is not an IDX file or is corrupt; re-download it"
        )
    if not 1 <= ndim <= 8:
        raise DataError(f"{source} declares {ndim} IDX dims (want 1..8): re-download it")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated IDX file {source}: header cut short; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise DataError(
            f"truncated IDX file {source}: expected {expected} data bytes for shape {dims}, "
            f"found {got}; re-download it"
        )
    if got > expected:
        raise DataError(
            f"IDX file {source} has {got - expected} trailing bytes after shape {dims}: "
            "the file is corrupt; re-download it"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file; gzip is detected from the content, not the extension."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError as exc:
        raise DataError(
            f"IDX file {path} not found: check the path or set data.root (--set data.root=DIR)"
        ) from exc
    except (EOFError, OSError, zlib.error) as exc:  # truncated / corrupt gzip stream
        raise DataError(
            f"cannot decompress {path} ({type(exc).__name__}: {exc}): the file is truncated "
            "or corrupt; re-download it"
        ) from exc
    return parse_idx(raw, source=str(path))


@dataclass(frozen=True)
class IdxSpec:
    """Where an IDX dataset lives and how to get it."""

    title: str
    url_base: str
    md5: dict[str, str]
    classes: tuple[str, ...]
    default_root: str | None
    install_hint: str
    torchvision_dir: str


IDX_DATASETS: dict[str, IdxSpec] = {
    "fashion_mnist": IdxSpec(
        title="Fashion-MNIST",
        url_base="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        default_root="/usr/share/datasets/fashion-mnist",
        install_hint="run `apt-get install -y dataset-fashion-mnist` or set data.root (--set data.root=DIR)",
        torchvision_dir="FashionMNIST",
    ),
    "mnist": IdxSpec(
        title="MNIST",
        url_base="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        classes=tuple(str(i) for i in range(10)),
        default_root=None,
        install_hint="set data.root to a directory holding the MNIST IDX files, or set data.download=true",
        torchvision_dir="MNIST",
    ),
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


def _prefix(split: str) -> str:
    try:
        return _SPLIT_PREFIX[split]
    except KeyError:
        raise DataError(f"unknown IDX split {split!r}: use 'train' or 'test'") from None


def _candidates(prefix: str, kind: str) -> list[str]:
    ndim = 3 if kind == "images" else 1
    base = f"{prefix}-{kind}-idx{ndim}-ubyte"
    dotted = f"{prefix}-{kind}.idx{ndim}-ubyte"  # spelling used by some mirrors
    return [base + ".gz", base, dotted, dotted + ".gz"]


def idx_search_dirs(root: str | os.PathLike[str] | None, dataset: str) -> list[Path]:
    """Directories searched for the IDX files, in order."""
    spec = IDX_DATASETS[dataset]
    dirs: list[Path] = []
    bases = [Path(root).expanduser()] if root is not None else []
    if root is None and spec.default_root:
        bases.append(Path(spec.default_root))
    for b in bases:
        dirs += [b, b / spec.torchvision_dir / "raw", b / dataset]
    dirs.append(cache_dir() / "downloads" / dataset)
    return dirs


def find_idx_files(
    root: str | os.PathLike[str] | None, split: str, dataset: str = "fashion_mnist"
) -> tuple[Path, Path] | None:
    """(images, labels) paths for a split, or None when not present."""
    prefix = _prefix(split)
    for d in idx_search_dirs(root, dataset):
        img = next((d / n for n in _candidates(prefix, "images") if (d / n).is_file()), None)
        lab = next((d / n for n in _candidates(prefix, "labels") if (d / n).is_file()), None)
        if img is not None and lab is not None:
            return img, lab
    return None


def download_idx_split(split: str, dataset: str, timeout: float = 15.0) -> tuple[Path, Path]:
    """Fetch the split's two .gz files from the official URL into the cache."""
    spec = IDX_DATASETS[dataset]
    prefix = _prefix(split)
    dest = cache_dir() / "downloads" / dataset
    out = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        name = f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
        if not (dest / name).is_file():
            download_url(
                spec.url_base + name,
                dest / name,
                md5=spec.md5.get(name),
                timeout=timeout,
                hint=spec.install_hint,
            )
        out.append(dest / name)
    return out[0], out[1]


def _resolve_dataset(dataset: str) -> IdxSpec:
    try:
        return IDX_DATASETS[dataset]
    except KeyError:
        valid = ", ".join(IDX_DATASETS)
        raise DataError(f"unknown IDX dataset {dataset!r}: use one of {valid}") from None


def locate_idx_split(
    root: str | os.PathLike[str] | None,
    split: str,
    dataset: str = "fashion_mnist",
    download: bool = False,
    timeout: float = 15.0,
) -> tuple[Path, Path]:
    """Find (or download) the split's files; DataError with the fix when impossible."""
    spec = _resolve_dataset(dataset)
    found = find_idx_files(root, split, dataset)
    if found is not None:
        return found
    if download:
        return download_idx_split(split, dataset, timeout=timeout)
    where = root if root is not None else (spec.default_root or cache_dir() / "downloads")
    raise DataError(
        f"{spec.title} files not found under {where} "
        f"(looked for {_candidates(_prefix(split), 'images')[1]}[.gz]): {spec.install_hint}"
    )


def read_idx_pair(
    img_path: str | os.PathLike[str],
    lab_path: str | os.PathLike[str],
    num_classes: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an images/labels pair -> (uint8 (N, H, W, 1), int64 (N,))."""
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{img_path} holds {images.dtype} data of shape {images.shape}, expected uint8 "
            "(N, H, W): wrong file? re-download it"
        )
    if labels.ndim != 1:
        raise DataError(f"{lab_path} holds shape {labels.shape}, expected (N,): wrong file?")
    if len(labels) != len(images):
        raise DataError(
            f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels: "
            "the files belong to different splits or one is corrupt; re-download them"
        )
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{lab_path} has labels outside 0..{num_classes - 1}: wrong file? re-download it"
        )
    return images[..., None], labels


def load_idx_split(
    root: str | os.PathLike[str] | None,
    split: str,
    *,
    dataset: str = "fashion_mnist",
    download: bool = False,
    timeout: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as (images uint8 (N, H, W, 1), labels int64 (N,)). Uncached."""
    spec = _resolve_dataset(dataset)
    img_path, lab_path = locate_idx_split(root, split, dataset, download, timeout)
    return read_idx_pair(img_path, lab_path, len(spec.classes))
