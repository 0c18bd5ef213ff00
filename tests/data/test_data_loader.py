"""ArrayDataset, BatchLoader (determinism, resume, sharding, subset) and the registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tsquant.data import DATASETS, ArrayDataset, BatchLoader, DataError, dataset_info, load_dataset


def _dataset(n: int = 23, hw: int = 8, c: int = 3, torch_arrays: bool = False) -> ArrayDataset:
    """Image i is filled with value i % 256 so batches can be traced back to indices."""
    images = np.broadcast_to(
        (np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, hw, hw, c)
    ).copy()
    labels = (np.arange(n) % 4).astype(np.int64)
    if torch_arrays:
        return ArrayDataset(
            torch.from_numpy(images),
            torch.from_numpy(labels),
            ["a", "b", "c", "d"],
            name="toy",
            mean=(0.0,) * c,
            std=(1.0,) * c,
        )
    return ArrayDataset(
        images, labels, ["a", "b", "c", "d"], name="toy", mean=(0.0,) * c, std=(1.0,) * c
    )


def _ids(x: torch.Tensor) -> list[int]:
    """Sample ids from un-augmented batches (mean=0, std=1 -> value/255)."""
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def _epoch(loader: BatchLoader, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.iter_from(start))


@pytest.mark.parametrize("torch_arrays", [False, True])
def test_batches_cover_epoch(torch_arrays: bool) -> None:
    ds = _dataset(torch_arrays=torch_arrays)
    loader = BatchLoader(ds, batch_size=5, shuffle=True, seed=1)
    assert len(loader) == 5
    batches = _epoch(loader)
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    ids = [i for x, _ in batches for i in _ids(x)]
    assert sorted(ids) == list(range(23)) and ids != list(range(23))
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (5, 3, 8, 8) and y.dtype == torch.int64
    assert y.tolist() == [i % 4 for i in _ids(x)]  # labels follow their images
    assert len(BatchLoader(ds, batch_size=5, drop_last=True)) == 4
    no_shuffle = [i for x, _ in BatchLoader(ds, batch_size=5) for i in _ids(x)]
    assert no_shuffle == list(range(23))


def test_epoch_order_is_seeded_and_reproducible() -> None:
    ds = _dataset()
    a = BatchLoader(ds, batch_size=4, shuffle=True, seed=7)
    b = BatchLoader(ds, batch_size=4, shuffle=True, seed=7)
    order0 = a.indices().tolist()
    assert order0 == b.indices().tolist()
    a.set_epoch(1)
    assert a.indices().tolist() != order0
    b.set_epoch(1)
    assert a.indices().tolist() == b.indices().tolist()
    assert BatchLoader(ds, 4, shuffle=True, seed=8).indices().tolist() != order0


def test_iter_from_matches_tail_of_full_epoch_with_augmentation() -> None:
    ds = _dataset(n=30, hw=8)
    ds.mean, ds.std = (0.5,) * 3, (0.25,) * 3
    loader = BatchLoader(ds, batch_size=4, shuffle=True, augment=True, seed=3, policy="crop_flip")
    loader.set_epoch(2)
    full = _epoch(loader)
    resumed = BatchLoader(ds, batch_size=4, shuffle=True, augment=True, seed=3, policy="crop_flip")
    resumed.set_epoch(2)
    tail = _epoch(resumed, start=5)
    assert len(tail) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ya, yb)
    assert _epoch(resumed, start=len(resumed)) == []
    with pytest.raises(DataError, match="out of range"):
        resumed.iter_from(len(resumed) + 1)


def test_augmentation_changes_with_epoch_but_not_labels() -> None:
    ds = _dataset(n=16, hw=8)
    loader = BatchLoader(ds, batch_size=16, augment=True, seed=0, policy="crop_flip")
    x0, y0 = next(iter(loader))
    loader.set_epoch(1)
    x1, y1 = next(iter(loader))
    assert not torch.equal(x0, x1) and torch.equal(y0, y1)
    assert (x0 == 0).any()  # zero padding visible (mean 0, std 1)
    plain = BatchLoader(ds, batch_size=16, augment=False)
    assert not (next(iter(plain))[0][1:] == 0).any()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharding_is_disjoint_and_balanced(world_size: int) -> None:
    ds = _dataset(n=23)
    shards = []
    for rank in range(world_size):
        loader = BatchLoader(
            ds, batch_size=3, shuffle=True, seed=5, rank=rank, world_size=world_size
        )
        loader.set_epoch(4)
        ids = [i for x, _ in loader for i in _ids(x)]
        assert ids == loader.indices().tolist()
        assert len(loader) == len(BatchLoader(ds, 3, rank=0, world_size=world_size))
        shards.append(set(ids))
    sizes = {len(s) for s in shards}
    assert sizes == {23 // world_size}
    union = set().union(*shards)
    assert len(union) == sum(len(s) for s in shards)  # disjoint
    with pytest.raises(DataError, match="rank 2 invalid"):
        BatchLoader(ds, 3, rank=2, world_size=2)


def test_subset_is_deterministic() -> None:
    ds = _dataset(n=40)
    a, b = ds.subset(10, seed=1), ds.subset(10, seed=1)
    np.testing.assert_array_equal(a.images, b.images)
    ids = a.images[:, 0, 0, 0].tolist()
    assert len(set(ids)) == 10 and ids == sorted(ids)
    assert ds.subset(10, seed=2).images[:, 0, 0, 0].tolist() != ids
    np.testing.assert_array_equal(a.labels, np.asarray(ids) % 4)
    calib = BatchLoader(ds, batch_size=4, shuffle=True, augment=True).subset(
        8, seed=0, augment=False
    )
    assert len(calib) == 2 and not calib.augment and calib.num_samples == 8
    with pytest.raises(DataError, match="subset size"):
        ds.subset(41)


def test_channels_last_and_stats_fallback() -> None:
    ds = _dataset()
    x, _ = next(iter(BatchLoader(ds, batch_size=4, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    plain = ArrayDataset(ds.images, ds.labels, ds.classes, name="unregistered")
    mean, std = plain.stats()
    assert len(mean) == 3 and all(s > 0 for s in std)
    assert plain.augment_policy() == "crop_flip"


def test_arraydataset_validation() -> None:
    imgs = np.zeros((3, 4, 4, 1), np.uint8)
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(imgs.astype(np.float32), np.zeros(3, np.int64), ["a"])
    with pytest.raises(DataError, match="int64"):
        ArrayDataset(imgs, np.zeros(3, np.int32), ["a"])
    with pytest.raises(DataError, match="one int64 label per image"):
        ArrayDataset(imgs, np.zeros(2, np.int64), ["a"])
    with pytest.raises(DataError, match="NHWC"):
        ArrayDataset(imgs[0], np.zeros(4, np.int64), ["a"])
    with pytest.raises(DataError, match="labels span 0..5"):
        ArrayDataset(imgs, np.array([0, 5, 1], np.int64), ["a", "b"])


def test_registry() -> None:
    assert DATASETS == ("fashion_mnist", "mnist", "cifar10", "imagefolder", "imagenette")
    info = dataset_info("cifar10")
    assert (info.in_channels, info.num_classes, info.image_size) == (3, 10, 32)
    assert info.augment == "crop_flip" and info.padding == 4
    fm = dataset_info("Fashion-MNIST")
    assert (fm.in_channels, fm.image_size, fm.augment) == (1, 28, "crop")
    assert dataset_info("imagenette").std == (0.229, 0.224, 0.225)
    with pytest.raises(DataError, match=r"unknown dataset 'cifar': did you mean 'cifar10'\?"):
        dataset_info("cifar")
    with pytest.raises(DataError, match="valid names: fashion_mnist, mnist, cifar10"):
        load_dataset("svhn", "train")
    with pytest.raises(DataError, match="no split 'val'"):
        load_dataset("mnist", "val")


def test_load_dataset_fashion_mnist_from_root(tmp_path: Path, helpers) -> None:
    helpers.write_idx_split(tmp_path, "test", n=9, gz=True)
    ds = load_dataset("fashion_mnist", "test", root=tmp_path)
    assert len(ds) == 9 and ds.image_shape == (28, 28, 1) and ds.classes[0] == "T-shirt/top"
    x, y = next(iter(BatchLoader(ds, batch_size=4, augment=True, shuffle=True)))
    assert x.shape == (4, 1, 28, 28)
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion_mnist", "train", root=tmp_path)
