"""Inference speed of an exported model: the integer ONNX model and the FP32 ONNX export of the
same network on onnxruntime (CPU, same threads, same run), and the integer reference runtime.

    python benchmarks/inference.py configs/demo_fashion_mnist.yaml --threads 1 [--set KEY=VALUE]

The run's `export/` holds the integer model; the FP32 network is the run's train-stage model,
exported with PyTorch's ONNX exporter. Throughput is measured at --batch images per call (median
of --repeats timed calls after warm-up), latency at batch 1 (median of --latency-runs calls);
the runtimes' calls are interleaved round by round.
Rows go to benchmarks/inference.json (replaced per model, dataset and runtime).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rowfile import merge_rows

from tsquant.cli import parse_overrides
from tsquant.export import IntegerRuntime, load_export
from tsquant.export.onnx_export import onnx_session
from tsquant.export.runtime import multiplications, output_shapes
from tsquant.pipeline.config import load_config
from tsquant.pipeline.stages import Context

ROWS = Path(__file__).with_name("inference.json")


def timed(calls: dict, repeats: dict, warmup: int = 2) -> dict:
    """Median seconds of one call of each, the calls interleaved round by round so that a
    slower stretch of the machine hits every runtime alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for round_ in range(max(repeats.values())):
        for name, call in calls.items():
            if round_ < repeats[name]:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def fp32_onnx(ctx: Context, input_shape: list[int], path: Path) -> Path:
    model = ctx.load("train", ctx.fp_model()).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        torch.onnx.export(
            model,
            torch.zeros(1, *input_shape),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def ideal_kernel(exported) -> dict:
    """Per image, what a dedicated low-bit kernel would do in the quantized layers, from the
    export: their multiply-accumulates (all of them additions or subtractions with ternary
    weights; only those with a non-zero weight need doing), the bit-serial alternative
    (AND + popcount over 64-bit words: input bit planes x 2 weight masks per 64 inputs), and
    the bytes of weights and input activations moved at their true widths against FP32."""
    nodes = {node.name: node for node in exported.graph}
    shapes = output_shapes(exported)
    macs = multiplications(exported)
    total = dict.fromkeys(("macs", "nonzero_macs", "popcount_words", "weight_bytes"), 0.0)
    total.update(fp32_weight_bytes=0.0, activation_bytes=0.0, fp32_activation_bytes=0.0)
    for node in exported.graph:
        if node.op not in ("qconv", "qlinear"):
            continue
        source = nodes[node.inputs[0]]
        while source.op in ("maxpool", "flatten", "slice", "pad"):
            source = nodes[source.inputs[0]]
        if source.op not in ("quantize", "quantize_input"):
            continue  # a quantized layer on FP values: no low-bit input
        in_bits = source.attrs["bits"]
        codes = node.tensor(exported.tensors, "codes")
        fan_in, outputs = codes[0].numel(), macs[node.name] // codes[0].numel()
        inputs = math.prod(shapes[node.inputs[0]])
        total["macs"] += macs[node.name]
        total["nonzero_macs"] += macs[node.name] * float((codes != 0).double().mean())
        total["popcount_words"] += outputs * in_bits * 2 * math.ceil(fan_in / 64)
        total["weight_bytes"] += codes.numel() * node.attrs["codes_bits"] / 8
        total["fp32_weight_bytes"] += codes.numel() * 4
        total["activation_bytes"] += inputs * in_bits / 8
        total["fp32_activation_bytes"] += inputs * 4
    return {key: round(value) for key, value in total.items()}


def _runner(session):
    return lambda data: session.run(None, {"input": data})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--latency-runs", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, parse_overrides(args.set))
    ctx = Context(cfg)
    exported = load_export(ctx.stage_dir("export"))
    shape = exported.input_shape
    x, _ = next(iter(ctx.test_loader()))
    x = x.contiguous()[: args.batch].float()
    batch = torch.cat([x] * (args.batch // len(x) + 1))[: args.batch].numpy()
    one = batch[:1]
    sessions = {"onnx_int": onnx_session(ctx.stage_dir("export") / "model.onnx")}
    with tempfile.TemporaryDirectory() as tmp:
        sessions["onnx_fp32"] = onnx_session(fp32_onnx(ctx, shape, Path(tmp) / "fp32.onnx"))
        runs = {name: _runner(session) for name, session in sessions.items()}
        runtime = IntegerRuntime(exported)
        runs["integer_runtime"] = lambda data: runtime.run(torch.from_numpy(data))
        agree = np.argmax(runs["onnx_int"](batch)[0], 1) == np.argmax(
            runs["onnx_fp32"](batch)[0], 1
        )
        command = "python benchmarks/inference.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        machine = f"{platform.machine()} CPU, {args.threads} threads"
        model_name = f"{cfg.model.name} ({ctx.as_recorded('transform').cfg.transform.first_layer}/"
        model_name += f"{ctx.as_recorded('transform').cfg.transform.last_layer} boundary)"
        rows = []
        slow = {"integer_runtime"}  # the reference runtime: fewer repeats
        batch_time = timed(
            {name: (lambda c=call: c(batch)) for name, call in runs.items()},
            {name: max(2, args.repeats // 5) if name in slow else args.repeats for name in runs},
        )
        one_time = timed(
            {name: (lambda c=call: c(one)) for name, call in runs.items()},
            {name: 10 if name in slow else args.latency_runs for name in runs},
        )
        for name in runs:
            throughput, latency = args.batch / batch_time[name], one_time[name]
            row = {
                "model": model_name,
                "dataset": ctx.dataset("test").title,
                "runtime": name,
                "batch": args.batch,
                "images_per_s": round(throughput, 1),
                "latency_ms": round(1000 * latency, 3),
                "threads": args.threads,
                "machine": machine,
                "date": datetime.date.today().isoformat(),
                "command": command,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    fp32 = next(r for r in rows if r["runtime"] == "onnx_fp32")
    for r in rows:
        r["throughput_vs_onnx_fp32"] = round(r["images_per_s"] / fp32["images_per_s"], 3)
        r["latency_vs_onnx_fp32"] = round(fp32["latency_ms"] / r["latency_ms"], 3)  # > 1: faster
    print(f"int vs fp32 ONNX predictions agree on {100 * agree.mean():.1f}% of the batch")
    ideal = ideal_kernel(exported)
    print("quantized layers per image, for an ideal ternary/low-bit kernel:", json.dumps(ideal))
    for r in rows:
        if r["runtime"] == "onnx_int":
            r["ideal_kernel"] = ideal
    merge_rows(ROWS, rows, ("model", "dataset", "runtime"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
