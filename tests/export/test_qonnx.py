"""QONNX export (export.qonnx): Quant / MultiThreshold at the true bit widths, run by qonnx's
own executor with the integer runtime's predictions, and cleaned up for FINN's front end."""

import copy

import pytest
import torch
from export_helpers import SHAPES, int8_boundary_small_cnn, random_tsq_model

from tsquant.export import IntegerRuntime, export_model, load_export

pytest.importorskip("qonnx")
from tsquant.export.qonnx_export import QONNXRunner, to_qonnx  # noqa: E402


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name, grid, bits", [("resnet20", "ternary", 2), ("small_cnn", 2, 3)])
def test_qonnx_file_has_true_bit_widths_and_matches_the_integer_runtime(tmp_path, name, grid, bits):
    import onnx
    from onnx import numpy_helper

    model = random_tsq_model(name, grid=grid)
    exported = export_model(model, tmp_path, list(SHAPES[name]))
    exported = load_export(tmp_path)
    path = to_qonnx(exported, tmp_path / "model.qonnx.onnx")
    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quants = [n for n in proto.graph.node if n.op_type == "Quant"]
    thresholds = [n for n in proto.graph.node if n.op_type == "MultiThreshold"]
    quantized = [n for n in exported.graph if n.op in ("qconv", "qlinear")]
    assert len(quants) == len(quantized) and thresholds
    assert {float(inits[n.input[3]]) for n in quants} == {bits}  # the weights' bit width
    assert all(_attrs(n)["narrow"] == 1 and _attrs(n)["signed"] == 1 for n in quants)
    assert {_attrs(n)["out_dtype"].decode() for n in thresholds} == {"UINT2"}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # FINN: batch 1
    x = torch.randn(12, *SHAPES[name], generator=torch.Generator().manual_seed(2))
    expected = IntegerRuntime(exported).run(x)
    got = QONNXRunner(exported).run(x)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)  # float32


def test_int8_boundary_layers_in_qonnx(tmp_path):
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model_q = int8_boundary_small_cnn(x, iters=1)
    export_model(model_q, tmp_path, [1, 28, 28])
    exported = load_export(tmp_path)
    test = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    expected = IntegerRuntime(exported).run(test)
    got = QONNXRunner(exported).run(test)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    with torch.no_grad():
        reference = copy.deepcopy(model_q).double()(test.double())
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-4)
