"""The canonical adapter form: {module path in diffusers naming: Delta}.

Every reader in `weights/` produces these; everything in `core/adapters` consumes them. A Delta knows how to
compute its weight difference for a target weight shape; applying and merging live elsewhere.

Module paths are prefixed by the component they belong to, e.g. ``unet.down_blocks.1.attentions.0.proj_in`` or
``text_encoder.encoder.layers.0.self_attn.q_proj`` (text-encoder paths never contain ``text_model.``: transformers 5
flattened CLIPTextModel, so resolution goes through ``getattr(te, "text_model", te)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRA:
    """W' = W + scale * up @ down, scale = alpha / rank (kohya / PEFT convention; alpha None means alpha = rank).

    down: (r, in) for linear, (r, in, kh, kw) for conv.  up: (out, r) or (out, r, 1, 1).
    mid: optional Tucker core (r, r, kh, kw) of LyCORIS LoCon convolutions.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta_weight(self, shape: torch.Size, dtype=torch.float32, device=None) -> torch.Tensor:
        """Delta W with the target weight's shape (scale included)."""
        up = self.up.to(device=device, dtype=dtype).flatten(1)            # (out, r)
        if self.mid is None:
            down = self.down.to(device=device, dtype=dtype).flatten(1)    # (r, in*kh*kw)
            delta = up @ down
        else:
            down = self.down.to(device=device, dtype=dtype).flatten(1)    # (r, in)
            mid = self.mid.to(device=device, dtype=dtype)                 # (r, r, kh, kw)
            delta = torch.einsum("or,rskl,si->oikl", up, mid, down)
        return (delta * self.scale).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None

    def numel(self) -> int:
        return sum(t.numel() for t in (self.down, self.up, self.mid) if t is not None)


@dataclass
class Diff:
    """A full difference: W' = W + weight (and b' = b + bias). ComfyUI's `.diff` / `.diff_b`."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def delta_weight(self, shape: torch.Size, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device=device, dtype=dtype).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    def numel(self) -> int:
        return sum(t.numel() for t in (self.weight, self.bias) if t is not None)


Delta = LoRA | Diff
