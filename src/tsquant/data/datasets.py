"""In-memory datasets, a worker-free deterministic batch loader and the dataset registry."""

from __future__ import annotations

import difflib
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cifar, idx, imagefolder
from .cache import cached_arrays, is_tarball
from .errors import DataError
from .transforms import (
    AUGMENT_POLICIES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    BatchTransform,
    augmentation,
    default_padding,
    normalize,
)

ArrayLike = np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------------------------
# ArrayDataset
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ArrayDataset:
    """Images uint8 (N, H, W, C) and int64 labels (N,), as numpy (possibly memmap) or torch."""

    images: ArrayLike
    labels: ArrayLike
    classes: list[str]
    name: str = "custom"
    mean: tuple[float, ...] | None = None  # None: registry value for `name`, else computed
    std: tuple[float, ...] | None = None
    policy: str | None = None  # augmentation policy; None: registry value for `name`
    source: str = ""  # where the data came from (path), for logs and reports
    title: str = ""  # human-readable name for reports, e.g. "CIFAR-10 (JPEG q75 copy)"
    _stats: tuple[tuple[float, ...], tuple[float, ...]] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be NHWC (4-D), got shape {tuple(self.images.shape)}"
            )
        if _dtype_name(self.images) != "uint8":
            raise DataError(f"{self.name}: images must be uint8, got {self.images.dtype}")
        if tuple(self.labels.shape) != (self.images.shape[0],):
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}: pass one int64 label per image"
            )
        if _dtype_name(self.labels) != "int64":
            raise DataError(f"{self.name}: labels must be int64, got {self.labels.dtype}")
        self.classes = [str(c) for c in self.classes]
        if len(self) and self.classes:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= len(self.classes):
                raise DataError(
                    f"{self.name}: labels span {lo}..{hi} but there are {len(self.classes)} "
                    "classes: fix the labels or the class list"
                )
        if not self.title:
            self.title = self.name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """One raw sample: (uint8 HWC tensor, label)."""
        img = self.images[i]
        t = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img))
        return t, int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        _, h, w, c = self.images.shape
        return int(h), int(w), int(c)

    @property
    def in_channels(self) -> int:
        return self.image_shape[2]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def gather(
        self, indices: torch.Tensor | np.ndarray | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 NHWC images, int64 labels) at `indices` as torch tensors (copies)."""
        ix_t = torch.as_tensor(indices, dtype=torch.long)
        ix_np = ix_t.numpy()

        def take(a: ArrayLike) -> torch.Tensor:
            if isinstance(a, torch.Tensor):
                return a.index_select(0, ix_t)
            return torch.from_numpy(np.take(a, ix_np, axis=0))

        return take(self.images), take(self.labels)

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel: explicit, else registry, else measured on <=10k images."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        if self.name in _INFO and _INFO[self.name].mean is not None:
            info = _INFO[self.name]
            if len(info.mean) == self.in_channels:
                return info.mean, info.std
        return self.measure_stats()

    def measure_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel in [0, 1], measured on <= 10k evenly spaced images."""
        if self._stats is None:
            n = min(len(self), 10_000)
            if n == 0:
                raise DataError(f"{self.name}: empty dataset has no statistics; pass mean/std")
            ix = torch.linspace(0, len(self) - 1, n).round().long()
            x = self.gather(ix)[0].to(torch.float64) / 255.0
            m = x.mean(dim=(0, 1, 2))
            s = x.std(dim=(0, 1, 2)).clamp_min(1e-3)
            self._stats = tuple(m.tolist()), tuple(s.tolist())
        return self._stats

    def augment_policy(self) -> str:
        """Explicit policy, else the registry's, else 'crop_flip' for RGB and 'none' for gray."""
        if self.policy is not None:
            return self.policy
        if self.name in _INFO and (self.name != "imagefolder" or self.in_channels == 3):
            return _INFO[self.name].augment
        return "crop_flip" if self.in_channels == 3 else "crop"  # no flips of gray digits

    def subset(self, n: int, seed: int = 0) -> ArrayDataset:
        """n distinct samples chosen by a seeded permutation (e.g. a calibration set).

        The result is materialised in memory; samples keep their original relative order.
        """
        if not 0 < n <= len(self):
            raise DataError(f"subset size {n} out of range 1..{len(self)}: lower n")
        g = torch.Generator().manual_seed(_mix_seed(seed, "subset"))
        ix = torch.randperm(len(self), generator=g)[:n].sort().values
        x, y = self.gather(ix)
        return replace(self, images=x.numpy(), labels=y.numpy(), _stats=self._stats)

    def fingerprint(self) -> str:
        """sha256 of the split's identity: shape, classes, labels, normalisation and up to 256
        evenly spaced images (cheap on a memory-mapped cache, changes with the data)."""
        digest = hashlib.sha256()
        digest.update(repr((tuple(self.images.shape), self.classes, self.stats())).encode())
        digest.update(np.ascontiguousarray(np.asarray(self.labels)).tobytes())
        n = len(self)
        if n:
            ix = torch.linspace(0, n - 1, min(n, 256)).round().long()
            digest.update(self.gather(ix)[0].numpy().tobytes())
        return digest.hexdigest()

    def holdout(self, n: int) -> tuple[ArrayDataset, ArrayDataset]:
        """(rest, held_out): n samples held out, stratified by class, the same for every seed.

        Used as a validation split carved from the training images, so that settings are chosen
        without looking at the test set. Each class gives n / num_classes samples (the remainder
        to the first classes); both parts keep the original relative order.
        """
        if not 0 < n < len(self):
            raise DataError(
                f"{self.name}: a validation split of {n} needs 1..{len(self) - 1} images: "
                "lower data.val_split"
            )
        labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long)
        k = max(self.num_classes, int(labels.max()) + 1)
        counts = torch.bincount(labels, minlength=k)
        g = torch.Generator().manual_seed(_mix_seed("holdout", len(self)))
        want = [n // k + (1 if c < n % k else 0) for c in range(k)]
        picked = []
        for c in range(k):
            members = (labels == c).nonzero().flatten()
            if want[c] > int(counts[c]) - 1:
                raise DataError(
                    f"{self.name}: class '{self.classes[c] if c < len(self.classes) else c}' has "
                    f"{int(counts[c])} images, too few to hold out {want[c]}: lower data.val_split"
                )
            picked.append(members[torch.randperm(len(members), generator=g)[: want[c]]])
        held = torch.cat(picked).sort().values
        mask = torch.ones(len(self), dtype=torch.bool)
        mask[held] = False
        rest = mask.nonzero().flatten()

        def part(ix: torch.Tensor, suffix: str) -> ArrayDataset:
            x, y = self.gather(ix)
            return replace(
                self,
                images=x.numpy(),
                labels=y.numpy(),
                title=f"{self.title} {suffix}",
                _stats=self._stats,
            )

        return part(rest, f"(train minus {n} val)"), part(held, f"({n} val held out of train)")


def _dtype_name(a: ArrayLike) -> str:
    return str(a.dtype).removeprefix("torch.")


def _mix_seed(*parts: Any) -> int:
    """Stable 63-bit seed from arbitrary parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------
# BatchLoader
# ---------------------------------------------------------------------------------------------


class BatchLoader:
    """Deterministic, resumable batch iterator over an ArrayDataset (no worker processes).

    Yields (x float32 NCHW normalised, y int64). Epoch order is a permutation seeded by
    (seed, epoch); augmentation of batch b is seeded by (seed, epoch, rank, b), so
    `set_epoch(e); iter_from(b)` reproduces exactly the tail of epoch e.
    With world_size > 1 each rank takes a disjoint strided shard of the permutation, truncated
    so all ranks see the same number of samples (N % world_size samples are left out per epoch).
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        *,
        rank: int = 0,
        world_size: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        policy: str | None = None,
        padding: int | None = None,
        transforms: Sequence[BatchTransform] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} invalid for world_size {world_size}: need 0 <= rank < ws")
        if len(dataset) < world_size:
            raise DataError(
                f"{dataset.name} has {len(dataset)} samples, fewer than world_size {world_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        ds_mean, ds_std = dataset.stats() if mean is None or std is None else (mean, std)
        self.mean = tuple(float(v) for v in (ds_mean if mean is None else mean))
        self.std = tuple(float(v) for v in (ds_std if std is None else std))
        self.policy = policy or dataset.augment_policy()
        if self.policy not in AUGMENT_POLICIES:
            raise DataError(f"unknown augmentation policy {self.policy!r}: use {AUGMENT_POLICIES}")
        h, w, _ = dataset.image_shape
        self.padding = default_padding(self.policy, min(h, w)) if padding is None else padding
        # Spatial train-time transforms (applied to uint8 NHWC before normalisation).
        self._custom_transforms = None if transforms is None else list(transforms)
        self.transforms: list[BatchTransform] = (
            list(transforms)
            if transforms is not None
            else augmentation(self.policy, (h, w), self.padding)
        )
        self.epoch = 0

    # -- ordering ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation/augmentation the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.dataset)
        return n if self.world_size == 1 else n // self.world_size

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's sample order for an epoch (default: the current one)."""
        e = self.epoch if epoch is None else epoch
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, e, "perm"))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[: self.num_samples * self.world_size][self.rank :: self.world_size]
        return order

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, batch_index: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches batch_index..len(self)-1 of the current epoch (resume mid-epoch)."""
        if not 0 <= batch_index <= len(self):
            raise DataError(
                f"start batch {batch_index} out of range 0..{len(self)}: "
                "check the resumed batch index against len(loader)"
            )
        order, epoch, bs = self.indices(), self.epoch, self.batch_size
        return (
            self._batch(order[b * bs : (b + 1) * bs], epoch, b)
            for b in range(batch_index, len(self))
        )

    def _batch(self, ix: torch.Tensor, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.gather(ix)
        if self.augment and self.transforms:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, self.rank, b, "aug"))
            for t in self.transforms:
                x = t(x, g)
        return normalize(x, self.mean, self.std, channels_last=self.channels_last), y

    def subset(self, n: int, seed: int = 0, **overrides: Any) -> BatchLoader:
        """Loader over `dataset.subset(n, seed)` with the same settings (override any kwarg)."""
        kwargs: dict[str, Any] = dict(
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            augment=self.augment,
            seed=self.seed,
            drop_last=self.drop_last,
            channels_last=self.channels_last,
            rank=self.rank,
            world_size=self.world_size,
            mean=self.mean,
            std=self.std,
            policy=self.policy,
            padding=self.padding,
            transforms=self._custom_transforms,
        )
        kwargs.update(overrides)
        return BatchLoader(self.dataset.subset(n, seed), **kwargs)

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.dataset.name}, n={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, augment={self.augment and self.policy}, "
            f"rank={self.rank}/{self.world_size})"
        )


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "cifar10", "imagefolder", "imagenette")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a registered dataset (None where it depends on the data)."""

    name: str
    in_channels: int
    num_classes: int | None
    image_size: int | None  # default (square) image size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # 'none' | 'crop' | 'crop_flip'
    padding: int  # padding of the random crop at the default image size
    splits: tuple[str, ...]


