"""Mixed precision under a size budget: one step-1 model through step 2 as uniform ternary,
under each weight budget (layers upgraded to 2-bit where they gain most per bit) and as uniform
2-bit; the average bits per quantized weight, each layer's format and test top-1 side by side.

    python benchmarks/mixed_precision.py configs/demo_fashion_mnist.yaml --set name=RUN \
        [--budgets 1.8] [--threads 2] [--set KEY=VALUE ...]

RUN must have finished its train and codes stages; they are copied to RUN_mp_<setting>, where
`tsquant transform` runs (provenance accepts the copies, so step 1 is not repeated). Bits per
weight count log2 of the levels (ternary 1.585, 2-bit 2.0), weighted by each layer's weights.
Rows go to benchmarks/mixed_precision.json (replaced per dataset, model and setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import shutil
import sys
from pathlib import Path

import torch
from rowfile import merge_rows
from stage_runs import run_stage

from tsquant.cli import parse_overrides
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context
from tsquant.quantizers.weight import WeightGrid

ROWS = Path(__file__).with_name("mixed_precision.json")


def bits_per_weight(meta: dict, sizes: dict[str, int]) -> float:
    """Weighted average of log2(levels) over the quantized layers, as the budget counts."""
    total = bits = 0.0
    for name, fmt in meta["layer_formats"].items():
        total += sizes[name]
        bits += sizes[name] * WeightGrid.from_spec(fmt).information_bits
    return bits / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    ctx = Context(load_config(args.config, overrides))
    source = ctx.run_dir
    for stage in ("train", "codes"):
        if not ctx.done(stage):
            raise SystemExit(f"{source} has no finished {stage} stage: run it first")
    step1 = ctx.load("codes", ctx.step1_model())
    sizes = {
        name: m.weight.numel()
        for name, m in step1.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    settings = {"ternary": ["transform.weight_bits=ternary"]}
    settings |= {f"budget{b}": [f"transform.weight_budget={b}"] for b in args.budgets}
    settings["2bit"] = ["transform.weight_bits=2"]
    command = "python benchmarks/mixed_precision.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for tag, extra in settings.items():
        name = f"{ctx.cfg.name}_mp_{tag}"
        target = source.parent / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for stage in ("train", "codes"):
            shutil.copytree(source / stage, target / stage)
        meta = run_stage(
            "transform", args.config, overrides, target, f"threads={args.threads}", *extra
        )
        row = {
            "dataset": ctx.dataset("test").title,
            "model": ctx.cfg.model.name,
            "setting": tag,
            "weight_budget": None if not tag.startswith("budget") else float(tag[6:]),
            "bits_per_weight": round(bits_per_weight(meta, sizes), 4),
            "layer_formats": meta["layer_formats"],
            "tsq_top1": meta["test_top1"],
            "step2_wall_s": round(meta["wall_s"], 1),
            "step1_run": str(source),
            "machine": f"{platform.machine()} CPU, {args.threads} threads",
            "date": datetime.date.today().isoformat(),
            "command": command,
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "layer_formats"}), flush=True)
    merge_rows(ROWS, rows, ("dataset", "model", "setting"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
