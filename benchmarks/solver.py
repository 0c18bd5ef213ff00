"""Step-2 solver benchmark: TSQ's solver against a Gram-building pass, AdaRound and Brevitas GPTQ.

    python benchmarks/solver.py configs/cifar10_resnet20_zoo.yaml \
        --step1 runs/bench/cifar10_resnet20_s0_tsq/codes/model.safetensors \
        --calib 256 1024 4096 --methods gram_pass,tsq,adaround,brevitas_gptq

Every (method, calibration size) runs in its own process, so its peak resident memory
(ru_maxrss) is its own; all share the step-1 model, the calibration images (drawn from the
training set with the config's seed) and the per-layer capture code of step 2.
- gram_pass: per quantized layer, capture its rows from the step-1 model and build X'X: the
  data pass any solver on these statistics needs (the lower bound of step 2).
- tsq: step 2 (`tsquant.transform`, the config's transform options).
- adaround: the same captured problems solved by learned rounding (tsquant.baselines.adaround).
- brevitas_gptq: Brevitas GPTQ of the FP model on the same calibration images (tsquant[bench]).
Rows go to benchmarks/solver.json and the solver section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from tsquant.baselines.adaround import AdaRoundConfig
from tsquant.capture import capture_layer_inputs
from tsquant.fileio import load_model_weights, write_text_atomic
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context
from tsquant.solver import gram
from tsquant.solver.rows import peak_rss_mb
from tsquant.surgery import analyse, quantizable_layers
from tsquant.training import evaluate
from tsquant.transform import transform

HERE = Path(__file__).resolve().parent
ROWS, RESULTS = HERE / "solver.json", HERE / "RESULTS.md"
BEGIN, END = "<!-- solver:begin -->", "<!-- solver:end -->"
METHODS = ("gram_pass", "tsq", "adaround", "brevitas_gptq")


def child(args) -> dict:
    """One (method, calibration size): prints one JSON row."""
    cfg = load_config(args.config, {"transform.calib_images": str(args.calib), **dict(args.set)})
    torch.set_num_threads(args.threads)
    ctx = Context(cfg)
    step1 = ctx.step1_model()
    load_model_weights(step1, Path(args.step1))
    step1 = step1.to(ctx.device).eval()
    loader = ctx.calib_loader()
    ctx.test_loader()  # load the test set now, so it counts in the memory before step 2
    rss_before = peak_rss_mb()
    layers = []
    top1 = agreement = None
    start = time.perf_counter()
    if args.method == "gram_pass":
        tcfg = ctx.transform_config(verbose=False)
        todo = quantizable_layers(analyse(step1), tcfg.first_layer, tcfg.last_layer)
        for index, layer in enumerate(todo):
            t0 = time.perf_counter()
            gram(
                capture_layer_inputs(layer, index, step1, loader, tcfg, False, cfg.memory.cache_mb)[
                    0
                ]
            )
            layers.append({"layer": layer.name, "wall_s": round(time.perf_counter() - t0, 2)})
        wall, peak = time.perf_counter() - start, peak_rss_mb()
    elif args.method in ("tsq", "adaround"):
        report: list[dict] = []
        model = transform(
            step1,
            loader,
            ctx.transform_config(
                method=(
                    AdaRoundConfig(iters=args.adaround_iters)
                    if args.method == "adaround"
                    else args.method
                ),
                verbose=False,
            ),
            report,
            memory=cfg.memory,
        )
        wall, peak = time.perf_counter() - start, peak_rss_mb()
        coded = [r for r in report if r["kind"] == "coded"]
        agreement = sum(r["agreement"] for r in coded) / len(coded)
        layers = [
            {
                "layer": r["layer"],
                "rows": r["rows"],
                "wall_s": round(r["capture_s"] + r["solve_s"], 2),
                "capture_s": round(r["capture_s"], 2),
                "agreement": round(r["agreement"], 4) if r["kind"] == "coded" else None,
                "relative_error": round(r["relative_error"], 4) if r["kind"] != "coded" else None,
                "peak_rss_mb": None if r["peak_rss_mb"] is None else round(r["peak_rss_mb"], 1),
            }
            for r in report
        ]
        top1 = evaluate(model, ctx.test_loader(), ctx.device, "eval")
    else:
        from tsquant.baselines import brevitas_gptq

        fp = ctx.load("train", ctx.fp_model()) if ctx.done("train") else _fp_from(ctx)
        t = cfg.transform
        model = brevitas_gptq(fp.eval(), loader, t.weight_bits, cfg.codes.bits)
        wall, peak = time.perf_counter() - start, peak_rss_mb()
        top1 = evaluate(model, ctx.test_loader(), ctx.device, "eval")
    device = (
        torch.cuda.get_device_name(ctx.device)
        if ctx.device.startswith("cuda")
        else f"{platform.machine()} CPU, {args.threads} torch threads"
    )
    return {
        "model": cfg.model.name,
        "dataset": ctx.dataset("test").title or cfg.data.dataset,
        "method": args.method,
        "calib_images": args.calib,
        "positions_per_image": cfg.transform.positions_per_image,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak, 1),  # during the method, before the test evaluation
        "rss_before_mb": round(rss_before, 1),
        "agreement": None if agreement is None else round(agreement, 4),
        "top1": top1,
        "adaround_iters": args.adaround_iters if args.method == "adaround" else None,
        "device": device,
        "layers": layers,
    }


def _fp_from(ctx: Context):
    """The FP model of a config that starts from init_checkpoint (the zoo)."""
    model = ctx.fp_model()
    load_model_weights(model, Path(ctx.cfg.init_checkpoint))
    return model.to(ctx.device)


def table(rows: list[dict]) -> str:
    head = rows[0]
    lines = [
        f"## Step-2 solver at scale: {head['model']}",
        "",
        f"{head['dataset']}, {head['model']}, step-1 model `{head['step1']}`, "
        f"{head['positions_per_image']} sampled positions per image, {head['device']}, "
        f"{head['date']}. Commands: "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
        + ".",
        "",
        "| calib images | method | wall (s) | x gram pass | peak RSS (MB) | RSS before step 2 (MB) "
        "| code agreement | test top-1 (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for calib in sorted({r["calib_images"] for r in rows}):
        group = [r for r in rows if r["calib_images"] == calib]
        base = next((r["wall_s"] for r in group if r["method"] == "gram_pass"), None)
        for r in group:
            ratio = f"{r['wall_s'] / base:.2f}" if base else "-"
            name = r["method"] + (
                f" ({r['adaround_iters']} it/layer)" if r["adaround_iters"] else ""
            )
            agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.2f} %"
            top1 = "-" if r["top1"] is None else f"{r['top1']:.2f}"
            lines.append(
                f"| {calib} | {name} | {r['wall_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_before_mb']:.0f} | {agree} | {top1} |"
            )
    tsq = {r["calib_images"]: r for r in rows if r["method"] == "tsq"}
    ada = {r["calib_images"]: r for r in rows if r["method"] == "adaround"}
    if len(tsq) > 1:
        lo, hi = min(tsq), max(tsq)
        lines += [
            "",
            f"TSQ peak RSS at {hi} vs {lo} calibration images: "
            f"{tsq[hi]['peak_rss_mb'] / tsq[lo]['peak_rss_mb']:.2f}x.",
        ]
    for calib in sorted(set(tsq) & set(ada)):
        lines.append(
            f"At {calib} images AdaRound / TSQ wall time: "
            f"{ada[calib]['wall_s'] / tsq[calib]['wall_s']:.1f}x."
        )
    lines += ["", "Per-layer times and agreements: benchmarks/solver.json."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--step1", required=True, help="step-1 model weights (.safetensors)")
    parser.add_argument("--calib", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--adaround-iters", type=int, default=10_000)
    parser.add_argument(
        "--adaround-calib",
        type=int,
        nargs="+",
        help="calibration sizes AdaRound runs at (default: all of --calib; it is the slow one)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--set", action="append", default=[], type=lambda s: s.split("=", 1))
    parser.add_argument("--out", type=Path, default=ROWS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep other rows of --out (same method/size/iters replaced)",
    )
    parser.add_argument("--child", choices=METHODS, dest="method")
    args = parser.parse_args()
    if args.method:  # the worker process
        args.calib = args.calib[0]
        print("ROW " + json.dumps(child(args)), flush=True)
        return 0
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: use {', '.join(METHODS)}")
    if not Path(args.step1).is_file():
        parser.error(f"step-1 weights {args.step1} not found: run `tsquant codes CONFIG` first")
    command = "python benchmarks/solver.py " + " ".join(sys.argv[1:])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    row_key = lambda r: (r["model"], r["method"], r["calib_images"], r["adaround_iters"])  # noqa: E731
    kept = json.loads(args.out.read_text()) if args.merge and args.out.exists() else []
    rows: list[dict] = []
    for calib in args.calib:
        for method in methods:
            if method == "adaround" and args.adaround_calib and calib not in args.adaround_calib:
                continue
            cmd = [
                sys.executable,
                __file__,
                args.config,
                "--step1",
                args.step1,
                "--calib",
                str(calib),
                "--child",
                method,
                "--adaround-iters",
                str(args.adaround_iters),
                "--threads",
                str(args.threads),
            ]
            for key, value in args.set:
                cmd += ["--set", f"{key}={value}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode != 0 or not found:
                print(done.stderr[-3000:], file=sys.stderr)
                print(
                    f"{method} at {calib} images failed (exit {done.returncode})", file=sys.stderr
                )
                return 1
            row = {**json.loads(found[0]), "step1": args.step1, "command": command, "date": date}
            rows.append(row)
            fresh = {row_key(r) for r in rows}
            all_rows = [r for r in kept if row_key(r) not in fresh] + rows
            print(
                f"{calib:5d} {method:<14} {row['wall_s']:8.1f} s  peak {row['peak_rss_mb']:7.0f} MB"
                f"  agreement {row['agreement']}  top-1 {row['top1']}",
                flush=True,
            )
            write_text_atomic(args.out, json.dumps(all_rows, indent=2) + "\n")
    if args.out == ROWS:
        from deploy import replace_section

        text = RESULTS.read_text() if RESULTS.exists() else "# tsquant benchmark results\n"
        tables = []
        for model in dict.fromkeys(r["model"] for r in all_rows):  # one table per model
            mine = [r for r in all_rows if r["model"] == model]
            tables.append(
                table(sorted(mine, key=lambda r: (r["calib_images"], METHODS.index(r["method"]))))
            )
        write_text_atomic(RESULTS, replace_section(text, BEGIN, END, "\n\n".join(tables)))
        print(f"wrote {ROWS} and {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
