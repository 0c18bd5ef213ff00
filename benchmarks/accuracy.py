"""Accuracy benchmark: TSQ against its baselines on one dataset/model, same harness and budget.

    python benchmarks/accuracy.py configs/fashion_mnist_small_cnn.yaml --seeds 0 1 2 \
        --rows fp,step1,tsq,tsq_ft,hwgq_otwa,hwgq_otwa_ft,qat,qat_2x,tsq_w2,brevitas_gptq \
        [--ablations eps,mode,lam,iters,calib,distill,keep_best,learn_step,finetune,split,hwgq_finetune]

Every method is a `tsquant run` of the same config with a few overrides (printed as the row's
command); a stage that another run under --out-dir (or --reuse-from) already made with the same
options and inputs (its recorded provenance) is copied instead of recomputed. QAT (LSQ) trains from
the same FP checkpoint for codes.epochs + finetune.epochs epochs at the step-1 learning rate
(qat_2x: twice as many). With data.val_split, every row also carries its validation top-1
(held-out training images), which is what settings are chosen on; the HWGQ-style baseline's
fine-tune is chosen the same way (`--ablations hwgq_finetune`, then `--hwgq-finetune VALUE`);
`--best ABLATION` prints the value to choose.
Rows go to benchmarks/results.json (replacing rows with the same dataset, model, method, seed
and ablation) and the tables to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from tsquant import __version__, zoo
from tsquant.baselines import prepare_lsq
from tsquant.cli import parse_overrides
from tsquant.export.verify import quantizer_codes
from tsquant.fileio import load_json, save_json, sha256_of, write_text_atomic
from tsquant.pipeline.config import RunConfig, load_config
from tsquant.pipeline.stages import Context, run_all
from tsquant.training import evaluate, train

HERE = Path(__file__).resolve().parent
BENCH_STAGES = ("train", "codes", "transform", "finetune", "eval")
CORE = ["fp", "step1", "tsq", "tsq_ft", "hwgq_otwa", "hwgq_otwa_ft", "qat", "qat_2x", "tsq_w2"]
QAT_BUDGET = {"qat": 1, "qat_2x": 2}  # times step 1 + fine-tune's epochs
OPTIONAL = ["brevitas_gptq"]  # needs pip install 'tsquant[bench]'; ask for it with --rows

# variant tag -> overrides of the main config
VARIANTS = {
    "tsq": {},
    "hwgq": {"codes.eps": "0", "transform.method": "otwa"},
    "w2": {"transform.weight_bits": "2"},
}
CHECKPOINTED = ("train", "codes", "transform", "finetune")
TRAIN_SECTIONS = ("data", "model", "train", "seed", "init_checkpoint")  # what FP training reads
# method -> (variant, the eval row it reads)
METHODS = {
    "fp": ("tsq", "fp"),
    "step1": ("tsq", "step1"),
    "tsq": ("tsq", "tsq"),
    "tsq_ft": ("tsq", "tsq_ft"),
    "hwgq_otwa": ("hwgq", "tsq"),
    "hwgq_otwa_ft": ("hwgq", "tsq_ft"),
    "tsq_w2": ("w2", "tsq"),
}
ABLATIONS = {  # name -> [(value, overrides)]; the main config's value is recomputed for free
    "eps": [(v, {"codes.eps": v}) for v in ("0", "0.2", "0.32", "0.5", "0.7")],
    "mode": [(v, {"transform.mode": v}) for v in ("sequential", "parallel")],
    "lam": [(v, {"transform.tsq.lam": v}) for v in ("1", "3", "10")],
    # lam moves the result only in the paper variant: the tsquant variant's repair phase uses
    # its own repair_lam, and its later alternations stop when w no longer changes
    "lam_paper": [
        (v, {"transform.tsq.lam": v, "transform.tsq.variant": "paper"}) for v in ("1", "3", "10")
    ],
    "variant": [(v, {"transform.tsq.variant": v}) for v in ("tsquant", "paper")],
    "start": [(v, {"transform.tsq.start": v}) for v in ("gptq", "otwa")],
    "iters": [(v, {"transform.tsq.iters": v}) for v in ("5", "20", "50")],
    "calib": [(v, {"transform.calib_images": v}) for v in ("250", "500", "1000", "2000", "4000")],
    # beyond the paper: the FP model's logits as soft targets in step 1 and the fine-tune
    "distill": [(v, {"codes.distill": v, "finetune.distill": v}) for v in ("0", "0.5", "0.9")],
    "keep_best": [(v, {"transform.tsq.keep_best": v}) for v in ("error", "agreement")],
    # beyond the paper: step 1 learns each quantizer's step d (LSQ's gradient) instead of the
    # Gaussian-optimal one; eps, and so the sparsity, stay
    "learn_step": [(v, {"codes.learn_step": v}) for v in ("false", "true")],
    # the fine-tune's length: QAT at equal budget gets codes.epochs + finetune.epochs, so a
    # longer fine-tune chosen here moves the qat row's budget with it
    "finetune": [
        (
            "e1_const",
            {"finetune.epochs": "1", "finetune.schedule": "constant", "finetune.lr": "0.0005"},
        ),
        ("e3_cos", {"finetune.epochs": "3", "finetune.schedule": "cosine", "finetune.lr": "0.002"}),
        ("e6_cos", {"finetune.epochs": "6", "finetune.schedule": "cosine", "finetune.lr": "0.002"}),
        # gentler: the HWGQ-style start (near chance) only recovers at low learning rates
        (
            "e6_cos_lr0005",
            {"finetune.epochs": "6", "finetune.schedule": "cosine", "finetune.lr": "0.0005"},
        ),
        # at step 1's (and QAT's) learning rate: enough for latent weights to cross a grid step
        (
            "e6_cos_lr01",
            {"finetune.epochs": "6", "finetune.schedule": "cosine", "finetune.lr": "0.01"},
        ),
    ],
}
# the same 22 epochs split differently between step 1 and the fine-tune (QAT's budget is unchanged)
ABLATIONS["split"] = [
    (f"c{c}_f{f}", {"codes.epochs": str(c), "finetune.epochs": str(f)})
    for c, f in ((16, 6), (8, 14))
]
# baselines get the same selection effort: the HWGQ-style row's fine-tune, chosen on validation
ABLATIONS["hwgq_finetune"] = [(v, {**VARIANTS["hwgq"], **o}) for v, o in ABLATIONS["finetune"]]

# the row --best compares an ablation's values with: the config's own setting
MAIN_ROW = {"hwgq_finetune": "hwgq_otwa_ft"}  # else tsq_ft (ablations with a fine-tune) or tsq
CONFIG_VALUE = "config"

ABLATION_NO_FINETUNE = {"finetune.epochs": "0"}  # ablation rows read step 2 before fine-tune
# ... except those acting in the fine-tune
ABLATIONS_WITH_FINETUNE = {"distill", "finetune", "split", "hwgq_finetune"}


class Bench:
    def __init__(self, config: str, base_overrides: dict, out_dir: str, reuse_from=()):
        self.config = config
        self.base_overrides = base_overrides
        self.out_dir = out_dir
        self.reuse_from = [Path(out_dir), *map(Path, reuse_from)]

    def cfg(self, seed: int, tag: str, overrides: dict) -> RunConfig:
        base = load_config(self.config, {**self.base_overrides, **overrides})
        name = f"{base.name}_s{seed}_{tag}"
        return replace(base, seed=seed, name=name, out_dir=self.out_dir)

    def command(self, seed: int, overrides: dict) -> str:
        sets = {**self.base_overrides, "seed": str(seed), **overrides}
        return (
            "tsquant run "
            + self.config
            + "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in sets.items())
        )

    def donor(self, ctx: Context, stage: str) -> Path | None:
        """A finished copy of the stage, in any run folder under reuse_from, that this run would
        rebuild exactly: same options and inputs on record (the main TSQ run first)."""
        first = Path(self.out_dir) / self.cfg(ctx.cfg.seed, "tsq", {}).name
        candidates = [first / stage] + sorted(
            d for root in self.reuse_from for d in root.glob(f"*/{stage}") if d.parent != first
        )
        wanted = ctx.provenance(stage)
        for folder in candidates:
            if folder.parent == ctx.run_dir or not (folder / "meta.json").is_file():
                continue
            meta = load_json(folder / "meta.json")
            if meta.get("provenance") == wanted and sha256_of(
                folder / "model.safetensors"
            ) == meta.get("model_sha256"):
                return folder
        return None

    def run(self, seed: int, tag: str, overrides: dict) -> Context:
        """The run's stages: copied where another run made them the same way, else computed
        (`tsquant run`'s rules: a finished stage whose options or inputs changed runs again)."""
        cfg = self.cfg(seed, tag, overrides)
        ctx = Context(cfg)
        for stage in CHECKPOINTED:
            if ctx.done(stage) and ctx.stale_reason(stage) is None:
                continue
            if (donor := self.donor(ctx, stage)) is None:
                break
            print(f"[bench] {cfg.name}: {stage} copied from {donor.parent}", flush=True)
            shutil.rmtree(ctx.stage_dir(stage), ignore_errors=True)  # stale or half-made
            shutil.copytree(donor, ctx.stage_dir(stage))
        run_all(cfg, BENCH_STAGES)
        return ctx


def fp_from_zoo(bench: Bench, seed: int) -> str | None:
    """Write the main run's train stage from the zoo checkpoint that this config trained at this
    seed (same model, dataset, seed, epochs, command), so the FP training is not repeated; the
    stage's wall time is the zoo entry's training time. Returns the zoo name used, or None."""
    main = Context(bench.cfg(seed, "tsq", {}))
    cfg = main.cfg
    touched = [k for k in bench.base_overrides if k.split(".")[0] in TRAIN_SECTIONS]
    if (
        (main.done("train") and main.stale_reason("train") is None)
        or cfg.init_checkpoint
        or touched
    ):
        return None
    wanted = zoo.architecture(asdict(cfg))
    for name, entry in zoo.read_manifest()["models"].items():
        same = all(
            entry.get(k) == wanted.get(k) for k in ("model", "model_kwargs", "image_size")
        ) and (entry["dataset"], entry["seed"], entry["epochs"]) == (
            cfg.data.dataset,
            seed,
            cfg.train.epochs,
        )
        if not same or bench.config not in entry["command"]:
            continue
        source, out = zoo.ZOO_DIR / entry["file"], main.stage_dir("train")
        if sha256_of(source) != entry["sha256"]:
            raise SystemExit(f"zoo file {source} differs from its manifest: restore it from git")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / "model.safetensors")
        meta = {
            "stage": "train",
            "tsquant": __version__,
            "config": asdict(cfg),
            # as if this run had trained it (the checks above): the other runs of the benchmark
            # copy a stage only from one with the provenance they would record
            "provenance": main.provenance("train"),
            "model_sha256": entry["sha256"],
            "test_top1": entry["test_top1"],
            "wall_s": entry["train_wall_s"],
            "source": f"zoo/{entry['file']} ({name}: {entry['command']})",
        }
        save_json(out / "meta.json", meta)
        return name
    return None


