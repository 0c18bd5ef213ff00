"""Baselines the benchmarks compare TSQ with (not part of the TSQ method itself)."""

from .brevitas_gptq import brevitas_gptq, prepare_brevitas
from .lsq import LSQActivation, LSQConv2d, LSQLinear, lsq_quantize, prepare_lsq

__all__ = [
    "brevitas_gptq",
    "prepare_brevitas",
    "LSQActivation",
    "LSQConv2d",
    "LSQLinear",
    "lsq_quantize",
    "prepare_lsq",
]
