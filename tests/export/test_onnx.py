import pytest
import torch
from export_helpers import SHAPES, int8_boundary_small_cnn, random_tsq_model

from tsquant.data import BatchLoader
from tsquant.data.datasets import ArrayDataset
from tsquant.export import IntegerRuntime, export_model, load_export
from tsquant.export.onnx_export import onnx_session, to_onnx
from tsquant.export.verify import verify

pytest.importorskip("onnxruntime")


def test_onnx_model_matches_the_runtime_exactly(exported_resnet, tmp_path):
    """Ternary layers on 2-bit codes run as float32 Conv on integer-valued codes (exact: every
    sum < 2^24), so the logits equal the integer runtime's."""
    import onnx

    exported = load_export(exported_resnet[1])
    path = to_onnx(exported, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    quantized = [n for n in exported.graph if n.op == "qconv"]
    assert "ConvInteger" not in ops and ops.count("Conv") == len(quantized) + 1  # + FP first
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
