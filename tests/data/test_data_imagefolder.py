"""ImageFolder: directory and tarball sources, resize/crop, safe extraction, errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsquant.data import DataError, extract_tarball, load_dataset, load_imagefolder
from tsquant.data import imagefolder as imf


def test_directory_with_size(imagefolder_root: Path) -> None:
    x, y, classes = load_imagefolder(imagefolder_root, "train", size=8, progress=False)
    assert classes == ["cat", "dog"]  # sorted dir names
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1]


def test_same_size_without_resize(imagefolder_root: Path) -> None:
    x, _, _ = load_imagefolder(imagefolder_root, "val", progress=False)
    assert x.shape == (6, 10, 12, 3)  # native H x W kept
    # grayscale files are converted to 3 identical channels
    gray = np.asarray(x[2])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])


def test_mixed_sizes_need_image_size(tmp_path: Path, helpers) -> None:
    root = helpers.write_imagefolder(tmp_path / "f", sizes=lambda k: (10 + k, 10))
    with pytest.raises(DataError, match=r"set data.image_size"):
        load_imagefolder(root, "train", progress=False)
    x, _, _ = load_imagefolder(root, "train", resize=9, size=8, progress=False)
    assert x.shape == (6, 8, 8, 3)


def test_decode_resize_then_center_crop(tmp_path: Path) -> None:
    # 40x20 image, left half black, right half white; shorter side 20 -> 10 gives 20x10
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p)
    out = imf.decode_image(p, resize=10, size=10)
    assert out.shape == (10, 10, 3)
    assert out[:, 0].max() < 128 and out[:, -1].min() > 127  # centred on the boundary
    assert imf.decode_image(p, resize=10).shape == (10, 20, 3)
    with pytest.raises(DataError, match="cannot decode"):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"\xff\xd8\xff garbage")
        imf.decode_image(bad)


def test_pool_matches_sequential(tmp_path: Path, helpers) -> None:
    root = helpers.write_imagefolder(tmp_path / "f", per_class=4)
    paths, _, _ = imf.list_images(root / "train")
    seq = imf.decode_images(paths, size=8, workers=0, progress=False)
    par = imf.decode_images(paths, size=8, workers=2, progress=False)
    np.testing.assert_array_equal(seq, par)


def test_split_alias_and_missing_split(imagefolder_root: Path) -> None:
    x, _, _ = load_imagefolder(imagefolder_root, "test", size=8, progress=False)  # -> val
    assert len(x) == 6
    with pytest.raises(DataError, match=r"no 'holdout' split .*found: train, val"):
        load_imagefolder(imagefolder_root, "holdout", progress=False)


def test_tarball_extracted_into_cache(
    tmp_path: Path, helpers, imagefolder_root: Path, isolated_cache: Path
) -> None:
    tar_dir = tmp_path / "ro"
    tar_dir.mkdir()
    tar = helpers.make_tarball(imagefolder_root, tar_dir / "folder.tar.gz", arcname="top")
    x, y, classes = load_imagefolder(tar, "train", size=8, progress=False)
    ref, ref_y, _ = load_imagefolder(imagefolder_root, "train", size=8, progress=False)
    np.testing.assert_array_equal(x, ref)
    np.testing.assert_array_equal(y, ref_y)
    assert classes == ["cat", "dog"]
    assert [p.name for p in tar_dir.iterdir()] == ["folder.tar.gz"]
    extracted = extract_tarball(tar, progress=False)  # second call: already there
    assert extracted.parent == isolated_cache / "extracted"
    assert (extracted / "top" / "train" / "cat").is_dir()


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        ok = tarfile.TarInfo("data/train/a/ok.png")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        if member.isreg():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return tar_path


@pytest.mark.parametrize(
    "name, kind, match",
    [
        ("../evil", tarfile.REGTYPE, r"'\.\.' path traversal"),
        ("data/../../evil", tarfile.REGTYPE, r"'\.\.' path traversal"),
        ("/tmp/abs_evil", tarfile.REGTYPE, "absolute path"),
        ("data/link", tarfile.SYMTYPE, r"\(link\)"),
    ],
)
def test_unsafe_tarball_rejected(
    tmp_path: Path, isolated_cache: Path, name: str, kind: bytes, match: str
) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    if kind == tarfile.SYMTYPE:
        member.linkname = "/etc/passwd"
    tar = _tar_with(tmp_path, member)
    with pytest.raises(DataError, match=rf"unsafe member .*{match}.*refusing to extract"):
        extract_tarball(tar, progress=False)
    assert not (tmp_path / "evil").exists() and not (isolated_cache / "evil").exists()
    assert not any((isolated_cache / "extracted").iterdir())  # temp dir cleaned up
    with pytest.raises(DataError, match="unsafe member"):
        load_dataset("imagefolder", "train", root=tar, progress=False)


def test_corrupt_tarball(tmp_path: Path) -> None:
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="corrupt or truncated"):
        extract_tarball(bad, progress=False)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_imagefolder(tmp_path / "missing", "train")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images under"):
        load_imagefolder(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="needs a root"):
        load_dataset("imagefolder", "train")


def test_load_dataset_imagenette_test_means_val(tmp_path: Path, helpers) -> None:
    root = helpers.write_imagefolder(tmp_path / "nette", splits=("train", "val"), per_class=2)
    ds = load_dataset("imagenette", "test", root=root, image_size=8, progress=False)
    assert len(ds) == 4 and ds.image_shape == (8, 8, 3) and ds.title == "Imagenette"