def _info(
    name: str,
    c: int,
    k: int | None,
    size: int | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: str,
    splits: tuple[str, ...],
) -> DatasetInfo:
    pad = default_padding(augment, size or 32)
    return DatasetInfo(name, c, k, size, mean, std, augment, pad, splits)


_INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": _info(
        "fashion_mnist", 1, 10, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, "crop", ("train", "test")
    ),
    "mnist": _info("mnist", 1, 10, 28, MNIST_MEAN, MNIST_STD, "crop", ("train", "test")),
    "cifar10": _info(
        "cifar10", 3, 10, 32, CIFAR10_MEAN, CIFAR10_STD, "crop_flip", ("train", "test")
    ),
    "imagefolder": _info(
        "imagefolder",
        3,
        None,
        None,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "crop_flip",
        ("train", "val", "test"),
    ),
    # Imagenette is stored at 224 px; 64 px keeps CPU training practical (pass image_size).
    "imagenette": _info(
        "imagenette", 3, 10, 64, IMAGENET_MEAN, IMAGENET_STD, "crop_flip", ("train", "val", "test")
    ),
}
assert tuple(_INFO) == DATASETS

SHARED_CIFAR10_JPEG = "cifar10-jpeg.tar.gz"
SHARED_IMAGENETTE = "imagenette-224-jpeg.tar.gz"


