"""GGML block formats: sizes, and one small pure-torch dequantizer per quantization type.

A GGUF tensor is stored row by row; each row (the last, fastest axis) is cut into blocks of ``block_size``
elements stored in ``type_size`` bytes. A dequantizer maps uint8 blocks (n, type_size) to floats (n, block_size).
Byte layouts follow ggml's ``ggml-common.h`` (block_q4_0 ... block_q6_K); the test suite checks every function
against the `gguf` package's numpy dequantizer on random bytes, float-exactly.

Packing pattern shared by every type: a run of G bytes holds 8/w "planes" of w-bit fields; bits [k*w, (k+1)*w) of
byte j are element k*G + j of that run (`_planes`). Q4_0 is one run of 16 bytes with two nibble planes, Q4_K
four runs of 32 bytes with two planes each, Q6_K's high bits two runs of 32 bytes with four 2-bit planes, etc.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["GGML_TYPES", "GGML_NAMES", "BLOCK_SIZES", "DEQUANTIZERS", "ggml_type", "dequantize",
           "dequantize_blocks", "row_bytes"]

QK_K = 256  # super-block of the K-quants

# ggml_type enum values (ggml.h); only the types this module reads
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
              "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
GGML_NAMES = {v: k for k, v in GGML_TYPES.items()}
# name -> (elements per block, bytes per block)
BLOCK_SIZES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
               "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (QK_K, 84), "Q3_K": (QK_K, 110), "Q4_K": (QK_K, 144),
               "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}


def ggml_type(qtype) -> str:
    """Canonical name ('Q4_K') of a type given as a name, an enum value or an IntEnum (gguf.GGMLQuantizationType)."""
    name = getattr(qtype, "name", None) or (GGML_NAMES.get(qtype) if isinstance(qtype, int) else str(qtype).upper())
    if name not in BLOCK_SIZES:
        raise KeyError(name if name is not None else qtype)
    return name


# ------------------------------------------------------------------------------------------------- bit helpers
def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut (n, type_size) bytes into consecutive fields of the given byte widths (the last takes the rest)."""
    return list(torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1))


def _planes(b: torch.Tensor, width: int) -> torch.Tensor:
    """(..., G) uint8 -> (..., 8 // width, G) int32: plane k holds bits [k*width, (k+1)*width) of each byte."""
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=b.device)
    return (b.to(torch.int32).unsqueeze(-2) >> shifts.unsqueeze(-1)) & ((1 << width) - 1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) little-endian bytes -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _runs(b: torch.Tensor, run: int, width: int) -> torch.Tensor:
    """(n, bytes) -> (n, elements): consecutive runs of `run` bytes, each unpacked plane by plane."""
    n = b.shape[0]
    return _planes(b.reshape(n, -1, run), width).reshape(n, -1)


def _bits_le(b: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit i first (Q5_0 / Q5_1 high bits)."""
    return _planes(b, 1).transpose(1, 2).reshape(b.shape[0], -1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (get_scale_min_k4 in ggml).
    Bytes 0-3 hold scales 0-3 (+2 high bits of scales 4-7), 4-7 mins 0-3 (+ high bits of mins 4-7),
    8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high)."""
    s = s.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


# ------------------------------------------------------------------------------------------------ dequantizers
def _f32(b):
    return b.contiguous().view(torch.float32)


def _f16_full(b):
    return b.contiguous().view(torch.float16).float()


def _bf16(b):
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _q8_0(b):
    d, q = _split(b, 2)
    return _f16(d) * q.contiguous().view(torch.int8).float()


def _q4_0(b):
    d, q = _split(b, 2)
    return _f16(d) * (_runs(q, 16, 4) - 8).float()


def _q4_1(b):
    d, m, q = _split(b, 2, 2)
    return _f16(d) * _runs(q, 16, 4).float() + _f16(m)


def _q5_0(b):
    d, qh, q = _split(b, 2, 4)
    return _f16(d) * ((_runs(q, 16, 4) | (_bits_le(qh) << 4)) - 16).float()


def _q5_1(b):
    d, m, qh, q = _split(b, 2, 2, 4)
    return _f16(d) * (_runs(q, 16, 4) | (_bits_le(qh) << 4)).float() + _f16(m)


def _q2_k(b):
    n = b.shape[0]
    sc, q, d, dmin = _split(b, 16, 64, 2)   # 16 sub-blocks of 16: 4-bit scale (low) and min (high)
    sc = sc.to(torch.int32)
    dl = (_f16(d) * (sc & 0xF).float()).reshape(n, 16, 1)
    ml = (_f16(dmin) * (sc >> 4).float()).reshape(n, 16, 1)
    return (dl * _runs(q, 32, 2).reshape(n, 16, 16).float() - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, q, s, d = _split(b, 32, 64, 12)
    s = s.to(torch.int32)
    low = _planes(s[:, :8], 4).reshape(n, 16)           # low 4 bits: bytes 0-7, low nibbles then high nibbles
    high = _planes(s[:, 8:], 2).reshape(n, 16)          # high 2 bits: bytes 8-11, four 2-bit planes
    scales = ((low | (high << 4)) - 32).float()
    dl = (_f16(d) * scales).reshape(n, 16, 1)
    # the 3rd bit is stored inverted: a set hmask bit means "no -4 offset"
    q = _runs(q, 32, 2) - ((_runs(hmask, 32, 1) ^ 1) << 2)
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


def _q4_k(b):
    n = b.shape[0]
    d, dmin, s, q = _split(b, 2, 2, 12)
    sc, mn = _k_scales(s)
    dl = (_f16(d) * sc).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn).reshape(n, 8, 1)
    return (dl * _runs(q, 32, 4).reshape(n, 8, 32).float() - ml).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin, s, qh, q = _split(b, 2, 2, 12, 32)
    sc, mn = _k_scales(s)
    dl = (_f16(d) * sc).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn).reshape(n, 8, 1)
    q = _runs(q, 32, 4) | (_runs(qh, 32, 1) << 4)
    return (dl * q.reshape(n, 8, 32).float() - ml).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, s, d = _split(b, 128, 64, 16)
    dl = (_f16(d) * s.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    q = (_runs(ql, 64, 4) | (_runs(qh, 32, 2) << 4)) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


DEQUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16_full, "BF16": _bf16, "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
    "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def row_bytes(qtype: str, row: int) -> int:
    """Bytes of one row of `row` elements (`row` must be a multiple of the block size)."""
    block, size = BLOCK_SIZES[qtype]
    if row % block:
        raise ValueError(f"{qtype}: a row of {row} elements is not a multiple of the block size {block}")
    return row // block * size


def dequantize_blocks(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 bytes of whole blocks (any shape) -> float32 (n_blocks * block_size,)."""
    block, size = BLOCK_SIZES[qtype]
    blocks = data.reshape(-1, size)  # (n, type_size)
    return DEQUANTIZERS[qtype](blocks).reshape(-1)


def dequantize(data: torch.Tensor, qtype: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bytes of a whole tensor -> float tensor of `shape` (the element count must match the bytes)."""
    block, size = BLOCK_SIZES[qtype]
    n = 1
    for s in shape:
        n *= int(s)
    if data.numel() * block != n * size:
        raise ValueError(f"{qtype}: {data.numel()} bytes do not hold {n} elements ({size} bytes per {block})")
    return dequantize_blocks(data.view(torch.uint8), qtype).reshape(tuple(shape)).to(dtype)
