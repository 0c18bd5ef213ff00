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
from .graph import ExportError

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
    """Executes an :class:`ExportedModel` with integer arithmetic in the quantized layers."""

    def __init__(self, exported: ExportedModel):
        self.exported = exported
        self.nodes = exported.nodes
        self.t = exported.tensors
        self._weights = {}  # node name -> int32 weight matrix: (O, K) conv, (K, O) linear
        for node in self.nodes:
            if node["op"] in ("qconv", "qlinear"):
                codes = self.t[node["tensors"]["codes"]]
                matrix = codes.reshape(codes.shape[0], -1).to(torch.int32)
                a = node["attrs"]
                bound = matrix.shape[1] * max(abs(a["low"]), abs(a["high"])) * 255
                if bound > INT32_MAX:
                    raise ExportError(f"{node['name']}: int32 accumulator could overflow ({bound})")
                self._weights[node["name"]] = (
                    matrix if node["op"] == "qconv" else matrix.t().contiguous()
                )

    def _tensor(self, node, role):
        key = node["tensors"].get(role)
        return None if key is None else self.t[key]

    def _qlayer(self, node, x):
        alpha = self._tensor(node, "alpha").double()
        bias = self._tensor(node, "bias")
        bias = torch.zeros_like(alpha) if bias is None else bias.double()
        w = self._weights[node["name"]]
        if not isinstance(x, Codes):  # e.g. a quantized first layer on the FP image
            codes = self.t[node["tensors"]["codes"]].double()
            weight = codes * alpha.reshape(-1, *([1] * (codes.dim() - 1)))
            return self._float_layer(node, to_float(x), weight, bias)
        if node["op"] == "qlinear":
            acc = x.codes.to(torch.int32) @ w
        else:
            a = node["attrs"]
            kernel = list(self.t[node["tensors"]["codes"]].shape[2:])
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

    def _float_layer(self, node, x, weight, bias):
        if node["op"] in ("conv", "qconv"):
            a = node["attrs"]
            return F.conv2d(
                x, weight, bias, a["stride"], a["padding"], a["dilation"], a.get("groups", 1)
            )
        return F.linear(x, weight, bias)

    def _quantize(self, node, x):
        a = node["attrs"]
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

    def _pool(self, node, x):
        a = node["attrs"]
        if node["op"] == "maxpool":  # max commutes with the monotone code -> value map
            pooled = F.max_pool2d(
                (x.codes if isinstance(x, Codes) else to_float(x)).double(),
                a["kernel"],
                a["stride"],
                a["padding"],
                a["dilation"],
                a["ceil_mode"],
            )
            return Codes(pooled.to(torch.int32), x.step) if isinstance(x, Codes) else pooled
        if node["op"] == "global_avgpool":
            return to_float(x).mean(dim=(2, 3), keepdim=True)
        return F.avg_pool2d(
            to_float(x),
            a["kernel"],
            a["stride"],
            a["padding"],
            count_include_pad=a["count_include_pad"],
        )

    def _reshape(self, node, x):
        """flatten / slice / pad act on codes directly (zero code = zero value)."""
        data = x.codes if isinstance(x, Codes) else to_float(x)
        a = node["attrs"]
        if node["op"] == "flatten":
            data = torch.flatten(data, a["start_dim"])
        elif node["op"] == "slice":
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
        for node in self.nodes:
            op = node["op"]
            args = [values[i] for i in node["inputs"]]
            if op == "input":
                out = x.double()
            elif op == "output":
                out = to_float(args[0])
            elif op in ("qconv", "qlinear"):
                out = self._qlayer(node, args[0])
            elif op in ("conv", "linear"):
                out = self._float_layer(
                    node,
                    to_float(args[0]),
                    self._tensor(node, "weight").double(),
                    None
                    if self._tensor(node, "bias") is None
                    else self._tensor(node, "bias").double(),
                )
            elif op == "affine":
                v = to_float(args[0])
                scale, shift = (
                    self._tensor(node, "scale").double(),
                    self._tensor(node, "shift").double(),
                )
                out = v * _channel_view(scale, v.dim()) + _channel_view(shift, v.dim())
            elif op == "quantize":
                out = self._quantize(node, args[0])
                if keep:
                    kept[node["attrs"].get("module", node["name"])] = out.codes
            elif op == "relu":
                out = torch.relu(to_float(args[0]))
            elif op == "add":
                out = to_float(args[0]) + to_float(args[1])
            elif op in ("maxpool", "avgpool", "global_avgpool"):
                out = self._pool(node, args[0])
            elif op in ("flatten", "slice", "pad"):
                out = self._reshape(node, args[0])
            else:  # check_graph has rejected unknown ops already
                raise ExportError(f"unknown op {op}")
            values[node["name"]] = out
            if shapes is not None:
                data = out.codes if isinstance(out, Codes) else getattr(out, "acc", out)
                shapes[node["name"]] = list(data.shape[1:])
        return (out, kept) if keep else out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x).argmax(dim=1)


def multiplications(exported: ExportedModel) -> dict[str, int]:
    """Per-sample multiply-accumulates of each weight layer, from the graph's shapes."""
    shapes = _output_shapes(exported)
    out = {}
    for node in exported.nodes:
        if node["op"] in ("conv", "qconv", "linear", "qlinear"):
            weight = exported.tensors[
                node["tensors"]["codes" if node["op"][0] == "q" else "weight"]
            ]
            fan_in = math.prod(weight.shape[1:])
            out[node["name"]] = fan_in * math.prod(shapes[node["name"]])
    return out


def _output_shapes(exported: ExportedModel) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    IntegerRuntime(exported).run(torch.zeros(1, *exported.input_shape), shapes=shapes)
    return shapes
