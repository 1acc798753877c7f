"""The scheme table: name -> fn(float weight) -> QuantizedWeight (round-to-nearest; calibrate.py refines).

Bits per weight below are for a 1280 x 1280 weight, scales included.

| name         | weight                                                        | bpw   |
|--------------|---------------------------------------------------------------|-------|
| int8         | per output channel, symmetric (integer kernel on CPU)         | 8.03  |
| int8_asym    | per output channel, scale + zero point                        | 8.05  |
| int4_g{32,64,128}  | group-wise affine, fp16 scale + minimum                 | 5.0 / 4.5 / 4.25 |
| int4s_g{32,64,128} | group-wise symmetric, fp16 scale                        | 4.5 / 4.25 / 4.125 |
| int4k_g{32,64}     | group-wise affine, 6-bit scale/min codes (Q4_K-style)   | 4.40 / 4.21 |
| nf4          | NF4 codebook, absmax per 64                                    | 4.25  |
| bfp8 / bfp4  | block floating point (32 / 16 per exponent), outlier columns permuted together | 8.26 / 4.51 |
"""

from __future__ import annotations

from functools import partial

from .bfp import quantize_bfp
from .int4 import quantize_int4
from .int8 import quantize_int8
from .modules import SCHEMES
from .nf4 import quantize_nf4

SCHEMES.update({
    "int8": partial(quantize_int8, symmetric=True),
    "int8_asym": partial(quantize_int8, symmetric=False),
    **{f"int4_g{g}": partial(quantize_int4, group=g) for g in (32, 64, 128)},
    **{f"int4s_g{g}": partial(quantize_int4, group=g, symmetric=True) for g in (32, 64, 128)},
    # no per-group range search by default: on NimbleDiff-Tiny it raised the denoiser error of int4k_g32 from 0.026
    # to 0.031 (RTN) and 0.015 to 0.020 (calibrated), although it lowers the weight error (bench/quant_bench.py)
    **{f"int4k_g{g}": partial(quantize_int4, group=g, scales="q6") for g in (32, 64)},
    "nf4": partial(quantize_nf4, block=64),
    "bfp8": partial(quantize_bfp, mantissa=8, block=32),
    "bfp4": partial(quantize_bfp, mantissa=4, block=16),
})

# The parameters of each scheme, so calibration can re-run a scheme with a clip ratio.
SCHEME_FN = {name: (fn.func, fn.keywords) for name, fn in SCHEMES.items()}
