"""The accuracy harness's results file: rows of two recipes are never averaged into one figure."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "benchmarks" / "accuracy.py"


def row(method, seed, top1, epochs, **extra):
    return {
        "dataset": "D",
        "model": "m",
        "method": method,
        "w_bits": "ternary",
        "a_bits": 2,
        "eps": 0.32,
        "seed": seed,
        "top1": top1,
        "wall_s": 1.0,
        "command": "c",
        "epochs": epochs,
        **extra,
    }


def test_a_new_recipe_supersedes_the_old_rows_of_its_method(accuracy, tmp_path):
    results = tmp_path / "results.json"
    old = [row("tsq_ft", 0, 70.0, {"train": 20}), row("tsq_ft", 1, 71.0, {"train": 20})]
    old.append(row("qat", 1, 60.0, {"train": 20}))
    results.write_text(json.dumps(old))
    merged = accuracy.merge([row("tsq_ft", 0, 90.0, {"train": 160})], results)
    by_key = {(r["method"], r["seed"]): r for r in merged}
    assert by_key[("tsq_ft", 0)]["top1"] == 90.0  # replaced
    assert "epochs" in by_key[("tsq_ft", 1)]["superseded"]  # other recipe, not re-run
    assert "superseded" not in by_key[("qat", 1)]  # another method: untouched
    table = accuracy.markdown(merged)
    assert "| tsq_ft | ternary | 2 | 0.32 | 90.00 | - | 0: 90.00 |" in table
    assert "Superseded" in table and "| tsq_ft | 1: 71.00 | train 20 |" in table


def test_same_recipe_rows_of_other_seeds_stay_in_the_mean(accuracy, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps([row("tsq_ft", 1, 80.0, {"train": 160}, val_top1=81.0)]))
    merged = accuracy.merge([row("tsq_ft", 0, 90.0, {"train": 160}, val_top1=89.0)], results)
    assert not any(r.get("superseded") for r in merged)
    assert "| 85.00 | 7.07 | 0: 90.00, 1: 80.00 | 85.00 | train 160 |" in accuracy.markdown(merged)


def test_ablation_values_of_other_lengths_do_not_supersede_each_other(accuracy, tmp_path):
    results = tmp_path / "results.json"
    short = row("ablation:finetune:tsq_ft", 0, 80.0, {"finetune": 1}, ablation_value="e1")
    results.write_text(json.dumps([short]))
    long = row("ablation:finetune:tsq_ft", 0, 81.0, {"finetune": 6}, ablation_value="e6")
    merged = accuracy.merge([long], results)
    assert len(merged) == 2 and not any(r.get("superseded") for r in merged)


@pytest.mark.parametrize(
    ("ablations", "message"),
    [
        ("distill:0.7", "ablation distill has no value 0.7"),
        ("distil", "unknown rows/ablations ['distil']"),
    ],
)
def test_ablation_names_and_values_are_checked_before_any_run(ablations, message, tmp_path):
    import subprocess
    import sys

    config = HARNESS.parents[1] / "configs" / "fashion_mnist_small_cnn.yaml"
    args = [sys.executable, str(HARNESS), str(config), "--rows", "none", "--ablations", ablations]
    args += ["--out-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_table_heading_says_what_the_model_was_built_with(accuracy):
    from tsquant.pipeline.config import load_config

    cfg = load_config(str(ROOT / "configs" / "imagenette_alexnet_bn.yaml"))
    alexnet = {**row("fp", 0, 80.0, {"train": 30}), **accuracy.model_setup(cfg)}
    assert alexnet["model_setup"] == {"image_size": 64, "fc_width": 1024}
    assert accuracy.model_setup(load_config(str(ROOT / "configs" / "cifar10_resnet20.yaml"))) == {}
    assert "## D, m (image_size 64, fc_width 1024)" in accuracy.markdown([alexnet])
