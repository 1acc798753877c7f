"""The scheme table: name -> fn(float weight) -> QuantizedWeight (round-to-nearest; calibrate.py refines)."""

from __future__ import annotations

from functools import partial

from .int8 import quantize_int8
from .modules import SCHEMES

SCHEMES.update({
    "int8": partial(quantize_int8, symmetric=True),
    "int8_asym": partial(quantize_int8, symmetric=False),
})