def stage_wall(ctx: Context, *stages: str) -> float:
    total = 0.0
    for stage in stages:
        meta = load_json(ctx.stage_dir(stage) / "meta.json")
        total += float(meta.get("wall_s") or 0.0)
    return total


def zero_fraction(ctx: Context, stage: str, builder) -> float:
    """Measured fraction of zero activation codes over all sparse quantizers (1,000 test images)."""
    model = ctx.load(stage, builder()).eval()
    counts = [0, 0]
    test = ctx.dataset("test")
    for x, _ in ctx.test_loader().subset(min(1000, len(test)), seed=ctx.cfg.seed):
        for codes in quantizer_codes(model, x)[1].values():
            counts[0] += int((codes == 0).sum())
            counts[1] += codes.numel()
    return counts[0] / max(1, counts[1])


def step2_summary(ctx: Context) -> dict:
    """Mean code agreement over the coded layers and wall time of a run's step 2."""
    meta = load_json(ctx.stage_dir("transform") / "meta.json")
    coded = [r["agreement"] for r in meta["layers"] if r.get("kind") == "coded"]
    return {
        "step2_agreement": round(statistics.mean(coded), 4) if coded else None,
        "step2_s": round(float(meta["wall_s"]), 1),
    }


WALL_STAGES = {
    "fp": ("train",),
    "step1": ("train", "codes"),
    "tsq": ("train", "codes", "transform"),
}
WALL_STAGES["tsq_ft"] = (*WALL_STAGES["tsq"], "finetune")


