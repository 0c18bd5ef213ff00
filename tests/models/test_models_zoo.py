"""Every registered model: output shape, fx traceability and TSQ conventions."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from tsquant.models import build_model, model_names

NUM_CLASSES = 7

# (name, in_channels, image_size, extra kwargs) -- small widths where the full
# model would make the suite slow; full-size variants are covered below.
CASES = [
    ("small_cnn", 1, 28, {}),
    ("small_cnn", 3, 32, {"width": 8}),
    ("resnet20", 3, 32, {}),
    ("resnet32", 3, 32, {}),
    ("resnet56", 1, 32, {}),
    ("vgg_small", 3, 32, {"width": 16}),
    ("vgg_small", 3, 64, {"width": 8}),
    ("alexnet_bn", 3, 64, {"fc_width": 32}),
    ("alexnet_bn", 3, 96, {"fc_width": 32}),
    ("alexnet_bn", 3, 128, {"fc_width": 32}),
    ("alexnet_bn", 3, 224, {"fc_width": 32}),
    ("resnet18", 3, 32, {"width": 8}),
    ("resnet18", 3, 64, {"width": 8}),
    ("resnet18", 3, 128, {"width": 8}),
    ("resnet18", 3, 224, {"width": 8}),
]


def _id(case):
    name, c, s, kw = case
    extra = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{name}-c{c}-{s}" + (f"-{extra}" if extra else "")


def _build(name, c, s, kw):
    torch.manual_seed(0)
    return build_model(name, num_classes=NUM_CLASSES, in_channels=c, image_size=s, **kw)


def test_cases_cover_all_models():
    assert {c[0] for c in CASES} == set(model_names())


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_forward_shape_trace_and_conventions(case, check_conventions):
    name, c, s, kw = case
    model = _build(name, c, s, kw)
    x = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(1))

    gm = check_conventions(model)
    assert isinstance(gm, fx.GraphModule)

    with torch.no_grad():
        model.train()
        y_train = model(x)
        y_train_traced = gm(x)
        model.eval()
        y = model(x)
        y_traced = gm(x)
    assert y.shape == (2, NUM_CLASSES)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_traced)
    assert torch.equal(y_train, y_train_traced)


@pytest.mark.parametrize(
    "name, c, s",
    [("small_cnn", 1, 28), ("resnet20", 3, 32), ("vgg_small", 3, 32), ("resnet18", 3, 64)],
)
def test_default_width_forward(name, c, s):
    model = _build(name, c, s, {}).eval()
    with torch.no_grad():
        y = model(torch.randn(1, c, s, s))
    assert y.shape == (1, NUM_CLASSES)


def test_alexnet_default_fc_width_builds_and_runs():
    model = build_model("alexnet_bn", num_classes=NUM_CLASSES, image_size=64).eval()
    assert model.fc6.fc.in_features == 256 * 6 * 6
    assert model.fc6.fc.out_features == 4096
    assert model.fc7.fc.out_features == 4096
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_CLASSES)


def test_backward_reaches_all_parameters():
    model = _build("resnet20", 3, 32, {})
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
