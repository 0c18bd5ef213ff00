"""Batch-level tensor transforms: uint8 NHWC batches in, normalised float32 NCHW out.

Spatial transforms (crop, flip) act on NHWC tensors of any dtype, before normalisation, so they
move 4x less memory on uint8. All randomness comes from an explicit torch.Generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import DataError

# Per-dataset channel statistics on [0, 1] pixels.
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

AUGMENT_POLICIES = ("none", "crop", "crop_flip")

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _check_nhwc(x: torch.Tensor, what: str) -> None:
    if x.ndim != 4:
        raise DataError(
            f"{what} expects an NHWC batch, got shape {tuple(x.shape)}: add a batch dim"
        )


def to_float_nchw(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1] (a channels_last-strided result)."""
    _check_nhwc(x, "to_float_nchw")
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, (x/255 - mean) / std per channel.

    With channels_last=True the result keeps NHWC memory layout (torch.channels_last).
    """
    _check_nhwc(x, "normalize")
    c = x.shape[-1]
    if len(mean) != c or len(std) != c:
        raise DataError(
            f"normalize got {len(mean)} means / {len(std)} stds for {c} channels: "
            "use the dataset's own statistics"
        )
    if any(s <= 0 for s in std):
        raise DataError(f"normalize std must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    # Fold /255 into the scale: y = x * (1 / (255 s)) - m / s (one fused pass).
    scale, shift = 1.0 / (255.0 * s), -m / s
    y = torch.addcmul(shift, x.permute(0, 3, 1, 2).to(torch.float32), scale)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return y.contiguous(memory_format=fmt)


def pad_nhwc(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad H and W of an NHWC batch by `padding` on each side."""
    if padding < 0:
        raise DataError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    return F.pad(x, (0, 0, padding, padding, padding, padding))


def random_crop(
    x: torch.Tensor, size: int | tuple[int, int], padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-sample random crop of an NHWC batch after zero padding (vectorised gather)."""
    _check_nhwc(x, "random_crop")
    th, tw = (size, size) if isinstance(size, int) else size
    xp = pad_nhwc(x, padding)
    n, hp, wp, _ = xp.shape
    if th > hp or tw > wp:
        raise DataError(f"crop {th}x{tw} larger than padded image {hp}x{wp}: lower the size")
    oy = torch.randint(0, hp - th + 1, (n,), generator=generator)
    ox = torch.randint(0, wp - tw + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(th))[:, :, None]  # (N, th, 1)
    cols = (ox[:, None] + torch.arange(tw))[:, None, :]  # (N, 1, tw)
    return xp[torch.arange(n)[:, None, None], rows, cols]  # (N, th, tw, C)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each NHWC sample left-right with probability p."""
    _check_nhwc(x, "random_hflip")
    flip = torch.rand(x.shape[0], generator=generator) < p
    if not bool(flip.any()):
        return x
    out = x.clone()
    out[flip] = x[flip].flip(2)
    return out


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Central size x size window of an NHWC batch."""
    _check_nhwc(x, "center_crop")
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[1], x.shape[2]
    if th > h or tw > w:
        raise DataError(f"center crop {th}x{tw} larger than image {h}x{w}: lower the size")
    top, left = round((h - th) / 2), round((w - tw) / 2)
    return x[:, top : top + th, left : left + tw]


# ---------------------------------------------------------------------------------------------
# Composable callables: t(x, generator) -> x
# ---------------------------------------------------------------------------------------------


class RandomCrop:
    def __init__(self, size: int | tuple[int, int], padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop(x, self.size, self.padding, generator)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_hflip(x, generator, self.p)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class CenterCrop:
    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return center_crop(x, self.size)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class Normalize:
    """uint8 NHWC -> normalised float32 NCHW (the last step of a pipeline)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False
    ) -> None:
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return normalize(x, self.mean, self.std, channels_last=self.channels_last)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    def __init__(self, transforms: Sequence[BatchTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def default_padding(policy: str, image_size: int) -> int:
    """Padding for padded random crops: 4 px at 32 px ('crop_flip'), 2 px at 28 px ('crop')."""
    if policy == "none":
        return 0
    return max(1, image_size // 8) if policy == "crop_flip" else max(1, image_size // 14)


def augmentation(
    policy: str, image_size: int | tuple[int, int], padding: int | None = None
) -> list[BatchTransform]:
    """Spatial train-time transforms for an augmentation policy."""
    if policy not in AUGMENT_POLICIES:
        raise DataError(f"unknown augmentation policy {policy!r}: use one of {AUGMENT_POLICIES}")
    if policy == "none":
        return []
    h = image_size if isinstance(image_size, int) else min(image_size)
    pad = default_padding(policy, h) if padding is None else padding
    ops: list[BatchTransform] = [RandomCrop(image_size, pad)]
    if policy == "crop_flip":
        ops.append(RandomHorizontalFlip())
    return ops


def build_transform(
    policy: str,
    image_size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    train: bool = True,
    padding: int | None = None,
    channels_last: bool = False,
) -> Compose:
    """Full batch pipeline: (train-time augmentation) + Normalize."""
    ops = augmentation(policy, image_size, padding) if train else []
    return Compose([*ops, Normalize(mean, std, channels_last)])
