"""Model surgery: the one place that walks a model and rewrites it.

``analyse`` traces the model with torch.fx and finds every chain

    Conv2d/Linear -> BatchNorm (no affine) -> [+ shortcut] -> ReLU

``convert_to_step1`` turns a trained FP model into the step-1 TSQ model (TSQ-METHOD.md, step 1):
affine BNs are folded into the previous layer and replaced by non-affine BNs, and every ReLU
becomes a :class:`SparseQuantizer`. ``write_back`` puts a step-2 solution into the model.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx
from torch import nn

from .normalise import (
    ACTIVATIONS,
    BATCH_NORMS,
    LEAVES,
    WEIGHT_LAYERS,
    SurgeryError,
    normalise,
    trace,
)
from .quantizers.activation import SparseQuantizer
from .quantizers.modules import InputQuantizer, QuantizedConv2d, QuantizedLinear

UNSUPPORTED_FUNCTIONS = {
    "relu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardtanh",
    "relu6",
    "leaky_relu",
    "elu",
    "softplus",
    "hardswish",
    "mish",
}
ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class Layer:
    """One weight layer of the model and what step 2 must do with it.

    kind: "coded" (conv/linear -> BN -> [add] -> Q: target = step-1 codes),
          "linear" (conv/linear -> BN -> add, the other operand being a coded chain: target = the
          step-1 BN output) or "head" (no activation after it: target = step-1 outputs).
    """

    name: str
    kind: str
    bn: str | None = None
    activation: str | None = None
    residual: bool = False
    feeds: list[str] = field(default_factory=list)  # linear layers added into this chain
    first: bool = False
    last: bool = False


def _module_of(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(gm, node, types) -> bool:
    return node is not None and isinstance(_module_of(gm, node), types)


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def analyse(model: nn.Module) -> list[Layer]:
    """Weight layers in topological order, each with its role for step 2.

    Raises SurgeryError listing every unsupported module or activation by qualified name.
    """
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    problems = []
    for node in nodes:
        module = _module_of(gm, node)
        if module is not None and not isinstance(module, LEAVES):
            problems.append(f"{node.target} ({type(module).__name__})")
        if node.op in ("call_function", "call_method"):
            fname = getattr(node.target, "__name__", str(node.target))
            if fname.rstrip("_") == "relu":
                problems.append(
                    f"{node.name} (functional relu: tsquant.prepare_step1 or "
                    "tsquant.normalise.normalise rewrites it into a module; analyse their result)"
                )
            elif fname.rstrip("_") in UNSUPPORTED_FUNCTIONS:
                problems.append(
                    f"{node.name} (functional {fname} in forward(); TSQ quantizes ReLU "
                    "activations: use F.relu or nn.ReLU there)"
                )
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            problems.append(f"{node.target} (grouped Conv2d, groups={module.groups})")
    if problems:
        raise SurgeryError(
            "unsupported modules: "
            + ", ".join(problems)
            + " — tsquant handles Conv2d/Linear/BatchNorm/ReLU/pooling/residual adds"
        )

    calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    reused = [
        f"{n} ({k} call sites)"
        for n, k in calls.items()
        if k > 1 and isinstance(gm.get_submodule(n), ACTIVATIONS + WEIGHT_LAYERS + BATCH_NORMS)
    ]
    if reused:
        raise SurgeryError(
            "modules used more than once: "
            + ", ".join(reused)
            + " — give every call site its own module instance"
        )

    weight_nodes = [n for n in nodes if _is(gm, n, WEIGHT_LAYERS)]
    if not weight_nodes:
        raise SurgeryError("the model has no Conv2d/Linear layer to quantize")
    layers: dict[str, Layer] = {n.target: Layer(n.target, "head") for n in weight_nodes}

    def bn_chain(node):
        """BN node fed directly by a weight layer, else None."""
        if _is(gm, node, BATCH_NORMS) and _is(gm, node.args[0], WEIGHT_LAYERS):
            return node
        return None

    for node in nodes:
        if not _is(gm, node, ACTIVATIONS):
            continue
        src = node.args[0]
        bn = bn_chain(src)
        if bn is not None:
            layers[bn.args[0].target] = Layer(bn.args[0].target, "coded", bn.target, node.target)
            continue
        if _is_add(src):
            operands = [a for a in src.args if isinstance(a, torch.fx.Node)]
            chains = [bn_chain(a) for a in operands]
            if any(c is not None for c in chains):
                # the main branch is the chain with the widest layer (3x3 conv vs a 1x1
                # projection shortcut); the others are solved first, as linear targets
                candidates = [c for c in chains if c is not None]
                main = max(
                    candidates, key=lambda c: gm.get_submodule(c.args[0].target).weight[0].numel()
                )
                conv_name = main.args[0].target
                layer = Layer(conv_name, "coded", main.target, node.target, residual=True)
                for c in chains:
                    if c is not None and c is not main:
                        layers[c.args[0].target] = Layer(c.args[0].target, "linear", c.target)
                        layer.feeds.append(c.args[0].target)
                layers[conv_name] = layer
                continue
        raise SurgeryError(
            f"activation '{node.target}' is not preceded by BatchNorm (directly or through a "
            "residual add): put a BatchNorm after the layer that feeds it"
        )
    ordered = []
    for n in weight_nodes:  # topological, with linear feeders moved before their chain
        layer = layers[n.target]
        if layer.kind == "linear" and layer in ordered:
            continue
        ordered += [layers[f] for f in layer.feeds if layers[f] not in ordered]
        if layer not in ordered:
            ordered.append(layer)
    for layer in ordered:
        layer.first = layer is ordered[0]
        layer.last = layer is ordered[-1]
    return ordered


def _head_input_activations(model: nn.Module, layers: list[Layer]) -> set[str]:
    """Activations whose output only reaches the last layer (through pooling/flatten)."""
    gm = trace(model)
    head = layers[-1].name
    found = set()
    for node in gm.graph.nodes:
        if not _is(gm, node, ACTIVATIONS):
            continue
        frontier, reaches = list(node.users), []
        while frontier:
            user = frontier.pop()
            if _is(gm, user, WEIGHT_LAYERS) or user.op == "output":
                reaches.append(user.target)
            elif _is(gm, user, ACTIVATIONS) or _is(gm, user, BATCH_NORMS) or _is_add(user):
                reaches.append(None)
            else:
                frontier.extend(user.users)
        if reaches and all(r == head for r in reaches):
            found.add(node.target)
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _fold_affine_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold an affine BN into the layer before and return the non-affine BN that follows it.

    The step-1 quantizer needs a normalised pre-activation, so only the sign of gamma survives:
    conv' = sign(gamma) (conv - mu) / sigma exactly, and the new BN (mean 0, variance 1 - eps)
    is the identity on it until training re-estimates its statistics. beta and |gamma| are
    dropped; step-1 training re-learns what they did.
    """
    with torch.no_grad():
        sign = torch.where(bn.weight < 0, -1.0, 1.0).to(bn.running_var.dtype)
        scale = sign / torch.sqrt(bn.running_var + bn.eps)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(scale.reshape(shape))
        old_bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = scale * (old_bias - bn.running_mean)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)
        new_bn = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=False)
        new_bn.running_mean.zero_()
        new_bn.running_var.fill_(1 - bn.eps)
    return new_bn.to(bn.running_mean.device)


