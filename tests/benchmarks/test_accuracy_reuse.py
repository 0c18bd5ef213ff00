"""The accuracy harness reuses a stage only when it would rebuild it exactly, and never reads a
stage made under other settings."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "accuracy.py"


def meta(ctx, stage):
    return json.loads((ctx.stage_dir(stage) / "meta.json").read_text())


def test_stages_are_copied_when_made_the_same_way_and_rebuilt_when_settings_change(
    accuracy, tiny_run_args, tmp_path
):
    overrides = dict(arg.split("=", 1) for arg in tiny_run_args[1::2])
    config = str(ROOT / "configs" / "fashion_mnist_small_cnn.yaml")
    bench = accuracy.Bench(config, overrides, str(tmp_path / "bench"))
    main = bench.run(0, "tsq", {})

    other_ft = bench.run(0, "ft", {"finetune.lr": "0.001"})
    for stage in ("train", "codes", "transform"):  # copied, not recomputed
        assert meta(other_ft, stage) == meta(main, stage)
    assert meta(other_ft, "finetune")["provenance"]["config"]["finetune.lr"] == 0.001

    # the same run folder under another fine-tune: its finished fine-tune is stale, not read
    changed = bench.run(0, "ft", {"finetune.lr": "0.002"})
    assert meta(changed, "finetune")["provenance"]["config"]["finetune.lr"] == 0.002
    evaluated = json.loads((changed.stage_dir("eval") / "results.json").read_text())
    tsq_ft = next(r for r in evaluated["rows"] if r["method"] == "tsq_ft")
    assert tsq_ft["top1"] == meta(changed, "finetune")["test_top1"]

    dense = accuracy.Context(bench.cfg(0, "dense", {"codes.eps": "0"}))
    assert bench.donor(dense, "train") == main.stage_dir("train")
    (dense.run_dir).mkdir(parents=True)
    shutil.copytree(main.stage_dir("train"), dense.stage_dir("train"))
    assert bench.donor(dense, "codes") is None  # step 1 under another eps is not the same


def test_best_prints_the_value_with_the_best_validation_top1(accuracy, tiny_run_args, tmp_path):
    overrides = dict(arg.split("=", 1) for arg in tiny_run_args[1::2])
    config = str(ROOT / "configs" / "fashion_mnist_small_cnn.yaml")
    ctx = accuracy.Context(accuracy.load_config(config, overrides))
    test = ctx.dataset("test")
    rows = [
        {
            "dataset": test.title or test.name,
            "model": ctx.cfg.model.name,
            "method": "ablation:finetune:tsq_ft",
            "seed": 0,
            "top1": top1,  # test top-1 never decides
            "val_top1": val,
            "ablation_value": value,
        }
        for value, top1, val in (("e1_const", 90.0, 80.0), ("e6_cos_lr01", 80.0, 81.0))
    ]
    rows.append({**rows[0], "ablation_value": "e6_cos", "val_top1": 99.0, "superseded": "old"})
    (tmp_path / "results.json").write_text(json.dumps(rows))
    args = [sys.executable, str(HARNESS), config, "--best", "finetune"]
    args += ["--results-dir", str(tmp_path), *tiny_run_args]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "e6_cos_lr01" and "--set finetune.lr=0.01" in done.stdout

    # the config's own setting (the tsq_ft row) competes with the values, and can win
    main = {**rows[0], "method": "tsq_ft", "val_top1": 82.0, "command": "tsquant run x"}
    (tmp_path / "results.json").write_text(json.dumps([*rows, main]))
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config: keep") and "config: val 82.00" in done.stderr


def test_a_baseline_made_with_other_settings_is_run_again_not_read(accuracy, tmp_path):
    out = tmp_path / "qat"
    made_with = {"fp_sha256": "a", "training": {"epochs": 22, "lr": 0.01}}
    row = {"method": "qat", "top1": 80.0, "epochs": {"train": 160, "qat": 22}}

    def write(meta):
        out.mkdir(exist_ok=True)
        (out / "meta.json").write_text(json.dumps(meta))

    write({"row": row, "made_with": made_with})
    assert accuracy.recorded_row(out, made_with, row["epochs"]) == row
    other_fp = {**made_with, "fp_sha256": "b"}
    assert accuracy.recorded_row(out, other_fp, row["epochs"]) is None and not out.exists()

    write({"row": row})  # recorded before made_with existed: its epochs decide
    assert accuracy.recorded_row(out, made_with, row["epochs"]) == row
    assert accuracy.recorded_row(out, made_with, {"train": 160, "qat": 44}) is None
    assert not out.exists()


def test_fp_from_zoo_takes_only_a_checkpoint_of_the_same_architecture(
    accuracy, tmp_path, monkeypatch
):
    from tsquant.fileio import sha256_of

    zoo_dir = tmp_path / "zoo"
    zoo_dir.mkdir()
    (zoo_dir / "alex.safetensors").write_bytes(b"weights")
    config = "configs/imagenette_alexnet_bn.yaml"
    entry = {
        "file": "alex.safetensors",
        "sha256": sha256_of(zoo_dir / "alex.safetensors"),
        "model": "alexnet_bn",
        "model_kwargs": {"fc_width": 4096},  # the config trains fc 1,024
        "image_size": 64,
        "dataset": "imagenette",
        "seed": 0,
        "epochs": 30,
        "command": f"python benchmarks/accuracy.py {config} --rows fp",
        "test_top1": 80.0,
        "train_wall_s": 1.0,
    }
    manifest = {"models": {"alex": entry}}
    monkeypatch.setattr(accuracy.zoo, "read_manifest", lambda: manifest)
    monkeypatch.setattr(accuracy.zoo, "ZOO_DIR", zoo_dir)
    monkeypatch.setattr(accuracy.Context, "train_fingerprint", lambda self: "the training split")
    monkeypatch.chdir(ROOT)
    bench = accuracy.Bench(config, {}, str(tmp_path / "bench"))
    assert accuracy.fp_from_zoo(bench, 0) is None
    entry["model_kwargs"] = {"fc_width": 1024}
    assert accuracy.fp_from_zoo(bench, 1) is None  # another seed
    assert accuracy.fp_from_zoo(bench, 0) == "alex"
    main = accuracy.Context(bench.cfg(0, "tsq", {}))
    train = main.stage_dir("train")
    assert (train / "model.safetensors").read_bytes() == b"weights"
    # the run reads it instead of training again, and the ablations' runs copy it
    assert main.stale_reason("train") is None
    ablation = accuracy.Context(bench.cfg(0, "learn_steptrue", {"codes.learn_step": "true"}))
    assert bench.donor(ablation, "train") == train


def test_a_row_whose_library_is_missing_fails_before_any_work(
    accuracy, tmp_path, monkeypatch, capsys
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        accuracy.importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "brevitas" else find_spec(name, *rest),
    )
    config = str(ROOT / "configs" / "fashion_mnist_small_cnn.yaml")
    argv = [config, "--rows", "fp,brevitas_gptq", "--results-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["accuracy.py", *argv, "--out-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exit_:
        accuracy.main()
    assert exit_.value.code == 2
    assert "pip install -e '.[bench]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run folder, no results
