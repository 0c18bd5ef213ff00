"""Check an export against the fake-quant PyTorch model it came from, on a whole test set.

Three executions of the same network are compared batch by batch: the fake-quant PyTorch model
(float32, the one `tsquant eval` scored), the integer runtime, and onnxruntime. The codes of
every sparse quantizer are compared element by element; a PyTorch run in float64 separates
real disagreements from float32 rounding at the quantizer thresholds.
"""

from __future__ import annotations

import copy
import time

import torch
from tqdm import tqdm

from ..quantizers.activation import SparseQuantizer
from .format import ExportedModel
from .runtime import IntegerRuntime


def quantizer_codes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(logits, {quantizer module name: codes}) of a fake-quant model."""
    codes: dict[str, torch.Tensor] = {}
    hooks = [
        q.register_forward_hook(lambda m, inp, out, n=n: codes.__setitem__(n, m.codes(inp[0])))
        for n, q in model.named_modules()
        if isinstance(q, SparseQuantizer)
    ]
    try:
        with torch.no_grad():
            logits = model(x.to(next(model.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    return logits, codes


def verify(
    model: torch.nn.Module,
    exported: ExportedModel,
    loader,
    onnx_session=None,
    desc="verify",
    qonnx_runner=None,
) -> dict:
    """Figures for benchmarks/deploy.json: accuracies and disagreement counts on ``loader``;
    ``qonnx_runner`` (a QONNXRunner) adds the QONNX file run by qonnx's own executor."""
    model = model.eval().cpu()
    model64 = copy.deepcopy(model).double()
    runtime = IntegerRuntime(exported)
    counts = {"torch": 0, "torch64": 0, "int": 0, "onnx": 0, "qonnx": 0}
    stats = {
        "int_vs_fakequant_disagreements": 0,
        "int_vs_fakequant64_disagreements": 0,
        "onnx_vs_int_disagreements": 0,
        "qonnx_vs_int_disagreements": 0,
        "code_mismatches_float32": 0,
        "code_mismatches_float64": 0,
        "codes_compared": 0,
    }
    per_layer: dict[str, list[int]] = {}
    first_batch_agreement = None
    total = 0
    start = time.time()
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        x = x.contiguous(memory_format=torch.contiguous_format).float()
        logits32, codes32 = quantizer_codes(model, x)
        logits64, codes64 = quantizer_codes(model64, x.double())
        logits_int, codes_int = runtime.run(x, keep=True)
        pred_torch, pred_int = logits32.argmax(1), logits_int.argmax(1)
        counts["torch"] += int((pred_torch == y).sum())
        counts["int"] += int((pred_int == y).sum())
        counts["torch64"] += int((logits64.argmax(1) == y).sum())
        stats["int_vs_fakequant_disagreements"] += int((pred_torch != pred_int).sum())
        stats["int_vs_fakequant64_disagreements"] += int((logits64.argmax(1) != pred_int).sum())
        if onnx_session is not None:
            pred_onnx = torch.from_numpy(onnx_session.run(None, {"input": x.numpy()})[0]).argmax(1)
            counts["onnx"] += int((pred_onnx == y).sum())
            stats["onnx_vs_int_disagreements"] += int((pred_onnx != pred_int).sum())
        if qonnx_runner is not None:
            pred_qonnx = qonnx_runner.run(x).argmax(1)
            counts["qonnx"] += int((pred_qonnx == y).sum())
            stats["qonnx_vs_int_disagreements"] += int((pred_qonnx != pred_int).sum())
        batch_layers = {}
        for name, c in codes_int.items():
            bad32 = int((c != codes32[name].to(torch.int32)).sum())
            bad64 = int((c != codes64[name].to(torch.int32)).sum())
            stats["code_mismatches_float32"] += bad32
            stats["code_mismatches_float64"] += bad64
            stats["codes_compared"] += c.numel()
            entry = per_layer.setdefault(name, [0, 0])
            entry[0] += bad32
            entry[1] += c.numel()
            batch_layers[name] = 100.0 * (1 - bad32 / c.numel())
        if first_batch_agreement is None:
            first_batch_agreement = batch_layers
        total += y.numel()
    if total == 0:
        raise ValueError("the test loader is empty: nothing to verify")
    return {
        "test_images": total,
        "torch_top1": 100.0 * counts["torch"] / total,
        "torch64_top1": 100.0 * counts["torch64"] / total,
        "int_top1": 100.0 * counts["int"] / total,
        "onnx_top1": 100.0 * counts["onnx"] / total if onnx_session is not None else None,
        "qonnx_top1": 100.0 * counts["qonnx"] / total if qonnx_runner is not None else None,
        **stats,
        "per_layer_code_mismatches": {k: v[0] for k, v in per_layer.items()},
        "first_batch_code_agreement_percent": first_batch_agreement,
        "verify_s": time.time() - start,
    }
