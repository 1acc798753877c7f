"""Inpainting by per-step blending with the re-noised known region (RePaint without resampling, Lugmayr et al.
2022; ComfyUI's KSamplerX0Inpaint), around any ask/tell sampler. Mask convention: 1 = generate, 0 = keep.

Soft masks blend per pixel. Differential masks (Levin & Fried 2023, "Differential Diffusion") give each pixel its own
strength: a pixel of value v is released once the step's threshold falls below v, so v = 1 changes from the first
step and v = 0.2 only in the last fifth.
"""

from __future__ import annotations

import torch

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats
from ..sampling.ode import sample_euler
from .inversion import check_model_kind


def box_span(height: int, width: int, box) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the latent cells of a box (x, y, width, height) given as fractions of the image, clipped to
    the latent (empty when the box covers no cell)."""
    x, y, bw, bh = (float(v) for v in box)
    x0, y0 = max(round(x * width), 0), max(round(y * height), 0)
    x1, y1 = min(round((x + bw) * width), width), min(round((y + bh) * height), height)
    return y0, y1, x0, x1


def box_mask(height: int, width: int, box) -> torch.Tensor:
    """(H, W) mask with 1 on the cells of `box` (x, y, width, height as fractions of the image), 0 elsewhere."""
    y0, y1, x0, x1 = box_span(height, width, box)
    mask = torch.zeros(height, width)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def check_mask(mask: torch.Tensor, x: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """mask (H, W), (B|1, 1|C, H, W) or (B|1, H, W) with values in [0, 1] and the latent's H x W -> (B|1, 1|C, H, W)
    in x's dtype. Refuses a size mismatch (naming both sizes) and a mask that leaves nothing to generate or keep."""
    mask = torch.as_tensor(mask)
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or x.ndim != 4:
        raise InvalidParameterError(f"{what} must be (H, W), (B, H, W) or (B, C, H, W) for an image latent "
                                    f"(B, C, H, W); got {what} {tuple(mask.shape)} and latent {tuple(x.shape)}")
    if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
        raise InvalidParameterError(
            f"{what} is {mask.shape[-1]}x{mask.shape[-2]} (WxH) but the latent is {x.shape[-1]}x{x.shape[-2]}; "
            f"resize the {what} to the latent size (image size / VAE factor)")
    if mask.shape[0] not in (1, x.shape[0]) or mask.shape[1] not in (1, x.shape[1]):
        raise InvalidParameterError(f"{what} {tuple(mask.shape)} does not broadcast to the latent {tuple(x.shape)}")
    mask = mask.to(dtype=x.dtype, device=x.device)
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise InvalidParameterError(f"{what} values must lie in [0, 1] (1 = generate, 0 = keep); got "
                                    f"[{float(mask.min()):.3g}, {float(mask.max()):.3g}]")
    if not (mask > 0).any():
        raise InvalidParameterError(f"{what} is empty (all 0): nothing to generate; paint the region to change "
                                    "with values > 0")
    if bool((mask >= 1).all()):
        raise InvalidParameterError(f"{what} is full (all 1): nothing is kept; use plain sampling (or img2img) "
                                    "instead of inpainting")
    return mask


def differential_masks(mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Binary mask per step of a differential (per-pixel strength) map: step i releases pixels > 1 - (i + 1) / N."""
    return [(mask > 1 - (i + 1) / steps).to(mask.dtype) for i in range(steps)]


def sample_inpaint(x, sigmas, *, param, noise, known, mask, method=sample_euler, differential: bool = False,
                   path=None, **options):
    """`method` (any ask/tell sampler) with the known region replaced, at every ask, by `known` re-noised to the
    asked sigma, and the model's x0 replaced by `known` there. The result equals `known` exactly where mask == 0.

    known: clean latent (B, C, H, W); mask: see check_mask (soft values blend; differential=True reads it as
    per-pixel strength). The known region follows one noise draw, so a deterministic sampler keeps it on the
    noised-known path between steps; `path` (sigma -> latent), when given, replaces that path, e.g. the inversion
    trajectory of `known` (diffedit.trajectory_path).
    """
    check_model_kind(param, "inpainting")
    mask = check_mask(mask, known)
    sigmas = as_floats(sigmas)
    per_step = differential_masks(mask, len(sigmas) - 1) if differential else None
    final = (mask > 0).to(mask.dtype) if differential else mask
    n_known = noise(sigmas[0], sigmas[-1]) if path is None else None     # (B, C, H, W), drawn once
    steps = method(x, sigmas, param=param, noise=noise, **options)
    try:
        x_ask, sigma = next(steps)
        while True:
            if per_step is None:
                m = mask
            else:                                                   # the step this sigma belongs to
                m = per_step[max(i for i in range(len(sigmas) - 1) if sigmas[i] >= sigma)]
            noised = param.noise_scaling(sigma, n_known, known) if path is None else path(sigma)
            x_in = m * x_ask + (1 - m) * noised
            denoised = yield x_in, sigma
            x_ask, sigma = steps.send(m * denoised + (1 - m) * known)
    except StopIteration as done:
        x = done.value
    # mask 0: 0 * x + 1 * known is known to the bit
    return final * x + (1 - final) * known


__all__ = ["check_mask", "differential_masks", "sample_inpaint"]
