"""Step schedules. A schedule is data: a decreasing list of sigmas ending in 0 (k-diffusion convention), or the
integer timesteps a discrete model was evaluated at. Timestep lists are what diffusers schedulers publish; sigma
lists are what ComfyUI's SIGMAS carry."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InvalidParameterError


def _check_steps(steps: int, limit: int | None = None) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"steps={steps!r}: need an integer >= 1")
    if limit is not None and steps > limit:
        raise InvalidParameterError(f"steps={steps} exceeds the {limit} timesteps this schedule can use")


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> list[int]:
    """LCM's timesteps (Luo et al. 2023, as diffusers LCMScheduler): `steps` evenly spaced indices into the
    `original_steps`-point skipping schedule the model was distilled on. 4 steps: 999, 759, 499, 259."""
    _check_steps(steps, original_steps)
    k = num_train_timesteps // original_steps
    origin = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    return [origin[math.floor(j * original_steps / steps)] for j in range(steps)]


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Trailing spacing (Lin et al. 2023, "Common diffusion noise schedules are flawed"): starts at T-1.
    4 steps: 999, 749, 499, 249."""
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps / steps
    return [round(num_train_timesteps - i * ratio) - 1 for i in range(steps)]


def sigmas_from_timesteps(param, timesteps) -> torch.Tensor:
    """Sigmas (with the final 0) of a discrete model at the given timesteps."""
    sig = param.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float32))
    return torch.cat([sig, sig.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    _check_steps(steps)
    return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp(), torch.zeros(1)])


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Rectified-flow sigmas 1 -> 1/steps, shifted (SD3), then 0."""
    _check_steps(steps)
    sig = torch.linspace(1.0, 1.0 / steps, steps)
    sig = shift * sig / (1 + (shift - 1) * sig)
    return torch.cat([sig, torch.zeros(1)])


def flowmatch_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """diffusers `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)` sigmas, bit for bit: linspace
    from 1 to the shifted 1/T (shifted a second time, as diffusers does), then 0. Note the last step starts at
    sigma ~ 1/T, so at 2 steps the second evaluation is wasted (flow_sigmas avoids that)."""
    _check_steps(steps)
    sigma_min = (shift * torch.tensor(1.0 / num_train_timesteps) / (1 + (shift - 1) * torch.tensor(
        1.0 / num_train_timesteps))).item()                       # diffusers' __init__, in float32
    sig = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, steps) / num_train_timesteps
    sig = shift * sig / (1 + (shift - 1) * sig)
    return torch.cat([torch.from_numpy(sig).float(), torch.zeros(1)])


def sgm_uniform_sigmas(steps: int, param) -> torch.Tensor:
    """ComfyUI's "sgm_uniform": timesteps uniform from sigma_max's down to sigma_min's, excluding the last, then 0.
    VP: fractional timesteps 999 ... (999 / steps), interpolated in log sigma; flow: 1 ... 1/T before the shift."""
    _check_steps(steps)
    if param.kind == "flow":
        t = torch.linspace(1.0, 1.0 / param.num_train_timesteps, steps + 1)[:-1]
        shift = getattr(param, "shift", 1.0)
        sig = shift * t / (1 + (shift - 1) * t)
    else:
        t = torch.linspace(float(param.sigma_to_t(param.sigma_max)), float(param.sigma_to_t(param.sigma_min)),
                           steps + 1)[:-1]
        sig = param.t_to_sigma(t).float()
    return torch.cat([sig.float(), torch.zeros(1)])


def logsnr_sigmas(steps: int, param, rho_min: float | None = None, rho_top: float = 14.6) -> torch.Tensor:
    """Few-step schedule: sigma_max, then steps - 1 points uniform in log-SNR (log rho, rho = sigma / alpha) from
    rho_top down to rho_min, then 0, so the last step is a real x0 jump instead of a wasted sigma_min -> 0 step.

    rho_min defaults to max(0.6 / steps, 2.4 / steps^2): the last evaluation moves closer to the data as steps are
    added (fitted on unit-scale data, the Gaussian mixtures of bench/sampler_accuracy.py; pass rho_min for data of
    another scale). For VP models rho_top is the model's sigma_max; a flow model starts at sigma = 1 (rho infinite)
    and spaces the rest from rho_top, the SD sigma_max.
    """
    _check_steps(steps)
    if rho_min is None:
        rho_min = max(0.6 / steps, 2.4 / steps**2)
    if param.kind == "vp":
        rho_top = float(param.sigma_max)
    if not 0 < rho_min < rho_top:
        raise InvalidParameterError(f"rho_min={rho_min!r}: need 0 < rho_min < {rho_top:.4g} (the top of the schedule)")
    if steps == 1:
        return torch.tensor([float(param.sigma_max), 0.0])
    rho = torch.logspace(math.log10(rho_top), math.log10(rho_min), steps, dtype=torch.float64)
    sig = rho if param.kind == "vp" else rho / (1 + rho)
    sig[0] = float(param.sigma_max)
    return torch.cat([sig.float(), torch.zeros(1)])


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a user schedule: 1-D, at least 2 entries, finite, non-negative and strictly decreasing."""
    try:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:  # text, None, ragged lists from a user file
        raise InvalidParameterError(f"sigmas must be a 1-D list of numbers; got {str(sigmas)[:80]!r} ({e})") from None
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise InvalidParameterError(f"sigmas must be a 1-D list of at least 2 values; got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise InvalidParameterError(f"sigmas must be finite and >= 0; got {sigmas.tolist()}")
    bad = (sigmas[1:] >= sigmas[:-1]).nonzero()
    if len(bad):
        i = int(bad[0])
        raise InvalidParameterError(
            f"sigmas must be strictly decreasing; sigmas[{i + 1}]={float(sigmas[i + 1]):.6g} >= "
            f"sigmas[{i}]={float(sigmas[i]):.6g}")
    return sigmas


SCHEDULES = ("lcm", "trailing", "karras", "exponential", "sgm_uniform", "flowmatch", "logsnr")


def make_sigmas(name: str, steps: int, param) -> torch.Tensor:
    """A named schedule for a parameterization (the one entry point nodes and pipelines use)."""
    if param.kind == "flow":
        if name in ("trailing", "lcm", "flow"):
            return flow_sigmas(steps, getattr(param, "shift", 1.0))
    elif name == "lcm":
        return sigmas_from_timesteps(param, lcm_timesteps(steps, param.num_train_timesteps))
    elif name == "trailing":
        return sigmas_from_timesteps(param, trailing_timesteps(steps, param.num_train_timesteps))
    if name == "logsnr":
        return logsnr_sigmas(steps, param)
    if name == "sgm_uniform":
        return sgm_uniform_sigmas(steps, param)
    if name == "flowmatch":
        if param.kind != "flow":
            raise InvalidParameterError("schedule='flowmatch' is diffusers' FlowMatchEuler grid, for flow models only")
        return flowmatch_sigmas(steps, getattr(param, "shift", 1.0), param.num_train_timesteps)
    if name == "karras":
        return karras_sigmas(steps, max(param.sigma_min, 1e-3), param.sigma_max)
    if name == "exponential":
        return exponential_sigmas(steps, max(param.sigma_min, 1e-3), param.sigma_max)
    raise InvalidParameterError(f"schedule={name!r} is unknown; valid: {', '.join(SCHEDULES)}")
