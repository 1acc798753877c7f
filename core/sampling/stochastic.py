"""Stochastic samplers in k-space: Score-SDE predictor-corrector and SCott-style stochastic consistency sampling.

Both build on one transition, the ancestral (DDPM-posterior) step from sigma to sigma' with a frozen x0
prediction D: in y = x / alpha, rho = sigma / alpha,

    y' = D + rho' [ c eps_hat + sqrt(1 - c^2) z ],   c = rho' / rho,

which is exact for Gaussian data and is the reverse SDE in the many-step limit. Blending the implied eps_hat with
fresh noise z at another ratio gives the whole DDIM (no fresh noise) ... LCM (all fresh noise) family.
"""

from __future__ import annotations

from ...errors import InvalidParameterError
from .driver import as_floats
from .multistep import alpha_of


def rho_ratio(param, sigma: float, sigma_next: float) -> float:
    """c = rho' / rho (0 when sigma' = 0 or when alpha = 0 at sigma, i.e. a flow start at sigma = 1)."""
    a, a_next = alpha_of(param, sigma), alpha_of(param, sigma_next)
    return sigma_next * a / (a_next * sigma) if sigma_next > 0 else 0.0


def renoise_step(param, x, sigma, sigma_next, denoised, eta_eff: float, z):
    """x at sigma_next = alpha' D + sigma' (sqrt(1 - eta_eff^2) eps_hat + eta_eff z); eta_eff = sqrt(1 - c^2) is
    the ancestral step, 0 DDIM, 1 LCM."""
    if sigma_next == 0:
        return denoised
    eps = param.eps(x, sigma, denoised)
    n = eps if eta_eff == 0 else (1 - eta_eff**2) ** 0.5 * eps + eta_eff * z
    return param.noise_scaling(sigma_next, n, denoised)


def _substeps(sigma: float, sigma_next: float, m: int) -> list[float]:
    """sigma, m interior points, sigma_next: geometric between positive ends, linear down to 0."""
    if sigma_next > 0:
        return [sigma * (sigma_next / sigma) ** (j / (m + 1)) for j in range(m + 2)]
    return [sigma * (1 - j / (m + 1)) for j in range(m + 2)]


def sample_scott(x, sigmas, *, param, noise, eta: float = 1.0, substeps: int = 0):
    """Stochastic multistep consistency sampling (SCott, Liu et al. 2024; the LCM rule of Luo et al. 2023 with a
    controllable re-noise strength): predict x0, then re-noise to the next level with a blend of the implied noise
    and fresh noise, eps' = sqrt(1 - e^2) eps_hat + e z, e = min(1, eta sqrt(1 - c^2)).

    eta is DDIM's: 0 = deterministic DDIM jumps, 1 = ancestral (DDPM) steps, which converge to the reverse SDE so
    quality improves as steps are added; eta >= 1 / sqrt(1 - c^2) is LCM's full re-noise (a plateau on an exact
    denoiser). substeps = m splits every interval into m + 1 SDE steps (m extra evaluations per interval, at the
    geometric means of its ends; linear spacing in the interval that ends at 0).
    """
    if not eta >= 0:
        raise InvalidParameterError(f"eta={eta!r}: need eta >= 0 (0 DDIM, 1 ancestral, large = LCM)")
    if not (isinstance(substeps, int) and substeps >= 0):
        raise InvalidParameterError(f"substeps={substeps!r}: need an integer >= 0")
    sigmas = as_floats(sigmas)
    for i in range(len(sigmas) - 1):
        grid = _substeps(sigmas[i], sigmas[i + 1], substeps)
        for j in range(substeps + 1):
            s, s_next = grid[j], grid[j + 1]
            denoised = yield x, s
            c = rho_ratio(param, s, s_next)
            e = min(1.0, eta * (1 - c * c) ** 0.5)
            z = noise(s, s_next) if e > 0 and s_next > 0 else None
            x = renoise_step(param, x, s, s_next, denoised, e, z)
    return x


def sample_pc(x, sigmas, *, param, noise, snr: float = 0.16, corrector_steps: int = 1):
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Algorithms
    2-3), in k-space: an ancestral predictor step sigma_i -> sigma_{i+1}, then `corrector_steps` Langevin MCMC steps
    at sigma_{i+1},

        x <- x + delta g + sqrt(2 delta) z,   g = grad log p = -eps_hat / sigma,   delta = 2 (snr |z| / |g|)^2,

    with |.| the batch mean of the per-sample norms, as in the paper's code (per-sample ratios are unstable in low
    dimension, where a sample near a mode has |g| ~ 0). No corrector at sigma = 0. NFE = N + corrector_steps (N - 1).
    """
    if not snr >= 0:
        raise InvalidParameterError(f"snr={snr!r}: need snr >= 0 (Score SDE uses 0.16 for VE, 0.01 for VP)")
    if not (isinstance(corrector_steps, int) and corrector_steps >= 0):
        raise InvalidParameterError(f"corrector_steps={corrector_steps!r}: need an integer >= 0")
    sigmas = as_floats(sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, s
        c = rho_ratio(param, s, s_next)
        z = noise(s, s_next) if s_next > 0 else None
        x = renoise_step(param, x, s, s_next, denoised, (1 - c * c) ** 0.5, z)        # predictor
        if s_next == 0:
            continue
        for _ in range(corrector_steps):                                                # corrector
            denoised = yield x, s_next
            g = -param.eps(x, s_next, denoised) / s_next
            z = noise(s, s_next)
            z_norm = z.reshape(len(z), -1).norm(dim=1).mean()
            g_norm = g.reshape(len(g), -1).norm(dim=1).mean().clamp_min(1e-20)
            delta = 2 * (snr * z_norm / g_norm) ** 2
            x = x + delta * g + (2 * delta).sqrt() * z
    return x


__all__ = ["sample_scott", "sample_pc", "renoise_step", "rho_ratio"]
