"""Calibration data for step 2 (tsquant.calibration) and what step 2 does with odd loaders and
in-place models: the same images in every pass, the same codes whatever the loader does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tsquant
from tsquant import QuantizedConv2d, SolverConfig, TransformConfig
from tsquant.calibration import CalibrationError, draw_calibration
from tsquant.models.common import bn2d

from bn_helpers import with_bn_statistics


def images(n=24, shape=(3, 8, 8), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# --- draw_calibration ------------------------------------------------------------------------


def test_draws_tensors_tuples_dicts_callables_and_generators_alike():
    x = images(12)
    batches = list(x.split(4))
    expected = torch.cat(batches)
    forms = {
        "tensors": batches,
        "tuples": [(b, torch.zeros(len(b))) for b in batches],
        "dicts": [{"image": b, "label": torch.zeros(len(b))} for b in batches],
        "generator": (b for b in batches),
        "callable": lambda: iter(batches),
        "one tensor": x,
    }
    for name, data in forms.items():
        assert torch.equal(torch.cat(draw_calibration(data)), expected), name
    custom = [{"pixels": b, "y": 0} for b in batches]
    assert torch.equal(torch.cat(draw_calibration(custom, input_key="pixels")), expected)


def test_max_images_stops_reading_and_batches_are_copies():
    x = images(12)
    loader = iter(list(x.split(4)))
    drawn = draw_calibration(loader, max_images=6)
    assert [len(b) for b in drawn] == [4, 2]
    assert len(list(loader)) == 1  # the third batch was never read
    source = x.clone()
    drawn = draw_calibration([source])
    source.zero_()  # a loader reusing its buffer must not change what was drawn
    assert torch.equal(drawn[0], x)


@pytest.mark.parametrize(
    ("data", "kwargs", "message"),
    [
        ([], {}, "yielded no images"),
        (iter([]), {}, "already consumed"),
        ([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], {}, "dtype torch.uint8"),
        ([torch.full((2, 3, 8, 8), float("nan"))], {}, "NaN or Inf"),
        ([{"label": torch.zeros(2)}], {}, "input_key"),
        ([{"image": torch.zeros(2, 3, 8, 8)}], {"input_key": "pixels"}, "input_key"),
        ([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 9, 9)], {}, "one size"),
        ([["not a tensor"]], {}, "not a tensor"),
        (5, {}, "not iterable"),
    ],
)
def test_bad_calibration_data_gives_one_line(data, kwargs, message):
    with pytest.raises(CalibrationError, match=message) as info:
        draw_calibration(data, **kwargs)
    assert "\n" not in str(info.value)


# --- step 2 on odd loaders and in-place models -----------------------------------------------


class Block(nn.Module):
    """A residual block written either with `out += x` (in place) or `out = out + x`."""

    def __init__(self, channels, inplace):
        super().__init__()
        self.inplace = inplace
        self.conv1, self.bn1 = (
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            bn2d(channels),
        )
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2, self.bn2 = (
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            bn2d(channels),
        )
        self.relu2 = nn.ReLU(inplace=inplace)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.relu2(out)


class TwoBlockNet(nn.Module):
    def __init__(self, inplace, channels=6):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), bn2d(channels), nn.ReLU()
        )
        self.block1, self.block2 = Block(channels, inplace), Block(channels, inplace)
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.block2(self.block1(self.stem(x))))))


def weight_codes(model):
    return {
        n: (m.weight_codes.clone(), m.alpha.detach().clone(), m.bias.detach().clone())
        for n, m in model.named_modules()
        if isinstance(m, QuantizedConv2d)
    }


def assert_same_codes(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for ta, tb in zip(a[name], b[name], strict=True):
            assert torch.equal(ta, tb), name


CONFIG = TransformConfig(method=SolverConfig(iters=3), positions_per_image=8, verbose=False)


def test_inplace_residual_add_gives_the_same_codes_as_out_of_place():
    torch.manual_seed(0)
    x = images(32)
    plain = TwoBlockNet(inplace=False)
    inplace = TwoBlockNet(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    reports = {}
    codes = {}
    for name, model in (("plain", plain), ("inplace", inplace)):
        step1 = with_bn_statistics(tsquant.prepare_step1(model), x.split(8))
        reports[name] = []
        quantized = tsquant.transform(step1, list(x.split(8)), CONFIG, report=reports[name])
        codes[name] = weight_codes(quantized)
    assert_same_codes(codes["plain"], codes["inplace"])
    agreement = {k: [r["agreement"] for r in v if r["kind"] == "coded"] for k, v in reports.items()}
    assert agreement["plain"] == agreement["inplace"]


def test_shuffling_loader_one_shot_iterator_and_generator_equal_a_fixed_loader():
    torch.manual_seed(1)
    x = images(32, seed=1)
    step1 = with_bn_statistics(tsquant.prepare_step1(TwoBlockNet(inplace=False)), x.split(8))
    dataset = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))

    def shuffling():
        return DataLoader(
            dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7)
        )

    fixed = list(shuffling())  # the images the shuffling loader hands out in its first epoch
    reference = weight_codes(tsquant.transform(step1, fixed, CONFIG))
    for data in (shuffling(), iter(shuffling()), (b for b in shuffling())):
        assert_same_codes(weight_codes(tsquant.transform(step1, data, CONFIG)), reference)


def test_transform_leaves_the_callers_model_untouched():
    torch.manual_seed(2)
    x = images(16, seed=2)
    step1 = with_bn_statistics(tsquant.prepare_step1(TwoBlockNet(inplace=True)), x.split(8)).train()
    before = copy.deepcopy(step1.state_dict())
    quantized = tsquant.transform(step1, [x], CONFIG)
    assert step1.training and all(m.training for m in step1.modules())
    after = step1.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QuantizedConv2d) for m in step1.modules())
    assert not quantized.training
