"""Step 2 per layer, start against end, for finished runs side by side (issue 15 item 4).

    python benchmarks/step2_layers.py RUN_DIR [RUN_DIR ...] [--label NAME ...]

For each coded layer: the code agreement of the start (the step-1 weights rounded in output
space) and of the kept iterate, with the solver's true error ||y - Q(p)||^2 (TSQ-METHOD.md,
"Step 2") at the start and at its lowest iterate, read from each run's transform/meta.json;
layers that end below their start's agreement are marked. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tsquant.fileio import load_json


def layer_rows(run_dir: Path) -> dict[str, dict]:
    """layer -> start/end agreement and true error of one run's step 2 (coded layers only)."""
    meta = load_json(Path(run_dir) / "transform" / "meta.json")
    out = {}
    for r in meta["layers"]:
        if r.get("kind") != "coded":
            continue
        errors = [h["true_error"] for h in r.get("history", []) if math.isfinite(h["true_error"])]
        out[r["layer"]] = {
            "start": r["agreement_init"],
            "end": r["agreement"],
            "error_start": errors[0] if errors else math.nan,
            "error_min": min(errors) if errors else math.nan,
        }
    return out


def table(runs: list[dict[str, dict]], labels: list[str]) -> str:
    """One row per layer; per run its own start (sequential step 2: inputs differ by run)."""
    cols = " | ".join(f"{lab}: start | end | true error: start -> lowest iterate" for lab in labels)
    lines = [f"| layer | {cols} |", "|---|" + "---|---|---|" * len(labels)]
    for layer in runs[0]:
        cells = [layer]
        for run in runs:
            r = run[layer]
            below = " (below)" if r["end"] < r["start"] else ""
            cells += [f"{r['start']:.4f}", f"{r['end']:.4f}{below}"]
            cells.append(f"{r['error_start']:.3f} -> {r['error_min']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean"]
    for run in runs:
        below = sum(r["end"] < r["start"] for r in run.values())
        cells.append(f"{sum(r['start'] for r in run.values()) / len(run):.4f}")
        cells.append(f"{sum(r['end'] for r in run.values()) / len(run):.4f}")
        cells.append(f"{below} of {len(run)} end below their start")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--label", action="append", default=[], help="one per run (default: dir)")
    args = parser.parse_args()
    labels = args.label or [d.name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"{len(labels)} --label for {len(args.run_dirs)} runs: give one per run")
    runs = [layer_rows(d) for d in args.run_dirs]
    if any(run.keys() != runs[0].keys() for run in runs):
        parser.error("the runs quantized different layers: compare runs of one model")
    print(table(runs, labels))


if __name__ == "__main__":
    main()
