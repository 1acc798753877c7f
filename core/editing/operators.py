"""Linear measurement operators y = A x for restoration, with their adjoints (and pseudo-inverses where cheap),
plus conjugate gradients. They act on any (B, C, H, W) tensor: a latent or pixels; the caller picks the space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError


class Mask:
    """Inpainting: A x = m * x (unobserved entries read as 0). Symmetric and idempotent, so A^T = A^+ = A."""

    name = "mask"

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def forward(self, x):
        return self.mask * x

    adjoint = forward
    pinv = forward


class Downsample:
    """Super-resolution: A x = average over factor x factor blocks. A A^T = I / factor^2, so A^+ = factor^2 A^T
    (nearest upsampling)."""

    name = "downsample"

    def __init__(self, factor: int):
        if not isinstance(factor, int) or factor < 1:
            raise InvalidParameterError(f"downsample factor={factor!r}: need an integer >= 1")
        self.factor = factor

    def forward(self, x):
        f = self.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise InvalidParameterError(f"downsample factor {f} does not divide the size "
                                        f"{x.shape[-1]}x{x.shape[-2]}")
        return F.avg_pool2d(x, f)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2

    def pinv(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")


class Blur:
    """Deblurring: A x = x * k, a normalised Gaussian of std `sigma` (pixels of the tensor it acts on), zero
    padding. A^T is the transposed convolution: the exact adjoint of that padded convolution."""

    name = "blur"

    def __init__(self, sigma: float, size: int | None = None):
        if not sigma > 0:
            raise InvalidParameterError(f"blur sigma={sigma!r}: need > 0")
        size = size or 2 * math.ceil(2 * sigma) + 1
        if size % 2 == 0:
            raise InvalidParameterError(f"blur kernel size={size}: need an odd size")
        t = torch.arange(size, dtype=torch.float64) - size // 2
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        k = torch.outer(g, g)
        self.kernel = k / k.sum()                   # (size, size)

    def _weight(self, x):
        c = x.shape[1]
        return self.kernel.to(x.dtype).to(x.device).expand(c, 1, *self.kernel.shape)

    def forward(self, x):
        return F.conv2d(x, self._weight(x), padding=self.kernel.shape[-1] // 2, groups=x.shape[1])

    def adjoint(self, y):
        return F.conv_transpose2d(y, self._weight(y), padding=self.kernel.shape[-1] // 2, groups=y.shape[1])


OPERATORS = {"mask": Mask, "downsample": Downsample, "blur": Blur}


def _dot(a, b):
    return (a * b).flatten(1).sum(1).view(-1, *([1] * (a.ndim - 1)))   # per batch item, (B, 1, ...)


def conjugate_gradient(apply, b, x, steps: int, tol: float = 0.0):
    """`steps` iterations of CG (Hestenes & Stiefel 1952) on apply(x) = b from x, per batch item; apply must be
    symmetric positive semi-definite. Stops early once every residual norm is <= tol."""
    r = b - apply(x)
    p = r
    rr = _dot(r, r)
    for _ in range(steps):
        if float(rr.max()) <= tol**2:
            break
        ap = apply(p)
        pap = _dot(p, ap)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = _dot(r, r)
        p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr)) * p
        rr = rr_new
    return x


def data_consistency(x0, y, operator, steps: int = 5, gamma: float = 0.0):
    """argmin_x ||y - A x||^2 + gamma ||x - x0||^2 by `steps` CG iterations on the normal equations started at x0
    (DDS, Chung et al. 2024: early-stopped CG from the Tweedie estimate stays near the data manifold)."""
    def normal(v):
        return operator.adjoint(operator.forward(v)) + gamma * v

    return conjugate_gradient(normal, operator.adjoint(y) + gamma * x0, x0, steps)


__all__ = ["Mask", "Downsample", "Blur", "OPERATORS", "conjugate_gradient", "data_consistency"]