def stage_epochs(cfg: RunConfig, stages) -> dict[str, int]:
    """Epochs of each training stage a row went through (step 2 trains nothing)."""
    by_stage = {
        "train": cfg.train.epochs,
        "codes": cfg.codes.epochs,
        "finetune": cfg.finetune.epochs,
    }
    return {s: by_stage[s] for s in stages if s in by_stage}


def model_setup(cfg: RunConfig) -> dict:
    """What a row's model is built with besides its name: the input size and constructor
    arguments a config chose (e.g. AlexNet-BN at 64 px with 1,024-wide fc layers)."""
    arch = zoo.architecture(asdict(cfg))
    setup = {k: arch[k] for k in ("image_size",) if k in arch} | arch.get("model_kwargs", {})
    return {"model_setup": setup} if setup else {}


def rows_from_eval(ctx: Context, wanted: dict[str, str], command: str, extra: dict) -> list[dict]:
    """wanted: eval method -> benchmark method."""
    out = []
    for r in load_json(ctx.stage_dir("eval") / "results.json")["rows"]:
        if r["method"] in wanted:
            out.append(
                {
                    **{
                        k: r[k]
                        for k in ("dataset", "model", "w_bits", "a_bits", "eps", "seed", "top1")
                    },
                    "val_top1": r.get("val_top1"),
                    "method": wanted[r["method"]],
                    "eps": 0.0 if r["a_bits"] == "fp" else r["eps"],
                    "wall_s": round(stage_wall(ctx, *WALL_STAGES[r["method"]]), 1),
                    "epochs": stage_epochs(ctx.cfg, WALL_STAGES[r["method"]]),
                    "command": command,
                    **model_setup(ctx.cfg),
                    **extra,
                }
            )
    return out


