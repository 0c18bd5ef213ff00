"""tsquant: Two-Step Quantization (Wang et al., CVPR 2018) for PyTorch CNNs.

Step 1 (code learning): :class:`SparseQuantizer` and :func:`prepare_step1`.
Step 2 (transformation-function learning): :func:`solve_layer` for one layer and
:func:`transform` for a whole model.
"""

from .baselines.adaround import AdaRoundConfig
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
from .step1 import prepare_step1
from .surgery import SurgeryError, analyse
from .transform import MemoryConfig, OTWAConfig, TransformConfig, register_step2_method, transform
from .version import __version__

__all__ = [
    "AdaRoundConfig",
    "InputQuantizer",
    "LayerSolution",
    "MemoryConfig",
    "OTWAConfig",
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
    "register_step2_method",
    "solve_layer",
    "ternarize",
    "transform",
    "__version__",
]
