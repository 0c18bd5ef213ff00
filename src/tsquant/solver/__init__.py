"""Step 2 as pure tensor math (TSQ-METHOD.md, "Step 2"): no model knowledge.

The public layer-problem interface: :class:`LayerProblem` (one layer's captured rows, targets
and residual offsets, with its scoring: codes, agreement, the true error), the closed-form
steps of the alternation (:func:`alpha_step`, :func:`coordinate_descent_wstep`), the starts
(:func:`initial_weights`, :mod:`.rounding`), the solvers (:func:`solve_layer`,
:func:`solve_linear_layer`) and the streamed statistics they need.
"""

from .alternation import (
    LayerProblem,
    LayerSolution,
    SolverConfig,
    alpha_step,
    coordinate_descent_wstep,
    initial_weights,
    solve_layer,
    solve_linear_layer,
)
from .statistics import GramAccumulator, cross, gram

__all__ = [
    "GramAccumulator",
    "LayerProblem",
    "LayerSolution",
    "SolverConfig",
    "alpha_step",
    "coordinate_descent_wstep",
    "cross",
    "gram",
    "initial_weights",
    "solve_layer",
    "solve_linear_layer",
]
