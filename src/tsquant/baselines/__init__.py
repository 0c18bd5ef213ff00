"""Baselines the benchmarks compare TSQ with (not part of the TSQ method itself)."""

from .lsq import LSQActivation, LSQConv2d, LSQLinear, lsq_quantize, prepare_lsq

__all__ = ["LSQActivation", "LSQConv2d", "LSQLinear", "lsq_quantize", "prepare_lsq"]
