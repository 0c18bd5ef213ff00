"""The CLI: --help, errors, and one tiny end-to-end run on a synthetic Fashion-MNIST."""

import json
import subprocess
import sys

import pytest

from tsquant.cli import main


def test_help_lists_stages_and_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in (
        "train",
        "codes",
        "transform",
        "finetune",
        "eval",
        "report",
        "run",
        "codes.eps",
        "transform.lam",
        "default: 0.32",
    ):
        assert word in out


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "tsquant", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "transform.weight_bits" in done.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["eval", "--set", "codes.eps=-1"], "codes.eps=-1.0 is out of range"),
        (["eval", "--set", "trainn.epochs=1"], "did you mean 'train'"),
        (["eval", "--set", "model.name=resnet21"], "unknown model.name 'resnet21' (did you mean"),
        (["eval", "--set", "data.dataset=cifar100"], "unknown data.dataset 'cifar100' (did you"),
        (["eval", "--set", "badpair"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, fragment):
    base = ["--set", f"out_dir={tmp_path}", "--set", f"data.root={tmp_path}"]
    code = main(args[:1] + base + args[1:])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("tsquant: error:") and "\n" not in err
    assert fragment in err


def test_tiny_end_to_end_run(tmp_path, tiny_run_args, capsys):
    args = ["run", *tiny_run_args]
    assert main(args) == 0
    run = tmp_path / "runs" / "tiny"
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "step1", "tsq", "tsq_ft"]
    assert all(r["test_images"] == 128 for r in rows)
    assert rows[0]["top1"] > 90  # the synthetic task is easy
    report = (run / "report" / "report.md").read_text()
    assert "activations.png" in report and (run / "report" / "solver.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| tsq | ternary | 2 |" in out
    # export: integer model + ONNX, checked on the whole (tiny) test set
    verified = json.loads((run / "export" / "verify.json").read_text())
    assert verified["source_stage"] == "finetune" and verified["test_images"] == 128
    assert verified["int_vs_fakequant_disagreements"] == 0
    assert verified["onnx_vs_int_disagreements"] == 0
    assert verified["int_top1"] == verified["torch_top1"] == rows[-1]["top1"]
    assert (run / "export" / "model.onnx").stat().st_size > 0
    assert "tsquant model card" in out
    # a second `run` skips the finished stages
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train: done, skipped" in out and "transform: done, skipped" in out
