"""The committed zoo: files match their manifest and load into their architectures."""

import pytest
import torch

from tsquant.fileio import load_model_weights
from tsquant.models import build_model
from tsquant.zoo import ZOO_DIR, add, read_manifest, verify

SHAPES = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "imagenette": (3, 224, 10)}


def test_zoo_has_the_fashion_mnist_cnn_and_files_match_the_manifest():
    manifest = read_manifest()
    assert "fashion_mnist_small_cnn" in manifest["models"]
    assert verify() == []


@pytest.mark.parametrize("name", sorted(read_manifest()["models"]))
def test_zoo_checkpoint_loads_into_its_model(name):
    entry = read_manifest()["models"][name]
    channels, size, classes = SHAPES[entry["dataset"]]
    size = entry.get("image_size", size)
    model = build_model(
        entry["model"],
        num_classes=classes,
        in_channels=channels,
        image_size=size,
        **entry.get("model_kwargs", {}),
    )
    load_model_weights(model, ZOO_DIR / entry["file"])
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.zeros(2, channels, size, size))).all()
    for key in ("sha256", "command", "seed", "test_top1", "date"):
        assert entry[key] not in (None, "")


def test_verify_detects_a_changed_file(tmp_path):
    from tsquant.fileio import save_json, save_tensors

    run = tmp_path / "run"
    save_tensors(run / "train" / "model.safetensors", {"w": torch.ones(2)})
    config = {"model": {"name": "m"}, "data": {"dataset": "d"}, "seed": 0, "train": {"epochs": 1}}
    save_json(run / "train" / "meta.json", {"config": config, "test_top1": 50.0, "tsquant": "x"})
    zoo = tmp_path / "zoo"
    entry = add(run, "m", "tsquant train x.yaml", zoo=zoo)
    assert verify(zoo) == [] and entry["test_top1"] == 50.0 and "val_top1" not in entry
    (zoo / "m.safetensors").write_bytes(b"changed")
    assert verify(zoo) == ["m"]


def test_add_records_validation_top1_when_the_run_held_out_a_split(tmp_path):
    from tsquant.fileio import save_json, save_tensors

    run = tmp_path / "run"
    save_tensors(run / "train" / "model.safetensors", {"w": torch.ones(2)})
    config = {"model": {"name": "m"}, "data": {"dataset": "d"}, "seed": 0, "train": {"epochs": 1}}
    meta = {"config": config, "test_top1": 50.0, "val_top1": 48.123, "tsquant": "x"}
    save_json(run / "train" / "meta.json", meta)
    assert add(run, "m", "cmd", zoo=tmp_path / "zoo")["val_top1"] == 48.12


def test_add_records_what_builds_the_model_besides_the_dataset(tmp_path):
    from tsquant.fileio import save_json, save_tensors

    run = tmp_path / "run"
    save_tensors(run / "train" / "model.safetensors", {"w": torch.ones(2)})
    config = {
        "model": {"name": "alexnet_bn", "kwargs": {"fc_width": 1024}},
        "data": {"dataset": "imagenette", "image_size": 64},
        "seed": 0,
        "train": {"epochs": 1},
    }
    save_json(run / "train" / "meta.json", {"config": config, "test_top1": 50.0, "tsquant": "x"})
    entry = add(run, "m", "cmd", zoo=tmp_path / "zoo")
    assert entry["model_kwargs"] == {"fc_width": 1024} and entry["image_size"] == 64
