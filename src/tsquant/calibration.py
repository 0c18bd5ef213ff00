"""Calibration data for step 2: drawn once, then the same images in every pass.

Step 2 makes several passes over its calibration data (one for the step-1 code targets, one per
layer for that layer's inputs) and pairs their rows by position. A shuffling DataLoader, a
one-shot iterator or a generator would hand each pass different images and silently ruin the
result, so the data is read exactly once, into a list of batches, before any pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

#: dict batches: the first of these keys present is the model input (or pass ``input_key``)
INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")


class CalibrationError(ValueError):
    """The calibration data cannot be used; the message says what to change."""


def _input_of(batch, index: int, input_key: str | None) -> torch.Tensor:
    if isinstance(batch, Mapping):
        keys = [input_key] if input_key else [k for k in INPUT_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            raise CalibrationError(
                f"calibration batch {index} is a dict with keys {sorted(map(str, batch))} and "
                f"no input key {input_key or INPUT_KEYS}: pass input_key='<the images key>'"
            )
        batch = batch[keys[0]]
    elif isinstance(batch, list | tuple):
        if not batch:
            raise CalibrationError(f"calibration batch {index} is an empty {type(batch).__name__}")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise CalibrationError(
            f"calibration batch {index} gives a {type(batch).__name__}, not a tensor: yield "
            "image tensors, (images, labels) tuples or dicts with an images key"
        )
    if not batch.is_floating_point():
        raise CalibrationError(
            f"calibration batch {index} has dtype {batch.dtype}: give float images normalised "
            "as in training (e.g. the test-time transform of your training data)"
        )
    if not torch.isfinite(batch).all():
        raise CalibrationError(
            f"calibration batch {index} contains NaN or Inf values: clean or re-decode the data"
        )
    return batch


def draw_calibration(
    data: Iterable | Callable[[], Iterable],
    max_images: int | None = None,
    input_key: str | None = None,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Read the calibration images once: a list of batches on ``device``.

    ``data`` is any iterable of image tensors, ``(images, ...)`` tuples or dicts (the images
    under ``input_key``, else the first of :data:`INPUT_KEYS`), or a callable returning one.
    At most ``max_images`` images are read (the iterable is not consumed further).
    """
    if callable(data) and not isinstance(data, Iterable | torch.nn.Module):
        data = data()
    if isinstance(data, torch.Tensor):
        data = [data]
    if not isinstance(data, Iterable):
        raise CalibrationError(
            f"calibration data of type {type(data).__name__} is not iterable: pass a DataLoader, "
            "a list of image batches or a callable returning one"
        )
    batches: list[torch.Tensor] = []
    seen = 0
    for index, batch in enumerate(data):
        x = _input_of(batch, index, input_key)
        if x.dim() < 2 or x.shape[0] == 0:
            continue
        if max_images is not None:
            x = x[: max_images - seen]
        if batches and x.shape[1:] != batches[0].shape[1:]:
            raise CalibrationError(
                f"calibration batch {index} has images of shape {tuple(x.shape[1:])} but batch 0 "
                f"{tuple(batches[0].shape[1:])}: resize the calibration images to one size"
            )
        # a copy: the loader may reuse its buffers, and the passes must see these exact values
        batches.append(x.detach().to(device, copy=True))
        seen += x.shape[0]
        if max_images is not None and seen >= max_images:
            break  # read no further: a one-shot iterator keeps the rest
    if not batches:
        raise CalibrationError(
            "the calibration data yielded no images: give step 2 some training images "
            "(a fresh DataLoader, not an iterator that was already consumed)"
        )
    return batches
