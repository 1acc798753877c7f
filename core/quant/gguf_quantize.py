"""GGML block writers (quantizers) in pure torch: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants Q4_K, Q5_K, Q6_K.

The `gguf` package writes only the 32-element types; K-quants come from llama.cpp's C code. These follow ggml's
reference quantizers (``quantize_row_*_ref`` in ggml-quants.c) step for step, vectorised over blocks:

- legacy types: one fp16 scale (and min) per 32 values, round-to-nearest as ggml rounds (``+ 8.5`` then truncate);
- Q4_K / Q5_K: 8 sub-blocks of 32 with a 6-bit scale and min each, found by ``make_qkx2_quants`` (a weighted
  least-squares search over candidate inverse scales, weights |x| + rms(x)), the sub-block scales and mins
  themselves quantized to 6 bits against two fp16 super-block scales, then the values re-rounded with those;
- Q6_K: 16 sub-blocks of 16 with an int8 scale from ``make_qx_quants`` (x^2-weighted search over 19 scales).

The byte layout is checked in the tests by round trip through ``gguf.quants.dequantize`` and, for the legacy types,
byte for byte against ``gguf.quants.quantize``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .gguf_dequant import BLOCK_SIZES, QK_K, _planes

__all__ = ["QUANTIZERS", "quantize_rows"]

_EPS = 1e-15  # GROUP_MAX_EPS in ggml-quants.c: a group this small is all zeros


# ------------------------------------------------------------------------------------------------- bit packing
def _pack(q: torch.Tensor, run: int, width: int) -> torch.Tensor:
    """Inverse of gguf_dequant._runs: (n, elements) ints -> (n, bytes) uint8, runs of `run` bytes, plane k of byte j
    holding element k*run + j of its run."""
    n, planes = q.shape[0], 8 // width
    q = q.to(torch.int32).reshape(n, -1, planes, run)
    shifts = torch.arange(0, 8, width, dtype=torch.int32).reshape(1, 1, planes, 1)
    return (q << shifts).sum(2).to(torch.uint8).reshape(n, -1)


def _pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """(n, 32) bits -> (n, 4) bytes of a little-endian uint32 (bit i = element i)."""
    return (bits.to(torch.int32).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.int32)).sum(2).to(torch.uint8)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n,) or (n, 1) float -> (n, 2) bytes of its fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (Q8_0 uses it)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude per row, sign kept (first one on ties, as ggml's loop)."""
    return torch.gather(x, 1, x.abs().argmax(1, keepdim=True))


# ------------------------------------------------------------------------------------------------ legacy types
def _q8_0(x):
    d = x.abs().amax(1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], 1)


