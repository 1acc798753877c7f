"""Step schedules. A schedule is data: a decreasing list of sigmas ending in 0 (k-diffusion convention), or the
integer timesteps a discrete model was evaluated at. Timestep lists are what diffusers schedulers publish; sigma
lists are what ComfyUI's SIGMAS carry."""

from __future__ import annotations

import math

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


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a user schedule: 1-D, at least 2 entries, finite, non-negative and strictly decreasing."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
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


SCHEDULES = ("lcm", "trailing", "karras", "exponential")


def make_sigmas(name: str, steps: int, param) -> torch.Tensor:
    """A named schedule for a parameterization (the one entry point nodes and pipelines use)."""
    if param.kind == "flow":
        if name in ("trailing", "lcm", "flow"):
            return flow_sigmas(steps, getattr(param, "shift", 1.0))
    elif name == "lcm":
        return sigmas_from_timesteps(param, lcm_timesteps(steps, param.num_train_timesteps))
    elif name == "trailing":
        return sigmas_from_timesteps(param, trailing_timesteps(steps, param.num_train_timesteps))
    if name == "karras":
        return karras_sigmas(steps, max(param.sigma_min, 1e-3), param.sigma_max)
    if name == "exponential":
        return exponential_sigmas(steps, max(param.sigma_min, 1e-3), param.sigma_max)
    raise InvalidParameterError(f"schedule={name!r} is unknown; valid: {', '.join(SCHEDULES)}")
