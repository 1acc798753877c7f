"""Deterministic ODE samplers in k-space (probability-flow ODE dx/dsigma = (x - x0) / sigma)."""

from __future__ import annotations


def sample_euler(x, sigmas, *, param, noise):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i]
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x
