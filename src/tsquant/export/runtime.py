"""Integer reference runtime for an exported TSQ model (CPU, torch integer ops).

Activations between quantized layers are integer codes 0..2^b-1 (value = code * d). A quantized
layer multiplies codes by integer weight codes and accumulates in int32; its output stays an
integer accumulator with one per-channel affine (alpha * d, bias) attached. When a sparse
quantizer follows directly, the affine is folded into per-channel integer thresholds, so the
next codes come from integer comparisons only:

    code = #{k : alpha d acc + b > t_k} = #{k : sign(alpha) acc > floor((t_k - b) / |alpha d|)}

A residual add or a full-precision op evaluates the affine in float64. Full-precision layers
(first/last, by the TSQ policy) run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quantizers.activation import thresholds as quantizer_thresholds
from .format import ExportedModel
from .graph import ExportError, Node

INT32_MAX = 2**31 - 1


@dataclass
class Codes:
    """Integer activation codes; value = codes * step."""

    codes: torch.Tensor  # int32
    step: float


@dataclass
class Accumulator:
    """Integer accumulator of a quantized layer; value = scale[c] * acc + offset[c]."""

    acc: torch.Tensor  # int32, channels on dim 1
    scale: torch.Tensor  # float64 (C,)
    offset: torch.Tensor  # float64 (C,)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def to_float(value) -> torch.Tensor:
    if isinstance(value, Codes):
        return value.codes.double() * value.step
    if isinstance(value, Accumulator):
        n = value.acc.dim()
        return value.acc.double() * _channel_view(value.scale, n) + _channel_view(value.offset, n)
    return value.double()


def im2col(codes: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Integer patches (N, C * kh * kw, OH * OW) in the weight layout. F.unfold only copies
    values, and codes <= 255 are exact in float32, so the round trip is lossless."""
    patches = F.unfold(codes.float(), kernel, dilation, padding, stride)
    return patches.to(torch.int32)


