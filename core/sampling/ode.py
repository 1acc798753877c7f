"""Deterministic ODE samplers in k-space (probability-flow ODE dx/dsigma = (x - x0) / sigma)."""

from __future__ import annotations

import torch

from .driver import as_floats


def sample_euler(x, sigmas, *, param, noise):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    sigmas = as_floats(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        if denoised.dtype != x.dtype:               # lerp does not promote (a model may answer in another dtype)
            dtype = torch.promote_types(x.dtype, denoised.dtype)
            x, denoised = x.to(dtype), denoised.to(dtype)
        # x + (sigma' - sigma) d with d = (x - x0) / sigma is x0 + (sigma' / sigma)(x - x0): one lerp kernel
        # instead of four (the whole step of a flow scheduler is then two kernels, as in FlowMatchEuler)
        x = torch.lerp(denoised, x, sigmas[i + 1] / sigmas[i])
    return x
