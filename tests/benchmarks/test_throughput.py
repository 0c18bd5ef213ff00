"""The throughput benchmark writes one row per model and phase with what the issue asks for."""

import json


def test_one_round_writes_every_phase(tmp_path, load_benchmark):
    module = load_benchmark("throughput")
    out = tmp_path / "throughput.json"
    argv = ["--models", "resnet20", "--rounds", "1", "--steps", "1", "--warmup", "0"]
    assert module.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["phase"] for r in rows] == list(module.PHASES)
    for row in rows:
        assert row["images_per_s"] > 0 and row["model"] == "resnet20" and row["threads"] == 1
        assert {"device", "date", "command"} <= row.keys()
