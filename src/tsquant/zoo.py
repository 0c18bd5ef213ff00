"""Model zoo: full-precision checkpoints trained by `tsquant train`, with a manifest.

``python -m tsquant.zoo add RUN_DIR NAME --command "..."`` copies ``RUN_DIR/train/model.safetensors``
to ``zoo/NAME.safetensors`` and records its sha256, the command, seed, accuracy and date in
``zoo/MANIFEST.json``. ``python -m tsquant.zoo verify`` checks every file against the manifest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path

from .fileio import CheckpointError, load_json, save_json, sha256_of

ZOO_DIR = Path(__file__).resolve().parents[2] / "zoo"


def manifest_path(zoo: Path = ZOO_DIR) -> Path:
    return zoo / "MANIFEST.json"


def read_manifest(zoo: Path = ZOO_DIR) -> dict:
    path = manifest_path(zoo)
    return load_json(path) if path.is_file() else {"models": {}}


def architecture(config: dict) -> dict:
    """What rebuilds a checkpoint's model besides the dataset's shape: the model's name and the
    constructor kwargs and input size a config set (e.g. AlexNet-BN's fc width, 64 px)."""
    kwargs, image_size = config["model"].get("kwargs"), config["data"].get("image_size")
    return {
        "model": config["model"]["name"],
        **({"model_kwargs": dict(kwargs)} if kwargs else {}),
        **({"image_size": image_size} if image_size else {}),
    }


def add(run_dir: Path, name: str, command: str, zoo: Path = ZOO_DIR) -> dict:
    meta = load_json(Path(run_dir) / "train" / "meta.json")
    source = Path(run_dir) / "train" / "model.safetensors"
    zoo.mkdir(parents=True, exist_ok=True)
    target = zoo / f"{name}.safetensors"
    shutil.copyfile(source, target)
    cfg = meta["config"]
    entry = {
        "file": target.name,
        "sha256": sha256_of(target),
        **architecture(cfg),
        "dataset": cfg["data"]["dataset"],
        "test_top1": round(meta["test_top1"], 2),
        **({"val_top1": round(meta["val_top1"], 2)} if meta.get("val_top1") is not None else {}),
        "seed": cfg["seed"],
        "epochs": cfg["train"]["epochs"],
        "command": command,
        "train_wall_s": round(meta.get("wall_s", 0.0), 1),
        "tsquant": meta["tsquant"],
        "date": dt.date.today().isoformat(),
    }
    manifest = read_manifest(zoo)
    manifest["models"][name] = entry
    save_json(manifest_path(zoo), manifest)
    return entry


def verify(zoo: Path = ZOO_DIR) -> list[str]:
    """Names whose file is missing or whose sha256 differs from the manifest."""
    bad = []
    for name, entry in read_manifest(zoo)["models"].items():
        path = zoo / entry["file"]
        if not path.is_file() or sha256_of(path) != entry["sha256"]:
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tsquant.zoo", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p_add = sub.add_parser("add", help="add a finished run's FP checkpoint to the zoo")
    p_add.add_argument("run_dir")
    p_add.add_argument("name")
    p_add.add_argument("--command", required=True, help="the command that trained it")
    sub.add_parser("verify", help="check every zoo file against its sha256")
    args = parser.parse_args(argv)
    try:
        if args.action == "add":
            print(add(Path(args.run_dir), args.name, args.command))
            return 0
        bad = verify()
        print("zoo ok" if not bad else f"zoo files missing or changed: {', '.join(bad)}")
        return 1 if bad else 0
    except CheckpointError as exc:
        print(f"tsquant.zoo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
