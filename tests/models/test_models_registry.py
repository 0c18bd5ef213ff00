"""The ``tsquant.models`` registry: names, build_model, unknown-name errors."""

from __future__ import annotations

import pytest
from torch import nn

import tsquant.models as tm
from tsquant.models import MODELS, build_model, model_names

EXPECTED = [
    "small_cnn",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg_small",
    "alexnet_bn",
    "resnet18",
]


def test_model_names():
    assert model_names() == EXPECTED
    assert list(MODELS) == EXPECTED
    assert all(callable(b) for b in MODELS.values())


def test_build_model_types_and_defaults():
    assert isinstance(build_model("small_cnn", in_channels=1, image_size=28), tm.SmallCNN)
    m = build_model("resnet32")
    assert isinstance(m, tm.CifarResNet) and m.depth == 32
    assert m.classifier.out_features == 10
    assert m.stem.conv.in_channels == 3
    assert isinstance(build_model("vgg_small", width=4), tm.VGGSmall)
    assert isinstance(build_model("resnet18", width=4), tm.ResNet18)
    assert isinstance(build_model("alexnet_bn", image_size=64, fc_width=8), tm.AlexNetBN)


def test_build_model_forwards_arguments():
    m = build_model("small_cnn", num_classes=5, in_channels=1, image_size=28, width=4)
    assert m.conv1.conv.in_channels == 1 and m.conv1.conv.out_channels == 4
    assert m.classifier.in_features == 8 * 7 * 7 and m.classifier.out_features == 5


@pytest.mark.parametrize("name", ["ResNet20", "VGG-Small", " alexnet-bn "])
def test_name_normalisation(name):
    assert isinstance(build_model(name, image_size=64, **_small_kwargs(name)), nn.Module)


def _small_kwargs(name):
    n = name.strip().lower()
    if n.startswith("vgg"):
        return {"width": 4}
    if n.startswith("alex"):
        return {"fc_width": 8}
    return {}


@pytest.mark.parametrize(
    "name, nearest",
    [
        ("resnet_20", "resnet20"),
        ("vgg_smal", "vgg_small"),
        ("alexnet", "alexnet_bn"),
        ("smallcnn", "small_cnn"),
        ("resnet-19", "resnet18"),
    ],
)
def test_unknown_name_error(name, nearest):
    with pytest.raises(ValueError) as exc:
        build_model(name)
    msg = str(exc.value)
    assert "\n" not in msg
    assert repr(name) in msg
    for valid in EXPECTED:
        assert valid in msg
    assert f"did you mean {nearest!r}" in msg


def test_unknown_name_always_has_a_suggestion():
    with pytest.raises(ValueError, match="did you mean"):
        build_model("zzz")
