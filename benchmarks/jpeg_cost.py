"""What the CIFAR-10 JPEG q75 copy is likely to cost against the usual (lossless) figures.

    python benchmarks/jpeg_cost.py configs/cifar10_resnet20.yaml --set name=RUN [--threads 2]

We have no lossless CIFAR-10 here, so the cost is estimated from the other side: the run's FP
model (trained on the q75 copy) is scored on its test images as stored and after one more
JPEG pass at several qualities (Pillow, 4:2:0 chroma subsampling, as the copy was made). The
copy itself is 30 dB PSNR (median) from the originals (../shared/data/README.md): the drop for a
pass that takes the stored images about 30 dB further (the median PSNR against the stored
images is in each row) is a proxy for what the copy's own compression costs at test time.
A second pass removes less at the same quality (the first has quantized the same DCT grid), so
the qualities are compared by their PSNR, not their number. Rows go to benchmarks/jpeg_cost.json.

    python benchmarks/jpeg_cost.py configs/cifar10_resnet20.yaml --matched-epochs 15 \
        [--matched-quality 50]

The matched estimate: the config's FP recipe shortened to --matched-epochs, trained from scratch
twice with the same seed, once on the images as stored and once with every split (train,
validation, test) through one more JPEG pass at --matched-quality, each scored on its own test
split. The gap is the cost of one further loss of about the copy's own size when the model has
also seen it in training, the situation of a model trained and tested on the copy. Rows go to
the "matched" list of benchmarks/jpeg_cost.json.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsquant.cli import parse_overrides
from tsquant.data import BatchLoader
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context
from tsquant.training import evaluate, train

ROWS = Path(__file__).with_name("jpeg_cost.json")


def recompressed(images: np.ndarray, quality: int) -> np.ndarray:
    """Every NHWC uint8 image through one JPEG encode/decode at ``quality``."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def psnr_db(images: np.ndarray, reference: np.ndarray) -> float:
    """Median PSNR (dB) of each image against its reference."""
    error = ((images.astype(np.float64) - reference) ** 2).mean(axis=(1, 2, 3))
    return float(np.median(10 * np.log10(255**2 / np.maximum(error, 1e-12))))


def test_time_rows(ctx: Context, qualities: list[int], threads: int, command: str) -> list[dict]:
    model = ctx.load("train", ctx.fp_model()).eval()
    test = ctx.dataset("test")
    stored = np.asarray(test.images)
    rows = []
    for quality in [None, *qualities]:
        images = stored if quality is None else recompressed(stored, quality)
        loader = BatchLoader(replace(test, images=images), ctx.cfg.data.eval_batch_size)
        top1 = evaluate(model, loader, ctx.device, f"q{quality or 'stored'}")
        rows.append(
            {
                "dataset": test.title,
                "model": ctx.cfg.model.name,
                "run": ctx.cfg.name,
                "test_images": "stored" if quality is None else f"+ one JPEG pass at q{quality}",
                "top1": round(top1, 2),
                "median_psnr_db_vs_stored": None
                if quality is None
                else round(psnr_db(images, stored), 2),
                "machine": f"{platform.machine()} CPU, {threads} threads",
                "date": datetime.date.today().isoformat(),
                "command": command,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def matched_row(
    ctx: Context, quality: int | None, work_dir: Path, threads: int, command: str
) -> dict:
    """Train the FP recipe from scratch on every split as stored (quality None) or through one
    more JPEG pass; score on the test split treated the same way."""
    splits = {}
    for split in ("train", "val", "test"):
        ds = ctx.dataset(split) if split != "val" or ctx.cfg.data.val_split else None
        if ds is not None and quality is not None:
            ds = replace(ds, images=recompressed(np.asarray(ds.images), quality))
        splits[split] = ds
    d, t = ctx.cfg.data, ctx.cfg.train
    train_loader = BatchLoader(
        splits["train"],
        d.batch_size,
        shuffle=True,
        augment=t.augment,
        seed=ctx.cfg.seed,
        drop_last=True,
        channels_last=d.channels_last,
    )
    val = splits["val"]
    val_loader = None if val is None else BatchLoader(val, d.eval_batch_size)
    model = ctx.fp_model()
    if d.channels_last:
        model.to(memory_format=torch.channels_last)
    start = time.time()
    logs = train(model, train_loader, t, work_dir, ctx.device, "fp", val_loader=val_loader)
    trained_here = time.time() - start
    top1 = evaluate(model, BatchLoader(splits["test"], d.eval_batch_size), ctx.device, "test")
    stored = np.asarray(ctx.dataset("test").images)
    return {
        "dataset": ctx.dataset("test").title,
        "model": ctx.cfg.model.name,
        "images": "as stored" if quality is None else f"every split + one JPEG pass at q{quality}",
        "median_psnr_db_vs_stored": None
        if quality is None
        else round(psnr_db(np.asarray(splits["test"].images), stored), 2),
        "epochs": t.epochs,
        "seed": ctx.cfg.seed,
        "val_top1": logs[-1].get("val_top1") if logs else None,
        "test_top1": round(top1, 2),
        # training time across resumes (train() keeps it), plus this process's test pass
        "wall_s": round(
            time.time() - start + logs[-1].get("wall_s", trained_here) - trained_here, 1
        ),
        "machine": f"{platform.machine()} CPU, {threads} threads",
        "date": datetime.date.today().isoformat(),
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qualities", type=int, nargs="+", default=[95, 90, 75, 50, 25])
    parser.add_argument("--matched-epochs", type=int, help="train the matched pair this long")
    parser.add_argument("--matched-quality", type=int, default=50)
    args = parser.parse_args(argv)
    if args.matched_epochs is not None and args.matched_epochs < 1:
        parser.error("--matched-epochs must be at least 1")
    if not 1 <= args.matched_quality <= 95:
        parser.error("--matched-quality must be a JPEG quality from 1 to 95")
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    command = "python benchmarks/jpeg_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    if args.matched_epochs is None:
        ctx = Context(load_config(args.config, overrides))
        results["rows"] = test_time_rows(ctx, args.qualities, args.threads, command)
    else:
        overrides["train.epochs"] = str(args.matched_epochs)
        ctx = Context(load_config(args.config, overrides))
        rows = []
        for quality in (None, args.matched_quality):
            tag = "stored" if quality is None else f"q{quality}"
            work_dir = (
                ctx.run_dir.parent / f"jpeg_matched_{ctx.cfg.name}_{args.matched_epochs}_{tag}"
            )
            rows.append(matched_row(ctx, quality, work_dir, args.threads, command))
            print(json.dumps(rows[-1]), flush=True)
        results["matched"] = rows
    ROWS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
