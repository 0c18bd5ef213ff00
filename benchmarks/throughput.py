"""Training and evaluation throughput, side by side in one run: FP training, step-1 training
(FP weights, sparse 2-bit activations), QAT training (the LSQ baseline) and evaluation.

    python benchmarks/throughput.py --threads 2 --rounds 5

Batches are synthetic tensors of the models' input shapes in channels-last memory format (the
training loop's), so the figures are the model's compute, not data loading. The phases of one
model run interleaved, round after round, and each phase reports its median round: a load on
the machine that drifts during the run hits every phase alike, so the ratios stay comparable.
Rows go to benchmarks/throughput.json (model, phase, images_per_s, threads, device, date,
command); the step-1 / FP time per image is printed at the end (target <= 1.3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tsquant import SparseQuantizer, prepare_step1
from tsquant.baselines import prepare_lsq
from tsquant.models import build_model

MODELS = {  # name -> (build kwargs, batch size, input shape); what the accuracy benchmark runs
    "resnet20": ({"num_classes": 10, "image_size": 32}, 128, (3, 32, 32)),
    "alexnet_bn": ({"num_classes": 10, "image_size": 64, "fc_width": 1024}, 64, (3, 64, 64)),
}
# step1_learned_step_train: step 1 with codes.learn_step (beyond the paper)
PHASES = (
    "fp_train",
    "step1_train",
    "step1_learned_step_train",
    "qat_train",
    "fp_eval",
    "step1_eval",
)


def _models(name: str) -> dict[str, torch.nn.Module]:
    kwargs = MODELS[name][0]
    fp = build_model(name, **kwargs)
    step1 = prepare_step1(fp, check_export=False)  # AlexNet-BN's adaptive max pool
    learned = prepare_step1(fp, check_export=False)
    for q in learned.modules():
        if isinstance(q, SparseQuantizer):
            q.learn_step()
    nets = {"fp": fp, "step1": step1, "step1_ls": learned, "qat": prepare_lsq(fp, "ternary", 2)}
    return {k: v.to(memory_format=torch.channels_last) for k, v in nets.items()}


def _phase_step(net: torch.nn.Module, train: bool, x: torch.Tensor, y: torch.Tensor):
    if not train:
        net.eval()

        def step():
            with torch.no_grad():
                net(x)

        return step
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step():
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(name: str, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """images/s per phase: the median over rounds of `steps` timed batches."""
    _, batch, shape = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen)
    nets = _models(name)
    steps_of = {
        "fp_train": _phase_step(nets["fp"], True, x, y),
        "step1_train": _phase_step(nets["step1"], True, x, y),
        "step1_learned_step_train": _phase_step(nets["step1_ls"], True, x, y),
        "qat_train": _phase_step(nets["qat"], True, x, y),
        "fp_eval": _phase_step(nets["fp"], False, x, y),
        "step1_eval": _phase_step(nets["step1"], False, x, y),
    }
    for step in steps_of.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for r in range(rounds):
        for phase in PHASES:
            start = time.perf_counter()
            for _ in range(steps):
                steps_of[phase]()
            times[phase].append((time.perf_counter() - start) / (steps * batch))
        print(
            f"[{name}] round {r + 1}/{rounds}: "
            + " ".join(f"{p} {1 / times[p][-1]:.0f}" for p in PHASES)
            + " images/s",
            flush=True,
        )
    return {phase: 1 / statistics.median(t) for phase, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed batches per phase per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("throughput.json")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/throughput.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    date = datetime.date.today().isoformat()
    device = f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
    rows = []
    for name in args.models:
        figures = measure(name, args.rounds, args.steps, args.warmup)
        for phase, images_per_s in figures.items():
            rows.append(
                {
                    "model": name,
                    "phase": phase,
                    "images_per_s": round(images_per_s, 1),
                    "batch": MODELS[name][1],
                    "input": list(MODELS[name][2]),
                    "threads": args.threads,
                    "device": device,
                    "date": date,
                    "command": command,
                }
            )
        ratio = figures["fp_train"] / figures["step1_train"]
        learned = figures["fp_train"] / figures["step1_learned_step_train"]
        qat = figures["fp_train"] / figures["qat_train"]
        print(
            f"[{name}] time per image vs FP training: step 1 {ratio:.2f}x "
            f"(learned step {learned:.2f}x), QAT {qat:.2f}x"
        )
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
