"""Generic ImageFolder (root/<split>/<class>/*.jpg|png|...) decoded with Pillow, no torchvision.

`root` may be a directory or a tarball; tarballs are safely extracted into the cache dir.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .cache import extract_tarball, is_tarball
from .errors import DataError

IMG_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
# A missing split may go by another common name (e.g. Imagenette has train/val, no test).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "test": ("val", "valid", "validation"),
    "val": ("valid", "validation", "test"),
}
_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
_POOL_MIN_IMAGES = 2000  # below this a process pool costs more than it saves


def resolve_root(root: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Directory of an ImageFolder: `root` itself, or its extraction if it is a tarball."""
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(
            f"image folder {r} not found: check the path or set data.root (--set data.root=DIR)"
        )
    if r.is_file():
        if not is_tarball(r):
            raise DataError(f"{r} is a file but not a tarball: pass a directory or a .tar.gz")
        return extract_tarball(r, progress=progress)
    return r


def find_split_dir(root: Path, split: str) -> Path:
    """root/<split>, also looking one level down (tarball top dir) and at split aliases."""
    names = (split, *SPLIT_ALIASES.get(split, ()))
    bases = [root]
    children = [c for c in sorted(root.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    if len(children) == 1:
        bases.append(children[0])
    for name in names:
        for base in bases:
            if (base / name).is_dir():
                return base / name
    have = ", ".join(c.name for c in children) or "nothing"
    raise DataError(
        f"no {split!r} split under {root} (found: {have}): expected {root}/{split}/<class>/<images>"
    )


def list_images(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, label per image, sorted class names) for one split dir."""
    with os.scandir(split_dir) as it:
        classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class subdirectories: expected {split_dir}/<class>/")
    paths: list[Path] = []
    labels: list[int] = []
    for idx, cls in enumerate(classes):
        with os.scandir(split_dir / cls) as it:
            files = sorted(
                e.name
                for e in it
                if e.is_file()
                and not e.name.startswith(".")
                and e.name.lower().endswith(IMG_EXTENSIONS)
            )
        paths += [split_dir / cls / f for f in files]
        labels += [idx] * len(files)
    if not paths:
        raise DataError(
            f"no images under {split_dir} (extensions {', '.join(IMG_EXTENSIONS)}): "
            "check the folder layout"
        )
    return paths, labels, classes


def decode_image(
    path: str | os.PathLike[str],
    resize: int | None = None,
    size: int | None = None,
    channels: int = 3,
) -> np.ndarray:
    """Decode to uint8 HWC (RGB, or gray with channels=1); shorter side -> `resize`, then
    center crop `size` x `size`."""
    if size is not None and resize is None:
        resize = size
    try:
        with Image.open(path) as im:
            if resize is not None and im.format == "JPEG":
                im.draft(None, (resize, resize))  # DCT-domain downscale, keeps sides >= resize
            im = im.convert("L" if channels == 1 else "RGB")
            if resize is not None:
                w, h = im.size
                if min(w, h) != resize:
                    scale = resize / min(w, h)
                    nw, nh = (
                        (resize, max(1, round(h * scale)))
                        if w <= h
                        else (max(1, round(w * scale)), resize)
                    )
                    im = im.resize((nw, nh), _BILINEAR)
            if size is not None:
                w, h = im.size
                left, top = round((w - size) / 2), round((h - size) / 2)
                im = im.crop((left, top, left + size, top + size))
            array = np.asarray(im, dtype=np.uint8)
            return array[:, :, None] if array.ndim == 2 else array
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(
            f"cannot decode image {path} ({type(exc).__name__}: {exc}): remove or replace the file"
        ) from exc


def _decode_job(job: tuple[str, int | None, int | None, int]) -> np.ndarray:
    return decode_image(*job)


def _default_workers(n: int) -> int:
    return min(2, os.cpu_count() or 1) if n >= _POOL_MIN_IMAGES else 0


def _decoded(
    jobs: list[tuple[str, int | None, int | None, int]], workers: int
) -> Iterator[np.ndarray]:
    """Decoded images in order, sequentially or with a fork pool (workers need no re-import)."""
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            yield decode_image(*job)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (py>=3.12)
        pool = mp.get_context("fork").Pool(workers)
    try:
        yield from pool.imap(_decode_job, jobs, chunksize=64)
    finally:
        pool.terminate()
        pool.join()


def decode_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    resize: int | None = None,
    size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "decode",
    channels: int = 3,
) -> np.ndarray:
    """Decode many images into one uint8 (N, H, W, channels) array of one size."""
    n = len(paths)
    if n == 0:
        raise DataError("no images to decode: check the folder layout")
    workers = _default_workers(n) if workers is None else workers
    jobs = [(str(p), resize, size, channels) for p in paths]
    out: np.ndarray | None = None
    with tqdm(
        total=n, desc=desc, unit=" img", disable=None if progress else True, leave=False
    ) as bar:
        for i, img in enumerate(_decoded(jobs, workers)):
            if out is None:
                out = np.empty((n, *img.shape), dtype=np.uint8)
            elif img.shape != out.shape[1:]:
                raise DataError(
                    f"image {paths[i]} is {img.shape[1]}x{img.shape[0]} but {paths[0]} is "
                    f"{out.shape[2]}x{out.shape[1]}: set data.image_size (image_size=) to resize "
                    "and center-crop all images to one size"
                )
            out[i] = img
            bar.update(1)
    assert out is not None
    return out


def load_imagefolder(
    root: str | os.PathLike[str],
    split: str,
    *,
    resize: int | None = None,
    size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one split: (uint8 (N, H, W, channels), int64 (N,), sorted class names). Uncached."""
    split_dir = find_split_dir(resolve_root(root, progress=progress), split)
    paths, labels, classes = list_images(split_dir)
    images = decode_images(
        paths,
        resize=resize,
        size=size,
        workers=workers,
        progress=progress,
        desc=f"decode {split_dir.parent.name}/{split_dir.name}",
        channels=channels,
    )
    return images, np.asarray(labels, dtype=np.int64), classes
