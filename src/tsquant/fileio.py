"""The project's file I/O: atomic writes, safetensors and JSON, hashes, safe state-dict loading.

Every file tsquant writes (stage checkpoints, resume states, exports, the data cache) goes to
a temporary name in the same folder and is moved into place with os.replace, so a killed
process leaves either the old file or the new one, never half of one. Nothing is unpickled
except PyTorch state dicts given by the user, through torch.load(weights_only=True). This
module imports nothing from tsquant: everything else builds on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or from another model; the message says what to do."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)``, fsync, then move the file to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {"tsquant": json.dumps(meta or {})}
    atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata=header))


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict file, read with weights_only=True: tensors and plain containers only,
    so a crafted pickle cannot run code; it is refused instead."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for refused globals, others for damage
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"refused to load {path}: it is not a plain PyTorch state dict ({reason}); "
            "save it with torch.save(model.state_dict()) or as safetensors"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors: save it with torch.save(model.state_dict())"
        )
    return data


def load_tensors(path: Path, user_file: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (or, by suffix, a PyTorch state dict read safely).

    ``user_file``: the file is the user's (init_checkpoint), not one tsquant wrote, and the
    advice on failure says so."""
    path = Path(path)
    if not path.is_file():
        if user_file:
            raise CheckpointError(f"init_checkpoint {path} not found: check the path")
        raise CheckpointError(f"checkpoint {path} not found: run the stage that writes it first")
    if path.suffix in TORCH_SUFFIXES:
        return _load_torch_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if user_file:
            raise CheckpointError(
                f"init_checkpoint {path} is damaged or not a safetensors file ({exc}): save your "
                "weights again (safetensors, or torch.save(model.state_dict()) to a .pt file)"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a safetensors file ({exc}): delete it and re-run the stage"
        ) from None


def load_tensor_meta(path: Path) -> dict:
    """The JSON metadata that :func:`save_tensors` stored in a file's header."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("tsquant", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged ({exc}): delete it and re-run the stage"
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path} not found: run the stage that writes it first (`tsquant run`)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"metadata {path} is unreadable ({exc}): delete the stage folder and re-run it"
        ) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_weights(
    model: torch.nn.Module, path: Path, strict: bool = True, user_file: bool = False
) -> None:
    """Load a safetensors state dict, naming the mismatch when it is another architecture."""
    state = load_tensors(path, user_file=user_file)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch {wrong[:3]}")
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({'; '.join(parts)}): "
            "it comes from a different architecture or stage; check model.name and the path"
        )
    bad = sorted(
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has NaN/Inf in {bad[:3]}: training diverged; retrain with a "
            "lower learning rate or use an earlier checkpoint"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# --- optimizer / RNG state as tensors + JSON -----------------------------------------------------


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_to_tensors() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state()}


def rng_from_tensors(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