def baseline_row(
    bench: Bench, main: Context, method: str, seed, top1, val_top1, wall_s, **extra
) -> dict:
    """A results row for a baseline run by this script (QAT, Brevitas) rather than `tsquant run`."""
    test = main.dataset("test")
    return {
        "dataset": test.title or test.name,
        "model": main.cfg.model.name,
        "method": method,
        "w_bits": main.cfg.transform.weight_bits,
        "a_bits": main.cfg.codes.bits,
        "eps": 0.0,
        "seed": seed,
        "top1": top1,
        "val_top1": val_top1,
        "wall_s": round(wall_s, 1),
        "command": f"python benchmarks/accuracy.py {bench.config} --seeds {seed} --rows {method}"
        + "".join(f" --set {shlex.quote(f'{k}={v}')}" for k, v in bench.base_overrides.items()),
        **model_setup(main.cfg),
        **extra,
    }


def validation_top1(model, ctx: Context, desc: str) -> float | None:
    val = ctx.val_loader()
    return None if val is None else evaluate(model, val, ctx.device, desc)


def run_qat(bench: Bench, seed: int, method: str = "qat") -> dict:
    """LSQ from the FP checkpoint for step 1 + fine-tune's epochs (qat), or twice as many
    (qat_2x), at the step-1 learning rate."""
    main = Context(bench.cfg(seed, "tsq", {}))
    ctx = Context(bench.cfg(seed, method, {}))
    out = ctx.stage_dir(method)
    c, f = main.cfg.codes, main.cfg.finetune
    budget = replace(c, epochs=QAT_BUDGET[method] * (c.epochs + f.epochs))
    epochs = {**stage_epochs(main.cfg, ("train",)), method: budget.epochs}
    made_with = {
        "fp_sha256": fp_sha256(main),
        "weight_bits": main.cfg.transform.weight_bits,
        "training": asdict(budget),
    }
    if (row := recorded_row(out, made_with, epochs)) is not None:
        return row
    fp = main.load("train", main.fp_model())
    model = prepare_lsq(fp, main.cfg.transform.weight_bits, main.cfg.codes.bits)
    teacher = main.teacher() if budget.distill > 0 else None  # as step 1 is, when it is
    logs = train(model, ctx.train_loader(budget), budget, out, ctx.device, "lsq", teacher=teacher)
    start = time.time()
    top1 = evaluate(model, ctx.test_loader(), ctx.device, "lsq eval")
    val_top1 = validation_top1(model, ctx, "lsq val")
    # the logs' wall_s counts the training of every process a resumed run took
    training_s = logs[-1]["wall_s"] if logs else 0.0
    row = baseline_row(
        bench,
        main,
        method,
        seed,
        top1,
        val_top1,
        training_s + time.time() - start + stage_wall(main, "train"),
        epochs=epochs,
        qat=f"LSQ, {budget.epochs} epochs at lr {budget.lr} from the FP checkpoint"
        + (f", distilled from it (weight {budget.distill})" if teacher is not None else ""),
    )
    save_json(out / "meta.json", {"row": row, "made_with": made_with})
    return row


