"""QONNX encoding of an exported TSQ model, for FINN's front end: the bit widths made explicit.

Where :mod:`.onnx_export` encodes the integer arithmetic (int8 containers), this writer keeps
the network in float32 and marks every quantization with the QONNX custom ops FINN reads:

- weights of a quantized layer: ``Quant`` (signed, narrow range) on ``alpha * codes`` with the
  per-channel scale ``alpha`` and the grid's true bit width (ternary: 2 bits, values -1..1;
  ``narrow:k``: k bits; a mid-rise k-bit grid's odd codes -(2^k - 1)..2^k - 1: k + 1 bits);
- a sparse activation quantizer: ``MultiThreshold`` with the quantizer's thresholds (shared by
  all channels), ``out_dtype`` UINT<bits> and ``out_scale`` = the step, so its output is
  code * step as in PyTorch. MultiThreshold counts ``x >= t``; the quantizer counts ``x > t``,
  so each threshold is the next float32 above the edge;
- the int8 input quantizer: ``Quant`` (signed, narrow, 8 bits) on the image.

Everything else is standard ONNX in float32. Requires the optional ``onnx`` and ``qonnx``
packages (``pip install 'tsquant[qonnx]'``); :class:`QONNXRunner` runs it with qonnx's own
executor.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write
from ..quantizers.activation import thresholds as quantizer_thresholds
from .format import ExportedModel
from .graph import ExportError, Node
from .onnx_export import (
    GraphBuilder,
    avgpool_attrs,
    conv_attrs,
    maxpool_attrs,
    pad_amounts,
    slice_inputs,
)

QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 13  # what qonnx's executor and FINN's front end read


def _qonnx():
    try:
        import qonnx  # noqa: F401
    except ImportError:
        raise ExportError(
            "QONNX export needs the qonnx package: pip install 'tsquant[qonnx]'"
        ) from None


def weight_bit_width(attrs: dict) -> int:
    """Signed narrow-range bits holding the grid's integer codes low..high (symmetric)."""
    largest = max(abs(attrs["low"]), abs(attrs["high"]))
    return int(math.ceil(math.log2(largest + 1))) + 1


def _per_channel(values: np.ndarray, rank: int) -> np.ndarray:
    return values.reshape([1, -1] + [1] * (rank - 2)).astype(np.float32)


class _Writer:
    """Emits the QONNX nodes of an exported graph: one method per op, looked up in _EMIT.
    Values are (ONNX name, rank), all float32."""

    def __init__(self, exported: ExportedModel):
        self.b = GraphBuilder()
        self.t = exported.tensors
        self.input_rank = len(exported.input_shape) + 1

    def f32(self, array, hint="c") -> str:
        return self.b.const(np.asarray(array, dtype=np.float32), hint)

    def quant(self, x: str, scale, bits: int) -> str:
        """Signed narrow-range Quant (every tsquant grid is symmetric about zero)."""
        inputs = [x, self.f32(scale, "scale"), self.f32(0.0, "zeropt"), self.f32(bits, "bits")]
        return self.b.op(
            "Quant", inputs, domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND"
        )

    # --- one method per op: (node, input values) -> output value --------------------------

    def input(self, node: Node, args):
        return "input", self.input_rank

    def output(self, node: Node, args):
        return args[0]

    def quantize_input(self, node: Node, args):
        a = node.attrs
        return self.quant(args[0][0], a["scale"], a["bits"]), args[0][1]

    def layer(self, node: Node, args):
        """conv / linear in float32; a quantized one takes its weights through a Quant node."""
        b, a = self.b, node.attrs
        x, bias = args[0][0], node.tensor(self.t, "bias")
        quantized = node.op in ("qconv", "qlinear")
        weight = node.float_weight(self.t)
        alpha = node.tensor(self.t, "alpha").double() if quantized else None
        if node.op in ("conv", "qconv"):
            w = self.f32(weight.numpy(), "w")
            if quantized:
                w = self.quant(w, alpha.numpy().reshape(-1, 1, 1, 1), weight_bit_width(a))
            inputs = [x, w] + ([self.f32(bias.numpy(), "b")] if bias is not None else [])
            y = b.op(
                "Conv",
                inputs,
                **conv_attrs(a),
                group=a.get("groups", 1),
            )
            return y, 4
        w = self.f32(weight.numpy().T.copy(), "w")  # (in, out) for MatMul
        if quantized:
            w = self.quant(w, alpha.numpy().reshape(1, -1), weight_bit_width(a))
        y = b.op("MatMul", [x, w])
        if bias is not None:
            y = b.op("Add", [y, self.f32(bias.numpy(), "b")])
        return y, 2

    def affine(self, node: Node, args):
        (x, rank), b = args[0], self.b
        scale = _per_channel(node.tensor(self.t, "scale").double().numpy(), rank)
        shift = _per_channel(node.tensor(self.t, "shift").double().numpy(), rank)
        return b.op("Add", [b.op("Mul", [x, self.f32(scale)]), self.f32(shift)]), rank

    def quantize(self, node: Node, args):
        (x, rank), a = args[0], node.attrs
        edges = quantizer_thresholds(a["step"], a["eps"], a["bits"]).numpy().astype(np.float32)
        above = np.nextafter(edges, np.float32(np.inf)).reshape(1, -1)  # x > edge <=> x >= above
        y = self.b.op(
            "MultiThreshold",
            [x, self.f32(above, "thresholds")],
            domain=QONNX_DOMAIN,
            out_dtype=f"UINT{a['bits']}",
            out_scale=float(a["step"]),
            data_layout="NCHW" if rank == 4 else "NC",
        )
        return y, rank

    def relu(self, node: Node, args):
        return self.b.op("Relu", [args[0][0]]), args[0][1]

    def add(self, node: Node, args):
        return self.b.op("Add", [args[0][0], args[1][0]]), args[0][1]

    def maxpool(self, node: Node, args):
        a = node.attrs
        y = self.b.op("MaxPool", [args[0][0]], **maxpool_attrs(a))
        return y, 4

    def avgpool(self, node: Node, args):
        a = node.attrs
        y = self.b.op("AveragePool", [args[0][0]], **avgpool_attrs(a))
        return y, 4

    def global_avgpool(self, node: Node, args):
        return self.b.op("GlobalAveragePool", [args[0][0]]), 4

    def flatten(self, node: Node, args):
        if node.attrs["start_dim"] != 1:
            raise ExportError(f"{node.name}: QONNX export supports flatten(x, 1) only")
        return self.b.op("Flatten", [args[0][0]], axis=1), 2

    def slice(self, node: Node, args):
        consts = [self.b.const(v) for v in slice_inputs(node.attrs["slices"])]
        return self.b.op("Slice", [args[0][0], *consts]), args[0][1]

    def pad(self, node: Node, args):
        (x, rank), b = args[0], self.b
        return b.op("Pad", [x, b.const(pad_amounts(node.attrs["pad"], rank))]), rank


