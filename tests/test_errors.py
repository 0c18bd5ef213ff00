"""Every bad input gives one line naming the problem and the fix, exit code 2, no traceback,
and leaves no output file behind (CLI cases); library cases raise ValueError subclasses."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tsquant import TransformConfig, prepare_step1, transform
from tsquant.cli import main
from tsquant.models import build_model
from tsquant.surgery import SurgeryError

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _nan_checkpoint(tmp_path):
    state = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28).state_dict()
    state["conv1.conv.weight"][0, 0, 0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "nan.safetensors")
    return f"init_checkpoint={tmp_path / 'nan.safetensors'}"


def _malicious_pt(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"conv1.conv.weight": _RunsCode(tmp_path / "pwned")}, fh)
    return f"init_checkpoint={tmp_path / 'evil.pt'}"


def _malicious_safetensors(tmp_path):
    with open(tmp_path / "evil.safetensors", "wb") as fh:
        pickle.dump(_RunsCode(tmp_path / "pwned"), fh)
    return f"init_checkpoint={tmp_path / 'evil.safetensors'}"


def _other_architecture(tmp_path):
    state = build_model("resnet20", num_classes=10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "r20.safetensors")
    return f"init_checkpoint={tmp_path / 'r20.safetensors'}"


CLI_CASES = {
    "unknown model": (["model.name=resnet21"], "unknown model.name 'resnet21' (did you mean"),
    "unknown dataset": (["data.dataset=cifar100"], "unknown data.dataset 'cifar100' (did you"),
    "missing data files": (["data.root={tmp}/nothing"], "Fashion-MNIST files not found under"),
    "bits out of range": (["codes.bits=9"], "codes.bits=9 is out of range: use 1..8"),
    "eps < 0": (["codes.eps=-0.1"], "codes.eps=-0.1 is out of range: use eps >= 0"),
    "lambda <= 0": (["transform.tsq.lam=0"], "transform.tsq: lam must be a finite number > 0"),
    "weight bits": (["transform.weight_bits=9"], "transform.weight_bits: unknown weight format"),
    "unknown key": (["trainn.epochs=1"], "did you mean 'train'"),
    "unknown nested key": (["codes.epsilon=0.3"], "did you mean 'codes.eps'"),
    "bad value type": (["train.epochs=many"], "train.epochs"),
    "NaN in weights": (_nan_checkpoint, "has NaN/Inf in ['conv1.conv.weight']"),
    "other architecture": (_other_architecture, "does not fit this model"),
    "malicious torch file": (_malicious_pt, "refused to load"),
    "pickle posing as safetensors": (_malicious_safetensors, "not a safetensors file"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_error_is_one_line_and_leaves_nothing(case, tmp_path, tiny_fmnist, capsys):
    settings, fragment = CLI_CASES[case]
    settings = [settings(tmp_path)] if callable(settings) else settings
    out_dir = tmp_path / "runs"
    args = ["run", "--set", f"out_dir={out_dir}", "--set", f"data.root={tiny_fmnist}"]
    for item in settings:
        args += ["--set", item.format(tmp=tmp_path)]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("tsquant: error:") and "\n" not in err and "Traceback" not in err
    assert fragment in err
    leftovers = [p for p in out_dir.rglob("*") if p.is_file()] if out_dir.exists() else []
    assert leftovers == []
    assert not (tmp_path / "pwned").exists()  # the crafted pickle ran nothing


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.relu(self.conv(x)).mean((2, 3)))


class Unsupported(NoBN):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.gate = nn.SiLU()

    def forward(self, x):
        return self.classifier(self.gate(self.relu(self.bn(self.conv(x)))).mean((2, 3)))


def _step1():
    return prepare_step1(build_model("small_cnn", num_classes=10)).eval()


LIBRARY_CASES = {
    "unsupported layer, by qualified name": (
        lambda: prepare_step1(Unsupported()),
        SurgeryError,
        "unsupported modules: gate (SiLU)",
    ),
    "activation without BN": (
        lambda: prepare_step1(NoBN()),
        SurgeryError,
        "activation 'relu' is not preceded by BatchNorm",
    ),
    "NaN in calibration inputs": (
        lambda: transform(
            _step1(), [torch.full((2, 1, 28, 28), float("nan"))], TransformConfig(verbose=False)
        ),
        ValueError,
        "calibration batch 0 contains NaN or Inf",
    ),
    "empty calibration loader": (
        lambda: transform(_step1(), [], TransformConfig(verbose=False)),
        ValueError,
        "calibration data yielded no images",
    ),
    "input shape mismatch": (
        lambda: transform(_step1(), [torch.zeros(2, 5, 28, 28)], TransformConfig(verbose=False)),
        ValueError,
        "cannot run on calibration inputs of shape (2, 5, 28, 28)",
    ),
}


@pytest.mark.parametrize("case", list(LIBRARY_CASES))
def test_library_errors_name_the_problem(case):
    call, error, fragment = LIBRARY_CASES[case]
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)