def fp_sha256(main: Context) -> str | None:
    """The FP checkpoint a baseline starts from (None before it exists: loading it then fails
    with the message that says which stage to run)."""
    if not main.done("train"):
        return None
    return load_json(main.stage_dir("train") / "meta.json")["model_sha256"]


def recorded_row(out: Path, made_with: dict, epochs: dict) -> dict | None:
    """A finished baseline's row if it was made with these settings and this FP model; a stale
    one is removed (never read). Rows from before ``made_with`` was recorded are kept when
    their epochs match."""
    if not (out / "meta.json").exists():
        return None
    meta = load_json(out / "meta.json")
    recorded = meta.get("made_with")
    if recorded == made_with or (recorded is None and meta["row"].get("epochs") == epochs):
        return meta["row"]
    print(f"[bench] {out}: made with other settings or another FP model: running it again")
    shutil.rmtree(out)
    return None


def run_brevitas(bench: Bench, seed: int) -> dict:
    from tsquant.baselines import brevitas_gptq

    main = Context(bench.cfg(seed, "tsq", {}))
    out = Context(bench.cfg(seed, "brevitas", {})).stage_dir("brevitas_gptq")
    made_with = {
        "fp_sha256": fp_sha256(main),
        "weight_bits": main.cfg.transform.weight_bits,
        "bits": main.cfg.codes.bits,
        "calib_images": main.cfg.transform.calib_images,
    }
    if (row := recorded_row(out, made_with, stage_epochs(main.cfg, ("train",)))) is not None:
        return row
    fp = main.load("train", main.fp_model()).eval()
    start = time.time()
    quant = brevitas_gptq(
        fp, main.calib_loader(), main.cfg.transform.weight_bits, main.cfg.codes.bits
    )
    wall = time.time() - start
    top1 = evaluate(quant, main.test_loader(), main.device, "brevitas eval")
    row = baseline_row(
        bench,
        main,
        "brevitas_gptq",
        seed,
        top1,
        validation_top1(quant, main, "brevitas val"),
        wall,
        epochs=stage_epochs(main.cfg, ("train",)),
        calib_images=main.cfg.transform.calib_images,
    )
    save_json(out / "meta.json", {"row": row, "made_with": made_with})
    return row