_EMIT = {
    "input": _Writer.input,
    "output": _Writer.output,
    "quantize_input": _Writer.quantize_input,
    "conv": _Writer.layer,
    "qconv": _Writer.layer,
    "linear": _Writer.layer,
    "qlinear": _Writer.layer,
    "affine": _Writer.affine,
    "quantize": _Writer.quantize,
    "relu": _Writer.relu,
    "add": _Writer.add,
    "maxpool": _Writer.maxpool,
    "avgpool": _Writer.avgpool,
    "global_avgpool": _Writer.global_avgpool,
    "flatten": _Writer.flatten,
    "slice": _Writer.slice,
    "pad": _Writer.pad,
}


def qonnx_model(exported: ExportedModel, batch: int | str = "batch"):
    """The QONNX ModelProto (input ``input`` float32 NCHW, output ``logits`` float32)."""
    _qonnx()
    writer = _Writer(exported)
    b = writer.b
    values: dict[str, tuple[str, int]] = {}
    for node in exported.graph:
        emit = _EMIT.get(node.op)
        if emit is None:
            raise ExportError(f"op {node.op} of node {node.name} has no QONNX encoding")
        values[node.name] = emit(writer, node, [values[i] for i in node.inputs])
    out = values[exported.graph[-1].name][0]
    b.nodes.append(b.h.make_node("Identity", [out], ["logits"]))
    graph = b.h.make_graph(
        b.nodes,
        "tsquant_qonnx",
        [b.h.make_tensor_value_info("input", b.T.FLOAT, [batch, *exported.input_shape])],
        [b.h.make_tensor_value_info("logits", b.T.FLOAT, [batch, None])],
        b.inits,
    )
    opsets = [b.h.make_opsetid("", OPSET), b.h.make_opsetid(QONNX_DOMAIN, 1)]
    return b.h.make_model(graph, opset_imports=opsets, producer_name="tsquant")


def to_qonnx(exported: ExportedModel, path: Path) -> Path:
    """Write the QONNX file for FINN: batch size 1, cleaned up by qonnx's own transformations
    (shape inference, constant folding that keeps the Quant nodes, unique names)."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    model = cleanup_model(ModelWrapper(qonnx_model(exported, batch=1)))
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(model.model.SerializeToString()))
    return path


class QONNXRunner:
    """Logits by qonnx's own executor (node by node: its MultiThreshold and Quant in numpy, the
    standard ops in onnxruntime), with one shape-inferred model per batch size."""

    def __init__(self, exported: ExportedModel):
        self.exported = exported
        self._models = {}

    def run(self, images: torch.Tensor) -> torch.Tensor:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.infer_shapes import InferShapes

        n = images.shape[0]
        if n not in self._models:
            self._models[n] = ModelWrapper(qonnx_model(self.exported, batch=n)).transform(
                InferShapes()
            )
        out = execute_onnx(self._models[n], {"input": images.float().numpy()})
        return torch.from_numpy(np.asarray(out["logits"]))
