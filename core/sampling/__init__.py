"""Samplers as ask/tell generators (see ../shared/STYLE.md) and the registry every surface reads."""

from . import consistency, fitted, multistep, ode, smc, stochastic
from .driver import k_diffusion_sampler, noise_from_seed, run

SAMPLERS = {
    "lcm": consistency.sample_lcm,
    "tcd": consistency.sample_tcd,
    "euler": ode.sample_euler,
    "dpmpp_2m": multistep.sample_dpmpp_2m,
    "deis": multistep.sample_deis,
    "plms": multistep.sample_plms,
    "ghvb": multistep.sample_ghvb,
    "dpmpp_2m_unic": multistep.sample_dpmpp_2m_unic,
    "scott": stochastic.sample_scott,
    "pc": stochastic.sample_pc,
    "fkc": smc.sample_fkc,
    "fitted": fitted.sample_fitted,
}

# Options each sampler accepts, with defaults: what nodes show as widgets and schedulers store in their config.
SAMPLER_OPTIONS = {
    "lcm": {},
    "tcd": {"gamma": 0.3},
    "euler": {},
    "dpmpp_2m": {"beta": 1.0},
    "deis": {"order": 2, "lower_order_final": True},
    "plms": {"order": 4, "beta": 1.0, "momentum": "hb"},
    "ghvb": {"order": 4, "beta": 0.8},
    "dpmpp_2m_unic": {"beta": 1.0},
    "scott": {"eta": 1.0, "substeps": 0},
    "pc": {"snr": 0.16, "corrector_steps": 1},
    "fkc": {"mode": "anneal", "beta": 1.0, "guidance": 3.0, "ess_threshold": 0.5},
    "fitted": {"coeffs": (), "gains": (), "prior_shift": False, "shifts": ()},   # from a `schedule search --method fit` file
}

__all__ = ["SAMPLERS", "SAMPLER_OPTIONS", "k_diffusion_sampler", "noise_from_seed", "run"]
