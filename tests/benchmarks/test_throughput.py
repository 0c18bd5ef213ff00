"""The throughput benchmark writes one row per model and phase with what the issue asks for."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def test_one_round_writes_every_phase(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "throughput.json"
    argv = ["--models", "resnet20", "--rounds", "1", "--steps", "1", "--warmup", "0"]
    assert module.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == list(module.PHASES)
    for row in rows:
        assert row["images_per_s"] > 0 and row["model"] == "resnet20" and row["threads"] == 1
        assert {"device", "date", "command"} <= row.keys()