def convert_to_step1(
    model: nn.Module,
    bits: int = 2,
    eps: float = 0.32,
    keep_head_input_fp: bool = True,
    inplace: bool = False,
    affine_bn: str = "fold",
) -> nn.Module:
    """FP model -> step-1 model, the conversion of :func:`tsquant.prepare_step1` (which adds
    the export check and documents the options)."""
    if affine_bn not in ("fold", "keep"):
        raise SurgeryError(f"affine_bn must be 'fold' or 'keep', got {affine_bn!r}")
    prepared = normalise(model)
    if inplace:
        if isinstance(prepared, torch.fx.GraphModule) and not isinstance(
            model, torch.fx.GraphModule
        ):
            raise SurgeryError(
                "the model's forward() needs rewriting (functional ReLUs, view-flatten or conv "
                "biases): call prepare_step1 without inplace=True and use the model it returns"
            )
        prepared = model
    layers = analyse(prepared)
    keep_fp = _head_input_activations(prepared, layers) if keep_head_input_fp else set()
    for layer in layers:
        if layer.bn is None:
            continue
        bn = prepared.get_submodule(layer.bn)
        if bn.affine and affine_bn == "fold":
            set_module(prepared, layer.bn, _fold_affine_bn(prepared.get_submodule(layer.name), bn))
        if layer.activation is not None and layer.activation not in keep_fp:
            set_module(
                prepared, layer.activation, SparseQuantizer.from_gaussian(bits=bits, eps=eps)
            )
    # what tsquant.save records to rebuild this structure
    options = {"bits": bits, "eps": eps, "keep_head_input_fp": keep_head_input_fp}
    set_record(prepared, "tsquant_step1", {**options, "affine_bn": affine_bn})
    return prepared


