"""tsquant.save / tsquant.load: step-1 and quantized models round-trip without pickle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tsquant
from tsquant import SolverConfig, TransformConfig
from tsquant.fileio import CheckpointError
from tsquant.models import build_model

from bn_helpers import with_bn_statistics


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def images(n=16, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


CONFIG = TransformConfig(method=SolverConfig(iters=2), positions_per_image=8, verbose=False)


def test_builtin_model_round_trips_by_itself(tmp_path):
    torch.manual_seed(0)
    x = images()
    kwargs = {"num_classes": 10, "in_channels": 3, "image_size": 8, "width": 4}
    step1 = with_bn_statistics(tsquant.prepare_step1(build_model("resnet20", **kwargs)), x)
    quantized = tsquant.transform(
        step1, [x], TransformConfig(**{**CONFIG.__dict__, "weight_bits": 2})
    )
    for model, folder in ((step1, "step1"), (quantized, "quantized")):
        tsquant.save(model, tmp_path / folder, architecture={"name": "resnet20", "kwargs": kwargs})
        loaded = tsquant.load(tmp_path / folder)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), folder
    assert sum(isinstance(m, tsquant.QuantizedConv2d) for m in loaded.modules()) == 18


def test_users_model_loads_with_its_architecture_given(tmp_path):
    torch.manual_seed(1)
    x = images(seed=1)
    step1 = with_bn_statistics(tsquant.prepare_step1(UserNet(), affine_bn="keep"), x)
    quantized = tsquant.transform(step1, [x], CONFIG)
    tsquant.save(quantized, tmp_path / "q")
    loaded = tsquant.load(tmp_path / "q", model=UserNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    with pytest.raises(CheckpointError, match="model=MyNet"):
        tsquant.load(tmp_path / "q")


def test_damaged_or_foreign_files_are_refused(tmp_path):
    torch.manual_seed(2)
    step1 = tsquant.prepare_step1(UserNet()).eval()
    tsquant.save(step1, tmp_path / "m")
    tensor_file = tmp_path / "m" / "model.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 1
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        tsquant.load(tmp_path / "m", model=UserNet())
    with pytest.raises(CheckpointError, match="tsquant.save"):
        tsquant.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="prepare_step1"):
        tsquant.save(UserNet(), tmp_path / "fp")
