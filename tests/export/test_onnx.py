import pytest
import torch
from export_helpers import SHAPES, int8_boundary_small_cnn, random_tsq_model

from tsquant.data import BatchLoader
from tsquant.data.datasets import ArrayDataset
from tsquant.export import IntegerRuntime, export_model, load_export
from tsquant.export.onnx_export import onnx_session, quantizer_paths, to_onnx
from tsquant.export.verify import verify

pytest.importorskip("onnxruntime")


def test_onnx_model_matches_the_runtime_exactly(exported_resnet, tmp_path):
    """Ternary layers on 2-bit codes run as QLinearConv (int8) or float32 Conv on
    integer-valued codes (exact: every sum < 2^24), their quantizers (after a residual add
    too) as rounded lines checked on every input where a code can change, so the logits equal
    the integer runtime's."""
    import onnx

    exported = load_export(exported_resnet[1])
    path = to_onnx(exported, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    quantized = [n for n in exported.graph if n.op == "qconv"]
    convs = ops.count("Conv") + ops.count("QLinearConv")
    assert "ConvInteger" not in ops and convs == len(quantized) + 1  # + FP first
    # every quantizer but the FP stem's is fused into its conv or residual add
    assert ops.count("Greater") == 3 and ops.count("Floor") + ops.count("Min") == 17
    x = torch.randn(5, *SHAPES["resnet20"])
    expected = IntegerRuntime(exported).run(x)
    got = onnx_session(path).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-9)


def test_verify_counts_no_disagreement_on_a_small_model(tmp_path):
    model = random_tsq_model("small_cnn")
    exported = export_model(model, tmp_path, list(SHAPES["small_cnn"]))
    exported = load_export(tmp_path)
    session = onnx_session(to_onnx(exported, tmp_path / "model.onnx"))
    images = (torch.rand(40, 28, 28, 1) * 255).to(torch.uint8).numpy()
    labels = torch.randint(0, 10, (40,)).numpy()
    loader = BatchLoader(ArrayDataset(images, labels, [str(i) for i in range(10)], name="t"), 16)
    row = verify(model, exported, loader, session)
    assert row["test_images"] == 40
    assert row["int_vs_fakequant64_disagreements"] == 0 and row["code_mismatches_float64"] == 0
    assert row["onnx_vs_int_disagreements"] == 0
    assert row["int_top1"] == row["onnx_top1"]
    assert all(v == 100.0 for v in row["first_batch_code_agreement_percent"].values())


def test_sums_beyond_float32_integers_use_the_integer_ops(tmp_path):
    """An 8-bit head on 8-bit codes (3,136 inputs x 255 x 127 > 2^24) keeps MatMulInteger."""
    import onnx

    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    model_q = int8_boundary_small_cnn(x, iters=1, width=32)
    export_model(model_q, tmp_path, [1, 28, 28])
    exported = load_export(tmp_path)
    path = to_onnx(exported, tmp_path / "model.onnx")
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(path)).graph.node}
    test = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    got = onnx_session(path).run(None, {"input": test.numpy()})[0]
    expected = IntegerRuntime(exported).run(test)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "eps, int8_kernels, expected_ops",
    [
        (0.32, True, {"QLinearConv": 2}),  # one uniform grid per layer
        (0.0, True, {"QLinearConv": 4, "Max": 2}),  # + a step at eps: first bin wider
        (0.6, True, {"QLinearConv": 4, "Mul": 3}),  # ... narrower (+1: the last conv's BN)
        (0.32, False, {"Floor": 2, "Relu": 3}),  # float32 line (+ the last conv's Relu)
        (0.0, False, {"Floor": 2, "LeakyRelu": 2}),  # float32 line, bent at the first gap
    ],
)
def test_quantizers_fused_into_their_layers_match_the_runtime_exactly(
    tmp_path, monkeypatch, eps, int8_kernels, expected_ops
):
    """Each quantizer after a quantized layer runs with that layer instead of as a comparison
    per threshold: as QLinearConv's requantization on uint8 codes (a uniform grid; with a
    second conv for the sparse quantizer's first edge where the grid misses it), or, without
    int8 kernels (here: switched off), as a float32 line after a float32 Conv. A channel with
    a negative scale runs on negated weights. Logits equal the integer runtime's on inputs
    that land on every code."""
    import onnx

    import tsquant.export.onnx_export as onnx_export
    from tsquant.quantizers.activation import SparseQuantizer

    if not int8_kernels:
        monkeypatch.setattr(onnx_export, "fit_requantized", lambda *args: None)
    model = random_tsq_model("small_cnn", seed=3)
    for module in model.modules():
        if isinstance(module, SparseQuantizer):
            module.qparams[1] = eps
    with torch.no_grad():
        model.conv3.conv.alpha[:3] *= -1
        model.conv3.conv.weight[:3] *= -1
    exported = export_model(model, tmp_path, list(SHAPES["small_cnn"]))
    path = to_onnx(load_export(tmp_path), tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Greater") == 3  # the FP first layer's quantizer: float32 comparisons
    assert {op: ops.count(op) for op in expected_ops} == expected_ops
    paths = quantizer_paths(path)  # recorded in the model's metadata, printed by the export
    assert paths["conv1_relu"] == "float32 comparisons"
    expected = "int8 requantization" if int8_kernels else "float32 line"
    assert paths["conv2_relu"].startswith(expected) and paths["conv3_relu"].startswith(expected)
    x = torch.randn(64, *SHAPES["small_cnn"], generator=torch.Generator().manual_seed(1))
    expected, codes = IntegerRuntime(exported).run(x, keep=True)
    assert all(len(c.unique()) >= 3 for c in codes.values())  # 4 but at eps 0.6
    got = onnx_session(path).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-9)


def test_an_8_bit_quantizer_after_a_residual_add_runs_as_a_float64_line(
    exported_resnet, tmp_path, monkeypatch
):
    """An 8-bit quantizer (the head input of int8 boundary layers) after a residual add can
    have several thresholds per accumulator unit, too fine for a float32 line (here: float32
    lines switched off); the line then runs in float64 after the conv, with no comparison per
    threshold, and stays exact."""
    import numpy as np
    import onnx

    import tsquant.export.onnx_export as onnx_export

    float32_lines_off = onnx_export.fit_line

    def fit_line(samples, first_gap=1.0, spacing=None, dtype=np.float32):
        return (
            None if dtype == np.float32 else float32_lines_off(samples, first_gap, spacing, dtype)
        )

    monkeypatch.setattr(onnx_export, "fit_line", fit_line)
    exported = load_export(exported_resnet[1])
    adds = {n.name for n in exported.graph if n.op == "add"}
    last = [n for n in exported.graph if n.op == "quantize" and n.inputs[0] in adds][-1]
    node = next(n for n in exported.nodes if n["name"] == last.name)
    node["attrs"].update(bits=8, eps=0.0, step=0.01)
    path = to_onnx(exported, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "ReduceSum" not in ops and "Max" in ops  # float64's leaky relu: max(x, leak x)
    x = torch.randn(16, *SHAPES["resnet20"], generator=torch.Generator().manual_seed(2))
    expected, codes = IntegerRuntime(exported).run(x, keep=True)
    assert len(codes[last.attrs["module"]].unique()) > 50
    got = onnx_session(path).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-9)
