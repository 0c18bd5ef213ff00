"""tsquant: Two-Step Quantization (Wang et al., CVPR 2018) for PyTorch CNNs.

Step 1 (code learning): :class:`SparseQuantizer` and :func:`prepare_step1`.
Step 2 (transformation-function learning): :func:`solve_layer` for one layer and
:func:`transform` for a whole model.
"""

from .quantizers import (
    InputQuantizer,
    QuantizedConv2d,
    QuantizedLinear,
    SparseQuantizer,
    WeightGrid,
    ternarize,
)
from .serialization import load, save
from .solver import LayerSolution, SolverConfig, solve_layer
from .surgery import SurgeryError, analyse, prepare_step1
from .transform import TransformConfig, transform

__version__ = "0.1.0"

__all__ = [
    "InputQuantizer",
    "LayerSolution",
    "QuantizedConv2d",
    "QuantizedLinear",
    "SolverConfig",
    "SparseQuantizer",
    "SurgeryError",
    "TransformConfig",
    "WeightGrid",
    "analyse",
    "load",
    "save",
    "prepare_step1",
    "solve_layer",
    "ternarize",
    "transform",
    "__version__",
]