def _symmetric(x, levels: int):
    """Q4_0 / Q5_0: d = -max/(levels/2) from the signed extreme, q = trunc(x/d + levels/2 + 0.5)."""
    d = _absmax_signed(x) / -(levels // 2)
    q = torch.trunc(x * _inverse(d) + (levels // 2 + 0.5)).clamp(0, levels - 1).to(torch.int32)
    return d, q


def _affine(x, levels: int):
    """Q4_1 / Q5_1: d = (max - min)/(levels - 1), q = trunc((x - min)/d + 0.5)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (hi - lo) / (levels - 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, levels - 1).to(torch.int32)
    return d, lo, q


def _q4_0(x):
    d, q = _symmetric(x, 16)
    return torch.cat([_f16_bytes(d), _pack(q, 16, 4)], 1)


def _q4_1(x):
    d, m, q = _affine(x, 16)
    return torch.cat([_f16_bytes(d), _f16_bytes(m), _pack(q, 16, 4)], 1)


def _q5_0(x):
    d, q = _symmetric(x, 32)
    return torch.cat([_f16_bytes(d), _pack_bits_le(q >> 4), _pack(q & 0xF, 16, 4)], 1)


def _q5_1(x):
    d, m, q = _affine(x, 32)
    return torch.cat([_f16_bytes(d), _f16_bytes(m), _pack_bits_le(q >> 4), _pack(q & 0xF, 16, 4)], 1)


# --------------------------------------------------------------------------------------------------- K-quants
def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis left to right in float32, as ggml's scalar loops add. torch.sum adds pairwise and
    torch.cumsum in float64, either of which rounds differently and can flip a near-tie between two candidate
    scales; numpy's add.accumulate is the sequential float32 loop."""
    a = np.add.accumulate(t.detach().float().contiguous().numpy(), axis=-1, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a[..., -1]))


def _float32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml make_qkx2_quants on rows x (M, n) with weights w: x ~ scale * L - the_min, L in [0, nmax], the_min >= 0.
    As in ggml, each candidate rounds against the best min found so far. Returns (scale, the_min (M,), L (M, n))."""
    hi = x.amax(1)
    mn = x.amin(1).clamp(max=0)
    flat = hi == mn
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    one = torch.ones_like(hi)

    def levels(step):  # the candidate inverse scale (rmin + rdelta*step + nmax) / (max - min), in float32 as ggml
        num = _float32(rmin) + _float32(rdelta) * step + nmax
        iscale = num / torch.where(flat, one, hi - mn)
        return torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)

    # 1. plain min/max rounding
    iscale = nmax / torch.where(flat, one, hi - mn)
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    diff = scale[:, None] * L + mn[:, None] - x
    best = _seqsum(w * (diff * diff))
    # 2. least-squares scale and min for each candidate rounding; keep the best weighted error
    for i in range(nstep + 1):
        La = levels(i)
        sl, sl2, sxl = _seqsum(w * La), _seqsum(w * La * La), _seqsum(w * La * x)
        D = sum_w * sl2 - sl * sl
        ok = D > 0
        Ds = torch.where(ok, D, one)
        ts = (sum_w * sxl - sum_x * sl) / Ds
        tm = (sl2 * sum_x - sl * sxl) / Ds
        pos = tm > 0  # the min must not be positive: refit the scale alone
        tm = torch.where(pos, torch.zeros_like(tm), tm)
        ts = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, one), ts)
        diff = ts[:, None] * La + tm[:, None] - x
        mad = _seqsum(w * (diff * diff))
        take = ok & (mad < best) & ~flat
        L = torch.where(take[:, None], La, L)
        best, scale, mn = torch.where(take, mad, best), torch.where(take, ts, scale), torch.where(take, tm, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mn, L.to(torch.int32)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (inverse of gguf_dequant._k_scales)."""
    ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    b0 = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b1 = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    b2 = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([b0, b1, b2], 1).to(torch.uint8)


def _qk_affine(x, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K shared steps: (d, dmin fp16 bytes, 12 scale bytes, L (n, 256) in [0, nmax])."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    # 1. per sub-block weights |x| + rms, scale and min by make_qkx2_quants
    w = (_seqsum(sub * sub)[:, None] / 32).sqrt() + sub.abs()
    scales, mins, L = _make_qkx2(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    # 2. 6-bit scales and mins against the block's largest
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    # ggml starts both at +0 and only takes larger values: never a -0 (an all-zero block has mins of -0)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_s = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_m = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0)
    ls = torch.round(inv_s * scales).clamp(max=63)
    lm = torch.round(inv_m * mins).clamp(max=63)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    # 3. re-round the values with the stored (quantized) scales; a zero scale keeps make_qkx2's levels
    dl = d.float() * ls                       # (n, 8)
    ml = dmin.float() * lm
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    L2 = torch.round((x.reshape(n, 8, 32) + ml[..., None]) / safe[..., None]).clamp(0, nmax).to(torch.int32)
    L = torch.where((dl == 0)[..., None], L, L2).reshape(n, QK_K)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), _pack_k_scales(ls, lm)], 1), L


def _q4_k(x):
    head, L = _qk_affine(x, 15, -1.0, 20)
    return torch.cat([head, _pack(L, 32, 4)], 1)


def _q5_k(x):
    head, L = _qk_affine(x, 31, -0.5, 15)
    return torch.cat([head, _pack(L >> 4, 32, 1), _pack(L & 0xF, 32, 4)], 1)


def _make_qx(x, nmax: int):
    """ggml make_qx_quants, rmse_type 1 (weights x^2): x ~ scale * l, l in [-nmax, nmax - 1], over 19 candidate
    inverse scales around -nmax/max. Returns (scale (M,), L = l + nmax (M, n) int)."""
    mx = _absmax_signed(x).squeeze(1)
    small = x.abs().amax(1) < _EPS
    mx = torch.where(small, torch.ones_like(mx), mx)
    w = x * x

    def fit(iscale):
        l = torch.round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return l, _seqsum(w * x * l), _seqsum(w * l * l)

    l, sumlx, suml2 = fit(-nmax / mx)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    for i in [*range(-9, 0), *range(1, 10)]:
        la, slx, sl2 = fit(-(nmax + _float32(0.1) * i) / mx)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        l = torch.where(take[:, None], la, l)
        scale = torch.where(take, slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), scale)
        best = torch.where(take, scale * slx, best)
    scale = torch.where(small, torch.zeros_like(scale), scale)
    L = torch.where(small[:, None], torch.zeros_like(l), l + nmax)
    return scale, L.to(torch.int32)


