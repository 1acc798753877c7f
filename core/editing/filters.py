"""FilterPrompt (Wang et al. 2024) image filters: an explicit pixel-space decomposition of the image cue before it
conditions a diffusion model (img2img, ControlNet, IP-Adapter), choosing whether structure or appearance transfers.
Images are (B, C, H, W) in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError
from .operators import Blur

LUMA = (0.299, 0.587, 0.114)   # ITU-R BT.601


def _luma(img):
    w = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def _low(img, radius):
    if radius < 0.25:                                           # a narrower Gaussian is the identity on a pixel grid
        return img
    pad = 2 * int(2 * radius + 0.999) + 1
    padded = F.pad(img, [pad // 2] * 4, mode="replicate")      # replicate: no dark frame from zero padding
    return Blur(radius, pad).forward(padded)[..., pad // 2:-(pad // 2), pad // 2:-(pad // 2)]


def low_pass(img, radius: float = 3.0):
    """Gaussian low pass: keeps colour layout and composition, drops texture and edges."""
    return _low(img, radius)


def high_pass(img, radius: float = 3.0):
    """Image minus its low pass, around mid grey: keeps edges and texture, drops colour layout."""
    return (img - _low(img, radius) + 0.5).clamp(0, 1)


def edges(img, radius: float = 1.0):
    """Sobel gradient magnitude of the (lightly smoothed) luminance, as a grey image: structure only."""
    y = _low(_luma(img), radius) if radius > 0 else _luma(img)
    kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=img.dtype, device=img.device).view(1, 1, 3, 3)
    padded = F.pad(y, [1, 1, 1, 1], mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(-1, -2))
    mag = (gx**2 + gy**2).sqrt()
    mag = mag / mag.flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
    return mag.expand(-1, img.shape[1], -1, -1)


def grey(img, radius: float = 0.0):
    """Colour stripped: luminance only, so the structure transfers and the colours stay free."""
    return _luma(img).expand(-1, img.shape[1], -1, -1)


def colour(img, radius: float = 6.0):
    """Structure stripped: the chroma of a strong low pass on mid luminance, so only the palette transfers."""
    low = _low(img, radius)
    return (low - _luma(low) + 0.5).clamp(0, 1)


FILTERS = {"low_pass": low_pass, "high_pass": high_pass, "edges": edges, "grey": grey, "colour": colour}


def apply_filter(img, name: str, radius: float | None = None):
    if name not in FILTERS:
        raise InvalidParameterError(f"filter={name!r} is unknown; valid: {', '.join(FILTERS)}")
    if img.ndim != 4 or img.shape[1] != 3:
        raise InvalidParameterError(f"image must be (B, 3, H, W) RGB; got {tuple(img.shape)}")
    if radius is not None and radius < 0:
        raise InvalidParameterError(f"radius={radius}: need >= 0")
    return FILTERS[name](img) if radius is None else FILTERS[name](img, radius)


__all__ = ["FILTERS", "apply_filter", "low_pass", "high_pass", "edges", "grey", "colour"]
