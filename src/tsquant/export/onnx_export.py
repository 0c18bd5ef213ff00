"""ONNX encoding of an exported TSQ model, with the integer arithmetic made explicit and exact.

Quantized layers multiply activation codes by weight codes with integer sums: float32 Conv /
MatMul on integer-valued codes where every sum stays below 2^24 (checked per layer), else
ConvInteger / MatMulInteger. The quantizer after a layer (or after a residual add) is fused with
it where its per-channel thresholds allow (``staircase``): as QLinearConv's requantization on
uint8 codes (onnxruntime's int8 kernels), or as a rounded line after the float32 conv; each fit
is checked at export on every accumulator where a code can change, and layers where nothing
fits compare with one threshold per code. Residual adds and full-precision ops that are not
fused run in float64 (Conv in float32, as onnxruntime has no float64 Conv), like the integer
runtime. Requires the optional ``onnx`` package; the checks use ``onnxruntime``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..fileio import atomic_write
from ..quantizers.activation import thresholds as quantizer_thresholds
from .format import ExportedModel
from .graph import ExportError, Node
from .runtime import integer_thresholds
from .staircase import (
    FLOAT32_EXACT,
    accumulator_samples,
    dyadic,
    fit_line,
    fit_requantized,
    float32_thresholds,
    fraction_bits,
    residual_samples,
)

OPSET = 21
INT64_MAX = np.iinfo(np.int64).max
WEIGHT_ZERO_POINT = 128  # ConvInteger / MatMulInteger weights: int8 codes + 128 as uint8


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx package: pip install 'tsquant[onnx]'"
        ) from None
    return onnx


class GraphBuilder:
    """ONNX nodes and initializers under construction, with fresh names."""

    def __init__(self):
        onnx = _onnx()
        self.h, self.T, self.nh = onnx.helper, onnx.TensorProto, onnx.numpy_helper
        self.nodes, self.inits, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(self.nh.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, hint=None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], **attrs))
        return out

    def cast(self, x, to) -> str:
        return self.op("Cast", [x], to=to)


def _channel_shape(rank: int) -> list[int]:
    return [1, -1] + [1] * (rank - 2)


def conv_pads(a: dict) -> list[int]:
    """ONNX pads (begin h, w, end h, w) of a conv/pool node's symmetric padding."""
    p = a["padding"]
    return [p[0], p[1], p[0], p[1]]


def conv_attrs(a: dict) -> dict:
    """ONNX strides, pads and dilations of a conv or max-pool node."""
    return {"strides": a["stride"], "pads": conv_pads(a), "dilations": a["dilation"]}


def maxpool_attrs(a: dict) -> dict:
    """ONNX MaxPool attributes of a maxpool node."""
    return {"kernel_shape": a["kernel"], **conv_attrs(a), "ceil_mode": int(a["ceil_mode"])}


def avgpool_attrs(a: dict) -> dict:
    """ONNX AveragePool attributes of an avgpool node."""
    return {
        "kernel_shape": a["kernel"],
        "strides": a["stride"],
        "pads": conv_pads(a),
        "count_include_pad": int(a["count_include_pad"]),
    }


def slice_inputs(slices: list) -> list[np.ndarray]:
    """ONNX Slice's starts, ends, axes, steps of a slice node's [start, stop, step] per dim."""
    starts = [s[0] or 0 for s in slices]
    ends = [INT64_MAX if s[1] is None else s[1] for s in slices]
    bounds = (starts, ends, list(range(len(slices))), [s[2] for s in slices])
    return [np.array(v, dtype=np.int64) for v in bounds]