def _unknown(name: str) -> DataError:
    near = difflib.get_close_matches(name.lower().replace("-", "_"), DATASETS, n=1, cutoff=0.4)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return DataError(f"unknown dataset {name!r}: {hint}valid names: {', '.join(DATASETS)}")


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(key, key)
    if key not in _INFO:
        raise _unknown(name)
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Channels, classes, default size, mean/std and augmentation policy of a dataset."""
    return _INFO[_canonical(name)]


def shared_data_dirs() -> list[Path]:
    """Candidate `../shared/data` dirs: relative to the cwd and to the package's repo root."""
    repo = Path(__file__).resolve().parents[3]  # src/tsquant/data/datasets.py -> repo root
    cands = [
        Path.cwd() / ".." / "shared" / "data",
        Path.cwd() / "shared" / "data",
        repo / ".." / "shared" / "data",
    ]
    if env := os.environ.get("TSQUANT_DATA"):
        cands.insert(0, Path(env))
    out: list[Path] = []
    for c in cands:
        r = c.resolve()
        if r.is_dir() and r not in out:
            out.append(r)
    return out


def find_shared(filename: str) -> Path | None:
    """First `<shared data dir>/filename` that exists."""
    return next((d / filename for d in shared_data_dirs() if (d / filename).is_file()), None)


