"""Step 2 over a whole model: tsquant.transform (TSQ-METHOD.md, "Step 2" and the [choice] list)."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import tsquant
from tsquant import (
    QuantizedConv2d,
    QuantizedLinear,
    SolverConfig,
    SparseQuantizer,
    TransformConfig,
)
from tsquant.models import build_model
from tsquant.surgery import check_weights_on_grid
from tsquant.transform import MemoryConfig

from bn_helpers import step1_with_statistics


def calibration(shape, batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen), torch.zeros(shape[0])) for _ in range(batches)]


def quantized_layers(model):
    return {
        n: m for n, m in model.named_modules() if isinstance(m, QuantizedConv2d | QuantizedLinear)
    }


def check_quantized_model(
    model_q, step1, loader, expected_quantized, first, last, codes=(-1, 0, 1)
):
    layers = quantized_layers(model_q)
    assert set(layers) == set(expected_quantized)
    for name, module in layers.items():
        alpha = module.alpha.detach().reshape(-1, *([1] * (module.weight.dim() - 1)))
        rebuilt = module.weight_codes.float() * alpha
        assert torch.equal(module.weight.detach(), rebuilt), name  # exactly codes * alpha
        assert set(module.weight_codes.unique().tolist()) <= set(codes), name
        assert bool((module.alpha > 0).all()), name
    assert check_weights_on_grid(model_q)
    assert type(model_q.get_submodule(first)) is nn.Conv2d  # first layer stays FP
    assert type(model_q.get_submodule(last)) is nn.Linear  # last layer stays FP
    assert torch.equal(model_q.get_submodule(first).weight, step1.get_submodule(first).weight)
    assert not quantized_layers(step1)  # the step-1 model is not modified
    with torch.no_grad():
        for x, _ in loader:
            out = model_q(x)
            assert out.shape == step1(x).shape
            assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_small_cnn_sequential_and_parallel(mode):
    loader = calibration((8, 1, 12, 12), batches=3)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    reference = copy.deepcopy(step1)
    report = []
    cfg = TransformConfig(
        mode=mode, method=SolverConfig(iters=3), positions_per_image=8, verbose=False
    )
    model_q = tsquant.transform(step1, loader, cfg, report=report)
    expected = ["conv2.conv", "conv3.conv", "conv4.conv"]
    check_quantized_model(model_q, step1, loader, expected, "conv1.conv", "classifier")
    # quantized layers absorbed their BN; the quantizers of step 1 are kept
    for block in ("conv2", "conv3", "conv4"):
        assert isinstance(model_q.get_submodule(f"{block}.bn"), nn.Identity)
    assert isinstance(model_q.conv1.bn, nn.BatchNorm2d)
    assert isinstance(model_q.conv2.relu, SparseQuantizer)
    for a, b in zip(step1.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [row["layer"] for row in report] == expected
    assert all(row["rows"] == 3 * 8 * 8 for row in report)
    coded = [row for row in report if row["kind"] == "coded"]
    assert len(coded) == 2  # conv4 feeds the FP head ReLU: it is fitted to its BN output
    for row in coded:
        assert 0.0 <= row["agreement"] <= 1.0
        assert 0.0 <= row["agreement_init"] <= 1.0
        assert len(row["history"]) >= 2
    for row in report:
        if row["kind"] != "coded":
            assert row["relative_error"] >= 0 and row["relative_error"] < float("inf")


def test_quantize_first_and_last_layer_with_two_bit_weights():
    loader = calibration((8, 1, 12, 12), batches=2, seed=1)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    cfg = TransformConfig(
        weight_bits=2,
        method=SolverConfig(iters=2),
        positions_per_image=8,
        verbose=False,
        first_layer="quantize",
        last_layer="quantize",
    )
    report = []
    model_q = tsquant.transform(step1, loader, cfg, report=report)
    layers = quantized_layers(model_q)
    assert set(layers) == {"conv1.conv", "conv2.conv", "conv3.conv", "conv4.conv", "classifier"}
    for module in layers.values():
        assert set(module.weight_codes.unique().tolist()) <= {-3, -1, 1, 3}
    assert len(report) == 5
    with torch.no_grad():
        assert bool(torch.isfinite(model_q(loader[0][0])).all())


def test_residual_model_sequential():
    loader = calibration((4, 3, 8, 8), batches=2, seed=2)
    step1 = step1_with_statistics(build_model("resnet20", image_size=8, width=4), loader)
    report = []
    cfg = TransformConfig(
        mode="sequential", method=SolverConfig(iters=3), positions_per_image=8, verbose=False
    )
    model_q = tsquant.transform(step1, loader, cfg, report=report)
    convs = [n for n, m in step1.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[0] == "stem.conv" and len(convs) == 19
    check_quantized_model(model_q, step1, loader, convs[1:], "stem.conv", "classifier")
    assert [row["layer"] for row in report] == convs[1:]
    for row in report:
        if row["kind"] == "coded":
            assert 0.0 <= row["agreement"] <= 1.0


def test_empty_calibration_loader_raises():
    loader = calibration((4, 1, 12, 12), batches=1)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    with pytest.raises(ValueError, match="no images"):
        tsquant.transform(step1, [], TransformConfig(method=SolverConfig(iters=1), verbose=False))


def test_bad_transform_options():
    with pytest.raises(ValueError, match="mode"):
        TransformConfig(mode="both")
    with pytest.raises(ValueError, match="first_layer"):
        TransformConfig(first_layer="ternary")
    with pytest.raises(ValueError, match="positions_per_image"):
        TransformConfig(positions_per_image=0)
    with pytest.raises(ValueError, match="mmap_threshold_mb"):
        MemoryConfig(mmap_threshold_mb=-1)
    with pytest.raises(ValueError, match="cache_mb"):
        MemoryConfig(cache_mb=1.5)
    with pytest.raises(ValueError, match="weight format"):
        TransformConfig(weight_bits="binary")
    with pytest.raises(ValueError, match="lam"):
        TransformConfig(method=SolverConfig(lam=0.0))


def test_sequential_mode_feeds_the_quantized_network_forward():
    """Both modes see the same input at the first quantized layer (after the FP first layer);
    from the second on, sequential mode regresses on the outputs of already quantized layers."""
    loader = calibration((8, 1, 12, 12), batches=2, seed=3)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    models = {}
    for mode in ("sequential", "parallel"):
        cfg = TransformConfig(
            mode=mode, method=SolverConfig(iters=3), positions_per_image=8, verbose=False
        )
        models[mode] = tsquant.transform(step1, loader, cfg)
    seq, par = models["sequential"].conv2.conv, models["parallel"].conv2.conv
    assert torch.equal(seq.weight, par.weight) and torch.equal(seq.bias, par.bias)
    seq, par = models["sequential"].conv3.conv, models["parallel"].conv3.conv
    assert not (torch.equal(seq.alpha, par.alpha) and torch.equal(seq.bias, par.bias))


def test_otwa_method_quantizes_the_folded_step1_weights_without_data():
    from tsquant import prepare_step1
    from tsquant.quantizers.weight import ternarize
    from tsquant.surgery import analyse, bn_affine

    torch.manual_seed(0)
    step1 = prepare_step1(build_model("small_cnn", num_classes=10, in_channels=1, image_size=28))
    step1.eval()
    rows = []
    out = tsquant.transform(step1, [], TransformConfig(method="otwa", verbose=False), report=rows)
    assert [r["kind"] for r in rows] == ["otwa"] * 3  # conv2..conv4; first/last stay FP
    layer = next(lay for lay in analyse(step1) if lay.name == "conv2.conv")
    scale, shift = bn_affine(step1, layer)
    w = step1.get_submodule("conv2.conv").weight.detach()
    codes, alpha = ternarize(w.reshape(w.shape[0], -1) * scale[:, None])
    q = out.get_submodule("conv2.conv")
    assert isinstance(q, QuantizedConv2d)
    assert torch.equal(q.weight_codes.reshape(codes.shape), codes)
    torch.testing.assert_close(q.alpha.detach(), alpha)
    torch.testing.assert_close(q.bias.detach(), shift)


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2), ((3, 1), (2, 1), (1, 0), 1)],
)
def test_sampled_patches_equal_unfold_at_the_same_positions(kernel, stride, padding, dilation):
    from tsquant.capture import patch_rows, sample_positions

    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(5, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    cols = torch.nn.functional.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )  # N, n, L
    pos = sample_positions(5, cols.shape[2], 6, torch.Generator().manual_seed(1))
    reference = cols.gather(2, pos[:, None, :].expand(-1, cols.shape[1], -1))
    reference = reference.permute(0, 2, 1).reshape(-1, cols.shape[1])
    assert torch.equal(patch_rows(conv, x, pos, chunk=2), reference)
    assert torch.equal(
        patch_rows(conv, x.contiguous(memory_format=torch.channels_last), pos), reference
    )


def test_step2_is_bit_identical_across_runs_on_the_cpu():
    loader = calibration((16, 3, 32, 32), 2)
    step1 = step1_with_statistics(build_model("resnet20"), loader)
    cfg = TransformConfig(
        positions_per_image=8, method=SolverConfig(iters=4), verbose=False, seed=3
    )
    first = tsquant.transform(copy.deepcopy(step1), loader, cfg).state_dict()
    second = tsquant.transform(copy.deepcopy(step1), loader, cfg).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_targets_from_one_pass_line_up_with_each_layers_inputs():
    """The step-1 codes of all layers come from one pass, the inputs from one pass per layer:
    both sample the same positions, so the step-1 layer applied to the captured inputs gives
    the captured codes."""
    from tsquant.capture import capture_layer_inputs, capture_targets
    from tsquant.surgery import analyse, bn_affine, quantizable_layers

    loader = calibration((8, 3, 32, 32), 2)
    step1 = step1_with_statistics(build_model("resnet20"), loader)
    cfg = TransformConfig(positions_per_image=5, verbose=False)
    todo = quantizable_layers(analyse(step1), "fp", "fp")
    wanted = {i: (layer, "codes") for i, layer in enumerate(todo) if layer.kind == "coded"}
    targets = capture_targets(step1, wanted, loader, cfg)
    for i in (0, 3):  # a plain and a residual layer
        layer = todo[i]
        x, offset = capture_layer_inputs(layer, i, step1, loader, cfg, offsets=layer.residual)
        assert (offset is not None) == layer.residual and x.rows == 16 * 5
        x_only, none = capture_layer_inputs(layer, i, step1, loader, cfg, offsets=False)
        assert none is None and torch.equal(x_only.to_tensor(), x.to_tensor())
        weight = step1.get_submodule(layer.name).weight.flatten(1)
        scale, shift = bn_affine(step1, layer)
        pre = x.to_tensor() @ (weight * scale[:, None]).T + shift
        if offset is not None:
            pre = pre + offset.to_tensor()
        with torch.no_grad():
            codes = step1.get_submodule(layer.activation)(pre)
        # float sums in another order may flip a code sitting on a bin edge, not many
        assert (codes == targets[i].to_tensor()).float().mean() > 0.99


def test_solver_settings_reach_the_solver_unchanged(monkeypatch):
    step2 = importlib.import_module("tsquant.transform")  # the module, not the function
    seen = []

    def spy(*args, config, **kwargs):
        seen.append(config)
        return solve_layer(*args, config=config, **kwargs)

    solve_layer = step2.solve_layer
    monkeypatch.setattr(step2, "solve_layer", spy)
    loader = calibration((8, 1, 12, 12), batches=1, seed=6)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    chosen = SolverConfig(lam=5.0, iters=3, margin=0.1, variant="paper")
    cfg = TransformConfig(weight_bits=2, method=chosen, positions_per_image=8, verbose=False)
    tsquant.transform(step1, loader, cfg)
    assert seen and all(c == replace(chosen, weight_bits=2) for c in seen)
    # the format is given once: on TransformConfig (per layer: layer_formats)
    with pytest.raises(ValueError, match="give the format once"):
        TransformConfig(weight_bits=3, method=SolverConfig(weight_bits=2))
    with pytest.raises(ValueError, match="variant paper starts from"):
        SolverConfig(variant="paper", start="gptq")
    assert SolverConfig(variant="paper").effective.start == "otwa"
    assert SolverConfig().effective.start == "gptq"


def test_methods_are_chosen_by_name_or_by_their_config_object():
    from tsquant.baselines.adaround import AdaRoundConfig
    from tsquant.transform import OTWAConfig

    assert TransformConfig(method="otwa").method == OTWAConfig()
    assert TransformConfig(method="adaround").method == AdaRoundConfig()
    assert TransformConfig(method=AdaRoundConfig(iters=7)).method_name == "adaround"
    assert TransformConfig().method == SolverConfig()
    with pytest.raises(ValueError, match="tsq, adaround, otwa"):
        TransformConfig(method="gptq")
    with pytest.raises(ValueError, match="config object"):
        TransformConfig(method={"lam": 3.0})


def test_step2_methods_are_a_registry_and_transform_records_its_plan():
    from tsquant.transform import STEP2_METHODS, register_step2_method, step2_plan

    calls = []

    @dataclass(frozen=True)
    class TwiceConfig:
        pass

    @register_step2_method("otwa_twice", TwiceConfig, needs_data=False)
    def otwa_twice(task):
        calls.append(task.layer.name)
        return STEP2_METHODS["otwa"].solve(task)

    try:
        step1 = tsquant.prepare_step1(build_model("small_cnn", num_classes=10)).eval()
        model_q = tsquant.transform(step1, [], TransformConfig(method="otwa_twice", verbose=False))
        plan = step2_plan(model_q)
        formats = dict.fromkeys(calls, "ternary")
        assert plan == {
            "method": "otwa_twice",
            "weight_bits": "ternary",
            "layers": calls,
            "formats": formats,
            "input_quantizer": False,
            "head_inputs": [],
            "budget": None,
        }
        assert calls == ["conv2.conv", "conv3.conv", "conv4.conv"]
        assert step2_plan(copy.deepcopy(model_q)) == plan  # kept with the model
    finally:
        del STEP2_METHODS["otwa_twice"]


def test_per_layer_weight_formats_by_pattern_or_function(tmp_path):
    from tsquant.transform import step2_plan

    loader = calibration((8, 1, 12, 12), batches=2, seed=4)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    by_pattern = {"conv3*": 2, "conv4.conv": "narrow:3"}
    by_function = {"conv3.conv": 2, "conv4.conv": "narrow:3"}.get
    for formats in (by_pattern, by_function):
        cfg = TransformConfig(
            method=SolverConfig(iters=2),
            positions_per_image=8,
            verbose=False,
            layer_formats=formats,
        )
        model_q = tsquant.transform(step1, loader, cfg)
        codes = {
            n: set(m.weight_codes.unique().tolist()) for n, m in quantized_layers(model_q).items()
        }
        assert codes["conv2.conv"] <= {-1, 0, 1}
        assert codes["conv3.conv"] <= {-3, -1, 1, 3} and 0 not in codes["conv3.conv"]
        assert codes["conv4.conv"] <= {-3, -2, -1, 0, 1, 2, 3}
        plan = step2_plan(model_q)["formats"]
        assert plan == {"conv2.conv": "ternary", "conv3.conv": 2, "conv4.conv": "narrow:3"}
    tsquant.save(model_q, tmp_path / "mixed", architecture=None)
    loaded = tsquant.load(
        tmp_path / "mixed", model=build_model("small_cnn", in_channels=1, image_size=12, width=4)
    )
    with torch.no_grad():
        assert torch.equal(loaded(loader[0][0]), model_q(loader[0][0]))
    with pytest.raises(ValueError, match=r"layer_formats\['conv\*'\]"):
        TransformConfig(layer_formats={"conv*": "binary"})


def test_otwa_with_int8_boundaries_draws_calibration_data_for_their_scales():
    loader = calibration((8, 1, 12, 12), batches=2, seed=5)
    step1 = step1_with_statistics(
        build_model("small_cnn", in_channels=1, image_size=12, width=4), loader
    )
    cfg = TransformConfig(method="otwa", first_layer="int8", last_layer="int8", verbose=False)
    model_q = tsquant.transform(step1, loader, cfg)
    assert model_q.get_submodule("input_quantizer").scale > 0
    with pytest.raises(ValueError, match="calib_images"):
        TransformConfig(calib_images=0)


def test_quantizer_parameters_stay_float64_through_float_and_half():
    from tsquant import InputQuantizer

    for q in (tsquant.SparseQuantizer.from_gaussian(2, 0.32), InputQuantizer(0.0123)):
        before = q.qparams.clone()
        q.half().float()
        assert q.qparams.dtype == torch.float64 and torch.equal(q.qparams, before)


def test_weight_budget_upgrades_the_layers_that_gain_most_per_bit_within_the_budget():
    from tsquant.quantizers.weight import WeightGrid
    from tsquant.transform import step2_plan

    loader = calibration((8, 1, 12, 12), batches=2, seed=7)
    model = build_model("small_cnn", in_channels=1, image_size=12, width=4)
    step1 = step1_with_statistics(model, loader)
    sizes = {n: step1.get_submodule(n).weight.numel() for n in ("conv2.conv", "conv3.conv")}
    sizes["conv4.conv"] = step1.get_submodule("conv4.conv").weight.numel()
    ternary, two = (WeightGrid.from_spec(f).information_bits for f in ("ternary", 2))
    total = sum(sizes.values())
    # room for conv2 and conv3 (the two smaller layers) but not for conv4 on top
    budget = (
        ternary * total + (two - ternary) * (sizes["conv2.conv"] + sizes["conv3.conv"])
    ) / total
    cfg = TransformConfig(
        weight_budget=budget + 1e-6,
        method=SolverConfig(iters=2),
        positions_per_image=8,
        verbose=False,
    )
    model_q = tsquant.transform(step1, loader, cfg)
    plan = step2_plan(model_q)["budget"]
    assert plan["average_bits"] <= budget + 1e-6
    upgraded = {n for n, f in plan["formats"].items() if f == 2}
    gains = plan["gains"]
    # greedy by gain per bit: walking the layers from the highest gain per bit, a layer is
    # upgraded exactly when it gains and still fits the budget
    room = (budget + 1e-6 - ternary) * total
    for name in sorted(gains, key=gains.get, reverse=True):
        cost = sizes[name] * (two - ternary)
        fits = gains[name] > 0 and cost <= room + 1e-9
        assert (name in upgraded) == fits, name
        room -= cost if fits else 0
    assert upgraded
    assert step2_plan(model_q)["formats"] == plan["formats"]
    codes = {n: set(m.weight_codes.unique().tolist()) for n, m in quantized_layers(model_q).items()}
    for name, fmt in plan["formats"].items():
        assert codes[name] <= ({-1, 0, 1} if fmt == "ternary" else {-3, -1, 1, 3})
    spent = sum(sizes[n] * (two if n in upgraded else ternary) for n in sizes) / total
    assert abs(spent - plan["average_bits"]) < 1e-9
    with pytest.raises(ValueError, match="below ternary's 1.585 bits"):
        TransformConfig(weight_budget=1.5)
    with pytest.raises(ValueError, match="not both"):
        TransformConfig(weight_budget=1.8, layer_formats={"conv2*": 2})
    with pytest.raises(ValueError, match="solves without data"):
        TransformConfig(weight_budget=1.8, method="otwa")
