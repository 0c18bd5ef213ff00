"""Step 2 on a finished step-1 run with several solver settings: test accuracy and agreement.

Usage: python benchmarks/step2_variants.py RUN_DIR [--calib 2000] [--set margin=0.2,lam=1 ...]
Each --set is one row (comma-separated SolverConfig fields; variant=paper for the paper form).
Without --set, it compares the paper variant with the tsquant default.
"""

import argparse
import time
from dataclasses import asdict
from pathlib import Path

from tsquant.fileio import load_json
from tsquant.pipeline.config import ConfigError, RunConfig, from_dict
from tsquant.pipeline.stages import Context
from tsquant.solver import SolverConfig
from tsquant.training import evaluate
from tsquant.transform import transform


def parse_row(text: str, base: SolverConfig) -> SolverConfig:
    """``base`` with the row's comma-separated ``field=value`` pairs, parsed and checked as
    the config file's transform.tsq section is."""
    pairs = dict(pair.split("=", 1) for pair in filter(None, text.split(",")))
    try:
        return from_dict(SolverConfig, {**asdict(base), **pairs}, prefix="transform.tsq.")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--calib", type=int, default=None, help="calibration images")
    parser.add_argument("--mode", default=None, help="sequential or parallel")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--set", action="append", default=[], help="one solver setting per row")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    cfg = from_dict(RunConfig, load_json(run_dir / "codes" / "meta.json")["config"])
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    if args.calib:
        cfg.transform.calib_images = args.calib
    cfg.threads = args.threads
    ctx = Context(cfg)
    step1 = ctx.load("codes", ctx.step1_model())
    test, calib = ctx.test_loader(), ctx.calib_loader()
    rows = args.set or ["variant=paper", ""]
    t = cfg.transform
    print(f"run {args.run_dir}: step-1 top-1 {evaluate(step1, test):.2f}%")
    print("| setting | mean agreement | top-1 (%) | step-2 time (s) |\n|---|---|---|---|")
    for text in rows:
        solver = parse_row(text, t.tsq)
        tcfg = ctx.transform_config(mode=args.mode or t.mode, verbose=False, method=solver)
        report: list[dict] = []
        start = time.perf_counter()
        model = transform(step1, calib, tcfg, report=report)
        wall = time.perf_counter() - start
        coded = [r["agreement"] for r in report if r["kind"] == "coded"]
        print(
            f"| {text or 'tsquant default'} | {sum(coded) / len(coded):.4f} | "
            f"{evaluate(model, test):.2f} | {wall:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
