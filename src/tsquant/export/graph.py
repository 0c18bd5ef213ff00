"""The exported architecture graph: a TSQ model as a list of plain, JSON-describable operations.

Each node is ``{"name", "op", "inputs": [node names], "attrs": {...}, "tensors": {role: key}}``;
tensors live in the export's safetensors file under ``key``. The same graph drives the integer
runtime (:mod:`.runtime`) and the ONNX writer (:mod:`.onnx_export`), so neither needs the
Python model class.

Ops: input, conv, qconv, linear, qlinear, affine (an eval-mode BatchNorm), quantize (the sparse
activation quantizer), relu, add, maxpool, avgpool, global_avgpool, flatten, slice, pad, output.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.activation import SparseQuantizer
from ..quantizers.modules import InputQuantizer, QuantizedConv2d, QuantizedLinear
from ..surgery import ADDS, SurgeryError, batchnorm_affine, trace


class ExportError(ValueError):
    """The model or the export file cannot be exported/loaded; the message says why and what to do."""


OPS = (
    "input quantize_input conv qconv linear qlinear affine quantize relu add maxpool avgpool "
    "global_avgpool flatten slice pad output"
).split()


@dataclass(frozen=True)
class Node:
    """One operation of the exported graph, as the backends (runtime, ONNX, card) read it; the
    manifest stores it as a plain dict (:meth:`to_dict`)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict
    tensors: dict  # role -> key in the export's tensors

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        return cls(d["name"], d["op"], tuple(d["inputs"]), dict(d["attrs"]), dict(d["tensors"]))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "inputs": list(self.inputs),
            "attrs": self.attrs,
            "tensors": self.tensors,
        }

    def tensor(self, tensors: dict, role: str):
        """The node's tensor in ``role`` (None when it has none, e.g. no bias)."""
        key = self.tensors.get(role)
        return None if key is None else tensors[key]

    def float_weight(self, tensors: dict) -> torch.Tensor:
        """The layer's weights in float64: codes * alpha per output channel when quantized."""
        if self.op in ("qconv", "qlinear"):
            codes = self.tensor(tensors, "codes").double()
            alpha = self.tensor(tensors, "alpha").double()
            return codes * alpha.reshape(-1, *([1] * (codes.dim() - 1)))
        return self.tensor(tensors, "weight").double()


def _pair(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, tuple | list) else [int(value)] * 2


def _conv_attrs(m: nn.Conv2d) -> dict:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ExportError(
            f"Conv2d padding={m.padding!r}, padding_mode={m.padding_mode!r} is not exportable: "
            "use integer zero padding"
        )
    return {
        "stride": _pair(m.stride),
        "padding": _pair(m.padding),
        "dilation": _pair(m.dilation),
        "groups": int(m.groups),
    }


def _grid_attrs(m) -> dict:
    grid = m.grid
    return {"grid": grid.name, "low": grid.low, "high": grid.high, "spacing": grid.spacing}


def _slice_attrs(index) -> list[list[int | None]]:
    index = index if isinstance(index, tuple) else (index,)
    out = []
    for item in index:
        if not isinstance(item, slice) or item.step is not None and item.step <= 0:
            raise ExportError(
                f"indexing with {item!r} is not exportable: only positive-step slices are"
            )
        out.append([item.start, item.stop, item.step or 1])
    return out


# --- module -> op: one function per module type, in MODULE_OPS --------------------------------
# Each returns (op, attrs, tensors by role), or None when the module is the identity in eval.


def _qconv_op(m: QuantizedConv2d):
    if m.groups != 1:
        raise ExportError("grouped quantized convolutions are not exportable")
    tensors = {"codes": m.weight_codes, "alpha": m.alpha, "bias": m.bias}
    return "qconv", {**_conv_attrs(m), **_grid_attrs(m)}, tensors


def _qlinear_op(m: QuantizedLinear):
    return "qlinear", _grid_attrs(m), {"codes": m.weight_codes, "alpha": m.alpha, "bias": m.bias}


def _conv_op(m: nn.Conv2d):
    return "conv", _conv_attrs(m), {"weight": m.weight, "bias": m.bias}


def _linear_op(m: nn.Linear):
    return "linear", {}, {"weight": m.weight, "bias": m.bias}


def _bn_op(m: nn.BatchNorm1d | nn.BatchNorm2d):
    scale, shift = batchnorm_affine(m, dtype=torch.float64)
    return "affine", {}, {"scale": scale, "shift": shift}


def _quantizer_op(m: SparseQuantizer):
    return "quantize", {"bits": m.bits, "eps": m.eps, "step": m.step}, {}


def _maxpool_op(m: nn.MaxPool2d):
    attrs = {
        "kernel": _pair(m.kernel_size),
        "stride": _pair(m.stride),
        "padding": _pair(m.padding),
        "dilation": _pair(m.dilation),
        "ceil_mode": bool(m.ceil_mode),
    }
    return "maxpool", attrs, {}


def _avgpool_op(m: nn.AvgPool2d):
    if m.ceil_mode or m.divisor_override is not None:
        return _unsupported(m)
    attrs = {
        "kernel": _pair(m.kernel_size),
        "stride": _pair(m.stride),
        "padding": _pair(m.padding),
        "count_include_pad": bool(m.count_include_pad),
    }
    return "avgpool", attrs, {}


def _adaptive_avgpool_op(m: nn.AdaptiveAvgPool2d):
    return ("global_avgpool", {}, {}) if _pair(m.output_size) == [1, 1] else _unsupported(m)


def _flatten_op(m: nn.Flatten):
    return ("flatten", {"start_dim": int(m.start_dim)}, {}) if m.end_dim == -1 else _unsupported(m)


