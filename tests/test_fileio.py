import os

import pytest
import torch

from tsquant.fileio import (
    CheckpointError,
    load_model_weights,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_tensors,
)


def test_tensors_round_trip_and_atomic(tmp_path):
    path = tmp_path / "a" / "m.safetensors"
    save_tensors(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"k": 1})
    assert torch.equal(load_tensors(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp file left


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"w": torch.ones(3)})

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("tsquant.fileio.save_file", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(path, {"w": torch.zeros(3)})
    assert torch.equal(load_tensors(path)["w"], torch.ones(3))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # and no temp file is left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="damaged"):
        load_tensors(path)


def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, torch.nn.Linear(3, 4).state_dict())
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model_weights(torch.nn.Linear(3, 5), path)


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    optimizer_from_tensors(fresh, tensors, meta)
    assert fresh.param_groups[0]["lr"] == 0.1
    buf = fresh.state[fresh.param_groups[0]["params"][0]]["momentum_buffer"]
    assert torch.equal(buf, opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"])


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    from tsquant.fileio import atomic_write

    target = tmp_path / "d" / "a.bin"

    def failing(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert list((tmp_path / "d").iterdir()) == []