def _resolve_size(name: str, image_size: int | None, native: int | None) -> None:
    if image_size is not None and native is not None and image_size != native:
        raise DataError(
            f"{name} is stored at {native} px and image_size={image_size} is not supported for "
            f"this format: omit image_size (or use an ImageFolder copy)"
        )


def _load_idx(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None,
    download: bool,
    image_size: int | None,
    use_cache: bool,
) -> ArrayDataset:
    _resolve_size(name, image_size, 28)
    spec = idx.IDX_DATASETS[name]
    files = idx.locate_idx_split(root, split, dataset=name, download=download)

    def build() -> tuple[np.ndarray, np.ndarray, list[str]]:
        images, labels = idx.read_idx_pair(files[0], files[1], len(spec.classes))
        return images, labels, list(spec.classes)

    images, labels, classes = cached_arrays(
        name, split, list(files), build, params={"loader": "idx"}, use_cache=use_cache
    )
    return ArrayDataset(
        images, labels, classes, name=name, source=str(files[0].parent), title=spec.title
    )


def _load_imagefolder(
    name: str,
    split: str,
    root: str | os.PathLike[str],
    size: int | None,
    use_cache: bool,
    title: str,
    progress: bool,
    workers: int | None,
    channels: int = 3,
) -> ArrayDataset:
    root = Path(root).expanduser().resolve()
    if is_tarball(root):
        source = root  # key on the tarball itself: a cache hit needs no extraction
    else:
        source = imagefolder.find_split_dir(imagefolder.resolve_root(root), split)
    params = {"loader": "imagefolder", "resize": size, "size": size}
    if channels != 3:
        params["channels"] = channels  # (3-channel cache keys stay as they were)

    def build() -> tuple[np.ndarray, np.ndarray, list[str]]:
        return imagefolder.load_imagefolder(
            root,
            split,
            resize=size,
            size=size,
            workers=workers,
            progress=progress,
            channels=channels,
        )

    images, labels, classes = cached_arrays(
        name, split, [source], build, params=params, use_cache=use_cache
    )
    return ArrayDataset(images, labels, classes, name=name, source=str(root), title=title)