def _unsupported(m: nn.Module):
    raise ExportError(
        f"({type(m).__name__}{m.extra_repr() and ': ' + m.extra_repr()}) is not exportable; "
        "supported: Conv2d, Linear, BatchNorm, SparseQuantizer, ReLU, MaxPool2d, AvgPool2d, "
        "AdaptiveAvgPool2d(1), Flatten, Identity, Dropout"
    )


def _input_quantizer_op(m: InputQuantizer):
    return "quantize_input", {"bits": m.bits, "scale": m.scale}, {}


MODULE_OPS = (  # in order: the quantized twins are subclasses of Conv2d / Linear
    (InputQuantizer, _input_quantizer_op),
    (QuantizedConv2d, _qconv_op),
    (QuantizedLinear, _qlinear_op),
    (nn.Conv2d, _conv_op),
    (nn.Linear, _linear_op),
    (nn.BatchNorm1d | nn.BatchNorm2d, _bn_op),
    (SparseQuantizer, _quantizer_op),
    (nn.ReLU, lambda m: ("relu", {}, {})),
    (nn.Identity | nn.Dropout, lambda m: None),
    (nn.MaxPool2d, _maxpool_op),
    (nn.AvgPool2d, _avgpool_op),
    (nn.AdaptiveAvgPool2d, _adaptive_avgpool_op),
    (nn.Flatten, _flatten_op),
)


# --- function -> op: (fx node, reference to an input) -> (op, inputs, attrs) ---------------


def _add_fn(node, ref):
    return "add", [ref(a) for a in node.args[:2]], {}


def _flatten_fn(node, ref):
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if end != -1:
        raise ExportError(f"{node.name}: torch.flatten with end_dim={end} is not exportable")
    return "flatten", [ref(node.args[0])], {"start_dim": int(start)}


def _slice_fn(node, ref):
    return "slice", [ref(node.args[0])], {"slices": _slice_attrs(node.args[1])}


def _pad_fn(node, ref):
    pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0):
        raise ExportError(f"{node.name}: only zero constant padding is exportable")
    return "pad", [ref(node.args[0])], {"pad": [int(p) for p in pad]}


FUNCTION_OPS = {
    **{add: _add_fn for add in ADDS},
    torch.flatten: _flatten_fn,
    operator.getitem: _slice_fn,
    F.pad: _pad_fn,
}


def build_graph(model: nn.Module) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Walk a (quantized) model in eval mode and return (nodes, tensors)."""
    gm = trace(model)
    nodes: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}  # fx node -> graph node producing its value (identity ops)

    def ref(arg) -> str:
        if not isinstance(arg, torch.fx.Node):
            raise ExportError(f"operand {arg!r} is a constant: only tensor operands are exportable")
        return alias.get(arg.name, arg.name)

    def add(node, op, inputs, attrs=None, node_tensors=None):
        entry = Node(node.name, op, tuple(inputs), attrs or {}, {})
        for role, value in (node_tensors or {}).items():
            if value is not None:
                key = f"{node.name}.{role}"
                tensors[key] = value.detach().cpu().contiguous()
                entry.tensors[role] = key
        nodes.append(entry.to_dict())

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            add(node, "input", [])
        elif node.op == "output":
            add(node, "output", [ref(node.args[0])])
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            handler = next((h for kind, h in MODULE_OPS if isinstance(m, kind)), _unsupported)
            try:
                found = handler(m)
            except ExportError as exc:
                raise ExportError(f"module {node.target} {exc}") from None
            if found is None:
                alias[node.name] = ref(node.args[0])
                continue
            op, attrs, node_tensors = found
            add(node, op, [ref(node.args[0])], {"module": node.target, **attrs}, node_tensors)
        elif node.op == "call_function" and node.target in FUNCTION_OPS:
            op, inputs, attrs = FUNCTION_OPS[node.target](node, ref)
            add(node, op, inputs, attrs)
        else:
            target = getattr(node.target, "__name__", str(node.target))
            raise ExportError(
                f"operation {node.name} ({node.op} {target}) is not exportable: use modules, "
                "torch.flatten, residual adds, slicing or F.pad in forward()"
            )
    return nodes, tensors


def quantized_nodes(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n["op"] in ("qconv", "qlinear")]


def check_graph(nodes: list[dict], tensors: dict[str, torch.Tensor]) -> None:
    """Structural checks of a loaded graph: known ops, inputs defined before use, tensors present."""
    defined: set[str] = set()
    if not nodes or nodes[0]["op"] != "input" or nodes[-1]["op"] != "output":
        raise ExportError("the graph must start with an input node and end with an output node")
    fields = {"name": str, "op": str, "inputs": list, "attrs": dict, "tensors": dict}
    for node in nodes:
        if not isinstance(node, dict) or any(
            not isinstance(node.get(k), t) for k, t in fields.items()
        ):
            raise ExportError(
                f"graph node {str(node)[:60]} lacks one of {list(fields)}: re-export the model"
            )
        if node.get("op") not in OPS:
            raise ExportError(f"unknown op {node.get('op')!r} in node {node.get('name')!r}")
        missing = [i for i in node["inputs"] if i not in defined]
        if missing:
            raise ExportError(f"node {node['name']} uses {missing} before they are computed")
        absent = [k for k in node["tensors"].values() if k not in tensors]
        if absent:
            raise ExportError(f"node {node['name']} needs tensors {absent} that the file lacks")
        defined.add(node["name"])


def check_exportable(model: nn.Module, otherwise: str) -> None:
    """Raise SurgeryError, before any work, when the integer export could not write the model;
    ``otherwise`` says how to go on without the export."""
    try:
        build_graph(model)
    except ExportError as exc:
        raise SurgeryError(f"{exc} ({otherwise})") from None
