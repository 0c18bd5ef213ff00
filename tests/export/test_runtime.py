import pytest
import torch
from export_helpers import SHAPES, random_tsq_model
from hypothesis import given, settings
from hypothesis import strategies as st

from tsquant.export import ExportError, IntegerRuntime, export_model, load_export
from tsquant.export.format import ExportedModel
from tsquant.export.runtime import integer_thresholds
from tsquant.export.verify import quantizer_codes


def _tiny_layer() -> ExportedModel:
    """input -> Q -> qconv (2 channels, 2x2 kernel) -> Q -> flatten -> output."""
    q = {"bits": 2, "eps": 0.3, "step": 1.0}
    codes = torch.tensor([[[[1, -1], [0, 1]]], [[[1, -1], [0, 1]]]], dtype=torch.int8)
    tensors = {
        "conv.codes": codes,
        "conv.alpha": torch.tensor([0.5, -0.5]),
        "conv.bias": torch.tensor([0.25, 0.25]),
    }
    conv_attrs = {
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
        "groups": 1,
        "low": -1,
        "high": 1,
        "spacing": 1,
    }
    nodes = [
        {"name": "x", "op": "input", "inputs": [], "attrs": {}, "tensors": {}},
        {"name": "q0", "op": "quantize", "inputs": ["x"], "attrs": q, "tensors": {}},
        {
            "name": "conv",
            "op": "qconv",
            "inputs": ["q0"],
            "attrs": conv_attrs,
            "tensors": {"codes": "conv.codes", "alpha": "conv.alpha", "bias": "conv.bias"},
        },
        {"name": "q1", "op": "quantize", "inputs": ["conv"], "attrs": q, "tensors": {}},
        {
            "name": "flat",
            "op": "flatten",
            "inputs": ["q1"],
            "attrs": {"start_dim": 1},
            "tensors": {},
        },
        {"name": "out", "op": "output", "inputs": ["flat"], "attrs": {}, "tensors": {}},
    ]
    return ExportedModel({"input_shape": [1, 2, 2]}, nodes, tensors)


def test_hand_computed_tiny_layer():
    # thresholds [0.3, 1.5, 2.5]: 0.2 -> 0, 1.2 -> 1, 2.0 -> 2, 3.7 -> 3
    x = torch.tensor([[[[0.2, 1.2], [2.0, 3.7]]]])
    out, codes = IntegerRuntime(_tiny_layer()).run(x, keep=True)
    assert codes["q0"].tolist() == [[[[0, 1], [2, 3]]]]
    # acc = 1*0 - 1*1 + 0*2 + 1*3 = 2 (int32); channel 0: 0.5*1*2 + 0.25 = 1.25 -> code 1;
    # channel 1: -0.5*2 + 0.25 = -0.75 -> code 0
    assert codes["q1"].dtype == torch.int32
    assert codes["q1"].tolist() == [[[[1]], [[0]]]]
    assert out.tolist() == [[1.0, 0.0]]


@settings(max_examples=200, deadline=None)
@given(
    scale=st.one_of(
        st.just(0.0), st.floats(-3, 3, allow_nan=False).filter(lambda s: abs(s) > 1e-3)
    ),
    offset=st.floats(-5, 5, allow_nan=False),
    acc=st.integers(-2000, 2000),
)
def test_integer_thresholds_match_the_float_comparison(scale, offset, acc):
    edges = torch.tensor([0.32, 0.97, 1.62], dtype=torch.float64)
    sign, limits = integer_thresholds(
        torch.tensor([scale]).double(), torch.tensor([offset]).double(), edges
    )
    y = scale * acc + offset
    if torch.isclose(torch.tensor(y).double(), edges, atol=1e-9).any():
        return  # exactly on a threshold: both sides are float rounding
    assert int((sign[0] * acc > limits[0]).sum()) == int((y > edges).sum())


@pytest.mark.parametrize(
    "name, grid", [("resnet20", "ternary"), ("small_cnn", "ternary"), ("small_cnn", 2)]
)
def test_runtime_codes_equal_the_fake_quant_model(name, grid, tmp_path):
    model = random_tsq_model(name, grid)
    export_model(model, tmp_path, list(SHAPES[name]))
    runtime = IntegerRuntime(load_export(tmp_path))
    x = torch.randn(6, *SHAPES[name])
    logits, codes = runtime.run(x, keep=True)
    ref_logits, ref_codes = quantizer_codes(model.double(), x.double())
    assert set(codes) == set(ref_codes) and len(codes) >= 3
    for layer, c in codes.items():
        assert torch.equal(c, ref_codes[layer].to(torch.int32)), layer  # 100 % per layer
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-9)


def test_input_shape_mismatch_is_a_clear_error(exported_resnet):
    runtime = IntegerRuntime(load_export(exported_resnet[1]))
    with pytest.raises(
        ExportError, match=r"shape \(3, 8, 8\) per sample, the model expects \(3, 16, 16\)"
    ):
        runtime.run(torch.zeros(1, 3, 8, 8))
