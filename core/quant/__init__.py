"""Quantized weights and layers: the QuantizedWeight interface, schemes, QuantLinear/QuantConv2d, calibration.

Pure torch. Files: tensor.py (interface + kind registry), modules.py (layers, LoRA branch, atomic swap),
schemes.py (name -> quantizer table), int8.py, int4.py, nf4.py, bfp.py, packing.py, act.py (W8A8),
calibrate.py (Q-Diffusion calibration, AdaRound, HAWQ-V2 mixed precision), gguf_*.py (GGUF block types)."""

from . import schemes as _schemes  # noqa: F401  (fills SCHEMES)
from .act import ActQuant
from .bfp import BFPWeight, quantize_bfp
from .int4 import Int4Weight, quantize_int4
from .int8 import Int8Weight, quantize_int8
from .modules import (SCHEMES, LowRank, QuantConv2d, QuantLinear, QuantModule, quantize_layer, quantize_model,
                      quantized_modules, replace, resolve_scheme)
from .nf4 import NF4Weight, nf4_codebook, quantize_nf4
from .tensor import WEIGHT_KINDS, QuantizedWeight, register_kind

__all__ = ["QuantizedWeight", "WEIGHT_KINDS", "register_kind", "SCHEMES", "LowRank", "QuantLinear", "QuantConv2d",
           "QuantModule", "quantize_layer", "quantize_model", "quantized_modules", "replace", "resolve_scheme",
           "ActQuant", "Int8Weight", "Int4Weight", "NF4Weight", "BFPWeight", "quantize_int8", "quantize_int4",
           "quantize_nf4", "quantize_bfp", "nf4_codebook"]