def _q6_k(x):
    n = x.shape[0]
    # 1. 16 sub-blocks of 16: scale by make_qx_quants
    scales, L = _make_qx(x.reshape(n * 16, 16), 32)
    scales, L = scales.reshape(n, 16), L.reshape(n, 16, 16)
    # 2. int8 scales against the block's scale of largest magnitude (it maps to -128)
    max_scale = _absmax_signed(scales)                    # (n, 1)
    zero = max_scale.abs().squeeze(1) < _EPS
    iscale = -128.0 / torch.where(zero[:, None], torch.ones_like(max_scale), max_scale)
    d = (1 / iscale).to(torch.float16)
    sc = torch.round(iscale * scales).clamp(max=127)     # >= -128 by construction
    # 3. re-round with the stored scales; a zero scale keeps make_qx's levels
    dl = d.float() * sc
    safe = torch.where(dl == 0, torch.ones_like(dl), dl)
    L2 = torch.round(x.reshape(n, 16, 16) / safe[..., None]).clamp(-32, 31).to(torch.int32) + 32
    L = torch.where((dl == 0)[..., None], L, L2).reshape(n, QK_K)
    out = torch.cat([_pack(L & 0xF, 64, 4), _pack(L >> 4, 32, 2), sc.to(torch.int8).view(torch.uint8),
                     d.view(torch.uint8)], 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)  # ggml writes an all-zero block


def _f32(x):
    return x.contiguous().view(torch.uint8)


def _f16(x):
    return x.to(torch.float16).view(torch.uint8)


def _bf16(x):
    """Round to nearest even; NaN stays a quiet NaN (ggml_compute_fp32_to_bf16)."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF   # the float's bits as unsigned
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    r = torch.where(nan, ((n >> 16) & 0xFFFF) | 64, (n + 0x7FFF + ((n >> 16) & 1)) >> 16)
    return torch.stack([r & 0xFF, (r >> 8) & 0xFF], -1).reshape(x.shape[0], -1).to(torch.uint8)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
    "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def quantize_rows(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """Float (..., row) -> uint8 (..., row_bytes): every row cut into blocks of the type's size."""
    if qtype not in QUANTIZERS:
        raise KeyError(qtype)
    block, size = BLOCK_SIZES[qtype]
    if x.shape[-1] % block:
        raise ValueError(f"{qtype}: rows of {x.shape[-1]} elements are not a multiple of the block size {block}")
    lead = x.shape[:-1]
    blocks = x.detach().float().cpu().reshape(-1, block)       # (n_blocks, block)
    out = QUANTIZERS[qtype](blocks)                            # (n_blocks, type_size)
    return out.reshape(*lead, x.shape[-1] // block * size)
