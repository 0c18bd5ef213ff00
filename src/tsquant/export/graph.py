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

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers.activation import SparseQuantizer
from ..quantizers.modules import QuantizedConv2d, QuantizedLinear
from ..surgery import ADDS, batchnorm_affine, trace


class ExportError(ValueError):
    """The model or the export file cannot be exported/loaded; the message says why and what to do."""


OPS = (
    "input conv qconv linear qlinear affine quantize relu add maxpool avgpool global_avgpool "
    "flatten slice pad output"
).split()


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

    def add(node, op, inputs, attrs=None, **node_tensors):
        entry = {"name": node.name, "op": op, "inputs": inputs, "attrs": attrs or {}, "tensors": {}}
        for role, value in node_tensors.items():
            if value is not None:
                key = f"{node.name}.{role}"
                tensors[key] = value.detach().cpu().contiguous()
                entry["tensors"][role] = key
        nodes.append(entry)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            add(node, "input", [])
        elif node.op == "output":
            add(node, "output", [ref(node.args[0])])
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            src = [ref(node.args[0])]
            attrs = {"module": node.target}
            if isinstance(m, QuantizedConv2d):
                if m.groups != 1:
                    raise ExportError(
                        f"{node.target}: grouped quantized convolutions are not exportable"
                    )
                add(
                    node,
                    "qconv",
                    src,
                    {**attrs, **_conv_attrs(m), **_grid_attrs(m)},
                    codes=m.weight_codes,
                    alpha=m.alpha,
                    bias=m.bias,
                )
            elif isinstance(m, QuantizedLinear):
                add(
                    node,
                    "qlinear",
                    src,
                    {**attrs, **_grid_attrs(m)},
                    codes=m.weight_codes,
                    alpha=m.alpha,
                    bias=m.bias,
                )
            elif isinstance(m, nn.Conv2d):
                add(node, "conv", src, {**attrs, **_conv_attrs(m)}, weight=m.weight, bias=m.bias)
            elif isinstance(m, nn.Linear):
                add(node, "linear", src, attrs, weight=m.weight, bias=m.bias)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                scale, shift = batchnorm_affine(m, dtype=torch.float64)
                add(node, "affine", src, attrs, scale=scale, shift=shift)
            elif isinstance(m, SparseQuantizer):
                add(node, "quantize", src, {**attrs, "bits": m.bits, "eps": m.eps, "step": m.step})
            elif isinstance(m, nn.ReLU):
                add(node, "relu", src, attrs)
            elif isinstance(m, nn.Identity | nn.Dropout):
                alias[node.name] = src[0]
            elif isinstance(m, nn.MaxPool2d):
                add(
                    node,
                    "maxpool",
                    src,
                    {
                        **attrs,
                        "kernel": _pair(m.kernel_size),
                        "stride": _pair(m.stride),
                        "padding": _pair(m.padding),
                        "dilation": _pair(m.dilation),
                        "ceil_mode": bool(m.ceil_mode),
                    },
                )
            elif isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.divisor_override is None:
                add(
                    node,
                    "avgpool",
                    src,
                    {
                        **attrs,
                        "kernel": _pair(m.kernel_size),
                        "stride": _pair(m.stride),
                        "padding": _pair(m.padding),
                        "count_include_pad": bool(m.count_include_pad),
                    },
                )
            elif isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == [1, 1]:
                add(node, "global_avgpool", src, attrs)
            elif isinstance(m, nn.Flatten) and m.end_dim == -1:
                add(node, "flatten", src, {**attrs, "start_dim": int(m.start_dim)})
            else:
                raise ExportError(
                    f"module {node.target} ({type(m).__name__}{m.extra_repr() and ': ' + m.extra_repr()}) "
                    "is not exportable; supported: Conv2d, Linear, BatchNorm, SparseQuantizer, ReLU, "
                    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Identity, Dropout"
                )
        elif node.op == "call_function" and node.target in ADDS:
            add(node, "add", [ref(a) for a in node.args[:2]])
        elif node.op == "call_function" and node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if end != -1:
                raise ExportError(
                    f"{node.name}: torch.flatten with end_dim={end} is not exportable"
                )
            add(node, "flatten", [ref(node.args[0])], {"start_dim": int(start)})
        elif node.op == "call_function" and node.target is operator.getitem:
            add(node, "slice", [ref(node.args[0])], {"slices": _slice_attrs(node.args[1])})
        elif node.op == "call_function" and node.target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
            value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
            if mode != "constant" or value not in (None, 0, 0.0):
                raise ExportError(f"{node.name}: only zero constant padding is exportable")
            add(node, "pad", [ref(node.args[0])], {"pad": [int(p) for p in pad]})
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
