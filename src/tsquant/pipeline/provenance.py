"""What each stage's result depends on, so a finished stage whose inputs changed is re-run.

A checkpointed stage records in its meta.json the options it was made with (the config keys
below) and the hashes of its inputs: the previous stage's checkpoint, the user's
init_checkpoint, the training data's fingerprint. ``tsquant run`` compares them with the current
run before skipping a stage; a training resume state carries them too, so a resumed run cannot
continue under other settings.
"""

from __future__ import annotations

from dataclasses import asdict

from ..training import describe_change
from .config import RunConfig, method_sections

__all__ = ["UPSTREAM", "describe_change", "stage_config"]

# data options that change what a training stage sees (not eval-only or runtime ones)
_DATA = [
    "data.dataset",
    "data.image_size",
    "data.channels",
    "data.stats",
    "data.mean",
    "data.std",
    "data.augment_policy",
    "data.val_split",
    "data.train_subset",
    "data.batch_size",
]
_RUNTIME = {"checkpoint_seconds"}  # speed, not results (the memory section is not a stage's)

UPSTREAM = {"train": None, "codes": "train", "transform": "codes", "finetune": "transform"}
SECTIONS = {"train": "train", "codes": "codes", "transform": "transform", "finetune": "finetune"}


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if key == "layer_formats":  # the first matching pattern wins: the order matters
            out[f"{prefix}{key}"] = [[k, v] for k, v in value.items()]
        elif isinstance(value, dict) and key != "kwargs":
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def stage_config(cfg: RunConfig, stage: str) -> dict:
    """The options (dotted keys) the stage's result depends on, with their values."""
    flat = _flatten(asdict(cfg))
    keys = ["seed", "model.name", "model.kwargs"]
    if stage == "train" and cfg.init_checkpoint:
        keys.append("init_checkpoint")  # loaded, not trained: the data plays no part
    else:
        keys += _DATA + [
            k
            for k in flat
            if k.startswith(SECTIONS[stage] + ".") and k.split(".")[-1] not in _RUNTIME
        ]
    if stage in ("transform", "finetune"):  # the step-1 design is part of what they reproduce
        keys += [k for k in flat if k.startswith("codes.") and k.split(".")[-1] in ("bits", "eps")]
    record = {k: flat[k] for k in keys}
    for section in ("codes", "finetune"):  # the temperature matters only when distilling
        if not record.get(f"{section}.distill"):
            record.pop(f"{section}.distill_temperature", None)
    if not record.get("codes.learn_step"):  # stages made before the option existed stay valid
        record.pop("codes.learn_step", None)
    for method in method_sections(cfg.transform):  # only the chosen method's options
        if record.get("transform.method") != method:
            record = {k: v for k, v in record.items() if not k.startswith(f"transform.{method}.")}
    return record
