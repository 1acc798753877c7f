"""Samplers as ask/tell generators (see ../shared/STYLE.md) and the registry every surface reads."""

from . import consistency, ode
from .driver import k_diffusion_sampler, noise_from_seed, run

SAMPLERS = {
    "lcm": consistency.sample_lcm,
    "tcd": consistency.sample_tcd,
    "euler": ode.sample_euler,
}

# Options each sampler accepts, with defaults: what nodes show as widgets and schedulers store in their config.
SAMPLER_OPTIONS = {
    "lcm": {},
    "tcd": {"gamma": 0.3},
    "euler": {},
}

__all__ = ["SAMPLERS", "SAMPLER_OPTIONS", "k_diffusion_sampler", "noise_from_seed", "run"]
