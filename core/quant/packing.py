"""Bit packing shared by the 4-bit schemes, and the grouped 2-D view every scheme quantizes."""

from __future__ import annotations

import torch

__all__ = ["pack4", "unpack4", "grouped", "ungrouped"]


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (N, K), K even -> uint8 (N, K/2); element 2i in the low nibble, 2i+1 in the high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> codes 0..15 (N, K) as uint8."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)


def grouped(w: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """w (out, ...) -> fp32 (out, G, group) with the row zero-padded to a multiple of ``group``; and the pad."""
    r = w.detach().float().reshape(w.shape[0], -1)  # (out, K)
    pad = (-r.shape[1]) % group
    if pad:
        r = torch.nn.functional.pad(r, (0, pad))
    return r.reshape(r.shape[0], -1, group), pad


def ungrouped(g: torch.Tensor, shape: torch.Size, pad: int) -> torch.Tensor:
    """Inverse of ``grouped``: (out, G, group) -> the weight in ``shape``."""
    r = g.reshape(g.shape[0], -1)
    if pad:
        r = r[:, : r.shape[1] - pad]
    return r.reshape(shape)


def pack6(c: torch.Tensor) -> torch.Tensor:
    """Codes 0..63 (N, G) -> uint8 (N, ceil(G/4)*3): four 6-bit codes in three bytes (zero-padded)."""
    c = c.to(torch.int32)
    pad = (-c.shape[1]) % 4
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(c.shape[0], -1, 4)
    v = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)  # 24 bits
    return torch.stack([v & 0xFF, (v >> 8) & 0xFF, v >> 16], -1).reshape(c.shape[0], -1).to(torch.uint8)


def unpack6(p: torch.Tensor, g: int) -> torch.Tensor:
    """uint8 (N, 3k) -> codes (N, g) as int32."""
    b = p.to(torch.int32).reshape(p.shape[0], -1, 3)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    c = torch.stack([(v >> s) & 0x3F for s in (0, 6, 12, 18)], -1).reshape(p.shape[0], -1)
    return c[:, :g]
