"""The README's quick-start Python example, run verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import torch

# Kept character for character as in the README ("Quick start"): edit both together.
README_EXAMPLE = """\
import torch, tsquant
from tsquant.models import build_model
model = build_model("small_cnn", in_channels=1, image_size=28)   # a trained FP model in practice
calib = [(torch.randn(64, 1, 28, 28), None) for _ in range(4)]  # calibration batches
step1 = tsquant.prepare_step1(model, bits=2, eps=0.32)          # ReLU -> sparse 2-bit quantizer
# ... train step1 (FP weights, 2-bit activations) here: `tsquant codes` does it for you ...
model_q = tsquant.transform(step1, calib, tsquant.TransformConfig(weight_bits="ternary"))
tsquant.save(model_q, "my_model")                               # safetensors + JSON, no pickle
"""

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example(tmp_path, monkeypatch):
    from tsquant import QuantizedConv2d, SparseQuantizer
    from tsquant import load as tsquant_load
    from tsquant.surgery import check_weights_on_grid

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace: dict = {}
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(README_EXAMPLE, "README.md (Python API)", "exec"), namespace)
    finally:
        torch.set_num_threads(previous)
    model_q = namespace["model_q"]
    quantized = {n: m for n, m in model_q.named_modules() if isinstance(m, QuantizedConv2d)}
    assert set(quantized) == {"conv2.conv", "conv3.conv", "conv4.conv"}
    for module in quantized.values():
        assert set(module.weight_codes.unique().tolist()) <= {-1, 0, 1}
    assert check_weights_on_grid(model_q)
    assert sum(isinstance(m, SparseQuantizer) for m in model_q.modules()) == 3
    assert sum(isinstance(m, SparseQuantizer) for m in namespace["step1"].modules()) == 3
    loaded = tsquant_load(tmp_path / "my_model", model=namespace["model"])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model_q.eval()(x))


def test_readme_carries_the_tested_example():
    text = README.read_text(encoding="utf-8")
    assert re.search(r"^## Quick start", text, flags=re.MULTILINE)
    assert README_EXAMPLE in text, "README's quick-start example differs from tests/test_api.py"
