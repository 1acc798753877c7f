"""Deterministic inversion: image latent -> noise along the model's own probability-flow ODE.

In k-space (see core/parameterization.py) both VP and rectified-flow models follow dx/dsigma = (x - D(x, sigma)) /
sigma, so one rule inverts both: DDIM inversion for VP models (Song et al. 2021; diffusers DDIMInverseScheduler)
and Euler inversion of the flow ODE for rectified flow. `sample_euler` on the same schedule regenerates.
"""

from __future__ import annotations

import math

import torch

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats, run
from ..sampling.ode import sample_euler

MODEL_KINDS = ("vp", "flow")


def check_model_kind(param, operator: str) -> None:
    """Editing operators follow the model's ODE; they know the VP and rectified-flow conventions only."""
    kind = getattr(param, "kind", None)
    if kind not in MODEL_KINDS:
        raise InvalidParameterError(f"{operator} needs a VP (eps / v) or rectified-flow model; got a model of kind "
                                    f"{kind!r} ({type(param).__name__})")


def invert(x, sigmas, *, param, noise=None, fixed_point: int = 0):
    """Walk a sampling schedule backwards from the clean latent x (sigma 0) to its noise; return the trajectory.

    sigmas: the *sampling* schedule (decreasing, ending at 0) that will regenerate the image; inversion visits it in
    reverse. Each step from s to s' > s evaluates the model at (x, s') (the DDIM-inversion approximation: x_{t+1}
    is unknown, so the model sees x_t at the next level) and moves x += (s' - s) (x - D) / s'.
    fixed_point: extra evaluations per step that solve x' = x + (s' - s) (x' - D(x', s')) / s' by fixed-point
    iteration; that equation is exactly the Euler (= DDIM) sampling step from s' back to s, so with enough
    iterations `sample_euler` reproduces the input (Pan et al. 2023, "accelerated iterative diffusion inversion").
    Returns [x at sigmas[-1] = 0, ..., x at sigmas[0]]: trajectory[-1] is the noise.
    """
    check_model_kind(param, "inversion")
    if fixed_point < 0:
        raise InvalidParameterError(f"fixed_point={fixed_point}: need an integer >= 0")
    up = as_floats(sigmas)[::-1]                # increasing: 0, s_N-1, ..., s_0
    trajectory = [x]
    for s, s_next in zip(up, up[1:]):
        h = (s_next - s) / s_next
        z = x
        for _ in range(fixed_point + 1):
            denoised = yield z, s_next            # ask: x0 at (z, s')?
            z = x + h * (z - denoised)
        x = z
        trajectory.append(x)
    return trajectory


def truncate(sigmas, strength: float) -> list[float]:
    """The last round(strength * steps) steps of a schedule (img2img's `strength`): where an edit starts."""
    sigmas = as_floats(sigmas)
    if not 0.0 <= strength <= 1.0:
        raise InvalidParameterError(f"strength={strength}: need 0 <= strength <= 1 (fraction of the schedule)")
    steps = round(strength * (len(sigmas) - 1))
    return sigmas[len(sigmas) - 1 - steps:]


def latent_psnr(x, reference) -> float:
    """PSNR in dB with the reference latent's value range as peak (latents have no fixed white level)."""
    mse = float(((x.double() - reference.double()) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def reconstruct(model, x, sigmas, *, param, fixed_point: int = 0, extra_args=None):
    """Invert x, regenerate it with Euler on the same schedule -> (trajectory, regenerated, latent PSNR in dB)."""
    trajectory = run(invert, model, x, sigmas, param=param, fixed_point=fixed_point, extra_args=extra_args)
    regenerated = run(sample_euler, model, trajectory[-1], sigmas, param=param, extra_args=extra_args)
    return trajectory, regenerated, latent_psnr(regenerated, x)


__all__ = ["invert", "truncate", "latent_psnr", "reconstruct", "check_model_kind"]
