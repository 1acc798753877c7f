"""NF4: a 16-entry codebook of normal quantiles with one absmax scale per block (Dettmers et al. 2023, QLoRA §3).

The codebook is built from its definition (not copied): 8 positive and 7 negative quantiles of N(0, 1) at evenly
spaced probabilities from 1 - offset to 1/2, plus an exact zero, normalised to [-1, 1]; offset 0.9677 is QLoRA's
choice (the midpoint between the tail quantiles of 15 and 16 bins). Weights have roughly normal rows, so equal-mass
bins waste fewer codes than uniform int4. Block 64 with an fp16 scale: 4.25 bits per weight (no double quantization).
"""

from __future__ import annotations

import functools
import math

import torch

from ...errors import InvalidParameterError, WeightsFormatError
from .packing import grouped, pack4, unpack4, ungrouped
from .tensor import QuantizedWeight, register_kind

__all__ = ["NF4Weight", "quantize_nf4", "nf4_codebook"]

OFFSET = 0.9677083


def _ndtri(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)  # inverse normal CDF


@functools.cache
def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values in ascending order (fp32, -1 ... 0 ... 1)."""
    p = torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1]  # 8 positive
    n = torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1]  # 7 negative
    v = torch.cat([_ndtri(p), torch.zeros(1, dtype=torch.float64), -_ndtri(n)])
    v = v.sort().values
    return (v / v.abs().max()).float()


@register_kind
class NF4Weight(QuantizedWeight):
    """packed uint8 (out, Kp/2) codebook indices, absmax fp16 (out, G)."""

    kind = "nf4"

    def __init__(self, shape, packed, absmax, *, block: int, pad: int) -> None:
        super().__init__(shape)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.block, self.pad = block, pad

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        idx = unpack4(self.packed).long().reshape(self.shape[0], -1, self.block)
        g = nf4_codebook().to(self.packed.device)[idx] * self.absmax.float()[..., None]
        return ungrouped(g, self.shape, self.pad).to(dtype)

    def config(self) -> dict:
        return {"block": self.block, "pad": self.pad}

    @classmethod
    def from_tensors(cls, shape, config, tensors):
        shape = torch.Size(shape)
        block, k = int(config.get("block", 0)), shape.numel() // shape[0]
        pad = (-k) % block if block > 0 else -1
        p, a = tensors.get("packed"), tensors.get("absmax")
        if (block <= 0 or config.get("pad") != pad or p is None or a is None or p.dtype != torch.uint8
                or tuple(p.shape) != (shape[0], (k + pad) // 2) or tuple(a.shape) != (shape[0], (k + pad) // block)):
            raise WeightsFormatError(f"nf4 weight {tuple(shape)}: config {config} / tensors "
                                     f"{ {n: tuple(t.shape) for n, t in tensors.items()} } do not agree")
        return cls(shape, p, a.half(), block=block, pad=pad)

    def requantize(self, weight: torch.Tensor) -> "NF4Weight":
        return quantize_nf4(weight, block=self.block)


def quantize_nf4(w: torch.Tensor, *, block: int = 64) -> NF4Weight:
    """Nearest codebook entry after dividing each block by its absmax."""
    if block <= 0 or block % 2:
        raise InvalidParameterError(f"nf4 block must be a positive even number, got {block}")
    g, pad = grouped(w, block)  # (out, G, block)
    absmax = g.abs().amax(-1).clamp_min(1e-8).half()
    x = g / absmax.float()[..., None]
    cb = nf4_codebook()
    mids = (cb[1:] + cb[:-1]) / 2  # nearest entry = number of midpoints below x
    idx = torch.bucketize(x.contiguous(), mids)
    return NF4Weight(w.shape, pack4(idx.reshape(w.shape[0], -1)), absmax, block=block, pad=pad)
