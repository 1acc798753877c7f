"""Quantized weights and layers: the QuantizedWeight interface, schemes, QuantLinear/QuantConv2d, calibration.

Pure torch. Files: tensor.py (interface + kind registry), modules.py (layers, LoRA branch, atomic swap),
schemes.py (name -> quantizer table), int8.py, and gguf_*.py (GGUF block types)."""

from .modules import (SCHEMES, LowRank, QuantConv2d, QuantLinear, QuantModule, quantize_layer, quantize_model,
                      quantized_modules, replace, resolve_scheme)
from .tensor import WEIGHT_KINDS, QuantizedWeight, register_kind
from . import schemes as _schemes  # noqa: F401  (fills SCHEMES)

__all__ = ["QuantizedWeight", "WEIGHT_KINDS", "register_kind", "SCHEMES", "LowRank", "QuantLinear", "QuantConv2d",
           "QuantModule", "quantize_layer", "quantize_model", "quantized_modules", "replace", "resolve_scheme"]