def set_record(model: nn.Module, key: str, value: dict) -> None:
    """Keep what tsquant did to a model on the model itself (it survives deepcopy)."""
    setattr(model, key, value)
    if isinstance(model, torch.fx.GraphModule):  # its deepcopy keeps `meta`, not attributes
        model.meta[key] = value


def get_record(model: nn.Module, key: str) -> dict | None:
    found = getattr(model, key, None)
    if found is None and isinstance(model, torch.fx.GraphModule):
        found = model.meta.get(key)
    return found


def swap_for_qat(
    model: nn.Module,
    weight_factory,
    activation_factory,
    first_layer: str = "fp",
    last_layer: str = "fp",
    keep_head_input_fp: bool = True,
) -> nn.Module:
    """A copy of ``model`` for quantization-aware training baselines: the quantizable weight
    layers become ``weight_factory(layer)`` and the activations ``activation_factory()``, with
    the same first/last/head-input policy as TSQ."""
    model = normalise(model)
    layers = analyse(model)
    keep_fp = _head_input_activations(model, layers) if keep_head_input_fp else set()
    for layer in quantizable_layers(layers, first_layer, last_layer):
        set_module(model, layer.name, weight_factory(model.get_submodule(layer.name)))
    for layer in layers:
        if layer.activation is not None and layer.activation not in keep_fp:
            set_module(model, layer.activation, activation_factory())
    return model


INT8 = "narrow:8"  # the boundary layers' format: per-channel symmetric 8-bit weights
BoundaryPolicy = Literal["fp", "quantize", "int8"]  # the first and last layers: see transform


