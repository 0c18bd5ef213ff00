"""Graph normalisation: the idioms of users' models rewritten into the modules tsquant analyses.

Before a model is analysed (``tsquant.prepare_step1``), its ``forward`` is traced with torch.fx
and rewritten, in the manner of Brevitas' functional-to-module passes:

- ``F.relu`` / ``torch.relu`` / ``x.relu()`` and their in-place forms become ``nn.ReLU``
  modules, and ``nn.ReLU(inplace=True)`` becomes an out-of-place ReLU;
- ``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.view(-1, n)`` and
  ``x.flatten(1)`` become one ``nn.Flatten`` (``torch.flatten(x, 1)`` stays as it is);
- ``F.max_pool2d``, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d`` and ``F.dropout`` become
  their modules, and ``x.mean((2, 3))`` a global average pool and a flatten;
- a conv/linear bias followed by a BatchNorm is folded into the BN's running mean (the BN
  subtracts it anyway, in training and in eval);
- ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers are unwrapped.

The result computes the same function. What cannot be rewritten is reported by
``surgery.analyse`` with the module path, the operation and the change to make.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .quantizers.activation import SparseQuantizer
from .quantizers.modules import InputQuantizer, QuantizedConv2d, QuantizedLinear

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ACTIVATIONS = (nn.ReLU, SparseQuantizer)
PASS_THROUGH = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)
SUPPORTED = WEIGHT_LAYERS + BATCH_NORMS + ACTIVATIONS + PASS_THROUGH
LEAVES = SUPPORTED + (QuantizedConv2d, QuantizedLinear, InputQuantizer)

RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
RESHAPE_METHODS = ("view", "reshape")


class SurgeryError(ValueError):
    """The model cannot be traced, rewritten or turned into a TSQ model; the message names the
    modules and the fix."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module under torch.compile / DataParallel / DistributedDataParallel wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAVES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """The model as an fx graph whose leaves are the modules tsquant understands."""
    model = unwrap(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SurgeryError(
            f"cannot trace {type(model).__name__}.forward with torch.fx ({type(exc).__name__}: "
            f"{reason}); remove data-dependent Python control flow (if/for on tensor values) "
            "from forward()"
        ) from None
    return torch.fx.GraphModule(model, graph)


def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_batch_size(arg, source) -> bool:
    """arg is x.size(0) or x.shape[0] (of any tensor: the batch dimension)."""
    if not isinstance(arg, torch.fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return _arg(arg, 1, "dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        inner = arg.args[0]
        return isinstance(inner, torch.fx.Node) and (
            (inner.op == "call_function" and inner.target is getattr and inner.args[1] == "shape")
            or (inner.op == "call_method" and inner.target == "size" and len(inner.args) == 1)
        )
    return False


def _flatten_from_one(node: torch.fx.Node) -> bool:
    """True when the node flattens every dimension after the batch one into one."""
    if node.op == "call_method" and node.target in RESHAPE_METHODS:
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], tuple | list):
            shape = tuple(shape[0])
        if len(shape) != 2:
            return False
        first, second = shape
        if _is_batch_size(first, node.args[0]):
            return second == -1 or isinstance(second, int)
        return first == -1 and isinstance(second, int) and second > 0
    if node.op == "call_method" and node.target == "flatten":  # torch.flatten is exportable
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    return False


def _module_for(node: torch.fx.Node) -> nn.Module | None:
    """The module that replaces a functional node, or None when it stays as it is."""
    target = node.target
    if (node.op == "call_function" and target in RELU_FUNCTIONS) or (
        node.op == "call_method" and target in RELU_METHODS
    ):
        return nn.ReLU()
    if _flatten_from_one(node):
        return nn.Flatten(1)
    if node.op == "call_method" and target == "mean" and not _arg(node, 2, "keepdim", False):
        dims = _arg(node, 1, "dim")
        if isinstance(dims, tuple | list) and sorted(dims) in ([2, 3], [-2, -1]):
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))  # global average pool
    if node.op != "call_function":
        return None
    if target is F.max_pool2d:
        if _arg(node, 6, "return_indices", False):
            return None
        kernel = _arg(node, 1, "kernel_size")
        return nn.MaxPool2d(
            kernel,
            _arg(node, 2, "stride") or kernel,
            _arg(node, 3, "padding", 0),
            _arg(node, 4, "dilation", 1),
            ceil_mode=_arg(node, 5, "ceil_mode", False),
        )
    if target is F.avg_pool2d:
        kernel = _arg(node, 1, "kernel_size")
        return nn.AvgPool2d(
            kernel,
            _arg(node, 2, "stride") or kernel,
            _arg(node, 3, "padding", 0),
            ceil_mode=_arg(node, 4, "ceil_mode", False),
            count_include_pad=_arg(node, 5, "count_include_pad", True),
            divisor_override=_arg(node, 6, "divisor_override"),
        )
    if target is F.adaptive_avg_pool2d:
        return nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size"))
    if target is F.dropout:
        return nn.Dropout(_arg(node, 1, "p", 0.5))
    return None


def _free_name(gm: nn.Module, node: torch.fx.Node, kind: str) -> str:
    """A submodule name beside the module whose forward made the call: ``layer1.0.relu``."""
    stack = node.meta.get("nn_module_stack") or {}
    parent = next(reversed(stack.keys()), "") if stack else ""
    owner = gm.get_submodule(parent) if parent else gm
    prefix = f"{parent}." if parent else ""
    name, k = kind, 0
    while hasattr(owner, name):
        k += 1
        name = f"{kind}_{k}"
    return prefix + name


def _fold_bias_into_bn(gm: torch.fx.GraphModule) -> bool:
    """conv/linear(bias) -> BN: the bias moves into the BN's running mean (exact)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        layer = gm.get_submodule(node.target)
        user = next(iter(node.users))
        if not isinstance(layer, WEIGHT_LAYERS) or layer.bias is None or user.op != "call_module":
            continue
        bn = gm.get_submodule(user.target)
        if not isinstance(bn, BATCH_NORMS) or bn.running_mean is None:
            continue
        with torch.no_grad():
            bn.running_mean.sub_(layer.bias.to(bn.running_mean.dtype))
        layer.bias = None
        changed = True
    return changed


def _is_inplace(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        return node.target in (F.relu_, torch.relu_) or node.kwargs.get("inplace") is True
    return False


def _explicit_inplace_data_flow(gm: torch.fx.GraphModule) -> bool:
    """`out.relu_(); return out`: later uses of an in-place op's operand read its result."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    changed = False
    for node in gm.graph.nodes:
        if not _is_inplace(node, gm) or not isinstance(node.args[0], torch.fx.Node):
            continue
        operand = node.args[0]
        for user in list(operand.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(operand, node)
                changed = True
    return changed


def normalise(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the idioms above rewritten; the model itself is not changed.

    Returns a deep copy of the (unwrapped) model when nothing needed rewriting, else an fx
    GraphModule with the same submodule names and state-dict keys plus any new modules."""
    gm = trace(copy.deepcopy(unwrap(model)))
    changed = _fold_bias_into_bn(gm)
    changed |= _explicit_inplace_data_flow(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.ReLU) and module.inplace:
                module.inplace = False
                changed = True
            continue
        replacement = _module_for(node)
        if replacement is None:
            continue
        kind = (
            "avgpool"
            if isinstance(replacement, nn.Sequential)
            else type(replacement).__name__.lower()
        )
        name = _free_name(gm, node, kind)
        gm.add_submodule(name, replacement)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if not changed:
        return unwrap(copy.deepcopy(model))
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


__all__ = ["SurgeryError", "normalise", "trace", "unwrap"]
