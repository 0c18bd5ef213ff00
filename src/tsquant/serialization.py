"""Save and load step-1 and quantized models without pickle: ``tsquant.save`` / ``tsquant.load``.

A saved model is a folder with ``model.safetensors`` (the state dict) and ``model.json`` (how to
rebuild the structure around it: the FP architecture, the ``prepare_step1`` options, and which
layers step 2 replaced with which weight grid). Loading rebuilds the structure and loads the
tensors strictly, after checking the tensor file against the sha256 that ``model.json`` records.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .fileio import (
    CheckpointError,
    load_json,
    load_model_weights,
    save_json,
    save_tensors,
    sha256_of,
)
from .quantizers.modules import QuantizedConv2d, QuantizedLinear
from .quantizers.weight import WeightGrid
from .surgery import analyse, apply_boundary, convert_to_step1, get_record, write_back

FORMAT = "tsquant-model"
TENSOR_FILE = "model.safetensors"
STRUCTURE_FILE = "model.json"


def save(model: nn.Module, path: str | Path, architecture: dict | None = None) -> Path:
    """Write ``model`` (prepared by :func:`tsquant.prepare_step1`, before or after step 2) to
    the folder ``path``.

    ``architecture`` ({"name": built-in name or "package.module:factory", "kwargs": {...}})
    lets :func:`load` rebuild the FP network by itself; without it, pass the FP network to
    ``load``. The structure file is written last, so a folder with it is complete.
    """
    options = get_record(model, "tsquant_step1")
    if options is None:
        raise CheckpointError(
            "tsquant.save takes a model made by tsquant.prepare_step1 (before or after "
            "transform); for a plain FP network use torch.save(model.state_dict()) or safetensors"
        )
    quantized = {
        name: [m.grid.low, m.grid.high, m.grid.spacing]
        for name, m in model.named_modules()
        if isinstance(m, QuantizedConv2d | QuantizedLinear)
    }
    folder = Path(path)
    save_tensors(folder / TENSOR_FILE, model.state_dict(), {"format": FORMAT})
    plan = get_record(model, "tsquant_step2") or {}
    structure = {
        "format": FORMAT,
        "architecture": architecture,
        "prepare_step1": options,
        "quantized_layers": quantized,
        "input_quantizer": bool(plan.get("input_quantizer")),
        "head_inputs": list(plan.get("head_inputs", [])),
        "tensor_sha256": sha256_of(folder / TENSOR_FILE),
    }
    save_json(folder / STRUCTURE_FILE, structure)
    return folder


def _fp_network(architecture: dict | None, model: nn.Module | None, where: Path) -> nn.Module:
    if model is not None:
        return copy.deepcopy(model)
    if not architecture:
        raise CheckpointError(
            f"{where} does not say which network it holds (saved without architecture=): "
            "pass the FP network, tsquant.load(path, model=MyNet())"
        )
    from .models import build_model, build_user_model, is_factory_spec

    name, kwargs = architecture.get("name"), dict(architecture.get("kwargs") or {})
    return build_user_model(name, kwargs) if is_factory_spec(name) else build_model(name, **kwargs)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model saved by :func:`save` at ``path``, in eval mode.

    ``model``: the FP network it came from (any instance of the architecture; its weights are
    replaced), needed when the model was saved without ``architecture``.
    """
    folder = Path(path)
    structure_path, tensor_path = folder / STRUCTURE_FILE, folder / TENSOR_FILE
    if not structure_path.is_file() or not tensor_path.is_file():
        raise CheckpointError(
            f"{folder} has no {STRUCTURE_FILE} and {TENSOR_FILE}: give a folder written by "
            "tsquant.save"
        )
    structure = load_json(structure_path)
    if structure.get("format") != FORMAT:
        raise CheckpointError(f"{structure_path} is not a tsquant model file: re-save the model")
    if sha256_of(tensor_path) != structure.get("tensor_sha256"):
        raise CheckpointError(
            f"{tensor_path} does not match the sha256 in {STRUCTURE_FILE} (modified or "
            "truncated): save the model again"
        )
    fp = _fp_network(structure.get("architecture"), model, folder)
    built = convert_to_step1(fp, **structure["prepare_step1"])
    layers = {layer.name: layer for layer in analyse(built)}
    for name, bounds in structure["quantized_layers"].items():
        if name not in layers:
            raise CheckpointError(
                f"{folder} quantized layer '{name}', which this network does not have: pass the "
                "FP network the model was made from"
            )
        module = built.get_submodule(name)
        c = module.weight.shape[0]
        zeros = torch.zeros(c, module.weight[0].numel())
        grid = WeightGrid.from_bounds(*bounds)
        write_back(built, layers[name], zeros, torch.ones(c), torch.zeros(c), grid)
    built = apply_boundary(
        built, structure.get("input_quantizer", False), structure.get("head_inputs", [])
    )
    load_model_weights(built, tensor_path)
    return built.eval()


__all__ = ["load", "save"]
