"""ONNX encoding of an exported TSQ model, with the integer arithmetic made explicit.

Quantized layers are ``ConvInteger`` / ``MatMulInteger`` on uint8 activation codes and int8
weight codes (int32 accumulators), followed by the same per-channel integer thresholds as the
integer runtime (``Greater`` + ``ReduceSum`` produce the next uint8 codes). Residual adds and
full-precision ops run in float64 (``Conv`` in float32, as onnxruntime has no float64 Conv).
Requires the optional ``onnx`` package; the checks use ``onnxruntime``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write
from ..quantizers.activation import thresholds as quantizer_thresholds
from .format import ExportedModel
from .graph import ExportError
from .runtime import integer_thresholds

OPSET = 21
INT64_MAX = np.iinfo(np.int64).max


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError(
            "ONNX export needs the onnx package: pip install 'tsquant[onnx]'"
        ) from None
    return onnx


class _Builder:
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


def to_onnx(exported: ExportedModel, path: Path) -> Path:
    """Write the ONNX model (input ``input`` float32 NCHW, output ``logits`` float64)."""
    onnx = _onnx()
    b = _Builder()
    T = b.T
    t = exported.tensors
    # value: (kind, onnx name, rank, extra); kinds: codes (uint8, step), acc (int32, scale, offset),
    # float (float64)
    values: dict[str, tuple] = {}

    def as_double(v) -> str:
        kind, name, rank, extra = v
        if kind == "float":
            return name
        x = b.cast(name, T.DOUBLE)
        if kind == "codes":
            return b.op("Mul", [x, b.const(np.float64(extra))])
        scale, offset = (e.numpy().reshape(_channel_shape(rank)) for e in extra)
        return b.op("Add", [b.op("Mul", [x, b.const(scale, "scale")]), b.const(offset, "offset")])

    def count_above(x: str, limits: np.ndarray) -> str:
        """Number of thresholds (axis 0 of limits) strictly below x, as uint8."""
        above = b.op(
            "Greater", [b.op("Unsqueeze", [x, b.const(np.array([0]))]), b.const(limits, "thr")]
        )
        total = b.op("ReduceSum", [b.cast(above, T.INT32), b.const(np.array([0]))], keepdims=0)
        return b.cast(total, T.UINT8)

    for node in exported.nodes:
        op, a = node["op"], node["attrs"]
        args = [values[i] for i in node["inputs"]]
        tensor = {role: t[key] for role, key in node["tensors"].items()}
        if op == "input":
            out = ("float", b.cast("input", T.DOUBLE), len(exported.input_shape) + 1, None)
        elif op == "output":
            out = ("float", as_double(args[0]), args[0][2], None)
        elif op in ("qconv", "qlinear") and args[0][0] == "codes":
            codes = tensor["codes"].to(torch.int8).numpy()
            alpha = tensor["alpha"].double()
            bias = tensor.get("bias", torch.zeros_like(alpha)).double()
            x = args[0][1]
            if op == "qconv":
                p = a["padding"]
                acc = b.op(
                    "ConvInteger",
                    [x, b.const(codes, "wcodes")],
                    strides=a["stride"],
                    pads=[p[0], p[1], p[0], p[1]],
                    dilations=a["dilation"],
                )
                rank = 4
            else:
                acc = b.op("MatMulInteger", [x, b.const(codes.T.copy(), "wcodes")])
                rank = 2
            out = ("acc", acc, rank, (alpha * args[0][3], bias))
        elif op in ("conv", "qconv"):
            if op == "qconv":
                codes = tensor["codes"].double()
                weight = codes * tensor["alpha"].double().reshape(-1, 1, 1, 1)
            else:
                weight = tensor["weight"]
            inputs = [b.cast(as_double(args[0]), T.FLOAT), b.const(weight.float().numpy(), "w")]
            if tensor.get("bias") is not None:
                inputs.append(b.const(tensor["bias"].float().numpy(), "b"))
            p = a["padding"]
            y = b.op(
                "Conv",
                inputs,
                strides=a["stride"],
                pads=[p[0], p[1], p[0], p[1]],
                dilations=a["dilation"],
                group=a.get("groups", 1),
            )
            out = ("float", b.cast(y, T.DOUBLE), 4, None)
        elif op in ("linear", "qlinear"):
            if op == "qlinear":
                weight = tensor["codes"].double() * tensor["alpha"].double().reshape(-1, 1)
            else:
                weight = tensor["weight"].double()
            y = b.op("MatMul", [as_double(args[0]), b.const(weight.numpy().T.copy(), "w")])
            if tensor.get("bias") is not None:
                y = b.op("Add", [y, b.const(tensor["bias"].double().numpy(), "b")])
            out = ("float", y, 2, None)
        elif op == "affine":
            rank = args[0][2]
            scale = tensor["scale"].double().numpy().reshape(_channel_shape(rank))
            shift = tensor["shift"].double().numpy().reshape(_channel_shape(rank))
            y = b.op("Add", [b.op("Mul", [as_double(args[0]), b.const(scale)]), b.const(shift)])
            out = ("float", y, rank, None)
        elif op == "quantize":
            kind, name, rank, extra = args[0]
            edges = quantizer_thresholds(a["step"], a["eps"], a["bits"])
            if kind == "acc":
                sign, limits = integer_thresholds(extra[0], extra[1], edges)
                signed = b.op(
                    "Mul",
                    [b.cast(name, T.INT64), b.const(sign.numpy().reshape(_channel_shape(rank)))],
                )
                limits = limits.numpy().T.reshape([-1, 1, limits.shape[0]] + [1] * (rank - 2))
                codes = count_above(signed, np.ascontiguousarray(limits))
            else:
                limits = edges.numpy().reshape([-1] + [1] * rank)
                codes = count_above(as_double(args[0]), limits)
            out = ("codes", codes, rank, a["step"])
        elif op == "relu":
            out = ("float", b.op("Relu", [as_double(args[0])]), args[0][2], None)
        elif op == "add":
            out = ("float", b.op("Add", [as_double(args[0]), as_double(args[1])]), args[0][2], None)
        elif op == "maxpool":
            kind, name, rank, extra = args[0]
            source = name if kind == "codes" else as_double(args[0])
            p = a["padding"]
            y = b.op(
                "MaxPool",
                [source],
                kernel_shape=a["kernel"],
                strides=a["stride"],
                pads=[p[0], p[1], p[0], p[1]],
                dilations=a["dilation"],
                ceil_mode=int(a["ceil_mode"]),
            )
            out = (
                kind if kind == "codes" else "float",
                y,
                rank,
                extra if kind == "codes" else None,
            )
        elif op == "global_avgpool":
            y = b.op("ReduceMean", [as_double(args[0]), b.const(np.array([2, 3]))], keepdims=1)
            out = ("float", y, 4, None)
        elif op == "avgpool":
            p = a["padding"]
            y = b.op(
                "AveragePool",
                [b.cast(as_double(args[0]), T.FLOAT)],
                kernel_shape=a["kernel"],
                strides=a["stride"],
                pads=[p[0], p[1], p[0], p[1]],
                count_include_pad=int(a["count_include_pad"]),
            )
            out = ("float", b.cast(y, T.DOUBLE), 4, None)
        elif op in ("flatten", "slice", "pad"):
            kind, name, rank, extra = args[0]
            if kind == "acc":
                kind, name, extra = "float", as_double(args[0]), None
            if op == "flatten":
                if a["start_dim"] != 1:
                    raise ExportError(f"{node['name']}: ONNX export supports flatten(x, 1) only")
                name, rank = b.op("Flatten", [name], axis=1), 2
            elif op == "slice":
                starts = [s[0] or 0 for s in a["slices"]]
                ends = [INT64_MAX if s[1] is None else s[1] for s in a["slices"]]
                steps = [s[2] for s in a["slices"]]
                axes = list(range(len(a["slices"])))
                name = b.op(
                    "Slice",
                    [name]
                    + [b.const(np.array(v, dtype=np.int64)) for v in (starts, ends, axes, steps)],
                )
            else:
                pairs = [a["pad"][i : i + 2] for i in range(0, len(a["pad"]), 2)]  # last dim first
                begin, end = [0] * rank, [0] * rank
                for k, (lo, hi) in enumerate(pairs):
                    begin[rank - 1 - k], end[rank - 1 - k] = lo, hi
                name = b.op("Pad", [name, b.const(np.array(begin + end, dtype=np.int64))])
            out = (kind, name, rank, extra)
        else:
            raise ExportError(f"op {op} of node {node['name']} has no ONNX encoding")
        values[node["name"]] = out
    b.nodes.append(b.h.make_node("Identity", [out[1]], ["logits"]))
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
