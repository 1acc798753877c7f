"""A multistep solver whose coefficients are fitted to one model: the sampler half of `schedule_search.fit_solver`.

Every data-prediction multistep method (DDIM, DPM-Solver++(2M), UniPC's corrector, iPNDM) has the same step,
x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D^, and differs only in how D^ mixes the current and past x0
predictions and in how the new evaluation corrects the point it was made at. Here both are free numbers per step,
fitted with the step sizes (in the spirit of S4S, Frankel et al. 2025, "Solving for a diffusion model solver", and
LD3, Tong et al. 2025, which fit timesteps by gradient): with all of them zero it is DDIM.

shifts (time shift, Li et al. 2024, "Alleviating exposure bias in diffusion models through sampling with shifted
time steps") asks the model at a noise level other than the one the step integrates from: rho = sigma / alpha
times exp(shifts[i]), a free number per step that the fit sets where a few-step path's states sit off the model's
training marginals.

prior_shift (VP only) starts from x + D(x) instead of x: SD-type schedules end at a nonzero SNR, so the true
marginal at sigma_max has mean E[x0] where the drawn noise has mean 0 (Lin et al. 2024, "Common diffusion noise
schedules and sample steps are flawed"); D(x) at sigma_max is the model's estimate of that mean. It reuses the first
evaluation (D barely moves under a shift of |E[x0]| << sigma_max), so it costs no NFE.

Sigmas may be Python floats or 0-d tensors (even ones that require grad): the fit differentiates through this
very function, so there is one implementation for sampling and fitting.
"""

from __future__ import annotations

import math

import torch

from ...errors import InvalidParameterError


def _alpha(param, sigma):
    """The x0 coefficient at sigma: 1 in VP k-space, 1 - sigma for rectified flow (float or tensor alike)."""
    return 1 - sigma if param.kind == "flow" else 1.0


def _shifted(param, sigma, shift):
    """sigma with its rho = sigma / alpha scaled by exp(shift) (float or tensor alike; a flow start, sigma 1,
    stays 1). A zero float shift returns sigma itself, a tensor one goes through so the fit has its gradient."""
    if not isinstance(shift, torch.Tensor) and shift == 0:
        return sigma
    e = shift.exp() if isinstance(shift, torch.Tensor) else math.exp(shift)
    return sigma * e if param.kind == "vp" else sigma * e / (1 - sigma + sigma * e)


def check_fitted_options(steps: int, coeffs, gains, prior_shift, param, shifts=()) -> None:
    if coeffs and len(coeffs) != steps:
        raise InvalidParameterError(
            f"coeffs were fitted for {len(coeffs)} steps but the sigmas give {steps}; use the sigmas stored with "
            "them (the schedule file), or refit for this step count")
    for i, c in enumerate(coeffs or ()):
        if len(c) > i:
            raise InvalidParameterError(f"coeffs[{i}] has {len(c)} weights but step {i} has only {i} past "
                                        "predictions")
    if gains and len(gains) > max(steps - 1, 0):
        raise InvalidParameterError(f"gains has {len(gains)} entries; a {steps}-step solve corrects at most "
                                    f"{max(steps - 1, 0)} points")
    if shifts and len(shifts) > steps:
        raise InvalidParameterError(f"shifts has {len(shifts)} entries; a {steps}-step solve asks the model {steps} "
                                    "times")
    if prior_shift and param.kind != "vp":
        raise InvalidParameterError("prior_shift=True is for VP schedules (nonzero terminal SNR); a flow model "
                                    "starts from exact noise at sigma = 1")


def sample_fitted(x, sigmas, *, param, noise, coeffs=(), gains=(), prior_shift: bool = False, shifts=()):
    """Data-prediction multistep step with fitted mixing weights.

    coeffs[i]: weights c_ij on (D_{i-j} - D_i), j = 1..len, newest past prediction first: D^_i = D_i + sum c_ij (..).
    gains[i]: once D_{i+1} is known at the predicted point x_{i+1}, that point moves by
    gains[i] * (alpha' - alpha sigma'/sigma) (D_{i+1} - D^_i), the UniC-style corrector with a fitted weight.
    shifts[i]: the log factor on rho at which step i asks the model (see the module text).
    """
    n = len(sigmas) - 1
    check_fitted_options(n, coeffs, gains, prior_shift, param, shifts)
    history = []                                    # past x0 predictions, newest first
    depth = max((len(c) for c in coeffs or ()), default=0)
    last = None                                     # (D^, k) of the previous step, for its corrector
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = yield x, (_shifted(param, s, shifts[i]) if i < len(shifts or ()) else s)
        if last is not None and i - 1 < len(gains or ()):
            x = x + (last[1] * gains[i - 1]) * (denoised - last[0])
        if i == 0 and prior_shift:
            x = x + denoised
        d = denoised
        for c, d_past in zip(coeffs[i] if coeffs else (), history):
            d = d + c * (d_past - denoised)
        k = _alpha(param, s_next) - _alpha(param, s) * s_next / s
        x = (s_next / s) * x + k * d
        last = (d, k)
        history = ([denoised] + history)[:depth]
    return x
