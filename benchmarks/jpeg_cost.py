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
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import platform
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tsquant.cli import parse_overrides
from tsquant.data import BatchLoader
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context
from tsquant.training import evaluate

ROWS = Path(__file__).with_name("jpeg_cost.json")


def recompressed(images: np.ndarray, quality: int) -> np.ndarray:
    """Every NHWC uint8 image through one JPEG encode/decode at ``quality``."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qualities", type=int, nargs="+", default=[95, 90, 75, 50, 25])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = Context(load_config(args.config, parse_overrides(args.set)))
    model = ctx.load("train", ctx.fp_model()).eval()
    test = ctx.dataset("test")
    stored = np.asarray(test.images)
    command = "python benchmarks/jpeg_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = []
    for quality in [None, *args.qualities]:
        images = stored if quality is None else recompressed(stored, quality)
        data = replace(test, images=images)
        loader = BatchLoader(data, ctx.cfg.data.eval_batch_size)
        top1 = evaluate(model, loader, ctx.device, f"q{quality or 'stored'}")
        error = ((images.astype(np.float64) - stored) ** 2).mean(axis=(1, 2, 3))
        psnr = float(np.median(10 * np.log10(255**2 / np.maximum(error, 1e-12))))
        rows.append(
            {
                "dataset": test.title,
                "model": ctx.cfg.model.name,
                "run": ctx.cfg.name,
                "test_images": "stored" if quality is None else f"+ one JPEG pass at q{quality}",
                "top1": round(top1, 2),
                "median_psnr_db_vs_stored": None if quality is None else round(psnr, 2),
                "machine": f"{platform.machine()} CPU, {args.threads} threads",
                "date": datetime.date.today().isoformat(),
                "command": command,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ROWS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
