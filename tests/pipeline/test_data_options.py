"""The pipeline's data options: a grayscale ImageFolder read as one channel with statistics
measured on its training images, the augmentation policy, and the validation split."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tsquant.pipeline.config import ConfigError, load_config
from tsquant.pipeline.stages import Context


def gray_folder(root, per_class=12):
    """MNIST-like PNGs: gray, 16x16, class 'one' brighter than class 'zero'."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(("zero", "one")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 100 + 120 * label, (16, 16)).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def context(tmp_path, monkeypatch, **data):
    monkeypatch.setenv("TSQUANT_CACHE", str(tmp_path / "cache"))
    overrides = {"out_dir": str(tmp_path / "runs"), "model.name": "small_cnn"}
    overrides |= {f"data.{k}": str(v) for k, v in data.items()}
    return Context(load_config(None, overrides))


def test_gray_imagefolder_is_one_channel_with_its_own_statistics(tmp_path, monkeypatch):
    root = gray_folder(tmp_path / "digits")
    ctx = context(
        tmp_path, monkeypatch, dataset="imagefolder", root=root, channels=1, stats="measure"
    )
    train, test = ctx.dataset("train"), ctx.dataset("test")
    assert train.image_shape == (16, 16, 1) and test.image_shape == (16, 16, 1)
    pixels = np.asarray(train.images, dtype=np.float64) / 255
    assert train.mean == pytest.approx((pixels.mean(),)) and len(train.std) == 1
    assert train.std == pytest.approx((pixels.std(ddof=1),), rel=1e-6)
    assert (test.mean, test.std) == (train.mean, train.std)  # test normalised like train
    assert train.augment_policy() == "crop"  # no horizontal flips of gray digits
    x, _ = next(iter(ctx.test_loader()))
    assert tuple(x.shape[1:]) == (1, 16, 16)
    # the same folder read by default is RGB with ImageNet statistics and flips
    rgb = context(tmp_path, monkeypatch, dataset="imagefolder", root=root).dataset("train")
    assert rgb.image_shape == (16, 16, 3) and rgb.augment_policy() == "crop_flip"


def test_given_statistics_and_augmentation(tmp_path, monkeypatch):
    root = gray_folder(tmp_path / "digits")
    ctx = context(
        tmp_path,
        monkeypatch,
        dataset="imagefolder",
        root=root,
        channels=1,
        mean="[0.5]",
        std="[0.25]",
        augment_policy="none",
    )
    train = ctx.dataset("train")
    assert (train.mean, train.std) == ((0.5,), (0.25,)) and train.augment_policy() == "none"
    bad = context(
        tmp_path, monkeypatch, dataset="imagefolder", root=root, mean="[0.5]", std="[0.2]"
    )
    with pytest.raises(ConfigError, match="one value per channel"):
        bad.dataset("train")
    with pytest.raises(ConfigError, match="data.channels=2"):
        context(tmp_path, monkeypatch, channels=2)
    with pytest.raises(ConfigError, match="data.augment_policy='flip'"):
        context(tmp_path, monkeypatch, augment_policy="flip")


def test_validation_split_is_stratified_disjoint_and_seed_independent(tmp_path, monkeypatch):
    root = gray_folder(tmp_path / "digits", per_class=20)
    options = {"dataset": "imagefolder", "root": root, "channels": 1, "val_split": 10}
    seen = []
    for seed in (0, 1):
        ctx = context(tmp_path, monkeypatch, **options)
        ctx.cfg.seed = seed
        train, val = ctx.dataset("train"), ctx.dataset("val")
        assert len(train) == 30 and len(val) == 10
        assert np.bincount(np.asarray(val.labels)).tolist() == [5, 5]
        rows = {bytes(img) for img in np.asarray(train.images)}
        assert not rows & {bytes(img) for img in np.asarray(val.images)}
        seen.append(np.asarray(val.images).copy())
    assert np.array_equal(seen[0], seen[1])
    with pytest.raises(ValueError, match="lower data.val_split"):
        context(tmp_path, monkeypatch, **{**options, "val_split": 40}).dataset("train")


def test_eval_scores_the_validation_split_too(tmp_path, monkeypatch, capsys):
    """With data.val_split, `tsquant eval` reports each model's top-1 on the held-out training
    images beside the test set's: settings are chosen on it, never on the test set."""
    import json

    from tsquant.cli import main

    monkeypatch.setenv("TSQUANT_CACHE", str(tmp_path / "cache"))
    root = gray_folder(tmp_path / "digits", per_class=20)
    settings = {
        "out_dir": tmp_path / "runs",
        "name": "val",
        "model.name": "small_cnn",
        "data.dataset": "imagefolder",
        "data.root": root,
        "data.channels": 1,
        "data.val_split": 10,
        "data.batch_size": 10,
        "train.epochs": 1,
        "threads": 1,
    }
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", *args]) == 0 and main(["eval", *args]) == 0
    rows = json.loads((tmp_path / "runs" / "val" / "eval" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp"] and 0 <= rows[0]["val_top1"] <= 100
    assert "validation top-1" in capsys.readouterr().out
