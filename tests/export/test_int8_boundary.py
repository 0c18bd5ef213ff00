"""int8 boundary layers (transform.first_layer / last_layer: int8): the input quantized to
signed 8 bits, the head's input to unsigned 8 bits, 8-bit weights per channel; the export is
then integer from the input scaling to the logits' scale, and agrees with float64 PyTorch."""

from __future__ import annotations

import copy

import torch
from export_helpers import int8_boundary_small_cnn

import tsquant
from tsquant import InputQuantizer, QuantizedConv2d, QuantizedLinear, SparseQuantizer
from tsquant.export import IntegerRuntime, export_model, load_export
from tsquant.export.onnx_export import onnx_session, to_onnx
from tsquant.export.verify import quantizer_codes
from tsquant.models import build_model
from tsquant.transform import step2_plan


def test_int8_boundary_layers_through_export(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model_q = int8_boundary_small_cnn(x)
    plan = step2_plan(model_q)
    assert plan["input_quantizer"] and plan["formats"]["conv1.conv"] == "narrow:8"
    assert plan["formats"]["classifier"] == "narrow:8"
    assert isinstance(model_q.get_submodule("input_quantizer"), InputQuantizer)
    assert isinstance(model_q.get_submodule("conv1.conv"), QuantizedConv2d)
    assert isinstance(model_q.get_submodule("classifier"), QuantizedLinear)
    head = [model_q.get_submodule(n) for n in plan["head_inputs"]]
    assert head and all(isinstance(q, SparseQuantizer) and q.bits == 8 for q in head)
    codes = model_q.get_submodule("conv1.conv").weight_codes
    assert int(codes.abs().max()) <= 127 and int(codes.abs().max()) > 63  # 8-bit, used
    exported = export_model(model_q, tmp_path, [1, 28, 28])
    ops = [n["op"] for n in exported.nodes]
    assert ops[:3] == ["input", "quantize_input", "qconv"] and "conv" not in ops
    assert "linear" not in ops  # no full-precision layer is left
    test = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    runtime = IntegerRuntime(load_export(tmp_path))
    logits_int, codes_int = runtime.run(test, keep=True)
    logits64, codes64 = quantizer_codes(copy.deepcopy(model_q).double(), test.double())
    assert torch.equal(logits_int.argmax(1), logits64.argmax(1))
    for key, c in codes_int.items():
        assert torch.equal(c, codes64[key].to(torch.int32)), key
    torch.testing.assert_close(logits_int, logits64, rtol=1e-9, atol=1e-9)
    session = onnx_session(to_onnx(exported, tmp_path / "model.onnx"))
    logits_onnx = torch.from_numpy(session.run(None, {"input": test.numpy()})[0])
    torch.testing.assert_close(logits_onnx, logits_int, rtol=1e-9, atol=1e-9)
    # saved and loaded with its boundary
    tsquant.save(model_q, tmp_path / "saved")
    model = build_model("small_cnn", num_classes=10, in_channels=1, image_size=28, width=4)
    loaded = tsquant.load(tmp_path / "saved", model=model)
    with torch.no_grad():
        assert torch.equal(loaded(test), model_q(test))
