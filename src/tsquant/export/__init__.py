"""Deployable integer model: export format, integer runtime, ONNX, model card, verification."""

from .card import format_card, model_card
from .format import ExportedModel, export_model, load_export
from .graph import ExportError, build_graph, check_exportable
from .packing import PackingError, pack_codes, unpack_codes
from .runtime import IntegerRuntime

__all__ = [
    "ExportError",
    "ExportedModel",
    "IntegerRuntime",
    "PackingError",
    "build_graph",
    "check_exportable",
    "export_model",
    "format_card",
    "load_export",
    "model_card",
    "pack_codes",
    "unpack_codes",
]
