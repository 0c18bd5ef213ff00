"""Quantizers: pure tensor functions first, thin modules on top."""

from .activation import (
    SparseQuantizer,
    codes_to_values,
    eps_for_sparsity,
    gaussian_optimal_step,
    quantize_codes,
    sparse_quantize,
    values_to_codes,
)
from .modules import InputQuantizer, QuantizedConv2d, QuantizedLinear
from .weight import WeightGrid, dequantize, quantize_to_grid, ternarize

__all__ = [
    "InputQuantizer",
    "QuantizedConv2d",
    "QuantizedLinear",
    "SparseQuantizer",
    "WeightGrid",
    "codes_to_values",
    "dequantize",
    "eps_for_sparsity",
    "gaussian_optimal_step",
    "quantize_codes",
    "quantize_to_grid",
    "sparse_quantize",
    "ternarize",
    "values_to_codes",
]
