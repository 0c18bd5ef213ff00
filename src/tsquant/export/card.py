"""Model card of an export: sizes, bit widths, sparsity and the multiplications TSQ removes."""

from __future__ import annotations

from pathlib import Path

import torch

from .format import TENSOR_FILE, ExportedModel
from .runtime import IntegerRuntime, multiplications


def model_card(exported: ExportedModel, export_dir: Path, sample: torch.Tensor | None) -> dict:
    """Figures about the exported model; activation sparsity is measured on ``sample``."""
    t = exported.tensors
    params = fp_params = 0
    layers = []
    macs = multiplications(exported)
    for node in exported.nodes:
        op = node["op"]
        if op not in ("conv", "qconv", "linear", "qlinear"):
            params += sum(t[k].numel() for k in node["tensors"].values())
            continue
        quantized = op.startswith("q")
        weight = t[node["tensors"]["codes" if quantized else "weight"]]
        extra = sum(
            t[k].numel() for r, k in node["tensors"].items() if r not in ("codes", "weight")
        )
        params += weight.numel() + extra
        fp_params += weight.numel() + (
            t[node["tensors"]["bias"]].numel() if "bias" in node["tensors"] else 0
        )
        layers.append(
            {
                "name": node["attrs"].get("module", node["name"]),
                "op": op,
                "weight_bits": node["attrs"]["codes_bits"] if quantized else 32,
                "grid": node["attrs"]["grid"] if quantized else "fp32",
                "weights": weight.numel(),
                "zero_weights": float((weight == 0).double().mean()) if quantized else None,
                "macs_per_sample": macs[node["name"]],
            }
        )
    quant_weights = sum(r["weights"] for r in layers if r["weight_bits"] != 32)
    quant_zero = sum(r["zero_weights"] * r["weights"] for r in layers if r["weight_bits"] != 32)
    weight_bits = sum(r["weights"] * r["weight_bits"] for r in layers)
    total_macs = sum(r["macs_per_sample"] for r in layers)
    quant_macs = sum(r["macs_per_sample"] for r in layers if r["weight_bits"] != 32)
    activations = {}
    if sample is not None:
        _, codes = IntegerRuntime(exported).run(sample, keep=True)
        activations = {name: float((c == 0).double().mean()) for name, c in codes.items()}
    size = (Path(export_dir) / TENSOR_FILE).stat().st_size
    return {
        "parameters": params,
        "fp32_size_bytes": 4 * fp_params,
        "size_bytes": size,
        "compression": 4 * fp_params / size,
        "mean_bits_per_weight": weight_bits / max(1, sum(r["weights"] for r in layers)),
        "quantized_weight_fraction": quant_weights / max(1, sum(r["weights"] for r in layers)),
        "zero_weight_fraction": quant_zero / max(1, quant_weights),
        "macs_per_sample": total_macs,
        "multiplications_removed_per_sample": quant_macs,
        "multiplications_removed_fraction": quant_macs / max(1, total_macs),
        "zero_activation_fraction": activations,
        "activation_sample_size": 0 if sample is None else int(sample.shape[0]),
        "layers": layers,
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}T"


def format_card(card: dict) -> str:
    lines = [
        "tsquant model card",
        f"  parameters            {card['parameters']:,}",
        f"  size                  {card['size_bytes']:,} bytes (FP32 {card['fp32_size_bytes']:,}, "
        f"{card['compression']:.1f}x smaller)",
        f"  bits per weight       {card['mean_bits_per_weight']:.2f} on average "
        f"({100 * card['quantized_weight_fraction']:.1f}% of weights quantized)",
        f"  zero weights          {100 * card['zero_weight_fraction']:.1f}% of quantized weights",
        f"  multiply-accumulates  {_human(card['macs_per_sample'])} per sample; "
        f"{_human(card['multiplications_removed_per_sample'])} "
        f"({100 * card['multiplications_removed_fraction']:.1f}%) become additions/subtractions "
        "of activation codes",
    ]
    if card["zero_activation_fraction"]:
        lines.append(
            f"  zero activations      (measured on {card['activation_sample_size']} samples)"
        )
        width = max(len(n) for n in card["zero_activation_fraction"])
        for name, frac in card["zero_activation_fraction"].items():
            lines.append(f"    {name:<{width}}  {100 * frac:5.1f}%")
    lines.append("  layers")
    for r in card["layers"]:
        zeros = "" if r["zero_weights"] is None else f", {100 * r['zero_weights']:.1f}% zero"
        grid = "FP32" if r["grid"] == "fp32" else f"{r['grid']} ({r['weight_bits']:g} bits packed)"
        lines.append(
            f"    {r['name']}: {r['op']}, {grid} weights{zeros}, "
            f"{_human(r['macs_per_sample'])} MACs"
        )
    return "\n".join(lines)


__all__ = ["format_card", "model_card"]
