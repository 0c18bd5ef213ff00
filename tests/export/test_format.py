import json

import pytest
import torch
from export_helpers import SHAPES
from torch import nn

from tsquant import prepare_step1
from tsquant.export import ExportError, export_model, load_export
from tsquant.export.format import MANIFEST_FILE, TENSOR_FILE
from tsquant.quantizers.modules import QuantizedConv2d


def test_round_trip_restores_codes_and_parameters(exported_resnet):
    model, folder = exported_resnet
    loaded = load_export(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format"] == "tsquant-export" and manifest["model"] == "resnet20"
    assert manifest["input_shape"] == list(SHAPES["resnet20"])
    by_module = {n["attrs"].get("module"): n for n in loaded.nodes}
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedConv2d)]
    assert quantized
    for name, module in quantized:
        node = by_module[name]
        assert node["attrs"]["codes_bits"] == 1.6  # ternary: five weights per byte
        assert torch.equal(loaded.tensors[node["tensors"]["codes"]], module.weight_codes)
        assert torch.equal(loaded.tensors[node["tensors"]["alpha"]], module.alpha.detach())
        stored = manifest["tensors"][node["tensors"]["codes"]]
        assert stored == {"shape": [-(-module.weight.numel() // 5)], "dtype": "uint8"}


def test_no_pickle_in_the_tensor_file(exported_resnet):
    _, folder = exported_resnet
    data = (folder / TENSOR_FILE).read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])  # safetensors: JSON header + raw bytes
    assert all("dtype" in v for k, v in header.items() if k != "__metadata__")


def _copy(folder, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name in (TENSOR_FILE, MANIFEST_FILE):
        (out / name).write_bytes((folder / name).read_bytes())
    return out


def test_tampered_tensor_file_is_refused(exported_resnet, tmp_path):
    folder = _copy(exported_resnet[1], tmp_path)
    data = bytearray((folder / TENSOR_FILE).read_bytes())
    data[-5] ^= 0x01  # one flipped weight bit
    (folder / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match its manifest.*modified or truncated"):
        load_export(folder)


def test_truncated_tensor_file_is_refused(exported_resnet, tmp_path):
    folder = _copy(exported_resnet[1], tmp_path)
    data = (folder / TENSOR_FILE).read_bytes()
    (folder / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="modified or truncated"):
        load_export(folder)


def test_truncated_file_with_a_matching_hash_is_still_refused(exported_resnet, tmp_path):
    from tsquant.fileio import sha256_of

    folder = _copy(exported_resnet[1], tmp_path)
    data = (folder / TENSOR_FILE).read_bytes()
    (folder / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["tensor_sha256"] = sha256_of(folder / TENSOR_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_export(folder)


@pytest.mark.parametrize("damage", ["not json", '{"format": "other"}', "missing"])
def test_bad_manifest_is_refused(exported_resnet, tmp_path, damage):
    folder = _copy(exported_resnet[1], tmp_path)
    if damage == "missing":
        (folder / MANIFEST_FILE).unlink()
    else:
        (folder / MANIFEST_FILE).write_text(damage)
    with pytest.raises(ExportError, match="manifest|JSON|tsquant export"):
        load_export(folder)


def _rewrite(folder, edit, rehash: bool):
    from tsquant.export.format import graph_digest

    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit(manifest)
    if rehash:  # as if the editor also recomputed the hash: the structural checks still hold
        manifest["graph_sha256"] = graph_digest(manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_graph_referring_to_a_missing_tensor_is_refused(exported_resnet, tmp_path):
    folder = _copy(exported_resnet[1], tmp_path)
    _rewrite(folder, lambda m: m["graph"][1]["tensors"].update(weight="nowhere"), rehash=True)
    with pytest.raises(ExportError, match="nowhere"):
        load_export(folder)


def _first(manifest, op):
    return next(node for node in manifest["graph"] if node["op"] == op)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: _first(m, "quantize")["attrs"].update(step=0.7),
        lambda m: _first(m, "quantize")["attrs"].update(eps=0.1),
        lambda m: _first(m, "qconv")["attrs"].update(padding=[0, 0]),
        lambda m: _first(m, "qconv")["attrs"].update(low=-3, high=3, spacing=2),
        lambda m: m.update(input_shape=[3, 32, 32]),
    ],
    ids=["quantizer step", "eps", "padding", "weight grid", "input shape"],
)
def test_edited_manifest_is_refused(exported_resnet, tmp_path, edit):
    folder = _copy(exported_resnet[1], tmp_path)
    _rewrite(folder, edit, rehash=False)
    with pytest.raises(ExportError, match="edited after export") as info:
        load_export(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.pop("graph"),
        lambda m: m.update(graph=5),
        lambda m: m["graph"][1].pop("attrs"),
        lambda m: m.update(tensors=[]),
        lambda m: _first(m, "qconv")["attrs"].update(codes_shape="x"),
    ],
    ids=["no graph", "graph not a list", "node without attrs", "tensors a list", "bad shape"],
)
def test_malformed_manifest_is_one_line(exported_resnet, tmp_path, edit):
    folder = _copy(exported_resnet[1], tmp_path)
    _rewrite(folder, edit, rehash=True)
    with pytest.raises(ExportError) as info:
        load_export(folder)
    assert "\n" not in str(info.value) and "re-export" in str(info.value)


class WithSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.gate(self.relu(self.bn(self.conv(x)))).mean((2, 3)))


def test_unexportable_module_is_named_and_nothing_is_written(tmp_path):
    with pytest.raises(ExportError, match="gate \\(Hardsigmoid"):
        export_model(WithSigmoid().eval(), tmp_path / "out", [1, 8, 8])
    assert not (tmp_path / "out").exists()


def test_step1_model_exports_with_fp_weights(tmp_path):
    """A step-1 model (FP weights, quantized activations) is exportable too."""
    from tsquant.models import build_model

    model = prepare_step1(build_model("small_cnn", num_classes=10)).eval()
    exported = export_model(model, tmp_path, [1, 28, 28])
    assert {n["op"] for n in exported.nodes} >= {"conv", "affine", "quantize", "linear"}
