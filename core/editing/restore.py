"""Restoration of linear inverse problems y = A x0 with a diffusion prior, as ask/tell samplers."""

from __future__ import annotations

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats
from .inversion import check_model_kind
from .operators import data_consistency


def _check(y, operator, cg_steps=None):
    if not hasattr(operator, "forward") or not hasattr(operator, "adjoint"):
        raise InvalidParameterError(f"operator {operator!r} needs forward() and adjoint(); use one of "
                                    "core.editing.operators.OPERATORS")
    if cg_steps is not None and (not isinstance(cg_steps, int) or cg_steps < 0):
        raise InvalidParameterError(f"cg_steps={cg_steps!r}: need an integer >= 0")


def sample_dds(x, sigmas, *, param, noise, y, operator, cg_steps: int = 5, eta: float = 0.0, gamma: float = 0.0):
    """Decomposed Diffusion Sampler (Chung, Lee & Ye 2024, Algorithm 1).

    Per step: 1. Tweedie x0 estimate D(x, sigma); 2. `cg_steps` conjugate-gradient steps on ||y - A x||^2
    (+ gamma ||x - D||^2) started at D; 3. DDIM re-noise of the corrected x0 with the step's own noise estimate,
    mixed with a fresh draw by eta (0 = deterministic). One model evaluation per step, no back-propagation.
    """
    check_model_kind(param, "DDS")
    _check(y, operator, cg_steps)
    if not 0.0 <= eta <= 1.0:
        raise InvalidParameterError(f"eta={eta}: need 0 <= eta <= 1")
    sigmas = as_floats(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        x0 = data_consistency(denoised, y, operator, cg_steps, gamma)
        if sigmas[i + 1] == 0:
            x = x0
            continue
        eps = param.eps(x, sigmas[i], denoised)
        if eta > 0:
            eps = (1 - eta**2) ** 0.5 * eps + eta * noise(sigmas[i], sigmas[i + 1])
        x = param.noise_scaling(sigmas[i + 1], eps, x0)
    return x


def sample_replace(x, sigmas, *, param, noise, y, operator):
    """Replacement baseline for any operator with a pseudo-inverse (ILVR, Choi et al. 2021; inpainting's
    "replace the known region" when A is a mask): before each evaluation, swap the measured component of x for
    the measurement noised to the same level, x <- x - A^+ A x + A^+ y_sigma, then take a DDIM step."""
    check_model_kind(param, "replacement restoration")
    _check(y, operator)
    if not hasattr(operator, "pinv"):
        raise InvalidParameterError(f"operator {operator.name!r} has no cheap pseudo-inverse; use sample_dds")
    sigmas = as_floats(sigmas)
    n = noise(sigmas[0], sigmas[-1])                # one draw: the measured component follows one noise path
    for i in range(len(sigmas) - 1):
        y_sigma = param.noise_scaling(sigmas[i], operator.forward(n), y)
        x = x - operator.pinv(operator.forward(x)) + operator.pinv(y_sigma)
        denoised = yield x, sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = param.noise_scaling(sigmas[i + 1], param.eps(x, sigmas[i], denoised), denoised)
    return x - operator.pinv(operator.forward(x)) + operator.pinv(y)


__all__ = ["sample_dds", "sample_replace"]
