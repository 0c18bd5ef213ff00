"""The export format: ``model.safetensors`` (packed codes, scales, biases, FP layers) and
``manifest.json`` (graph, shapes, bit widths, version, hashes). Loading needs no pickle and
checks the tensor file against the manifest's sha256, so a tampered or truncated file is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..fileio import save_json, save_tensors, sha256_of
from ..version import __version__
from .graph import ExportError, Node, build_graph, check_graph, quantized_nodes
from .packing import PackingError, bits_per_code, grid_levels, pack_codes, unpack_codes

FORMAT = "tsquant-export"
FORMAT_VERSION = 3  # 2: graph_sha256 covers the graph and the tensor specs; 3: radix packing
TENSOR_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class ExportedModel:
    manifest: dict
    nodes: list[dict]
    tensors: dict[str, torch.Tensor]  # codes unpacked to int8

    @property
    def input_shape(self) -> list[int]:
        return self.manifest["input_shape"]

    @property
    def graph(self) -> list[Node]:
        """The nodes, typed."""
        return [Node.from_dict(n) for n in self.nodes]


def export_model(
    model: torch.nn.Module, out_dir: Path, input_shape: list[int], info: dict | None = None
) -> ExportedModel:
    """Write ``out_dir/model.safetensors`` and ``out_dir/manifest.json`` (manifest last)."""
    model = model.eval()
    nodes, tensors = build_graph(model)
    stored = dict(tensors)
    shapes = {}
    for node in quantized_nodes(nodes):
        key = node["tensors"]["codes"]
        codes = tensors[key]
        a = node["attrs"]
        a.update(
            {
                "codes_shape": list(codes.shape),
                # stored bits per weight: ternary 1.6 (five per byte)
                "codes_bits": bits_per_code(grid_levels(a["low"], a["high"], a["spacing"])),
            }
        )
        stored[key] = pack_codes(codes, a["low"], a["high"], a["spacing"])
    for key, value in stored.items():
        shapes[key] = {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    out_dir = Path(out_dir)
    save_tensors(out_dir / TENSOR_FILE, stored, {"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tsquant": __version__,
        "input_shape": [int(v) for v in input_shape],
        "graph": nodes,
        "tensors": shapes,
        "tensor_file": TENSOR_FILE,
        "tensor_sha256": sha256_of(out_dir / TENSOR_FILE),
        **(info or {}),
    }
    manifest["graph_sha256"] = graph_digest(manifest)
    save_json(out_dir / MANIFEST_FILE, manifest)
    return ExportedModel(manifest, nodes, tensors)


def graph_digest(manifest: dict) -> str:
    """sha256 of what the tensors do not hold: the graph (quantizer steps and eps, padding,
    weight grids, ...), the input shape and the tensor specs."""
    covered = {k: manifest.get(k) for k in ("graph", "input_shape", "tensors", "tensor_file")}
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()


def _manifest_path(path: Path) -> Path:
    path = Path(path)
    return path / MANIFEST_FILE if path.is_dir() else path


def load_export(path: Path) -> ExportedModel:
    """Load an export folder (or its manifest.json), verifying hash, shapes and graph."""
    manifest_path = _manifest_path(path)
    if not manifest_path.is_file():
        raise ExportError(
            f"no export at {path}: expected {MANIFEST_FILE}; run `tsquant export` first"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{manifest_path} is not valid JSON ({exc}): re-export the model"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{manifest_path} is not a tsquant export manifest: re-export the model")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{manifest_path} has format version {manifest.get('format_version')}, this tsquant "
            f"reads {FORMAT_VERSION}: export again with this version"
        )
    if manifest.get("graph_sha256") != graph_digest(manifest):
        raise ExportError(
            f"{manifest_path} was edited after export (its graph, input shape or tensor list no "
            "longer match its graph_sha256): re-export the model"
        )
    try:
        return _load_checked(manifest_path, manifest)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(
            f"{manifest_path} is malformed ({type(exc).__name__}: {exc}): re-export the model"
        ) from None


def _load_checked(manifest_path: Path, manifest: dict) -> ExportedModel:
    tensor_path = manifest_path.parent / manifest.get("tensor_file", TENSOR_FILE)
    if not tensor_path.is_file():
        raise ExportError(f"{tensor_path} is missing: copy it beside {manifest_path.name}")
    digest = sha256_of(tensor_path)
    if digest != manifest.get("tensor_sha256"):
        raise ExportError(
            f"{tensor_path} does not match its manifest (sha256 {digest[:12]}... vs "
            f"{str(manifest.get('tensor_sha256'))[:12]}...): the file was modified or truncated; "
            "re-export or copy it again"
        )
    try:
        stored = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ExportError(
            f"{tensor_path} is not a readable safetensors file ({exc}): re-export"
        ) from None
    expected = manifest.get("tensors", {})
    for key, spec in expected.items():
        if key not in stored or list(stored[key].shape) != spec["shape"]:
            raise ExportError(
                f"tensor {key} is missing or has the wrong shape: re-export the model"
            )
    nodes = manifest["graph"]
    tensors = dict(stored)
    try:
        for node in quantized_nodes(nodes):
            a = node["attrs"]
            key = node["tensors"]["codes"]
            tensors[key] = unpack_codes(
                stored[key], tuple(a["codes_shape"]), a["low"], a["high"], a["spacing"]
            )
    except (PackingError, KeyError) as exc:
        raise ExportError(
            f"packed weight codes are inconsistent ({exc}): re-export the model"
        ) from None
    check_graph(nodes, tensors)
    return ExportedModel(manifest, nodes, tensors)
