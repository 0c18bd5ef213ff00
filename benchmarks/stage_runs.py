"""Running one `tsquant` stage of a named run from a benchmark, as a user would."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage: str, config: str, overrides: dict, run_dir: Path, *settings: str) -> dict:
    """`tsquant STAGE CONFIG` with the benchmark's overrides (its name replaced by run_dir's)
    and ``settings`` ("key=value"); the stage's meta.json. Output streams to the console."""
    sets = [f"{k}={v}" for k, v in overrides.items() if k != "name"]
    sets += [f"name={run_dir.name}", *settings]
    call = [sys.executable, "-m", "tsquant", stage, config]
    call += [arg for s in sets for arg in ("--set", s)]
    if subprocess.run(call, cwd=ROOT).returncode != 0:
        raise SystemExit(f"{shlex.join(call)} failed")
    return json.loads((run_dir / stage / "meta.json").read_text())