def pad_amounts(pad: list, rank: int) -> np.ndarray:
    """ONNX Pad's pads (all begins, then all ends) of torch's pad list (last dim first)."""
    begin, end = [0] * rank, [0] * rank
    for k in range(len(pad) // 2):
        begin[rank - 1 - k], end[rank - 1 - k] = pad[2 * k], pad[2 * k + 1]
    return np.array(begin + end, dtype=np.int64)


CODES = ("codes", "codes8", "icodes")  # the kinds of _Value that hold integer codes


class _Value(NamedTuple):
    """An ONNX value and how to read it: kind "codes" (integer-valued float32, extra = step),
    "codes8" (uint8 codes, extra = step), "line" (a fused quantizer's codes before their last,
    monotone rounding op, see ``rounded``),
    "acc" (int32) or "facc" (integer-valued float32; both extra = (scale, offset) per channel),
    "icodes" (signed input codes, float64; extra = scale), "f32" (float32 values whose float64
    meaning applies extra's per-channel (scale, shift) stages, in order) or "float" (float64)."""

    kind: str
    name: str
    rank: int
    extra: object = None
    top: int = 0  # codes, icodes: the largest code magnitude; facc: the largest |sum|
    finish: tuple = ()  # line: (kind of its codes, [(op, extra inputs[, attrs])] rounding it)


class _Writer:
    """Emits the ONNX nodes of an exported graph: one method per op, looked up in _EMIT."""

    def __init__(self, exported: ExportedModel):
        self.b = GraphBuilder()
        self.T = self.b.T
        self.t = exported.tensors
        self.input_rank = len(exported.input_shape) + 1
        self.consumers = {node.name: [] for node in exported.graph}
        for node in exported.graph:
            for name in node.inputs:
                self.consumers[name].append(node)
        self.fused: set[str] = set()  # quantizers emitted with their layer
        self.paths: dict[str, str] = {}  # quantizer node -> how the graph computes its codes
        self.rounded_names: dict[str, str] = {}  # "line" value -> its codes
        self.conv_without_bias: dict[str, object] = {}  # facc value -> its Conv node

    def double(self, v: _Value) -> str:
        b = self.b
        if v.kind == "float":
            return v.name
        x = v.name if v.kind == "icodes" else b.cast(v.name, self.T.DOUBLE)
        if v.kind == "f32":
            for scale, shift in v.extra:
                shape = _channel_shape(v.rank)
                x = b.op("Mul", [x, b.const(scale.reshape(shape), "scale")])
                x = b.op("Add", [x, b.const(shift.reshape(shape), "shift")])
            return x
        if v.kind in CODES:
            return b.op("Mul", [x, b.const(np.float64(v.extra))])
        scale, offset = (e.numpy().reshape(_channel_shape(v.rank)) for e in v.extra)
        return b.op("Add", [b.op("Mul", [x, b.const(scale, "scale")]), b.const(offset, "offset")])

    def count_above(self, x: str, limits: np.ndarray, chunk: int = 8) -> str:
        """Number of thresholds (axis 0 of limits, in x's dtype) strictly below x, as float32
        codes. Up to ``chunk`` thresholds one comparison each; more are compared ``chunk`` at a
        time through a broadcast: an 8-bit quantizer has 255, and broadcasting them all at once
        would hold 255 copies of the activation map (11 GB on 500 Fashion-MNIST images)."""
        b, F32 = self.b, self.T.FLOAT
        if limits.shape[0] <= chunk:
            counts = [
                b.cast(b.op("Greater", [x, b.const(np.ascontiguousarray(limit), "thr")]), F32)
                for limit in limits
            ]
            return counts[0] if len(counts) == 1 else b.op("Sum", counts)
        expanded = b.op("Unsqueeze", [x, b.const(np.array([0]))])
        total = None
        for start in range(0, limits.shape[0], chunk):
            part = np.ascontiguousarray(limits[start : start + chunk])
            above = b.op("Greater", [expanded, b.const(part, "thr")])
            count = b.op("ReduceSum", [b.cast(above, F32), b.const(np.array([0]))], keepdims=0)
            total = count if total is None else b.op("Add", [total, count])
        return total

    # --- one method per op: (node, input values) -> output value --------------------------

    def input(self, node: Node, args) -> _Value:
        return _Value("f32", "input", self.input_rank, ())

    def output(self, node: Node, args) -> _Value:
        return _Value("float", self.double(args[0]), args[0].rank)

    def quantize_input(self, node: Node, args) -> _Value:
        """Signed input codes, kept as integer-valued float64 ("icodes")."""
        b, a = self.b, node.attrs
        top = float(2 ** (a["bits"] - 1) - 1)
        scaled = b.op("Div", [self.double(args[0]), b.const(np.float64(a["scale"]))])
        codes = b.op(
            "Clip", [b.op("Round", [scaled]), b.const(np.float64(-top)), b.const(np.float64(top))]
        )
        return _Value("icodes", codes, args[0].rank, a["scale"], int(top))

    def qlayer(self, node: Node, args) -> _Value:
        """Codes times weight codes, exact. While every sum stays below 2^24 (inputs * largest
        input code * largest weight code): fused with a quantizer that is the layer's only
        consumer where its thresholds allow (``fused_quantizer``), else float32 Conv/MatMul on
        integer-valued codes (exact there); larger sums on ConvInteger/MatMulInteger (uint8
        codes, weight codes + 128 as uint8 with that zero point, int32 sums)."""
        x = args[0]
        if x.kind not in CODES:  # e.g. a quantized first layer on the FP image
            return self.layer(node, args)
        b = self.b
        weight_codes = node.tensor(self.t, "codes")
        alpha = node.tensor(self.t, "alpha").double()
        bias = node.tensor(self.t, "bias")
        bias = torch.zeros_like(alpha) if bias is None else bias.double()
        scale = (alpha * x.extra, bias)
        rank = 4 if node.op == "qconv" else 2
        bound = weight_codes[0].numel() * x.top * int(weight_codes.abs().max())
        if bound < FLOAT32_EXACT:
            consumers = self.consumers[node.name]
            if len(consumers) == 1 and consumers[0].op == "quantize":
                fused = self.fused_quantizer(node, x, scale, bound, consumers[0])
                if fused is not None:
                    return fused
            acc = self.product(node, self.float_codes(x), weight_codes.float().numpy())
            if node.op == "qconv" and len(self.consumers[node.name]) == 1:
                self.conv_without_bias[acc] = self.b.nodes[-1]  # a fused residual sets it
            return _Value("facc", acc, rank, scale, bound)
        if x.kind == "icodes":
            raise ExportError(
                f"{node.name}: {weight_codes[0].numel()} signed 8-bit products could exceed "
                "float32's exact integers: keep this layer fp"
            )
        # weights as uint8 around a zero point of 128: x86 kernels without VNNI add uint8 x int8
        # products in pairs in int16 and saturate (2 x 255 x 127 > 2^15); their uint8 x uint8
        # kernels widen to 16 bits first and sum in int32, exactly
        weight = (weight_codes.to(torch.int16) + WEIGHT_ZERO_POINT).to(torch.uint8).numpy()
        x8 = self.uint8_codes(x)
        zero_points = [b.const(np.uint8(0), "xzero"), b.const(np.uint8(WEIGHT_ZERO_POINT), "wzero")]
        if node.op == "qconv":
            inputs = [x8, b.const(weight, "wcodes"), *zero_points]
            acc = b.op("ConvInteger", inputs, **conv_attrs(node.attrs))
        else:
            acc = b.op("MatMulInteger", [x8, b.const(weight.T.copy(), "wcodes"), *zero_points])
        return _Value("acc", acc, rank, scale)

    def float_codes(self, x: _Value) -> str:
        return x.name if x.kind == "codes" else self.b.cast(x.name, self.T.FLOAT)

    def product(self, node: Node, codes: str, weight: np.ndarray, shift=None) -> str:
        """float32 Conv (``shift`` as its bias) or MatMul (then + shift) of a layer's codes."""
        b = self.b
        if node.op == "qconv":
            inputs = [codes, b.const(weight, "wcodes")]
            if shift is not None:
                inputs.append(b.const(shift, "shift"))
            return b.op("Conv", inputs, **conv_attrs(node.attrs))
        acc = b.op("MatMul", [codes, b.const(weight.T.copy(), "wcodes")])
        return acc if shift is None else b.op("Add", [acc, b.const(shift, "shift")])

    def fused_quantizer(
        self, node: Node, x: _Value, scale, bound: int, quantizer: Node
    ) -> _Value | None:
        """The layer and its quantizer in one: a conv on uint8 codes whose per-channel integer
        thresholds fit a uniform grid runs as QLinearConv, its requantization rounding to the
        codes (``staircase.fit_requantized``; several times faster than a float32 Conv on
        onnxruntime's int8 kernels); other layers as float32 Conv(+shift) -> (Leaky)Relu -> Mul
        [-> Add] -> Floor -> Clip where every channel fits a ``staircase`` line (the
        (Leaky)Relu also keeps runtimes from folding the Mul into the weights, which would
        round). Channels with a negative scale run on negated weights. None, with nothing
        emitted, when neither fits."""
        b, a = self.b, quantizer.attrs
        edges = quantizer_thresholds(a["step"], a["eps"], a["bits"])
        sign, limits = integer_thresholds(scale[0], scale[1], edges)
        samples, levels = accumulator_samples(limits.numpy(), bound), 2 ** a["bits"] - 1
        spacing = (a["step"] / scale[0].abs()).numpy()  # inf where the scale is 0: unused
        weight = node.tensor(self.t, "codes").numpy().astype(np.int64)
        weight = weight * sign.numpy().reshape([-1] + [1] * (weight.ndim - 1))
        rank = 4 if node.op == "qconv" else 2
        requant = None
        if node.op == "qconv" and x.kind != "icodes":  # int8 inputs measured slower here
            requant = fit_requantized(samples, int(np.abs(weight).max()), x.top, spacing)
        if requant is None:
            first_gap = float(edges[1] - edges[0]) / a["step"] if len(edges) > 1 else 1.0
            line = fit_line(samples, first_gap, spacing)
            if line is None:
                return None
            acc = self.product(node, self.float_codes(x), weight.astype(np.float32), line.shift)
            return self.line_ops(acc, line, rank, quantizer)
        codes = self.uint8_codes(x)
        y = self.requantized_conv(node, codes, weight, requant.main)
        if requant.first is not None:
            step = self.requantized_conv(node, codes, weight, requant.first)
            y = b.op(requant.combine, [y, step])
        finish = [] if levels == 255 else [("Min", [b.const(np.uint8(levels), "levels")])]
        how = "int8 requantization" + (
            f" + step at eps ({requant.combine})" if requant.first else ""
        )
        self.fused.add(quantizer.name)
        self.paths[quantizer.name] = how
        return _Value("line", y, rank, a["step"], levels, ("codes8", finish))

    def uint8_codes(self, x: _Value) -> str:
        return x.name if x.kind == "codes8" else self.b.cast(x.name, self.T.UINT8)

    def requantized_conv(self, node: Node, codes: str, weight: np.ndarray, line) -> str:
        """QLinearConv on uint8 codes: weights times line.factor (int8, symmetric), int32 bias,
        per-channel requantization scale, uint8 out (zero points 0, input/output scales 1)."""
        b = self.b
        inputs = [
            codes,
            b.const(np.float32(1)),
            b.const(np.uint8(0)),
            b.const((weight * line.factor).astype(np.int8), "wcodes"),
            b.const(line.scale, "requant"),
            b.const(np.zeros(weight.shape[0], np.int8)),
            b.const(np.float32(1)),
            b.const(np.uint8(0)),
            b.const(line.bias, "shift"),
        ]
        return b.op("QLinearConv", inputs, **conv_attrs(node.attrs))

    def line_ops(self, shifted: str, line, rank: int, quantizer: Node) -> _Value:
        """(Leaky)Relu -> Mul [-> Add] of a staircase line on its shifted input, in the line's
        float type (float64 has no LeakyRelu in onnxruntime: max or min of x and leak * x, the
        same values); the Floor and Clip that make it codes come with ``rounded``."""
        b, a, dtype = self.b, quantizer.attrs, line.dtype
        if not line.leak:
            bent = b.op("Relu", [shifted])
        elif dtype == np.float32:
            bent = b.op("LeakyRelu", [shifted], alpha=line.leak)
        else:
            leaked = b.op("Mul", [shifted, b.const(dtype(line.leak), "leak")])
            bent = b.op("Max" if line.leak < 1 else "Min", [shifted, leaked])
        y = b.op("Mul", [bent, b.const(line.slope.reshape(_channel_shape(rank)), "slope")])
        if line.offset:
            y = b.op("Add", [y, b.const(dtype(line.offset), "offset")])
        levels = 2 ** a["bits"] - 1
        top = b.const(dtype(levels), "levels")
        finish = ("codes", [("Floor", []), ("Clip", [b.const(dtype(0)), top])])
        if dtype != np.float32:
            finish[1].append(("Cast", [], {"to": self.T.FLOAT}))
        self.fused.add(quantizer.name)
        self.paths[quantizer.name] = f"{np.dtype(dtype).name} line" + (" (bent)" * bool(line.leak))
        return _Value("line", y, rank, a["step"], levels, finish)

    def fused_residual(self, node: Node, args) -> _Value | None:
        """A residual add of a quantized conv (float32 Conv on codes) and shortcut codes whose
        only consumer is a quantizer, as one staircase line in u = acc + ratio * z (ratio =
        shortcut step / conv scale) instead of float64 arithmetic and a comparison per
        threshold: in float32 with a dyadic ratio (u exact) and the line's shift as the conv's
        bias; where float32 is too coarse (e.g. an 8-bit quantizer), in float64 after the
        conv. Every (accumulator, shortcut code) pair where the code can change is checked
        against the integer runtime's float64 codes (``staircase.residual_samples``) in the
        graph's arithmetic; None, nothing emitted, when no line fits or a channel's scale is
        not positive."""
        consumers = self.consumers[node.name]
        accs = [v for v in args if v.kind == "facc" and v.name in self.conv_without_bias]
        shortcuts = [v for v in args if v.kind in ("codes", "codes8")]
        if len(consumers) != 1 or consumers[0].op != "quantize" or not (accs and shortcuts):
            return None
        acc, shortcut, quantizer = accs[0], shortcuts[0], consumers[0]
        scale, offset = (e.numpy() for e in acc.extra)
        if (scale <= 0).any():
            return None
        a, b, shape = quantizer.attrs, self.b, _channel_shape(acc.rank)
        edges = quantizer_thresholds(a["step"], a["eps"], a["bits"]).numpy()
        first_gap = float(edges[1] - edges[0]) / a["step"] if len(edges) > 1 else 1.0
        exact_ratio = shortcut.extra / scale

        def fit(ratio, dtype):
            samples = residual_samples(
                scale, offset, shortcut.extra, shortcut.top, edges, acc.top, ratio
            )
            return samples, fit_line(samples, first_gap, a["step"] / scale, dtype)

        bits = fraction_bits(2 * (acc.top + float(exact_ratio.max()) * shortcut.top))
        if bits >= 0:
            ratio = dyadic(exact_ratio, bits)
            samples, line = fit(ratio, np.float32)
            shift_bits = (
                None
                if line is None
                else fraction_bits(samples.bound + float(np.abs(line.shift).max()))
            )
            if line is not None and shift_bits >= bits:  # acc + shift + ratio z exact in any order
                self.conv_without_bias.pop(acc.name).input.append(b.const(line.shift, "shift"))
                codes = self.float_codes(shortcut)
                weighted = b.op("Mul", [codes, b.const(ratio.reshape(shape), "ratio")])
                return self.line_ops(b.op("Add", [acc.name, weighted]), line, acc.rank, quantizer)
        _, line = fit(exact_ratio, np.float64)  # u = acc + ratio * z rounded as the graph does
        if line is None:
            return None
        codes = b.cast(shortcut.name, self.T.DOUBLE)
        weighted = b.op("Mul", [codes, b.const(exact_ratio.reshape(shape), "ratio")])
        u = b.op("Add", [b.cast(acc.name, self.T.DOUBLE), weighted])
        shifted = b.op("Add", [u, b.const(line.shift.reshape(shape), "shift")])
        return self.line_ops(shifted, line, acc.rank, quantizer)

    def rounded(self, v: _Value) -> _Value:
        """The codes of a "line" value: its last rounding ops, emitted once per value (after
        any max pooling, which commutes with them: they are monotone)."""
        if v.kind != "line":
            return v
        kind, ops = v.finish
        if v.name not in self.rounded_names:
            name = v.name
            for op, extra, *attrs in ops:  # (op, extra inputs[, attributes])
                name = self.b.op(op, [name, *extra], **(attrs[0] if attrs else {}))
            self.rounded_names[v.name] = name
        return v._replace(kind=kind, name=self.rounded_names[v.name], finish=())

    def layer(self, node: Node, args) -> _Value:
        b, a, T = self.b, node.attrs, self.T
        weight, bias = node.float_weight(self.t), node.tensor(self.t, "bias")
        if node.op in ("conv", "qconv"):  # onnxruntime has no float64 Conv
            x = args[0]
            x = x.name if x.kind == "f32" and not x.extra else b.cast(self.double(x), T.FLOAT)
            inputs = [x, b.const(weight.float().numpy(), "w")]
            if bias is not None:
                inputs.append(b.const(bias.float().numpy(), "b"))
            y = b.op(
                "Conv",
                inputs,
                **conv_attrs(a),
                group=a.get("groups", 1),
            )
            return _Value("f32", y, 4, ())
        w = b.const(weight.double().numpy().T.copy(), "w")
        y = b.op("MatMul", [self.double(args[0]), w])
        if bias is not None:
            y = b.op("Add", [y, b.const(bias.double().numpy(), "b")])
        return _Value("float", y, 2)

    def affine(self, node: Node, args) -> _Value:
        b, rank = self.b, args[0].rank
        if args[0].kind == "f32":  # applied where the value is read (see quantize, double)
            stage = tuple(node.tensor(self.t, r).double().numpy() for r in ("scale", "shift"))
            return args[0]._replace(extra=(*args[0].extra, stage))
        scale = node.tensor(self.t, "scale").double().numpy().reshape(_channel_shape(rank))
        shift = node.tensor(self.t, "shift").double().numpy().reshape(_channel_shape(rank))
        y = b.op("Add", [b.op("Mul", [self.double(args[0]), b.const(scale)]), b.const(shift)])
        return _Value("float", y, rank)

    def quantize(self, node: Node, args) -> _Value:
        b, a, x = self.b, node.attrs, args[0]
        if node.name in self.fused:
            return x
        self.paths[node.name] = "comparisons"
        edges = quantizer_thresholds(a["step"], a["eps"], a["bits"])
        if x.kind in ("acc", "facc"):
            sign, limits = integer_thresholds(x.extra[0], x.extra[1], edges)
            limits = limits.numpy().T.reshape([-1, 1, limits.shape[0]] + [1] * (x.rank - 2))
            sign = sign.numpy().reshape(_channel_shape(x.rank))
            if x.kind == "facc":  # |acc| < 2^24: limits clipped to that range stay exact
                sign = sign.astype(np.float32)
                limits = limits.clip(-(2**24), 2**24).astype(np.float32)
                signed = x.name
            else:
                signed = b.cast(x.name, self.T.INT64)
            if (sign != 1).any():  # alpha * step > 0 in practice: no multiplication then
                signed = b.op("Mul", [signed, b.const(sign)])
            codes = self.count_above(signed, np.ascontiguousarray(limits))
        elif x.kind == "f32" and len(edges) <= 7 and all((s > 0).all() for s, _ in x.extra):
            return self.float32_quantize(x, edges.numpy(), node)
        else:
            limits = edges.numpy().reshape([-1] + [1] * x.rank)
            codes = self.count_above(self.double(x), limits)
        return _Value("codes", codes, x.rank, a["step"], 2 ** a["bits"] - 1)

    def float32_quantize(self, x: _Value, edges: np.ndarray, node: Node) -> _Value:
        """A quantizer on a float32 value read through float64 stages (an FP conv and its BN):
        one float32 comparison per edge against thresholds that give exactly the float64
        comparisons' codes (``staircase.float32_thresholds``), counted in uint8."""
        b, shape, a = self.b, _channel_shape(x.rank), node.attrs
        self.paths[node.name] = "float32 comparisons"
        stages = x.extra or ((np.ones(1), np.zeros(1)),)
        limits = float32_thresholds(list(stages), edges)
        count = None
        for k in range(len(edges)):
            above = b.op("Greater", [x.name, b.const(limits[:, k].reshape(shape), "thr")])
            above = b.cast(above, self.T.UINT8)
            count = above if count is None else b.op("Add", [count, above])
        return _Value("codes8", count, x.rank, a["step"], 2 ** a["bits"] - 1)

    def relu(self, node: Node, args) -> _Value:
        return _Value("float", self.b.op("Relu", [self.double(args[0])]), args[0].rank)

    def add(self, node: Node, args) -> _Value:
        fused = self.fused_residual(node, args)
        if fused is not None:
            return fused
        y = self.b.op("Add", [self.double(args[0]), self.double(args[1])])
        return _Value("float", y, args[0].rank)

    def maxpool(self, node: Node, args) -> _Value:
        a, x = node.attrs, args[0]
        codes = x.kind in (*CODES, "line")  # max commutes with code -> value (step > 0)
        y = self.b.op("MaxPool", [x.name if codes else self.double(x)], **maxpool_attrs(a))
        return x._replace(name=y) if codes else _Value("float", y, x.rank)

    def global_avgpool(self, node: Node, args) -> _Value:
        y = self.b.op("ReduceMean", [self.double(args[0]), self.b.const(np.array([2, 3]))])
        return _Value("float", y, 4)

    def avgpool(self, node: Node, args) -> _Value:
        b, a, T = self.b, node.attrs, self.T
        y = b.op("AveragePool", [b.cast(self.double(args[0]), T.FLOAT)], **avgpool_attrs(a))
        return _Value("float", b.cast(y, T.DOUBLE), 4)

    def reshape(self, node: Node, args) -> _Value:
        """flatten / slice / pad act on codes directly (zero code = zero value)."""
        b, a, x = self.b, node.attrs, args[0]
        if x.kind in ("acc", "facc") or (x.kind == "f32" and x.extra):  # stages are per channel
            x = _Value("float", self.double(x), x.rank)
        name, rank = x.name, x.rank
        if node.op == "flatten":
            if a["start_dim"] != 1:
                raise ExportError(f"{node.name}: ONNX export supports flatten(x, 1) only")
            name, rank = b.op("Flatten", [name], axis=1), 2
        elif node.op == "slice":
            name = b.op("Slice", [name, *(b.const(v) for v in slice_inputs(a["slices"]))])
        else:
            name = b.op("Pad", [name, b.const(pad_amounts(a["pad"], rank))])
        return x._replace(name=name, rank=rank)


_EMIT = {
    "input": _Writer.input,
    "output": _Writer.output,
    "qconv": _Writer.qlayer,
    "qlinear": _Writer.qlayer,
    "conv": _Writer.layer,
    "linear": _Writer.layer,
    "affine": _Writer.affine,
    "quantize": _Writer.quantize,
    "quantize_input": _Writer.quantize_input,
    "relu": _Writer.relu,
    "add": _Writer.add,
    "maxpool": _Writer.maxpool,
    "avgpool": _Writer.avgpool,
    "global_avgpool": _Writer.global_avgpool,
    "flatten": _Writer.reshape,
    "slice": _Writer.reshape,
    "pad": _Writer.reshape,
}


# ops that take a fused quantizer's line before its rounding: the quantizer itself, and max
# pooling (max commutes with the monotone Floor and Clip, which then run on the pooled map)
ROUNDED_LATER = ("quantize", "maxpool")


QUANTIZER_PATHS = "tsquant.quantizer_paths"  # model metadata: how each quantizer is computed


def quantizer_paths(path: Path) -> dict[str, str]:
    """{quantizer node: how the ONNX graph computes its codes} of a model written by to_onnx."""
    props = {p.key: p.value for p in _onnx().load(str(path)).metadata_props}
    return json.loads(props.get(QUANTIZER_PATHS, "{}"))


def to_onnx(exported: ExportedModel, path: Path) -> Path:
    """Write the ONNX model (input ``input`` float32 NCHW, output ``logits`` float64)."""
    onnx = _onnx()
    writer = _Writer(exported)
    b, T = writer.b, writer.T
    values: dict[str, _Value] = {}
    for node in exported.graph:
        emit = _EMIT.get(node.op)
        if emit is None:
            raise ExportError(f"op {node.op} of node {node.name} has no ONNX encoding")
        args = [values[i] for i in node.inputs]
        if node.op not in ROUNDED_LATER:
            args = [writer.rounded(v) for v in args]
        values[node.name] = out = emit(writer, node, args)
    b.nodes.append(b.h.make_node("Identity", [out.name], ["logits"]))
    graph = b.h.make_graph(
        b.nodes,
        "tsquant",
        [b.h.make_tensor_value_info("input", T.FLOAT, ["batch", *exported.input_shape])],
        [b.h.make_tensor_value_info("logits", T.DOUBLE, ["batch", None])],
        b.inits,
    )
    model = b.h.make_model(
        graph, opset_imports=[b.h.make_opsetid("", OPSET)], producer_name="tsquant"
    )
    model.ir_version = 10
    onnx.helper.set_model_props(model, {QUANTIZER_PATHS: json.dumps(writer.paths)})
    onnx.checker.check_model(model)
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(model.SerializeToString()))
    return path


def onnx_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "running the ONNX model needs onnxruntime: pip install onnxruntime"
        ) from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