def merge(rows: list[dict], results_json: Path) -> list[dict]:
    """New rows replace old ones of the same dataset, model, method, seed and ablation value. An
    old row of the same dataset, model, method and ablation value trained on other epochs
    (another recipe) is marked superseded, so that tables never average two recipes into one figure."""
    existing = json.loads(results_json.read_text()) if results_json.exists() else []
    key = lambda r: (r["dataset"], r["model"], r["method"], r["seed"], r.get("ablation_value"))  # noqa: E731
    same_row = lambda r: (r["dataset"], r["model"], r["method"], r.get("ablation_value"))  # noqa: E731
    recipe = {same_row(r): r.get("epochs") for r in rows}
    fresh = {key(r) for r in rows}
    kept = [r for r in existing if key(r) not in fresh]
    for r in kept:
        epochs = recipe.get(same_row(r), r.get("epochs"))
        if epochs != r.get("epochs") and not r.get("superseded"):
            r["superseded"] = f"by rows of another recipe (epochs {epochs})"
    return kept + rows


def _epochs(row: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (row.get("epochs") or {}).items()) or "-"


def markdown(rows: list[dict]) -> str:
    lines = ["# tsquant accuracy benchmark", ""]
    for dataset, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        current = [r for r in group if not r.get("superseded")]
        main = [r for r in current if not r["method"].startswith("ablation:")]
        setup = next((r["model_setup"] for r in group if r.get("model_setup")), {})
        built = ", ".join(f"{k} {v}" for k, v in setup.items())
        lines += [
            f"## {dataset}, {model}" + (f" ({built})" if built else ""),
            "",
            "| method | W | A | eps | top-1 mean (%) | spread (std) | seeds: top-1 | val top-1 mean (%) "
            "| epochs | wall (s, mean) | command (seed 0) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in main):
            rs = sorted((r for r in main if r["method"] == method), key=lambda r: r["seed"])
            tops = [r["top1"] for r in rs]
            spread = f"{statistics.stdev(tops):.2f}" if len(tops) > 1 else "-"
            per_seed = ", ".join(f"{r['seed']}: {r['top1']:.2f}" for r in rs)
            vals = [r["val_top1"] for r in rs if r.get("val_top1") is not None]
            val = f"{statistics.mean(vals):.2f}" if vals else "-"
            lines.append(
                f"| {method} | {rs[0]['w_bits']} | {rs[0]['a_bits']} | {rs[0]['eps']} | "
                f"{statistics.mean(tops):.2f} | {spread} | {per_seed} | {val} | {_epochs(rs[0])} | "
                f"{statistics.mean(r['wall_s'] for r in rs):.0f} | `{rs[0]['command']}` |"
            )
        ablations = [r for r in current if r["method"].startswith("ablation:")]
        if ablations:
            lines += [
                "",
                "| ablation | value | seed | top-1 (%) | val top-1 (%) | zero activations "
                "| step-2 code agreement | step 2 (s) | wall (s) | command |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in ablations:
                val = "-" if r.get("val_top1") is None else f"{r['val_top1']:.2f}"
                zeros = f"{100 * r['zero_fraction']:.1f} %" if "zero_fraction" in r else "-"
                agree = r.get("step2_agreement")
                agree = "-" if agree is None else f"{100 * agree:.2f} %"
                step2 = "-" if r.get("step2_s") is None else f"{r['step2_s']:.0f}"
                lines.append(
                    f"| {r['method'][9:]} | {r['ablation_value']} | {r['seed']} | {r['top1']:.2f} | "
                    f"{val} | {zeros} | {agree} | {step2} | {r['wall_s']:.0f} | `{r['command']}` |"
                )
        superseded = [r for r in group if r.get("superseded")]
        for why in dict.fromkeys(r["superseded"] for r in superseded):
            old = [r for r in superseded if r["superseded"] == why]
            lines += ["", f"Superseded ({why}; in no mean above):", ""]
            lines += ["| method | seeds: top-1 | epochs |", "|---|---|---|"]
            for method in dict.fromkeys(r["method"] for r in old):
                rs = sorted((r for r in old if r["method"] == method), key=lambda r: r["seed"])
                per_seed = ", ".join(
                    f"{r['seed']}: {r['top1']:.2f}"
                    + (f" ({r['ablation_value']})" if "ablation_value" in r else "")
                    for r in rs
                )
                lines.append(f"| {method} | {per_seed} | {_epochs(rs[0])} |")
        lines.append("")
    lines.append(
        "Wall: seconds of the stages a row needs, summed (its FP training included), as recorded "
        "in each stage's meta.json; the QAT row adds its training to the FP training; the Brevitas "
        "row is its post-training quantization alone."
    )
    lines.append("")
    machine = {r.get("machine") for r in rows} - {None}
    lines.append(
        f"Machines: {', '.join(sorted(machine))}. Rows with commands, seeds and wall "
        "times: benchmarks/results.json."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--rows", default=",".join(CORE), help=f"comma list of {CORE + OPTIONAL}, or none"
    )
    parser.add_argument(
        "--ablations",
        default="",
        help=f"comma list of {list(ABLATIONS)}; NAME:V1:V2 runs only those values of one",
    )
    parser.add_argument("--out-dir", default="runs/bench")
    parser.add_argument(
        "--reuse-from",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder of runs whose stages may be copied when made the same way",
    )
    parser.add_argument(
        "--hwgq-finetune",
        choices=[v for v, _ in ABLATIONS["finetune"]],
        help="the HWGQ-style row's fine-tune (chosen on validation by --ablations "
        "hwgq_finetune); default: the config's",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--fp-from-zoo",
        action="store_true",
        help="start from the zoo's FP checkpoint where this config trained it at this seed",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=HERE, help="where results.json/RESULTS.md go"
    )
    parser.add_argument(
        "--tables-only", action="store_true", help="rewrite RESULTS.md from results.json"
    )
    parser.add_argument(
        "--best",
        metavar="ABLATION",
        help="print the value of an ablation with the best validation top-1 (after fine-tune "
        "where it has one) among results.json's rows of this config's data, model and first "
        "seed, and its --set overrides; runs nothing",
    )
    args = parser.parse_args()
    results_json, results_md = args.results_dir / "results.json", args.results_dir / "RESULTS.md"
    if args.tables_only:
        rows = json.loads(results_json.read_text())
        write_text_atomic(results_md, _with_other_sections(markdown(rows), results_md))
        return 0
    if args.best:
        overrides = parse_overrides(args.set)
        return print_best(args.config, overrides, args.best, args.seeds[0], results_json, parser)
    bench = Bench(args.config, parse_overrides(args.set), args.out_dir, args.reuse_from)
    wanted = [m for m in args.rows.split(",") if m and m != "none"]
    ablations = [a.split(":") for a in args.ablations.split(",") if a]
    unknown = [m for m in wanted if m not in CORE + OPTIONAL] + [
        ":".join(a) for a in ablations if a[0] not in ABLATIONS
    ]
    if unknown:
        parser.error(f"unknown rows/ablations {unknown}")
    if "brevitas_gptq" in wanted and importlib.util.find_spec("brevitas") is None:
        parser.error("row brevitas_gptq needs brevitas: pip install -e '.[bench]', or drop the row")
    for name, *values in ablations:
        known = [v for v, _ in ABLATIONS[name]]
        if bad := [v for v in values if v not in known]:
            parser.error(f"ablation {name} has no value {bad[0]} (it has {known})")
    base_cfg = load_config(args.config, bench.base_overrides)
    threads = base_cfg.threads or torch.get_num_threads()
    machine = f"{platform.machine()} CPU, {threads} torch threads"
    if base_cfg.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(base_cfg.device)} ({machine})"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rows: list[dict] = []
    variants = dict(VARIANTS)
    if args.hwgq_finetune:
        variants["hwgq"] = {**VARIANTS["hwgq"], **dict(ABLATIONS["finetune"])[args.hwgq_finetune]}

    def keep(new: list[dict]) -> None:
        for r in new:
            r.update(machine=machine, date=date)
        rows.extend(new)
        all_rows = merge(rows, results_json)
        write_text_atomic(results_json, json.dumps(all_rows, indent=2) + "\n")
        write_text_atomic(results_md, _with_other_sections(markdown(all_rows), results_md))

    for seed in args.seeds:
        if args.fp_from_zoo and (name := fp_from_zoo(bench, seed)):
            print(f"[bench] seed {seed}: FP training taken from zoo entry {name}", flush=True)
        for tag, overrides in variants.items():
            methods = {METHODS[m][1]: m for m in wanted if m in METHODS and METHODS[m][0] == tag}
            if methods:
                if tag != "tsq" and "tsq_ft" not in methods:  # its rows read step 2 alone
                    overrides = {**overrides, **ABLATION_NO_FINETUNE}
                ctx = bench.run(seed, tag, overrides)
                keep(rows_from_eval(ctx, methods, bench.command(seed, overrides), {}))
        for method in QAT_BUDGET:
            if method in wanted:
                keep([run_qat(bench, seed, method)])
        if "brevitas_gptq" in wanted:
            keep([run_brevitas(bench, seed)])
    for name, *values in ablations:
        for value, overrides in ABLATIONS[name]:
            if values and value not in values:
                continue
            seed = args.seeds[0]
            if name in ABLATIONS_WITH_FINETUNE:  # read step 1 and the fine-tuned model
                reads = {m: f"ablation:{name}:{m}" for m in ("step1", "tsq_ft")}
            else:
                overrides = {**overrides, **ABLATION_NO_FINETUNE}
                reads = {"tsq": f"ablation:{name}"}
            ctx = bench.run(seed, f"{name}{value}", overrides)
            extra = {"ablation_value": value, **step2_summary(ctx)}
            if name == "eps":
                extra["zero_fraction"] = zero_fraction(ctx, "codes", ctx.step1_model)
            keep(rows_from_eval(ctx, reads, bench.command(seed, overrides), extra))
    print(f"wrote {results_json} and {results_md}")
    return 0


def print_best(
    config: str, overrides: dict, name: str, seed: int, results_json: Path, parser
) -> int:
    """The ablation value to choose: the best validation top-1 of the rows a setting is chosen
    on (the fine-tuned model for ablations acting in the fine-tune, else step 2's)."""
    if name not in ABLATIONS:
        parser.error(f"unknown ablation {name!r} (known: {list(ABLATIONS)})")
    ctx = Context(load_config(config, overrides))
    dataset = ctx.dataset("test")
    method = f"ablation:{name}" + (":tsq_ft" if name in ABLATIONS_WITH_FINETUNE else "")
    existing = json.loads(results_json.read_text()) if results_json.exists() else []
    data_model = (dataset.title or dataset.name, ctx.cfg.model.name)

    def chosen_on_val(method: str) -> list[dict]:
        return [
            r
            for r in existing
            if (r["dataset"], r["model"], r["method"], r["seed"]) == (*data_model, method, seed)
            and not r.get("superseded")
            and r.get("val_top1") is not None
        ]

    rows = chosen_on_val(method)
    if not rows:
        raise SystemExit(
            f"no {method} rows with a validation top-1 for seed {seed} in {results_json}: run "
            f"--ablations {name} first (with data.val_split set)"
        )
    # the config's own setting competes too, unless its row was made as one of the values
    main_method = MAIN_ROW.get(name, "tsq_ft" if name in ABLATIONS_WITH_FINETUNE else "tsq")
    commands = {r.get("command") for r in rows}
    rows += [
        {**r, "ablation_value": CONFIG_VALUE}
        for r in chosen_on_val(main_method)
        if r.get("command") not in commands
    ]
    for r in rows:
        print(f"{r['ablation_value']}: val {r['val_top1']:.2f}", file=sys.stderr)
    best = max(rows, key=lambda r: r["val_top1"])
    if best["ablation_value"] == CONFIG_VALUE:
        print(f"{CONFIG_VALUE}: keep {config}'s setting")
        return 0
    overrides = dict(ABLATIONS[name])[best["ablation_value"]]
    print(best["ablation_value"], *(f"--set {k}={v}" for k, v in overrides.items()))
    return 0


def _with_other_sections(accuracy: str, results_md: Path) -> str:
    """RESULTS.md = the accuracy tables, then the sections other benchmarks maintain."""
    text = results_md.read_text() if results_md.exists() else ""
    others = text[text.index("<!--") :] if "<!--" in text else ""
    return accuracy.rstrip() + "\n\n" + others


if __name__ == "__main__":
    sys.exit(main())
