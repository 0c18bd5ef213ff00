"""The CLI: --help, errors, and one tiny end-to-end run on a synthetic Fashion-MNIST."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from tsquant.cli import main


def write_idx(path, array):
    dims = array.shape
    header = struct.pack(">HBB", 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path, monkeypatch):
    """Two easy classes of 28x28 images (bright top half vs bright bottom half) + noise."""
    monkeypatch.setenv("TSQUANT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 256), ("t10k", 128)):
        labels = rng.integers(0, 2, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, (0 if label == 0 else 14) : (14 if label == 0 else 28)] += 150
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


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


def test_tiny_end_to_end_run(tmp_path, tiny_fmnist, capsys):
    args = [
        "run",
        "--set",
        f"out_dir={tmp_path / 'runs'}",
        "--set",
        "name=tiny",
        "--set",
        f"data.root={tiny_fmnist}",
        "--set",
        "data.batch_size=32",
        "--set",
        "data.eval_batch_size=64",
        "--set",
        "train.epochs=3",
        "--set",
        "train.lr=0.02",
        "--set",
        "codes.epochs=1",
        "--set",
        "finetune.epochs=1",
        "--set",
        "transform.calib_images=64",
        "--set",
        "transform.positions_per_image=8",
        "--set",
        "transform.iters=3",
        "--set",
        "threads=1",
    ]
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
