"""Per-output-channel int8 weights, symmetric (W = s q) or asymmetric (W = s (q - z)).

Forward (``Int8Weight.kernel``): by default a bf16 matmul of bf16 activations with the int8 codes (exact in bf16)
and the per-row scale applied to the fp32 output. ``torch._weight_int8pack_mm`` ("aten") is the alternative; it is
fast only with bf16 activations (fp32 takes a ~35x slower path, ../shared/notes/perf-anchors.md #10), and on this
machine it is slower than fp32 even then. The bf16 rounding of x (relative 2^-9) is far below the int8 weight error
(~1e-2). The aten kernel (torch 2.13 CPU) segfaults or returns garbage when the input width is not a multiple of
16 (K = 8, 24, 40 tried), so such layers never use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import WeightsFormatError
from .tensor import QuantizedWeight, register_kind

__all__ = ["Int8Weight", "quantize_int8"]

_HAS_INT8_MM = hasattr(torch, "_weight_int8pack_mm")


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1)  # (out, in*kh*kw)


@register_kind
class Int8Weight(QuantizedWeight):
    """q int8 (out, K), scale (out,) fp32, zero (out,) fp32 or absent (symmetric)."""

    kind = "int8"

    def __init__(self, shape, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 fast: bool = True) -> None:
        super().__init__(shape)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.fast = fast  # allow the integer kernel (benches switch it off to time the dequantize path)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.q.float()
        if self.zero is not None:
            q = q - self.zero[:, None]
        return (q * self.scale[:, None]).reshape(self.shape).to(dtype)

    # "bf16": x and q in bf16 (int8 values are exact in bf16), one bf16 matmul, per-row scale applied to the
    # fp32 output; measured 0.43-0.49x of fp32 F.linear on a 64x1280x1280 matmul here, while aten's
    # _weight_int8pack_mm ("aten") took 1.7-1.8x (bench/results/quant_bench.md). "dequant": fp32 reference path.
    KERNELS = ("bf16", "aten", "dequant")
    kernel = "bf16"

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        k = self.kernel if self.fast else "dequant"
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            k = "dequant"
        if k == "aten" and not (self.symmetric and _HAS_INT8_MM and self.q.shape[1] % 16 == 0):
            k = "bf16"
        if k == "dequant":
            return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        lead = x.shape[:-1]
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # fp32 activations hit aten's slow kernel path
        if k == "aten":
            y = torch._weight_int8pack_mm(xb, self.q, self.scale.to(torch.bfloat16)).to(x.dtype)
            y = y if bias is None else y + bias.to(x.dtype)
        elif x.dtype == torch.bfloat16 and self.zero is None:
            # bf16 in and out: scale (and bias) in one bf16 pass over the output, no fp32 round trip
            y = F.linear(xb, self.q.reshape(self.q.shape[0], -1).to(torch.bfloat16))
            scale = self.scale.to(torch.bfloat16)
            y = y * scale if bias is None else torch.addcmul(bias.to(torch.bfloat16), y, scale)
        else:
            y = F.linear(xb, self.q.reshape(self.q.shape[0], -1).to(torch.bfloat16)).float()
            if self.zero is not None:  # x (q - z)^T = x q^T - z sum(x)
                y = y - xb.float().sum(-1, keepdim=True) * self.zero.float()
            scale = self.scale.float()
            y = (y * scale if bias is None else torch.addcmul(bias.float(), y, scale)).to(x.dtype)
        return y.reshape(*lead, -1)

    def config(self) -> dict:
        return {"symmetric": self.symmetric}

    @classmethod
    def from_tensors(cls, shape, config, tensors):
        q, scale, zero = tensors.get("q"), tensors.get("scale"), tensors.get("zero")
        rows, k = shape[0], int(torch.Size(shape).numel() // shape[0])
        if q is None or scale is None or q.dtype != torch.int8 or tuple(q.shape) != (rows, k) or scale.shape != (rows,):
            raise WeightsFormatError(f"int8 weight of shape {tuple(shape)} needs q int8 ({rows}, {k}) and scale "
                                     f"({rows},); got {({n: (tuple(t.shape), str(t.dtype)) for n, t in tensors.items()})}")
        if not config.get("symmetric", True) and zero is None:
            raise WeightsFormatError("asymmetric int8 weight has no 'zero' tensor")
        return cls(shape, q, scale.float(), None if zero is None else zero.float())

    def requantize(self, weight: torch.Tensor) -> "Int8Weight":
        return quantize_int8(weight, symmetric=self.symmetric)

    def affine_grid(self):
        """(s, m, qmin, qmax), s and m broadcastable to (out, K): W = q s + m; the grid calibration rounds onto."""
        s = self.scale.float()[:, None]
        m = torch.zeros_like(s) if self.symmetric else -self.zero.float()[:, None] * s
        return s, m, (-127 if self.symmetric else -128), 127

    def with_codes(self, q: torch.Tensor) -> "Int8Weight":
        return Int8Weight(self.shape, q.to(torch.int8).reshape(self.q.shape), self.scale, self.zero, self.fast)


def quantize_int8(w: torch.Tensor, *, symmetric: bool = True, clip: torch.Tensor | float | None = None) -> Int8Weight:
    """Round-to-nearest per-channel int8. ``clip`` (scalar or (out,), a fraction of each row's range) shrinks the
    range: the knob calibration searches."""
    r = _rows(w)
    if isinstance(clip, torch.Tensor):
        clip = clip.reshape(-1)  # one ratio per output row
    if symmetric:
        amax = r.abs().amax(1)
        if clip is not None:
            amax = amax * clip
        scale = (amax / 127).clamp_min(1e-12)
        q = torch.clamp(torch.round(r / scale[:, None]), -127, 127).to(torch.int8)
        return Int8Weight(w.shape, q, scale)
    lo, hi = r.amin(1).clamp(max=0), r.amax(1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    zero = torch.round(-lo / scale) - 128  # q in [-128, 127] and q - zero = 0 exactly represents 0
    q = torch.clamp(torch.round(r / scale[:, None]) + zero[:, None], -128, 127).to(torch.int8)
    return Int8Weight(w.shape, q, scale, zero)
