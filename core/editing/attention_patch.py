"""One attention-patch mechanism for UNet self-attention (attn1) and cross-attention (attn2), pure torch.

A patch is a description plus a function: `kinds` says which attention calls it replaces ("self", "cross"), and
`patch(q, k, v, call) -> (B, N, heads * d)` computes the output of one call from its projected queries, keys and
values (before the output projection). `call` (an `AttentionCall`) names the layer, the heads and the batch layout,
so a patch can keep per-layer state (recorded keys/values, masks) in itself. Two thin adapters apply it:

- diffusers: `pipelines/compose.py` swaps the UNet's attention processors (layer = the module name),
- ComfyUI: `nodes/compose.py` sets `patches_replace["attn1" / "attn2"]` on a cloned ModelPatcher (layer = the
  (block, number, index) key ComfyUI looks up; tag = the call's cond_or_uncond layout).

Both hand the patch the same q, k, v; the math lives here only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError

KINDS = ("self", "cross")


@dataclass(frozen=True)
class AttentionCall:
    kind: str                   # "self" (attn1) or "cross" (attn2)
    layer: Hashable             # the adapter's stable name of the attention module
    heads: int
    tag: Hashable = None        # batch layout of the call (ComfyUI: tuple of cond_or_uncond), None if fixed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v per head. q (B, N, h*d), k and v (B, T, h*d), bias broadcastable to
    (B, h, N, T) (-inf forbids a key) -> (B, N, h*d)."""
    b, n, inner = q.shape
    if inner % heads:
        raise InvalidParameterError(f"attention width {inner} is not divisible by heads={heads}")
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))     # (B, h, N|T, d)
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                  # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of an attention level with n_tokens = h * w for a latent of height x width: UNet levels halve with
    ceil (stride-2 convolutions with padding 1)."""
    h, w = height, width
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise InvalidParameterError(f"an attention call with {n_tokens} tokens is not a level of a {width}x{height} "
                                    "latent (expected the latent's size halved 0 or more times)")
    return h, w


def mask_tokens(mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Latent mask (B|1, 1, H, W) -> (B|1, N) at the attention level with n_tokens: the share of each token's
    latent cells the mask covers (area average), row-major as the UNet flattens (h, w)."""
    h, w = token_grid(n_tokens, *mask.shape[-2:])
    small = mask if (h, w) == tuple(mask.shape[-2:]) else F.adaptive_avg_pool2d(mask, (h, w))
    return small.reshape(small.shape[0], h * w)


class AttentionPatch:
    """Base patch: replaces the calls of `kinds` with plain attention. Subclasses override __call__."""

    kinds: tuple[str, ...] = KINDS

    def wants(self, kind: str) -> bool:
        return kind in self.kinds

    def __call__(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        return attention(q, k, v, call.heads)


__all__ = ["KINDS", "AttentionCall", "AttentionPatch", "attention", "mask_tokens", "token_grid"]