def add_input_quantizer(model: nn.Module, quantizer: InputQuantizer) -> nn.Module:
    """``model`` with ``quantizer`` applied to its input (an fx rewrite; module names and
    state-dict keys are kept, plus ``input_quantizer.qparams``)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    gm.add_submodule("input_quantizer", quantizer)
    with gm.graph.inserting_after(placeholder):
        node = gm.graph.call_module("input_quantizer", (placeholder,))
    placeholder.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.recompile()
    for key in ("tsquant_step1", "tsquant_step2"):
        if get_record(model, key) is not None:
            set_record(gm, key, get_record(model, key))
    return gm


def head_input_activations(model: nn.Module) -> list[str]:
    """The activations that feed only the last layer (the head's input)."""
    return sorted(_head_input_activations(model, analyse(model)))


def apply_boundary(model: nn.Module, input_quantizer: bool, head_inputs: list[str]) -> nn.Module:
    """The int8 boundary of a transformed model's structure (for loading its checkpoint): an
    input quantizer and 8-bit head-input quantizers, their parameters to be loaded."""
    for name in head_inputs:
        set_module(model, name, SparseQuantizer(bits=8, eps=0.0))
    return add_input_quantizer(model, InputQuantizer()) if input_quantizer else model


def quantizable_layers(layers: list[Layer], first_layer: str = "fp", last_layer: str = "fp"):
    """Layers step 2 replaces, after the first/last layer policy ("fp" or a weight format)."""
    out = []
    for layer in layers:
        if layer.first and first_layer == "fp":
            continue
        if layer.last and last_layer == "fp":
            continue
        out.append(layer)
    return out


def bn_affine(model: nn.Module, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with BN(conv(x)) = scale * conv_nobias(x) + shift per output channel."""
    module = model.get_submodule(layer.name)
    c = module.weight.shape[0]
    device = module.weight.device
    bias = module.bias.detach() if module.bias is not None else torch.zeros(c, device=device)
    if layer.bn is None:
        return torch.ones(c, device=device), bias
    return batchnorm_affine(model.get_submodule(layer.bn), bias)


def batchnorm_affine(
    bn: nn.Module, input_bias=None, dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN(x + input_bias) as scale * x + shift per channel (in dtype if given)."""
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    if dtype is not None:
        mean, var = mean.to(dtype), var.to(dtype)
    sigma = torch.sqrt(var + bn.eps)
    scale = 1 / sigma
    shift = (-mean if input_bias is None else input_bias.to(mean.dtype) - mean) / sigma
    if bn.affine:
        weight, beta = bn.weight.detach().to(mean.dtype), bn.bias.detach().to(mean.dtype)
        scale, shift = scale * weight, shift * weight + beta
    return scale, shift


def write_back(model: nn.Module, layer: Layer, codes, alpha, bias, grid) -> None:
    """Replace the layer by its quantized twin (BN folded into alpha and bias) and the BN by
    Identity: output = codes * alpha (*) x + bias."""
    module = model.get_submodule(layer.name)
    if isinstance(module, nn.Conv2d):
        new = QuantizedConv2d.from_conv(module, grid)
    else:
        new = QuantizedLinear.from_linear(module, grid)
    new.set_quantized(codes, alpha, bias)
    set_module(model, layer.name, new)
    if layer.bn is not None:
        set_module(model, layer.bn, nn.Identity())


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Raise SurgeryError naming the first parameter or buffer holding NaN/Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SurgeryError(
                f"{what} has NaN/Inf in '{name}': the checkpoint is broken (diverged training?); "
                "retrain or use an earlier checkpoint"
            )


def check_weights_on_grid(model: nn.Module) -> bool:
    """True when every quantized layer's weight is exactly alpha * grid integer."""
    for m in model.modules():
        if isinstance(m, QuantizedConv2d | QuantizedLinear):
            w = m.weight.detach()
            rebuilt = m.weight_codes.float() * m._alpha_view().detach()
            if not torch.allclose(w, rebuilt, rtol=0, atol=1e-6 * float(w.abs().max()) + 1e-12):
                return False
    return True


def quantized_skeleton(step1_model: nn.Module, layer_names: list[str], grid) -> nn.Module:
    """The structure of a transformed model (for loading its checkpoint): the named layers
    become quantized layers and their BNs Identity, exactly as :func:`write_back` leaves them.
    ``grid``: one weight format for all, or {layer name: format}."""
    model = copy.deepcopy(step1_model)
    by_name = {layer.name: layer for layer in analyse(model)}
    unknown = [n for n in layer_names if n not in by_name]
    if unknown:
        raise SurgeryError(
            f"layers {unknown} are not weight layers of this model: "
            "the checkpoint comes from a different architecture"
        )
    for name in layer_names:
        module = model.get_submodule(name)
        c = module.weight.shape[0]
        zeros = torch.zeros_like(module.weight).reshape(c, -1)
        layer_grid = grid[name] if isinstance(grid, dict) else grid
        write_back(model, by_name[name], zeros, torch.ones(c), torch.zeros(c), layer_grid)
    return model


__all__ = [
    "Layer",
    "SurgeryError",
    "analyse",
    "convert_to_step1",
    "write_back",
    "quantizable_layers",
    "bn_affine",
    "check_finite",
    "swap_for_qat",
    "trace",
    "check_weights_on_grid",
    "quantized_skeleton",
]
