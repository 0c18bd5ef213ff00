"""Step 2 as pure tensor math: statistics and the alternating solver."""

from .alternation import LayerSolution, SolverConfig, solve_layer, solve_linear_layer
from .statistics import GramAccumulator, cross, gram

__all__ = [
    "GramAccumulator",
    "LayerSolution",
    "SolverConfig",
    "cross",
    "gram",
    "solve_layer",
    "solve_linear_layer",
]
