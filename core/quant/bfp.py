"""Block floating point with outlier channels permuted together (block quantization with outliers).

Each block of ``block`` consecutive weights in a row shares one 8-bit exponent e and stores signed ``mantissa``-bit
integers: W = q 2^(e - (m - 2)), |q| <= 2^(m-1) - 1 (Darvish Rouhani et al. 2020, MSFP). One large input channel
forces a large shared exponent on every block it lands in, flushing its neighbours to zero. So the input columns are
first sorted by their magnitude: outlier columns end up together in their own blocks and the small ones share
small exponents. The permutation is folded into the stored weight (dequantize scatters the columns back), so the
layer's inputs are never permuted at run time; it costs one int16 per input column (negligible bits per weight).
"""

from __future__ import annotations

import torch

from ...errors import InvalidParameterError, WeightsFormatError
from .packing import grouped, pack4, unpack4, ungrouped
from .tensor import QuantizedWeight, register_kind

__all__ = ["BFPWeight", "quantize_bfp"]


@register_kind
class BFPWeight(QuantizedWeight):
    """mant int8 (out, Kp) [m=8] or packed uint8 (out, Kp/2) [m=4], exp int8 (out, G), perm int16/int32 (K,)."""

    kind = "bfp"

    def __init__(self, shape, mant, exp, perm, *, mantissa: int, block: int, pad: int) -> None:
        super().__init__(shape)
        self.register_buffer("mant", mant)
        self.register_buffer("exp", exp)
        self.register_buffer("perm", perm)
        self.mantissa, self.block, self.pad = mantissa, block, pad

    def _q(self) -> torch.Tensor:
        if self.mantissa == 4:
            return unpack4(self.mant).float() - 8
        return self.mant.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self._q().reshape(self.shape[0], -1, self.block)
        g = q * torch.exp2(self.exp.float() - (self.mantissa - 2))[..., None]
        rows = ungrouped(g, torch.Size([self.shape[0], self.perm.numel()]), self.pad)  # permuted column order
        out = torch.empty_like(rows)
        out[:, self.perm.long()] = rows  # fold the permutation back
        return out.reshape(self.shape).to(dtype)

    def config(self) -> dict:
        return {"mantissa": self.mantissa, "block": self.block, "pad": self.pad}

    @classmethod
    def from_tensors(cls, shape, config, tensors):
        shape = torch.Size(shape)
        k = shape.numel() // shape[0]
        m, block = config.get("mantissa"), int(config.get("block", 0))
        mant, exp, perm = tensors.get("mant"), tensors.get("exp"), tensors.get("perm")
        if m not in (4, 8) or block <= 0 or config.get("pad") != (-k) % block or None in (mant, exp, perm):
            raise WeightsFormatError(f"bfp weight {tuple(shape)}: bad config {config} or missing tensors "
                                     f"{sorted(tensors)} (need mant, exp, perm)")
        kp = k + (-k) % block
        if (tuple(perm.shape) != (k,) or tuple(exp.shape) != (shape[0], kp // block)
                or tuple(mant.shape) != (shape[0], kp if m == 8 else kp // 2)):
            raise WeightsFormatError(f"bfp weight {tuple(shape)}: tensor shapes "
                                     f"{ {n: tuple(t.shape) for n, t in tensors.items()} } do not match {config}")
        if not torch.equal(perm.long().sort().values, torch.arange(k)):
            raise WeightsFormatError(f"bfp weight {tuple(shape)}: 'perm' is not a permutation of 0..{k - 1}")
        return cls(shape, mant, exp, perm, mantissa=m, block=block, pad=config["pad"])

    def affine_grid(self):
        """(s, 0, -qmax, qmax) with s (out, K) in the original column order: W = q s."""
        e = torch.exp2(self.exp.float() - (self.mantissa - 2)).repeat_interleave(self.block, 1)
        s = torch.empty(self.shape[0], self.perm.numel(), device=e.device)
        s[:, self.perm.long()] = e[:, : self.perm.numel()]
        qmax = 2 ** (self.mantissa - 1) - 1
        return s, torch.zeros_like(s), -qmax, qmax

    def with_codes(self, q: torch.Tensor) -> "BFPWeight":
        """The same exponents and permutation with new mantissas q (out, K) in the original column order."""
        q = torch.nn.functional.pad(q[:, self.perm.long()].float(), (0, self.pad))
        mant = pack4(q + 8) if self.mantissa == 4 else q.to(torch.int8)
        return BFPWeight(self.shape, mant, self.exp, self.perm, mantissa=self.mantissa, block=self.block, pad=self.pad)

    def requantize(self, weight: torch.Tensor) -> "BFPWeight":
        return quantize_bfp(weight, mantissa=self.mantissa, block=self.block)


def quantize_bfp(w: torch.Tensor, *, mantissa: int = 8, block: int = 32, permute: bool = True) -> BFPWeight:
    """Shared-exponent blocks over magnitude-sorted input columns (round-to-nearest mantissas)."""
    if mantissa not in (4, 8):
        raise InvalidParameterError(f"bfp mantissa must be 4 or 8 bits, got {mantissa}")
    if block <= 0 or block % 2:
        raise InvalidParameterError(f"bfp block must be a positive even number, got {block}")
    r = w.detach().float().reshape(w.shape[0], -1)  # (out, K)
    k = r.shape[1]
    # 1. outlier columns together: sort input columns by their largest magnitude
    perm = torch.argsort(r.abs().amax(0), descending=True) if permute else torch.arange(k)
    g, pad = grouped(r[:, perm], block)  # (out, G, block)
    # 2. shared exponent per block: the smallest e with absmax <= (2^(m-1) - 1) 2^(e - (m-2)) (no clipping)
    qmax = 2 ** (mantissa - 1) - 1
    amax = g.abs().amax(-1).clamp_min(2.0 ** -100)
    e = torch.ceil(torch.log2(amax / qmax)) + (mantissa - 2)
    e = e.clamp(-127, 127)
    q = torch.clamp(torch.round(g / torch.exp2(e - (mantissa - 2))[..., None]), -qmax, qmax)
    q = q.reshape(r.shape[0], -1)
    mant = pack4(q + 8) if mantissa == 4 else q.to(torch.int8)
    perm = perm.to(torch.int16 if k <= 32767 else torch.int32)  # 16 bits per input column suffice for k < 2^15
    return BFPWeight(w.shape, mant, e.to(torch.int8), perm, mantissa=mantissa, block=block, pad=pad)
