"""Consistency-model samplers: each step predicts x0, then re-noises to the next level.

They are not ODE solvers: on an exact denoiser they sample a different (more diffuse) distribution, which is what a
consistency-distilled model (LCM-LoRA, Flash Diffusion, TCD, SCott) is trained for.
"""

from __future__ import annotations

from ...errors import InvalidParameterError
from .driver import as_floats


def sample_lcm(x, sigmas, *, param, noise):
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1; Flash Diffusion uses the same rule)."""
    sigmas = as_floats(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]                  # ask: x0 at (x, sigma_i)?
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = param.noise_scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), denoised)
    return x


def sample_tcd(x, sigmas, *, param, noise, gamma: float = 0.3):
    """Trajectory consistency distillation sampling (Zheng et al. 2024, "strategic stochastic sampling").

    From t, jump along the predicted trajectory to s = floor((1 - gamma) * t_next), then forward-diffuse back up to
    t_next with fresh noise. gamma = 0 is deterministic (DDIM-like); gamma = 1 is LCM.
    """
    if not 0.0 <= gamma <= 1.0:         # also refuses NaN
        raise InvalidParameterError(f"tcd gamma={gamma!r}: need 0 <= gamma <= 1 (0 deterministic, 1 = LCM)")
    sigmas = as_floats(sigmas)
    # every s at once: the two table searches are ~25 tensor launches (~65 µs), too many for each step
    sigmas_s = param.t_to_sigma((param.sigma_to_t(sigmas[1:]) * (1 - gamma)).floor()).tolist()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, sigma_s = sigmas[i], sigmas[i + 1], sigmas_s[i]
        denoised = yield x, sigma
        eps = param.eps(x, sigma, denoised)
        x = param.noise_scaling(sigma_s, eps, denoised)      # deterministic jump to s along the trajectory
        if gamma > 0 and sigma_next > 0:
            x = param.renoise(x, sigma_s, sigma_next, noise(sigma, sigma_next))
    return x


# TCD's last jump lands on s = floor((1 - gamma) * 0) = 0, the model's smallest noise level, not on sigma = 0: the
# returned sample still holds sigma(t=0) of noise (as in the paper's and diffusers' sampler). Drivers that change
# space (the diffusers scheduler) read where the result lies from here.
sample_tcd.final_sigma = lambda sigmas, param, **options: float(param.t_to_sigma(0))
