"""Mask-guided editing (DiffEdit, Couairon et al. 2022, "DiffEdit: Diffusion-based semantic image editing with mask
guidance"; diffusers' StableDiffusionDiffEditPipeline).

The region to edit is where the model's predictions under the source and the target caption disagree on the noised
image. The edit regenerates only that region under the target caption; everywhere else the latent follows the
image's own inversion path, so what the edit does not touch is kept to the bit in latent space.

Both captions' predictions are compared as x0 estimates (k-space D). diffusers compares noise predictions; at one
sigma these differ from x0's by a constant factor, which the normalisation below cancels: the maps are the same.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats
from ..sampling.ode import sample_euler
from .inpaint import sample_inpaint
from .inversion import check_model_kind, truncate
from .operators import Blur


def draw_noises(x0: torch.Tensor, count: int, generator=None) -> torch.Tensor:
    """(count, *x0.shape) standard normal draws for `edit_map`, from `generator` (seed 0 when None: a mask is
    repeatable unless asked otherwise), or from a list of one generator per image, as diffusers pipelines take."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidParameterError(f"mask_noises={count!r}: need an integer >= 1 (noise draws averaged)")
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(x0):
            raise InvalidParameterError(f"generator: a list of {len(generator)} generators for {len(x0)} images; "
                                        "give one per image, or a single one")
        return torch.stack([draw_noises(x[None], count, g)[:, 0] for x, g in zip(x0, generator)], dim=1)
    generator = generator or torch.Generator().manual_seed(0)
    return torch.randn((count, *x0.shape), generator=generator, dtype=x0.dtype).to(x0.device)


def mask_sigma(sigmas, strength: float) -> float:
    """The noise level the prompts are compared at: `strength` of the way into the schedule `sigmas`."""
    if not 0 < strength <= 1:
        raise InvalidParameterError(f"mask_strength={strength}: need 0 < strength <= 1 (how far into the schedule "
                                    "the image is noised to compare the prompts)")
    return truncate(sigmas, strength)[0]


def edit_map(source, target, x0, sigma: float, *, param, noises) -> torch.Tensor:
    """(B, 1, H, W) mean |D_target - D_source| over channels and noise draws, with x0 noised to `sigma`.

    source, target: denoisers model(x, sigma) -> x0 under the two captions; noises: (K, B, C, H, W) draws.
    """
    check_model_kind(param, "the DiffEdit mask")
    if noises.ndim != 5 or tuple(noises.shape[1:]) != tuple(x0.shape):
        raise InvalidParameterError(f"noises must be (K, *latent shape) = (K, {', '.join(map(str, x0.shape))}); "
                                    f"got {tuple(noises.shape)}")
    total = torch.zeros_like(x0[:, :1])
    for noise in noises:
        x = param.noise_scaling(sigma, noise, x0)
        s = sigma * x.new_ones([x.shape[0]])
        total += (target(x, s) - source(x, s)).abs().mean(1, keepdim=True)
    return total / len(noises)


def smooth_map(guidance: torch.Tensor, blur: float) -> torch.Tensor:
    """The map blurred by a Gaussian of std `blur` latent cells, edges replicated (zero padding would pull a
    border-wide change, a new background, below threshold at the border). DiffEdit's raw map is speckled: a
    speckle left out of an edited region keeps a stray source cell there, and one in a kept object cuts a hole."""
    if blur == 0:
        return guidance
    if not blur > 0:
        raise InvalidParameterError(f"mask_blur={blur}: need a number >= 0 (Gaussian std in latent cells)")
    kernel = Blur(blur).kernel.to(guidance)
    pad = kernel.shape[-1] // 2
    padded = F.pad(guidance, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel.expand(guidance.shape[1], 1, *kernel.shape), groups=guidance.shape[1])