def integer_thresholds(scale, offset, edges) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (sign, thresholds) so that scale*acc + offset > t  <=>  sign*acc > T."""
    sign = torch.where(scale < 0, -1, 1).to(torch.int64)
    limit = (edges[None, :] - offset[:, None]) / scale.abs()[:, None]  # (C, K)
    big = float(2**40)  # beyond any int32 accumulator
    limit = torch.where(
        scale[:, None] == 0,
        torch.where(offset[:, None] > edges[None, :], -big, big),
        limit.clamp(-big, big),
    )
    return sign, torch.floor(limit).to(torch.int64)


class IntegerRuntime:
    """Executes an :class:`ExportedModel` with integer arithmetic in the quantized layers.

    Each op is one method, looked up in :data:`_RUN` by the node's op."""

    def __init__(self, exported: ExportedModel):
        self.exported = exported
        self.graph = exported.graph
        self.t = exported.tensors
        self._weights = {}  # node name -> int32 weight matrix: (O, K) conv, (K, O) linear
        for node in self.graph:
            if node.op in ("qconv", "qlinear"):
                codes = node.tensor(self.t, "codes")
                matrix = codes.reshape(codes.shape[0], -1).to(torch.int32)
                a = node.attrs
                bound = matrix.shape[1] * max(abs(a["low"]), abs(a["high"])) * 255
                if bound > INT32_MAX:
                    raise ExportError(f"{node.name}: int32 accumulator could overflow ({bound})")
                self._weights[node.name] = matrix if node.op == "qconv" else matrix.t().contiguous()

    def _double(self, node: Node, role: str):
        value = node.tensor(self.t, role)
        return None if value is None else value.double()

    # --- one method per op: (node, input values) -> output value --------------------------

    def _output(self, node: Node, args):
        return to_float(args[0])

    def _qlayer(self, node: Node, args):
        x = args[0]
        alpha = self._double(node, "alpha")
        bias = self._double(node, "bias")
        bias = torch.zeros_like(alpha) if bias is None else bias
        if not isinstance(x, Codes):  # e.g. a quantized first layer on the FP image
            return self._float_layer(node, to_float(x), node.float_weight(self.t), bias)
        w = self._weights[node.name]
        if node.op == "qlinear":
            acc = x.codes.to(torch.int32) @ w
        else:
            a = node.attrs
            kernel = list(node.tensor(self.t, "codes").shape[2:])
            cols = im2col(x.codes, kernel, a["stride"], a["padding"], a["dilation"])
            n, _, h, width = x.codes.shape
            oh, ow = (
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip(
                    (h, width), a["padding"], a["dilation"], kernel, a["stride"], strict=True
                )
            )
            acc = (w @ cols).reshape(n, -1, oh, ow)  # int32 (O, K) @ (N, K, L)
        return Accumulator(acc.contiguous(), alpha * x.step, bias)

    def _float_layer(self, node: Node, x, weight, bias):
        if node.op in ("conv", "qconv"):
            a = node.attrs
            return F.conv2d(
                x, weight, bias, a["stride"], a["padding"], a["dilation"], a.get("groups", 1)
            )
        return F.linear(x, weight, bias)

    def _layer(self, node: Node, args):
        weight, bias = self._double(node, "weight"), self._double(node, "bias")
        return self._float_layer(node, to_float(args[0]), weight, bias)

    def _affine(self, node: Node, args):
        v = to_float(args[0])
        scale, shift = self._double(node, "scale"), self._double(node, "shift")
        return v * _channel_view(scale, v.dim()) + _channel_view(shift, v.dim())

    def _quantize(self, node: Node, args):
        x, a = args[0], node.attrs
        edges = quantizer_thresholds(a["step"], a["eps"], a["bits"])
        if isinstance(x, Accumulator):
            sign, limits = integer_thresholds(x.scale, x.offset, edges)
            signed = x.acc.to(torch.int64) * _channel_view(sign, x.acc.dim())
            shape = (1, -1) + (1,) * (x.acc.dim() - 2)
            codes = torch.zeros_like(x.acc)
            for k in range(limits.shape[1]):
                codes += (signed > limits[:, k].reshape(shape)).to(torch.int32)
            return Codes(codes, a["step"])
        codes = torch.bucketize(to_float(x).contiguous(), edges, right=False).to(torch.int32)
        return Codes(codes, a["step"])

    def _quantize_input(self, node: Node, args):
        """The network input to signed integer codes (the input scaling, in float64)."""
        a = node.attrs
        top = 2 ** (a["bits"] - 1) - 1
        codes = torch.round(to_float(args[0]) / a["scale"]).clamp(-top, top)
        return Codes(codes.to(torch.int32), a["scale"])

    def _relu(self, node: Node, args):
        return torch.relu(to_float(args[0]))

    def _add(self, node: Node, args):
        return to_float(args[0]) + to_float(args[1])

    def _maxpool(self, node: Node, args):  # max commutes with the monotone code -> value map
        x, a = args[0], node.attrs
        data = (x.codes if isinstance(x, Codes) else to_float(x)).double()
        pooled = F.max_pool2d(
            data, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]
        )
        return Codes(pooled.to(torch.int32), x.step) if isinstance(x, Codes) else pooled

    def _avgpool(self, node: Node, args):
        a = node.attrs
        return F.avg_pool2d(
            to_float(args[0]),
            a["kernel"],
            a["stride"],
            a["padding"],
            count_include_pad=a["count_include_pad"],
        )

    def _global_avgpool(self, node: Node, args):
        return to_float(args[0]).mean(dim=(2, 3), keepdim=True)

    def _reshape(self, node: Node, args):
        """flatten / slice / pad act on codes directly (zero code = zero value)."""
        x, a = args[0], node.attrs
        data = x.codes if isinstance(x, Codes) else to_float(x)
        if node.op == "flatten":
            data = torch.flatten(data, a["start_dim"])
        elif node.op == "slice":
            data = data[tuple(slice(*s) for s in a["slices"])]
        else:
            data = F.pad(data, a["pad"])
        return Codes(data, x.step) if isinstance(x, Codes) else data

    def run(self, x: torch.Tensor, keep: bool = False, shapes: dict | None = None):
        """Logits (float64) for input x; with ``keep`` also {quantize module: int codes}.
        ``shapes``, when given, receives every node's per-sample output shape."""
        expected = self.exported.input_shape
        if list(x.shape[1:]) != list(expected):
            raise ExportError(
                f"input has shape {tuple(x.shape[1:])} per sample, the model expects {tuple(expected)}"
            )
        values: dict[str, object] = {}
        kept: dict[str, torch.Tensor] = {}
        for node in self.graph:
            args = [values[i] for i in node.inputs]
            out = x.double() if node.op == "input" else _RUN[node.op](self, node, args)
            if keep and node.op == "quantize":
                kept[node.attrs.get("module", node.name)] = out.codes
            values[node.name] = out
            if shapes is not None:
                data = out.codes if isinstance(out, Codes) else getattr(out, "acc", out)
                shapes[node.name] = list(data.shape[1:])
        return (out, kept) if keep else out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).argmax(dim=1)


_RUN = {  # op -> IntegerRuntime method; check_graph has refused any other op
    "output": IntegerRuntime._output,
    "qconv": IntegerRuntime._qlayer,
    "qlinear": IntegerRuntime._qlayer,
    "conv": IntegerRuntime._layer,
    "linear": IntegerRuntime._layer,
    "affine": IntegerRuntime._affine,
    "quantize": IntegerRuntime._quantize,
    "quantize_input": IntegerRuntime._quantize_input,
    "relu": IntegerRuntime._relu,
    "add": IntegerRuntime._add,
    "maxpool": IntegerRuntime._maxpool,
    "avgpool": IntegerRuntime._avgpool,
    "global_avgpool": IntegerRuntime._global_avgpool,
    "flatten": IntegerRuntime._reshape,
    "slice": IntegerRuntime._reshape,
    "pad": IntegerRuntime._reshape,
}


def multiplications(exported: ExportedModel) -> dict[str, int]:
    """Per-sample multiply-accumulates of each weight layer, from the graph's shapes."""
    shapes = output_shapes(exported)
    out = {}
    for node in exported.graph:
        if node.op in ("conv", "qconv", "linear", "qlinear"):
            weight = node.tensor(exported.tensors, "codes" if node.op[0] == "q" else "weight")
            fan_in = math.prod(weight.shape[1:])
            out[node.name] = fan_in * math.prod(shapes[node.name])
    return out


def output_shapes(exported: ExportedModel) -> dict[str, list[int]]:
    """Per-sample output shape of every node of the graph (codes, accumulators or values)."""
    shapes: dict[str, list[int]] = {}
    IntegerRuntime(exported).run(torch.zeros(1, *exported.input_shape), shapes=shapes)
    return shapes
