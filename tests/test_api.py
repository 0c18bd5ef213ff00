"""The README's "Python API" example, run verbatim."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

# Kept character for character as in the README ("Python API"): edit both together.
README_EXAMPLE = """\
import torch, tsquant
from tsquant.models import build_model
model = build_model("small_cnn", in_channels=1, image_size=28)   # a trained FP model in practice
calib = [(torch.randn(64, 1, 28, 28), None) for _ in range(4)]  # calibration batches
step1 = tsquant.prepare_step1(model, bits=2, eps=0.32)          # ReLU -> sparse 2-bit quantizer
# ... train step1 (FP weights, 2-bit activations) here: `tsquant codes` does it for you ...
model_q = tsquant.transform(step1.eval(), calib, tsquant.TransformConfig(weight_bits="ternary"))
print(model_q(torch.randn(2, 1, 28, 28)).shape)                  # ternary W, 2-bit A
"""

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example(capsys):
    from tsquant import QuantizedConv2d, SparseQuantizer
    from tsquant.surgery import check_weights_on_grid

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    namespace: dict = {}
    try:
        exec(compile(README_EXAMPLE, "README.md (Python API)", "exec"), namespace)
    finally:
        torch.set_num_threads(previous)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "torch.Size([2, 10])"

    model_q = namespace["model_q"]
    quantized = {n: m for n, m in model_q.named_modules() if isinstance(m, QuantizedConv2d)}
    assert set(quantized) == {"conv2.conv", "conv3.conv", "conv4.conv"}
    for module in quantized.values():
        assert set(module.weight_codes.unique().tolist()) <= {-1, 0, 1}
    assert check_weights_on_grid(model_q)
    assert sum(isinstance(m, SparseQuantizer) for m in model_q.modules()) == 3
    assert sum(isinstance(m, SparseQuantizer) for m in namespace["step1"].modules()) == 3


def test_readme_carries_the_tested_example():
    if not README.exists():
        pytest.skip("README.md not written yet")
    text = README.read_text(encoding="utf-8")
    if not re.search(r"^#+\s*Python API", text, flags=re.MULTILINE):
        pytest.skip("README.md has no 'Python API' section yet")
    assert README_EXAMPLE in text, "README's Python API example differs from tests/test_api.py"
