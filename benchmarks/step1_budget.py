"""Step 1 against its epoch budget: one FP model, step 1 (FP weights, sparse 2-bit activations)
trained for each budget; validation and test top-1 per budget, to pick the budget where step 1
is within 1 pt of FP on the validation split (issue 15).

    python benchmarks/step1_budget.py configs/cifar10_resnet20.yaml --set name=RUN \
        --epochs 4 8 16 [--threads 2] [--set KEY=VALUE ...]

RUN must have finished its train stage (with data.val_split set, so that validation top-1
exists); it is copied to RUN_step1_<epochs>, where `tsquant codes` runs with codes.epochs set
(resumable: run the command again after an interruption). Rows go to
benchmarks/step1_budget.json (replaced per dataset, model, seed and epochs).
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

from rowfile import merge_rows
from stage_runs import run_stage

from tsquant.cli import parse_overrides
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context

ROWS = Path(__file__).with_name("step1_budget.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    ctx = Context(load_config(args.config, overrides))
    if not ctx.done("train"):
        raise SystemExit(f"{ctx.run_dir} has no finished train stage: run it first")
    if not ctx.cfg.data.val_split:
        raise SystemExit("set data.val_split: the budget is chosen on validation top-1")
    fp = json.loads((ctx.stage_dir("train") / "meta.json").read_text())
    command = "python benchmarks/step1_budget.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for epochs in args.epochs:
        name = f"{ctx.cfg.name}_step1_{epochs}"
        target = ctx.run_dir.parent / name
        if not (target / "train").exists():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copytree(ctx.stage_dir("train"), target / "train")
        settings = (f"threads={args.threads}", f"codes.epochs={epochs}")
        meta = run_stage("codes", args.config, overrides, target, *settings)
        row = {
            "dataset": ctx.dataset("test").title,
            "model": ctx.cfg.model.name,
            "seed": ctx.cfg.seed,
            "epochs": epochs,
            "step1_val_top1": meta.get("val_top1"),
            "step1_test_top1": meta["test_top1"],
            "fp_val_top1": fp.get("val_top1"),
            "fp_test_top1": fp["test_top1"],
            "wall_s": round(meta["wall_s"], 1),
            "machine": f"{platform.machine()} CPU, {args.threads} threads",
            "date": datetime.date.today().isoformat(),
            "command": command,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        merge_rows(ROWS, rows, ("dataset", "model", "seed", "epochs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
