"""Every class of bad input fails cleanly before any work (one line, exit 2, no traceback, no
files), and a run folder cannot be corrupted silently: stale stages are re-run, two runs cannot
share a folder, edited checkpoints are refused, diverged training stops."""

from __future__ import annotations

import json

import pytest
import torch

from tsquant.cli import main
from tsquant.pipeline.lock import RunLock


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def assert_clean_failure(code, err, fragment, out_dir):
    assert code == 2, err
    assert err.startswith("tsquant: error:") and "\n" not in err and "Traceback" not in err
    assert fragment in err, err
    leftovers = [p for p in out_dir.rglob("*") if p.is_file()] if out_dir.exists() else []
    assert leftovers == []


SHAPE_CASES = {  # YAML text -> fragment
    "scalar for a section": ("model: resnet20\n", "'model' is a section of options"),
    "string for a section": ("data: cifar10\n", "'data' is a section of options"),
    "false for a section": ("data: false\n", "'data' is a section of options"),
    "zero for a section": ("train: 0\n", "'train' is a section of options"),
    "empty string section": ('model: ""\n', "'model' is a section of options"),
    "list for a section": ("codes: [1, 2]\n", "'codes' is a section of options"),
    "list for the file": ("- a\n- b\n", "not sections of options"),
    "duplicate key": ("train:\n  epochs: 1\n  epochs: 2\n", "'epochs' appears twice"),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_config_shape_errors(case, tmp_path, tiny_fmnist, capsys):
    text, fragment = SHAPE_CASES[case]
    (tmp_path / "c.yaml").write_text(text)
    out_dir = tmp_path / "runs"
    code, _, err = run_cli(["run", str(tmp_path / "c.yaml"), "--set", f"out_dir={out_dir}"], capsys)
    assert_clean_failure(code, err, fragment, out_dir)


VALUE_CASES = {  # --set items -> fragment
    "section set to a value": (["data=foo"], "'data' is a section of options"),
    "cuda without a GPU": (["device=cuda"], "device='cuda' is out of range"),
    "unknown device": (["device=cudafoo"], "device='cudafoo' is out of range"),
    "eval batch 0": (["data.eval_batch_size=0"], "data.eval_batch_size=0 is out of range"),
    "negative threads": (["threads=-2"], "threads=-2 is out of range"),
    "huge seed": ([f"seed={2**70}"], "is out of range: use an integer in 0..2**63-1"),
    "negative momentum": (["train.momentum=-1"], "train.momentum=-1.0 is out of range"),
    "label smoothing 2": (["train.label_smoothing=2"], "label_smoothing=2.0 is out of range"),
    "negative weight decay": (["codes.weight_decay=-1"], "weight_decay=-1.0 is out of range"),
    "negative warmup": (["finetune.warmup=-1"], "finetune.warmup=-1.0 is out of range"),
    "subset below a batch": (["data.train_subset=10"], "smaller than one batch"),
    "out_dir is a file": (["out_dir={tmp}/afile"], "is a file, not a folder"),
    "out_dir below a file": (["out_dir={tmp}/afile/sub"], "is a file, not a folder"),
    "out_dir not writable": (["out_dir=/proc/tsquant-runs"], "cannot write in /proc"),
    "name with ..": (["name=../x"], "is not a folder name"),
    "absolute name": (["name=/tmp/x"], "is not a folder name"),
    "empty name": (["name="], "give a non-empty name"),
    "name with a newline": (["name=a\nb"], "is not a folder name"),
    "missing init checkpoint": (["init_checkpoint={tmp}/none.pt"], "not found: check the path"),
    "one of mean/std": (["data.mean=[0.5]"], "data.mean and data.std go together"),
}


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_value_errors_before_any_work(case, tmp_path, tiny_fmnist, capsys):
    settings, fragment = VALUE_CASES[case]
    (tmp_path / "afile").write_text("not a folder")
    out_dir = tmp_path / "runs"
    options = {"out_dir": str(out_dir), "data.root": str(tiny_fmnist)}
    options |= dict(item.format(tmp=tmp_path).split("=", 1) for item in settings)
    args = ["run"] + [a for k, v in options.items() for a in ("--set", f"{k}={v}")]
    code, _, err = run_cli(args, capsys)
    assert_clean_failure(code, err, fragment, out_dir)


def test_weight_bits_as_a_yaml_integer_is_accepted(tmp_path):
    from tsquant.pipeline.config import load_config

    (tmp_path / "c.yaml").write_text("transform:\n  weight_bits: 4\n")
    assert load_config(tmp_path / "c.yaml").transform.weight_bits == 4


def rows_of(run):
    return {r["method"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}


def test_stale_stages_are_rerun_and_labelled_from_the_stages(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "runs" / "tiny"
    assert main(["run", *tiny_run_args]) == 0
    first = json.loads((run / "transform" / "meta.json").read_text())["model_sha256"]
    capsys.readouterr()
    # another eps: train is kept, codes and everything after it run again
    assert main(["run", *tiny_run_args, "--set", "codes.eps=0.5"]) == 0
    out = capsys.readouterr().out
    assert "train: done, skipped" in out
    assert "codes: settings changed (codes.eps 0.32 -> 0.5): running it again" in out
    assert "transform: settings changed" in out
    assert rows_of(run)["tsq"]["eps"] == 0.5
    assert json.loads((run / "transform" / "meta.json").read_text())["model_sha256"] != first
    # `tsquant eval` with today's config reads the settings the stages were made with
    assert main(["eval", *tiny_run_args, "--set", "transform.weight_bits=2"]) == 0
    assert rows_of(run)["tsq"]["w_bits"] == "ternary" and rows_of(run)["tsq"]["eps"] == 0.5
    # a re-trained FP model: the stages built from the old one are left out of eval
    capsys.readouterr()
    assert main(["train", *tiny_run_args, "--set", "train.lr=0.05"]) == 0
    assert main(["eval", *tiny_run_args, "--set", "train.lr=0.05"]) == 0
    out = capsys.readouterr().out
    assert "step1 left out: codes was built from an earlier train result" in out
    assert list(rows_of(run)) == ["fp"]
    # an edited checkpoint is refused on load and rebuilt by `run`
    ckpt = run / "codes" / "model.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 1
    ckpt.write_bytes(bytes(data))
    assert main(["run", *tiny_run_args, "--set", "train.lr=0.05"]) == 0
    out = capsys.readouterr().out
    assert "codes:" in out and "running it again" in out


def test_resume_state_under_other_settings_starts_over(tmp_path, capsys):
    from types import SimpleNamespace

    from tsquant.training import train

    class Loader:
        def __init__(self):
            gen = torch.Generator().manual_seed(0)
            self.batches = [
                (torch.randn(8, 4, generator=gen), torch.randint(0, 2, (8,))) for _ in range(3)
            ]

        def __len__(self):
            return len(self.batches)

        def set_epoch(self, epoch):
            pass

        def iter_from(self, batch):
            return iter(self.batches[batch:])

    cfg = SimpleNamespace(
        epochs=1,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        warmup=0.1,
        label_smoothing=0.0,
        checkpoint_seconds=0.0,
    )
    model = torch.nn.Linear(4, 2)
    train(model, Loader(), cfg, tmp_path, provenance={"config": {"train.lr": 0.1}})
    # the state after epoch 1 is a resume file: under the same settings, resuming does no work
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    logs = train(model, Loader(), cfg, tmp_path, provenance={"config": {"train.lr": 0.1}})
    assert len(logs) == 1 and "starting the stage over" not in capsys.readouterr().out
    assert all(torch.equal(after_one[k], v) for k, v in model.state_dict().items())
    cfg.epochs = 2  # one more epoch, resumed from there
    logs = train(model, Loader(), cfg, tmp_path, provenance={"config": {"train.lr": 0.1}})
    assert len(logs) == 2 and "starting the stage over" not in capsys.readouterr().out
    logs = train(model, Loader(), cfg, tmp_path, provenance={"config": {"train.lr": 0.5}})
    out = capsys.readouterr().out
    assert "(train.lr 0.1 -> 0.5): starting the stage over" in out and len(logs) == 2


def test_one_run_per_folder(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "runs" / "tiny"
    with RunLock(run):
        code, _, err = run_cli(["run", *tiny_run_args], capsys)
        assert code == 2 and "is in use by another tsquant run (pid" in err and "\n" not in err
    assert not run.exists()  # the refused run left nothing; the holder's empty folder went too
    # the lock died with its holder: a stale lock file does not block the next run
    run.mkdir(parents=True)
    (run / ".lock").write_text("pid 999999")
    assert main(["train", *tiny_run_args]) == 0


def test_diverged_training_stops_with_one_line_and_leaves_the_stage_incomplete(
    tmp_path, tiny_run_args, capsys
):
    code, _, err = run_cli(["train", *tiny_run_args, "--set", "train.lr=1e6"], capsys)
    assert code == 2 and "training diverged" in err and "\n" not in err
    assert not (tmp_path / "runs" / "tiny" / "train" / "meta.json").exists()


def write_folder(root, classes_by_split):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in classes_by_split.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    return root


def test_test_split_classes_are_matched_to_the_training_classes(tmp_path, monkeypatch, capsys):
    from tsquant.pipeline.config import ConfigError, load_config
    from tsquant.pipeline.stages import Context

    monkeypatch.setenv("TSQUANT_CACHE", str(tmp_path / "cache"))
    root = write_folder(tmp_path / "f", {"train": ["ant", "bee", "cat"], "test": ["ant", "cat"]})
    ctx = Context(load_config(None, {"data.dataset": "imagefolder", "data.root": str(root)}))
    test = ctx.dataset("test")
    assert test.classes == ["ant", "bee", "cat"]
    assert sorted(set(test.labels.tolist())) == [0, 2]  # cat keeps the training index 2
    assert "no images of ['bee']" in capsys.readouterr().out
    extra = write_folder(tmp_path / "g", {"train": ["ant", "bee"], "test": ["ant", "dog"]})
    ctx = Context(load_config(None, {"data.dataset": "imagefolder", "data.root": str(extra)}))
    with pytest.raises(ConfigError, match=r"class\(es\) \['dog'\] that the training split lacks"):
        ctx.dataset("test")


def _damaged_checkpoint(tmp_path):
    (tmp_path / "fp.safetensors").write_bytes(b"\x00" * 64)
    return ["run", "--set", f"init_checkpoint={tmp_path / 'fp.safetensors'}"]


def _mixed_size_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for i, size in enumerate((8, 9)):
            folder = tmp_path / "mixed" / split / f"c{i}"
            folder.mkdir(parents=True)
            Image.new("RGB", (size, size)).save(folder / "a.png")
    return ["run", "--set", "data.dataset=imagefolder", "--set", f"data.root={tmp_path / 'mixed'}"]


ADVICE_CASES = {  # what the user did -> advice that fits who owns the file
    "damaged init_checkpoint": (_damaged_checkpoint, "save your weights again"),
    "mixed-size ImageFolder": (_mixed_size_folder, "set data.image_size"),
    "export before transform": (lambda tmp: ["export"], "run `tsquant transform`"),
}


@pytest.mark.parametrize("case", list(ADVICE_CASES))
def test_advice_fits_the_file_and_the_step(case, tmp_path, tiny_fmnist, monkeypatch, capsys):
    monkeypatch.setenv("TSQUANT_CACHE", str(tmp_path / "cache"))
    make, fragment = ADVICE_CASES[case]
    out_dir = tmp_path / "runs"
    args = make(tmp_path) + ["--set", f"out_dir={out_dir}"]
    if "data.dataset=imagefolder" not in args:
        args += ["--set", f"data.root={tiny_fmnist}"]
    code, _, err = run_cli(args, capsys)
    assert_clean_failure(code, err, fragment, out_dir)
