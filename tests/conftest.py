"""Shared fixtures: one thread per test (small tensors, two shared cores); a tiny synthetic
Fashion-MNIST and the CLI arguments of a tiny end-to-end run on it."""

import gzip
import struct

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


@pytest.fixture
def tiny_run_args(tmp_path, tiny_fmnist):
    """`tsquant run` arguments (after the command) of a complete tiny run, ~20 s on one thread."""
    settings = {
        "out_dir": tmp_path / "runs",
        "name": "tiny",
        "data.root": tiny_fmnist,
        "data.batch_size": 32,
        "data.eval_batch_size": 64,
        "train.epochs": 3,
        "train.lr": 0.02,
        "codes.epochs": 1,
        "finetune.epochs": 1,
        "transform.calib_images": 64,
        "transform.positions_per_image": 8,
        "transform.tsq.iters": 3,
        "threads": 1,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
