"""On-disk cache for decoded datasets and extracted tarballs.

Layout under the cache dir ($TSQUANT_CACHE, else $XDG_CACHE_HOME/tsquant, else ~/.cache/tsquant):

    arrays/<dataset>/<split>-<key>/images.npy   uint8 (N, H, W, C)
                                  labels.npy   int64 (N,)
                                  meta.json    class names, shapes, source (written last)
    extracted/<tarball stem>-<key>/...         safely extracted tarballs
    downloads/<dataset>/...                    files fetched from official URLs

Every write goes to a temp file in the target dir followed by os.replace, and meta.json is the
commit marker, so a killed run never leaves a cache entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from ..fileio import atomic_write
from .errors import DataError

log = logging.getLogger(__name__)

CACHE_ENV = "TSQUANT_CACHE"
CACHE_VERSION = 1  # bump when the decoded representation changes

ArrayTriple = tuple[np.ndarray, np.ndarray, list[str]]


def cache_dir() -> Path:
    """Root of the tsquant cache (created on demand)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "tsquant"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create cache dir {root} ({exc.strerror}): set {CACHE_ENV} to a writable dir"
        ) from exc
    return root


def _stat_entry(path: Path) -> list[Any]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def fingerprint(path: str | os.PathLike[str]) -> list[Any]:
    """Cheap identity of a source: abs path + size + mtime.

    For a directory, the mtimes of the dir and its immediate subdirs are used (they change when
    files are added, removed or renamed); rewriting a file in place is not detected.
    """
    p = Path(path).resolve()
    if not p.exists():
        raise DataError(
            f"{p} does not exist: check the path or set data.root (--set data.root=DIR)"
        )
    if p.is_file():
        return [str(p), *_stat_entry(p)]
    with os.scandir(p) as it:
        subdirs = sorted(e.name for e in it if e.is_dir())
    return [str(p), p.stat().st_mtime_ns, [[d, (p / d).stat().st_mtime_ns] for d in subdirs]]


def cache_key(sources: Iterable[str | os.PathLike[str]], split: str, **params: Any) -> str:
    """Stable short hash of (source fingerprints, split, decode params, cache version)."""
    payload = {
        "v": CACHE_VERSION,
        "sources": [fingerprint(s) for s in sources],
        "split": split,
        "params": params,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _write_with(dump: Callable[[IO[bytes]], None]) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            dump(f)

    return write


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    dump = _write_with(lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))
    atomic_write(path, dump)


def save_json_atomic(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True).encode()
    atomic_write(path, _write_with(lambda f: f.write(text)))


def entry_dir(dataset: str, split: str, key: str) -> Path:
    return cache_dir() / "arrays" / dataset / f"{split}-{key}"


def load_entry(path: Path, mmap: bool = True) -> ArrayTriple | None:
    """Load a committed cache entry, or None if absent/incomplete/corrupt."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(path / "images.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        labels = np.load(path / "labels.npy", allow_pickle=False)
        ok = (
            list(images.shape) == meta["images_shape"]
            and images.dtype == np.uint8
            and labels.shape == (images.shape[0],)
            and labels.dtype == np.int64
        )
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring corrupt cache entry %s (%s); rebuilding", path, exc)
        return None
    if not ok:
        log.warning("ignoring inconsistent cache entry %s; rebuilding", path)
        return None
    return images, labels, list(meta["classes"])


def save_entry(
    path: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], **extra: Any
) -> None:
    """Write images/labels then meta.json (the commit marker), each atomically."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"cache expects uint8 NHWC images, got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    save_npy_atomic(path / "images.npy", images)
    save_npy_atomic(path / "labels.npy", labels)
    meta = {"classes": list(classes), "images_shape": list(images.shape), **extra}
    save_json_atomic(path / "meta.json", meta)


def cached_arrays(
    dataset: str,
    split: str,
    sources: Sequence[str | os.PathLike[str]],
    build: Callable[[], ArrayTriple],
    *,
    params: dict[str, Any] | None = None,
    use_cache: bool = True,
    mmap: bool = True,
) -> ArrayTriple:
    """Return decoded arrays from the cache, building (and caching) them on a miss."""
    if not use_cache:
        return build()
    params = params or {}
    path = entry_dir(dataset, split, cache_key(sources, split, **params))
    hit = load_entry(path, mmap=mmap)
    if hit is not None:
        return hit
    images, labels, classes = build()
    sources_abs = [str(Path(s).resolve()) for s in sources]
    save_entry(path, images, labels, classes, sources=sources_abs, split=split, params=params)
    log.info("cached %s/%s (%d images) in %s", dataset, split, len(labels), path)
    return load_entry(path, mmap=mmap) or (images, labels, list(classes))


# ---------------------------------------------------------------------------------------------
# Safe tarball extraction
# ---------------------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def is_tarball(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


def _tar_stem(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _checked_member_path(member: tarfile.TarInfo, tarball: Path) -> PurePosixPath | None:
    """Relative path for a safe member, None for entries to skip; DataError if unsafe."""
    name = member.name
    rel = PurePosixPath(name)
    if name.startswith(("/", "\\")) or rel.is_absolute() or _DRIVE.match(name):
        raise DataError(
            f"unsafe member {name!r} in {tarball} (absolute path): refusing to extract; "
            "use a trusted archive"
        )
    if ".." in rel.parts or "\\" in name:
        raise DataError(
            f"unsafe member {name!r} in {tarball} ('..' path traversal): refusing to extract; "
            "use a trusted archive"
        )
    if member.issym() or member.islnk():
        raise DataError(
            f"unsafe member {name!r} in {tarball} (link): refusing to extract; "
            "use an archive of plain files"
        )
    if not (member.isfile() or member.isdir()):
        return None  # devices, fifos: silently skipped
    parts = [p for p in rel.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_tarball(tarball: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Safely extract `tarball` into the cache (once) and return the extraction dir.

    Rejects absolute paths, '..' components and links; extracts into a temp dir and renames it
    into place, so an interrupted extraction is never mistaken for a complete one.
    """
    src = Path(tarball).resolve()
    if not src.is_file():
        raise DataError(
            f"tarball {src} not found: check the path or set data.root (--set data.root=DIR)"
        )
    key = hashlib.sha256(json.dumps(fingerprint(src)).encode()).hexdigest()[:12]
    root = cache_dir() / "extracted"
    final = root / f"{_tar_stem(src)}-{key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_tar_stem(src)}-", dir=root))
    try:
        with (
            tarfile.open(src, "r|*") as tar,
            tqdm(
                desc=f"extract {src.name}",
                unit=" files",
                disable=None if progress else True,
                leave=False,
            ) as bar,
        ):
            for member in tar:
                rel = _checked_member_path(member, src)
                if rel is None:
                    continue
                target = tmp.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                fobj = tar.extractfile(member)
                assert fobj is not None  # regular file
                with fobj, open(target, "wb") as out:
                    shutil.copyfileobj(fobj, out, length=1 << 20)
                bar.update(1)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another process
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"cannot extract {src} ({type(exc).__name__}: {exc}): the archive is corrupt or "
            "truncated; re-download it"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clear_cache(dataset: str | None = None) -> None:
    """Delete cached arrays (of one dataset, or all arrays and extracted tarballs)."""
    root = cache_dir()
    targets = [root / "arrays" / dataset] if dataset else [root / "arrays", root / "extracted"]
    for t in targets:
        shutil.rmtree(t, ignore_errors=True)
