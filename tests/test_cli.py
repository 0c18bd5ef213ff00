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
        "transform.tsq.lam",
        "memory.cache_mb",
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


USER_MODEL = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A user's CNN as people write them: biased convs, affine BN, F.relu, view-flatten."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x)), inplace=True), 2)
        return self.fc(x.view(x.size(0), -1))


def make(num_classes=10, width=8):
    return Net(num_classes, width)
'''


def test_run_on_a_users_model_given_as_module_factory(tmp_path, tiny_run_args, monkeypatch, capsys):
    (tmp_path / "user_models_for_tsquant.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)  # the module is found in the current directory
    model = [
        "--set",
        "model.name=user_models_for_tsquant:make",
        "--set",
        "model.kwargs.width=6",
    ]
    assert main(["run", *tiny_run_args, *model, "--set", "codes.affine_bn=keep"]) == 0
    run = tmp_path / "runs" / "tiny"
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "step1", "tsq", "tsq_ft"]
    verified = json.loads((run / "export" / "verify.json").read_text())
    assert verified["int_vs_fakequant64_disagreements"] == 0
    assert verified["onnx_vs_int_disagreements"] == 0
    # a factory whose model does not fit the data is refused before any training
    capsys.readouterr()
    wrong = ["--set", "model.name=user_models_for_tsquant:make", "--set", "name=wrong"]
    wrong += ["--set", "model.kwargs.num_classes=3"]
    assert main(["run", *tiny_run_args, *wrong]) == 2
    err = capsys.readouterr().err
    assert "10 classes" in err and "model.kwargs" in err and "\n" not in err.strip()
    assert not (tmp_path / "runs" / "wrong" / "train").exists()
    for spec, fragment in (
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("user_models_for_tsquant:missing", "has no callable 'missing'"),
    ):
        fresh = ["--set", "name=fresh", "--set", f"model.name={spec}"]
        assert main(["run", *tiny_run_args, *fresh]) == 2
        assert fragment in capsys.readouterr().err


def test_run_with_per_layer_weight_formats(tmp_path, tiny_run_args):
    formats = ["--set", 'transform.layer_formats={"conv3*": 2}', "--set", "finetune.epochs=0"]
    assert main(["run", *tiny_run_args, *formats]) == 0
    run = tmp_path / "runs" / "tiny"
    rows = {r["method"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}
    assert rows["tsq"]["w_bits"] == "mixed (2, ternary)"
    card = json.loads((run / "export" / "card.json").read_text())
    grids = {layer["name"]: layer["grid"] for layer in card["layers"]}
    assert grids["conv3.conv"] == "2bit" and grids["conv2.conv"] == "ternary"
    verified = json.loads((run / "export" / "verify.json").read_text())
    assert verified["int_vs_fakequant64_disagreements"] == 0


def test_run_with_int8_boundary_layers(tmp_path, tiny_run_args):
    boundary = ["--set", "transform.first_layer=int8", "--set", "transform.last_layer=int8"]
    assert main(["run", *tiny_run_args, *boundary]) == 0
    run = tmp_path / "runs" / "tiny"
    card = json.loads((run / "export" / "card.json").read_text())
    assert {layer["grid"] for layer in card["layers"]} == {"ternary", "narrow:8"}
    assert card["quantized_weight_fraction"] == 1.0  # no FP32 layer left
    verified = json.loads((run / "export" / "verify.json").read_text())
    assert verified["int_vs_fakequant64_disagreements"] == 0
    assert verified["onnx_vs_int_disagreements"] == 0
    assert verified["int_top1"] == verified["torch64_top1"]


def test_users_init_checkpoint_with_conv_biases_loads_before_normalisation(
    tmp_path, tiny_run_args, monkeypatch, capsys
):
    import torch

    (tmp_path / "user_models_for_tsquant.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_models_for_tsquant import make

    torch.save(make().state_dict(), tmp_path / "fp.pt")  # biased convs, as the user has it
    args = ["--set", "model.name=user_models_for_tsquant:make"]
    args += ["--set", f"init_checkpoint={tmp_path / 'fp.pt'}"]
    assert main(["train", *tiny_run_args, *args]) == 0
    assert "loaded" in capsys.readouterr().out
