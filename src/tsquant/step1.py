"""Step 1's entry point (TSQ-METHOD.md, step 1): an FP model becomes the step-1 model, and an
operation the integer export could not write is reported before any training."""

from __future__ import annotations

from torch import nn

from .export.graph import check_exportable
from .surgery import convert_to_step1


def prepare_step1(
    model: nn.Module,
    bits: int = 2,
    eps: float = 0.32,
    keep_head_input_fp: bool = True,
    inplace: bool = False,
    affine_bn: str = "fold",
    check_export: bool = True,
) -> nn.Module:
    """FP model -> step-1 model: ReLUs replaced by sparse quantizers.

    The model is first normalised (:mod:`tsquant.normalise`: functional ReLUs, view-flattens,
    conv biases, torch.compile wrappers), so users' models work as they are written.
    ``affine_bn``: "fold" (the paper's non-affine BN before each quantizer: gamma's sign and the
    statistics are folded into the layer, |gamma| and beta dropped for step 1 to re-learn) or
    "keep" (affine BNs stay as they are, trainable; the converted model computes the FP
    network's pre-activations exactly, and step 2 folds gamma and beta into alpha and the bias).
    ``keep_head_input_fp`` keeps a full-precision ReLU on the input of the last layer, as in the
    authors' released AlexNet (spec, "Released AlexNet layout"). ``check_export`` reports, before
    any training, an operation the integer export could not write (surgery.convert_to_step1
    is the conversion alone).
    """
    prepared = convert_to_step1(model, bits, eps, keep_head_input_fp, inplace, affine_bn)
    if check_export:
        check_exportable(prepared, "pass check_export=False to quantize without the export")
    return prepared