def load_dataset(
    name: str,
    split: str,
    root: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    download: bool = False,
    *,
    cache: bool = True,
    progress: bool = True,
    workers: int | None = None,
    channels: int | None = None,
) -> ArrayDataset:
    """Load a registered dataset split as an ArrayDataset (decoded once, then cached).

    root: data dir or tarball (defaults: fashion_mnist /usr/share/datasets/fashion-mnist;
    cifar10 official copies in the cache, else ../shared/data/cifar10-jpeg.tar.gz;
    imagenette ../shared/data/imagenette-224-jpeg.tar.gz; imagefolder needs root).
    image_size: square size for ImageFolder data (shorter side resized, then center crop).
    channels: 1 (gray) or 3 (RGB) for ImageFolder data (default 3); other datasets have theirs.
    """
    key = _canonical(name)
    info = _INFO[key]
    split = split.strip().lower()
    if split not in info.splits:
        raise DataError(f"{key} has no split {split!r}: use one of {', '.join(info.splits)}")
    if image_size is not None and image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    if channels is not None and key != "imagefolder" and channels != info.in_channels:
        raise DataError(
            f"{key} images have {info.in_channels} channel(s): remove data.channels (it is an "
            "ImageFolder option)"
        )

    if key in ("fashion_mnist", "mnist"):
        return _load_idx(key, split, root, download, image_size, cache)

    if key == "cifar10":
        return _load_cifar10(root, split, image_size, download, cache, progress, workers)

    if key == "imagenette":
        if root is not None and (Path(root) / SHARED_IMAGENETTE).is_file():
            root = Path(root) / SHARED_IMAGENETTE  # root = a shared data dir
        if root is None:
            root = find_shared(SHARED_IMAGENETTE)
            if root is None:
                raise DataError(
                    f"Imagenette not found ({SHARED_IMAGENETTE} not in ../shared/data): "
                    "set data.root to a directory or tarball with train/ and val/ class folders"
                )
        return _load_imagefolder(
            key,
            "val" if split == "test" else split,
            root,
            image_size or info.image_size,
            cache,
            "Imagenette",
            progress,
            workers,
        )

    # generic imagefolder
    if root is None:
        raise DataError(
            "dataset 'imagefolder' needs a root: set data.root to a directory or .tar.gz"
        )
    return _load_imagefolder(
        key, split, root, image_size, cache, Path(root).name, progress, workers, channels or 3
    )


def _load_cifar10(
    root: str | os.PathLike[str] | None,
    split: str,
    image_size: int | None,
    download: bool,
    use_cache: bool,
    progress: bool,
    workers: int | None,
) -> ArrayDataset:
    """Official binary/python copy under root (or the cache), else an ImageFolder copy
    (root, or ../shared/data/cifar10-jpeg.tar.gz), else the official download."""
    official = cifar.find_cifar10(root, progress=progress)
    if official is None:
        folder: str | os.PathLike[str] | None = None
        if root is None:
            folder = find_shared(SHARED_CIFAR10_JPEG)
            if folder is None and not download:
                raise DataError(
                    "CIFAR-10 not found (no official copy in the cache, no ../shared/data/"
                    f"{SHARED_CIFAR10_JPEG}): set data.root to a directory holding "
                    "cifar-10-batches-bin/ or cifar-10-binary.tar.gz, or set data.download=true"
                )
        elif (Path(root) / SHARED_CIFAR10_JPEG).is_file():
            folder = Path(root) / SHARED_CIFAR10_JPEG  # root = a shared data dir
        elif _looks_like_imagefolder(root, split):
            folder = root
        if folder is not None:
            return _load_imagefolder(
                "cifar10",
                split,
                folder,
                image_size or 32,
                use_cache,
                _cifar_title(folder),
                progress,
                workers,
            )
        official = cifar.locate_cifar10(root, download=download, progress=progress)
    _resolve_size("cifar10", image_size, 32)
    fmt, batch_dir = official
    files = cifar.cifar10_split_files(fmt, batch_dir, split)
    images, labels, classes = cached_arrays(
        "cifar10",
        split,
        files,
        lambda: cifar.read_cifar10_split(fmt, batch_dir, split),
        params={"loader": f"cifar-{fmt}"},
        use_cache=use_cache,
    )
    return ArrayDataset(
        images, labels, classes, name="cifar10", source=str(batch_dir), title="CIFAR-10"
    )


def _looks_like_imagefolder(root: str | os.PathLike[str], split: str) -> bool:
    r = Path(root).expanduser()
    if r.is_file():
        return is_tarball(r)
    try:
        imagefolder.find_split_dir(r, split)
    except (DataError, OSError):
        return False
    return True


def _cifar_title(root: str | os.PathLike[str]) -> str:
    return "CIFAR-10 (JPEG q75 copy)" if "jpeg" in Path(root).name.lower() else "CIFAR-10"
