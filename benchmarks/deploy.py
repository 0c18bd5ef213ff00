"""Deployment check: export a finished run, verify int runtime and ONNX on the whole test set.

    python benchmarks/deploy.py configs/demo_fashion_mnist.yaml [--set KEY=VALUE ...]

Runs the `export` stage with ``export.verify_images`` unset (the whole test set), then adds the
row to benchmarks/deploy.json (one row per model/dataset, replaced on re-run) and rewrites the
deployment section of benchmarks/RESULTS.md. When the run's export/ already holds a whole-test-set
verification of the same source checkpoint (e.g. from `tsquant run`), it is reused unless
``--force`` is given.
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

from tsquant.cli import parse_overrides
from tsquant.fileio import load_json, sha256_of, write_text_atomic
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context, final_stage, stage_export

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
        "| dataset | model | first/last layer | test images | torch top-1 fp32 (fp64) | int top-1 | ONNX top-1 | int vs torch predictions fp32 (fp64) | code mismatches fp32 (fp64) of codes | size (bytes) | FP32 size | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r.get('boundary', 'first fp, last fp')} | "
            f"{r['test_images']:,} | {r['torch_top1']:.2f} "
            f"({r.get('torch64_top1', float('nan')):.2f}) | {r['int_top1']:.2f} | {r['onnx_top1']:.2f} | "
            f"{r['int_vs_fakequant_disagreements']} ({r['int_vs_fakequant64_disagreements']}) | "
            f"{r['code_mismatches_float32']} ({r['code_mismatches_float64']}) of "
            f"{r['codes_compared']:,} | {r['size_bytes']:,} | {r['fp32_size_bytes']:,} | "
            f"`{r['command']}` |"
        )
    lines.append("")
    lines.append("Machine, date and wall time of each row are in benchmarks/deploy.json.")
    return "\n".join(lines)


def earlier_verification(ctx: Context) -> dict | None:
    """The run's verify.json when it covers the whole test set of the current final model."""
    out = ctx.stage_dir("export")
    if not (out / "verify.json").exists() or not (out / "manifest.json").exists():
        return None
    row, manifest = load_json(out / "verify.json"), load_json(out / "manifest.json")
    source = ctx.stage_dir(final_stage(ctx)) / "model.safetensors"
    whole = row.get("test_images") == len(ctx.dataset("test")) and "torch64_top1" in row
    same = manifest.get("source", {}).get("sha256") == sha256_of(source)
    return row if whole and same else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--force", action="store_true", help="verify again even if done")
    args = parser.parse_args()
    cfg = load_config(args.config, parse_overrides(args.set))
    cfg.export.verify_images = None  # always the whole test set
    start = time.time()
    ctx = Context(cfg)
    row = None if args.force else earlier_verification(ctx)
    if row is not None:
        print(
            f"reusing {ctx.stage_dir('export') / 'verify.json'} (same checkpoint, whole test set)"
        )
        start -= row.get("verify_s", 0.0)
    row = row or stage_export(ctx)
    row.update(
        {
            "command": "python benchmarks/deploy.py "
            + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "wall_s": round(time.time() - start, 1),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        }
    )
    t = ctx.as_recorded("transform").cfg.transform
    row["boundary"] = f"first {t.first_layer}, last {t.last_layer}"
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else []
    key = (row["dataset"], row["model"], row["boundary"])
    rows = [
        r for r in rows if (r["dataset"], r["model"], r.get("boundary", "first fp, last fp")) != key
    ]
    rows.append(row)
    write_text_atomic(ROWS, json.dumps(rows, indent=2) + "\n")
    text = RESULTS.read_text() if RESULTS.exists() else "# tsquant benchmark results\n"
    write_text_atomic(RESULTS, replace_section(text, BEGIN, END, table(rows)))
    print(f"wrote {ROWS} and {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
