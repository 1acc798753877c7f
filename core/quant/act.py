"""W8A8: int8 activations on top of int8 weights.

Activations are quantized symmetrically, per token (dynamic, the default) or per tensor with a calibrated static
scale. Q-Diffusion §4.2: the input of a UNet up-block resnet is cat([h, skip]) whose halves have very different
ranges, so a static quantizer may be split at that channel (``splits``), one scale per segment.
With an int8 symmetric weight and a single segment the matmul runs as ``torch._int_mm`` (int8 x int8 -> int32)
and is rescaled by s_x s_w; anything else falls back to quantize-dequantize ("fake quant") and the weight's linear.
"""

from __future__ import annotations

import torch

from ...errors import InvalidParameterError

__all__ = ["ActQuant"]

_HAS_INT_MM = hasattr(torch, "_int_mm")


class ActQuant(torch.nn.Module):
    """Symmetric int8 activation quantizer. ``scale``: None (dynamic per token) or a tensor of one scale per
    segment; ``splits``: channel boundaries of the segments (channels are the last dim for Linear, dim 1 for conv)."""

    def __init__(self, scale: torch.Tensor | None = None, splits: tuple[int, ...] = (), channel_dim: int = -1) -> None:
        super().__init__()
        if scale is not None and scale.numel() != len(splits) + 1:
            raise InvalidParameterError(f"ActQuant: {scale.numel()} scales for {len(splits) + 1} segments")
        self.register_buffer("scale", None if scale is None else scale.float().reshape(-1))
        self.splits, self.channel_dim = tuple(int(s) for s in splits), channel_dim

    def _segments(self, x: torch.Tensor):
        edges = (0, *self.splits, x.shape[self.channel_dim])
        return [(a, b) for a, b in zip(edges[:-1], edges[1:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize x."""
        if self.scale is None:  # dynamic per token (last dim = features)
            s = (x.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
            return torch.clamp(torch.round(x / s), -127, 127) * s
        parts = []
        for (a, b), s in zip(self._segments(x), self.scale):
            seg = x.narrow(self.channel_dim, a, b - a)
            parts.append(torch.clamp(torch.round(seg / s), -127, 127) * s)
        return torch.cat(parts, self.channel_dim)

    def linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """x @ W^T with int8 activations; the integer kernel when ``weight`` is symmetric int8."""
        q = getattr(weight, "q", None)
        if (_HAS_INT_MM and not self.splits and getattr(weight, "kind", "") == "int8" and weight.symmetric
                and x.device.type == "cpu" and len(weight.shape) == 2):
            x2 = x.reshape(-1, x.shape[-1])
            if self.scale is None:
                s = (x2.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)  # (M, 1)
            else:
                s = self.scale.expand(x2.shape[0], 1)
            xq = torch.clamp(torch.round(x2 / s), -127, 127).to(torch.int8)
            y = torch._int_mm(xq, q.t()).float() * s * weight.scale.float()[None, :]  # (M, out) int32 -> float
            return y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return weight.linear(self(x))
