"""Affine BN conversion (issue 16): what `codes.affine_bn: fold` (the paper's non-affine BN) and
`keep` (gamma and beta kept) cost on a model with affine BNs, before and after step 1.

    python benchmarks/affine_bn.py --epochs 4 --codes-epochs 2 --threads 2

Trains the user-style AffineCNN (benchmarks/user_models.py: conv biases, affine BN, F.relu,
view-flatten) on Fashion-MNIST with `tsquant train`, then per policy runs `tsquant codes` with 0
epochs (the converted model as it starts step 1) and with --codes-epochs, and `tsquant
transform`; reads each stage's test top-1 from its meta.json. Rows go to
benchmarks/affine_bn.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/fashion_mnist_small_cnn.yaml"


def tsquant(stage: str, name: str, out: str, threads: int, *settings: str) -> dict:
    args = ["--set", f"name={name}", "--set", f"out_dir={out}", "--set", f"threads={threads}"]
    args += ["--set", "model.name=benchmarks.user_models:affine_cnn"]
    for setting in settings:
        args += ["--set", setting]
    command = [sys.executable, "-m", "tsquant", stage, CONFIG, *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads((ROOT / out / name / stage / "meta.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4, help="FP epochs")
    parser.add_argument("--codes-epochs", type=int, default=2, help="step-1 epochs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default="runs/affine_bn")
    parser.add_argument("--out", default=str(Path(__file__).with_name("affine_bn.json")))
    args = parser.parse_args(argv)
    command = "python benchmarks/affine_bn.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    fp = tsquant("train", "fp", args.out_dir, args.threads, f"train.epochs={args.epochs}")
    rows = []
    for policy in ("fold", "keep"):
        name = f"{policy}"
        target = ROOT / args.out_dir / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / args.out_dir / "fp", target)
        common = [f"train.epochs={args.epochs}", f"codes.affine_bn={policy}"]
        converted = tsquant("codes", name, args.out_dir, args.threads, *common, "codes.epochs=0")
        trained = tsquant(
            "codes", name, args.out_dir, args.threads, *common, f"codes.epochs={args.codes_epochs}"
        )
        tsq = tsquant(
            "transform",
            name,
            args.out_dir,
            args.threads,
            *common,
            f"codes.epochs={args.codes_epochs}",
        )
        row = {
            "affine_bn": policy,
            "fp_top1": fp["test_top1"],
            "converted_top1": converted["test_top1"],
            "step1_top1": trained["test_top1"],
            "tsq_top1": tsq["test_top1"],
            "fp_epochs": args.epochs,
            "codes_epochs": args.codes_epochs,
            "threads": args.threads,
            "date": datetime.date.today().isoformat(),
            "command": command,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
