"""Architecture details: parameter counts, shortcuts, stems, init, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch import nn

from tsquant.models import (
    AlexNetBN,
    BasicBlock,
    CifarResNet,
    OptionAShortcut,
    ResNet18,
    SmallCNN,
    VGGSmall,
    build_model,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # bias=False


def fc(fin: int, fout: int, bias: bool) -> int:
    return fin * fout + (fout if bias else 0)


def meta_build(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **kw)


# ----------------------------------------------------------------- param counts


def test_resnet20_param_count():
    # stem + 3 stages x 3 blocks x 2 convs (option A shortcuts: no params) + fc
    expected = conv(3, 16, 3)
    expected += 6 * conv(16, 16, 3)
    expected += conv(16, 32, 3) + 5 * conv(32, 32, 3)
    expected += conv(32, 64, 3) + 5 * conv(64, 64, 3)
    expected += fc(64, 10, True)
    assert expected == 268_346
    assert n_params(build_model("resnet20")) == expected
    assert 0.26e6 < expected < 0.28e6  # "0.27M" in He et al. (with BN affine)


@pytest.mark.parametrize("name, expected", [("resnet32", 461_882), ("resnet56", 848_954)])
def test_deeper_cifar_resnet_param_counts(name, expected):
    assert n_params(meta_build(name)) == expected


def test_vgg_small_param_count():
    expected = (
        conv(3, 128, 3)
        + conv(128, 128, 3)
        + conv(128, 256, 3)
        + conv(256, 256, 3)
        + conv(256, 512, 3)
        + conv(512, 512, 3)
        + fc(512 * 4 * 4, 10, True)
    )
    assert expected == 4_656_522
    assert n_params(meta_build("vgg_small")) == expected
    assert 4.5e6 < expected < 4.7e6  # "4.6M"


def test_small_cnn_param_count():
    expected = (conv(1, 32, 3) + conv(32, 32, 3) + conv(32, 64, 3) + conv(64, 64, 3)) + fc(
        64 * 7 * 7, 10, True
    )
    model = build_model("small_cnn", in_channels=1, image_size=28)
    assert model.classifier.in_features == 64 * 7 * 7
    assert n_params(model) == expected == 96_170


def test_resnet18_param_count_matches_torchvision_minus_bn_affine():
    model = meta_build("resnet18", num_classes=1000, image_size=224)
    bn_channels = 64 + 4 * 64 + (4 * 128 + 128) + (4 * 256 + 256) + (4 * 512 + 512)
    assert n_params(model) == 11_689_512 - 2 * bn_channels == 11_679_912


def test_alexnet_bn_param_count():
    model = meta_build("alexnet_bn", num_classes=1000, image_size=224)
    expected = (
        conv(3, 96, 11)
        + conv(96, 256, 5)
        + conv(256, 384, 3)
        + conv(384, 384, 3)
        + conv(384, 256, 3)
        + fc(256 * 6 * 6, 4096, False)
        + fc(4096, 4096, False)
        + fc(4096, 1000, True)
    )
    assert n_params(model) == expected == 62_368_776


@pytest.mark.parametrize(
    "name, kw",
    [
        ("small_cnn", {}),
        ("resnet20", {}),
        ("vgg_small", {"width": 8}),
        ("alexnet_bn", {"fc_width": 8, "image_size": 64}),
        ("resnet18", {"width": 8}),
    ],
)
def test_only_conv_and_linear_have_parameters(name, kw):
    model = build_model(name, **kw)
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners <= {nn.Conv2d, nn.Linear}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.classifier
    assert [m.bias is not None for m in linears].count(True) == 1


# -------------------------------------------------------------------- shortcuts


def test_cifar_resnet_structure_and_option_a_shortcuts():
    model = build_model("resnet20")
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    option_a = [b for b in blocks if isinstance(b.shortcut, OptionAShortcut)]
    assert len(option_a) == 2
    assert all(isinstance(b.shortcut, (nn.Identity, OptionAShortcut)) for b in blocks)
    assert [b.conv2.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 1 + 2 * 9
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    for depth, n in [(32, 5), (56, 9)]:
        deep = meta_build(f"resnet{depth}")
        assert sum(isinstance(m, BasicBlock) for m in deep.modules()) == 3 * n


def test_option_a_shortcut_semantics_and_tracing():
    sc = OptionAShortcut(16, 32, stride=2)
    assert list(sc.parameters()) == [] and list(sc.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    gm = fx.symbolic_trace(sc)
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert torch.equal(gm(x), y)
    odd = OptionAShortcut(3, 8)  # uneven padding split
    assert odd(torch.randn(1, 3, 5, 5)).shape == (1, 8, 3, 3)
    with pytest.raises(ValueError):
        OptionAShortcut(32, 16)


def test_resnet18_projection_shortcuts():
    model = build_model("resnet18", width=8)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    projections = [b.shortcut for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(projections) == 3
    for sc in projections:
        assert isinstance(sc, nn.Sequential) and len(sc) == 2
        assert isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1)
        assert sc[0].stride == (2, 2) and sc[0].bias is None
        assert isinstance(sc[1], nn.BatchNorm2d) and not sc[1].affine


def test_basic_block_rejects_unknown_shortcut():
    with pytest.raises(ValueError, match="shortcut"):
        BasicBlock(16, 32, 2, shortcut="C")


# ------------------------------------------------------------------------ stems


@pytest.mark.parametrize("size, small", [(32, True), (64, True), (127, True), (128, False)])
def test_resnet18_stem_selection(size, small):
    model = ResNet18(num_classes=10, image_size=size, width=8)
    assert model.small_stem is small
    if small:
        assert model.stem.conv.kernel_size == (3, 3) and model.stem.conv.stride == (1, 1)
        assert model.maxpool is None
    else:
        assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)
        assert isinstance(model.maxpool, nn.MaxPool2d)


def test_resnet18_stem_override():
    assert ResNet18(image_size=32, width=4, small_stem=False).maxpool is not None
    assert ResNet18(image_size=224, width=4, small_stem=True).maxpool is None


@pytest.mark.parametrize("size, small", [(64, True), (112, True), (128, False), (224, False)])
def test_alexnet_stem_selection(size, small):
    model = AlexNetBN(num_classes=10, image_size=size, fc_width=8)
    conv1 = model.features[0].conv
    assert model.small_stem is small
    if small:
        assert conv1.kernel_size == (5, 5) and conv1.stride == (2, 2)
    else:
        assert conv1.kernel_size == (11, 11) and conv1.stride == (4, 4)


@pytest.mark.parametrize("size, conv5_side", [(224, 13), (112, 13), (128, 7), (64, 7)])
def test_alexnet_feature_size_is_fixed(size, conv5_side):
    model = AlexNetBN(num_classes=10, image_size=size, fc_width=8).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        h = model.features[:-1](x)
        feats = model.features(x)
    assert h.shape == (1, 256, conv5_side, conv5_side)
    assert feats.shape == (1, 256, 6, 6)


def test_alexnet_adaptive_pool_matches_standard_pool5_at_224():
    h = torch.randn(2, 256, 13, 13)
    assert torch.equal(nn.AdaptiveMaxPool2d((6, 6))(h), nn.MaxPool2d(3, 2)(h))


# ------------------------------------------------------------------------- init


def test_kaiming_init_for_conv_default_for_linear():
    torch.manual_seed(0)
    model = VGGSmall(num_classes=10, width=32)
    conv5 = model.features[6].conv  # 64 -> 128, 3x3
    fan_out = conv5.out_channels * 9
    assert conv5.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.05)
    clf = model.classifier
    bound = 1.0 / math.sqrt(clf.in_features)  # nn.Linear default (kaiming_uniform a=sqrt 5)
    assert clf.weight.abs().max().item() <= bound
    assert clf.bias.abs().max().item() <= bound


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize("depth", [19, 21, 2])
def test_cifar_resnet_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SmallCNN(image_size=3),
        lambda: VGGSmall(image_size=7),
        lambda: AlexNetBN(image_size=12, fc_width=8),
        lambda: AlexNetBN(image_size=30, fc_width=8, small_stem=False),
        lambda: SmallCNN(width=0),
        lambda: VGGSmall(width=0),
        lambda: AlexNetBN(fc_width=0),
        lambda: ResNet18(width=0),
        lambda: CifarResNet(20, width=0),
    ],
)
def test_invalid_configurations_raise(factory):
    with pytest.raises(ValueError):
        factory()


@pytest.mark.parametrize("size", [13, 16, 20])
def test_alexnet_smallest_supported_sizes_run(size):
    model = AlexNetBN(num_classes=3, image_size=size, fc_width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 3)
