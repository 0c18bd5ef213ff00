"""Deployment check: export a finished run, verify int runtime and ONNX on the whole test set.

    python benchmarks/deploy.py configs/demo_fashion_mnist.yaml [--set KEY=VALUE ...]

Runs the `export` stage with ``export.verify_images`` unset (the whole test set), then adds the
row to benchmarks/deploy.json (one row per model/dataset, replaced on re-run) and rewrites the
deployment section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tsquant.cli import _overrides
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context, stage_export

HERE = Path(__file__).resolve().parent
ROWS = HERE / "deploy.json"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- deploy:begin -->", "<!-- deploy:end -->"


def replace_section(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    return text.rstrip() + "\n\n" + block + "\n"


def table(rows: list[dict]) -> str:
    lines = [
        "## Deployable integer model",
        "",
        "The exported model (packed ternary codes, int32 accumulation, integer thresholds) run by",
        "the integer runtime and by onnxruntime, against the fake-quant PyTorch model that",
        "`tsquant eval` scores, on every test image. Code mismatches are counted per activation",
        "element over all sparse quantizers; the float64 column repeats the comparison with the",
        "PyTorch model in float64, which separates float32 rounding at thresholds from real errors.",
        "",
        "| dataset | model | test images | torch top-1 | int top-1 | ONNX top-1 | int vs torch predictions | code mismatches fp32 (fp64) of codes | size (bytes) | FP32 size | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['test_images']:,} | {r['torch_top1']:.2f} | "
            f"{r['int_top1']:.2f} | {r['onnx_top1']:.2f} | {r['int_vs_fakequant_disagreements']} | "
            f"{r['code_mismatches_float32']} ({r['code_mismatches_float64']}) of "
            f"{r['codes_compared']:,} | {r['size_bytes']:,} | {r['fp32_size_bytes']:,} | "
            f"`{r['command']}` |"
        )
    lines.append("")
    lines.append("Machine, date and wall time of each row are in benchmarks/deploy.json.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, _overrides(args.set))
    cfg.export.verify_images = None  # always the whole test set
    start = time.time()
    row = stage_export(Context(cfg))
    row.update(
        {
            "command": "python benchmarks/deploy.py "
            + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "wall_s": round(time.time() - start, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
    )
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else []
    rows = [r for r in rows if (r["dataset"], r["model"]) != (row["dataset"], row["model"])]
    rows.append(row)
    ROWS.write_text(json.dumps(rows, indent=2) + "\n")
    text = RESULTS.read_text() if RESULTS.exists() else "# tsquant benchmark results\n"
    RESULTS.write_text(replace_section(text, BEGIN, END, table(rows)))
    print(f"wrote {ROWS} and {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