def threshold_map(guidance: torch.Tensor, ratio: float | None = 3.0, threshold: float = 0.5,
                  blur: float = 0.0) -> torch.Tensor:
    """Binary (B, 1, H, W) mask: each image's map (smoothed by `blur`, see smooth_map) scaled to [0, 1] and kept
    where it exceeds `threshold`.

    ratio None: min-max scaling, as the DiffEdit paper states it; it finds a global change (a new background) as
    readily as a local one. ratio r: clip at r times the map's mean first (diffusers' mask_thresholding_ratio; per
    image here, where diffusers takes one mean over the batch, so that one image's edit sets the others' masks).
    With r = 3 and threshold 0.5 a pixel needs 1.5 times the mean difference, which no pixel has when the
    difference is spread over most of the image.
    """
    if ratio is not None and not ratio > 0:
        raise InvalidParameterError(f"mask_ratio={ratio}: need a number > 0 (clip at this many times the mean), or "
                                    "None (min-max scaling)")
    if not 0 <= threshold < 1:
        raise InvalidParameterError(f"mask_threshold={threshold}: need 0 <= threshold < 1")
    tiny = torch.finfo(guidance.dtype).tiny
    guidance = smooth_map(guidance, blur)
    if ratio is None:
        low = guidance.amin((1, 2, 3), keepdim=True)
        soft = (guidance - low) / (guidance.amax((1, 2, 3), keepdim=True) - low).clamp_min(tiny)
    else:
        clip = guidance.mean((1, 2, 3), keepdim=True) * ratio
        soft = torch.minimum(guidance, clip) / clip.clamp_min(tiny)
    return (soft > threshold).to(guidance.dtype)


def edit_mask(source, target, x0, sigma: float, *, param, noises, ratio: float | None = 3.0,
              threshold: float = 0.5, blur: float = 0.0) -> torch.Tensor:
    """DiffEdit's mask, (B, 1, H, W) with 1 = edit: `edit_map` then `threshold_map`."""
    return threshold_map(edit_map(source, target, x0, sigma, param=param, noises=noises), ratio, threshold, blur)


NOTHING_TO_EDIT = ("the DiffEdit mask is empty: the source and target prompts give the same prediction everywhere at "
                   "this mask_strength / mask_threshold, so the source comes back unchanged; raise mask_strength or "
                   "lower mask_threshold (or mask_ratio)")


def trajectory_path(trajectory, sigmas):
    """sigma -> the inversion trajectory's latent at that sigma (`invert` returns it from sigma 0 up), for
    `sample_inpaint(path=...)`: the kept region then retraces the image's own ODE path."""
    sigmas = as_floats(sigmas)
    if len(trajectory) != len(sigmas):
        raise InvalidParameterError(f"the trajectory has {len(trajectory)} latents but the schedule {len(sigmas)} "
                                    "sigmas; invert along the same schedule the edit samples")
    by_level = list(zip(sigmas, reversed(trajectory)))

    def path(sigma):
        return min(by_level, key=lambda item: abs(item[0] - float(sigma)))[1]

    return path


def sample_masked_edit(x, sigmas, *, param, noise, trajectory, mask, method=sample_euler, **options):
    """Regenerate the mask's region from the inverted noise x along `sigmas`, keeping the rest on the inversion
    `trajectory` (DiffEdit's decoding). Outside the mask the result is trajectory[0], the source latent, exactly.

    An automatic mask may be empty (the prompts agree everywhere: the source comes back, with a warning) or full
    (they disagree everywhere: a plain regeneration, which is what the blend computes with nothing kept)."""
    mask = torch.as_tensor(mask)
    if not (mask > 0).any():
        warnings.warn(NOTHING_TO_EDIT, stacklevel=2)
        return trajectory[0]
    if bool((mask >= 1).all()):
        return (yield from method(x, sigmas, param=param, noise=noise, **options))
    return (yield from sample_inpaint(x, sigmas, param=param, noise=noise, known=trajectory[0], mask=mask,
                                      method=method, path=trajectory_path(trajectory, sigmas), **options))


__all__ = ["NOTHING_TO_EDIT", "draw_noises", "mask_sigma", "edit_map", "smooth_map", "threshold_map", "edit_mask",
           "trajectory_path", "sample_masked_edit"]
