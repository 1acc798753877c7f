"""Analytic Gaussian data: E[x0 | x_sigma] and the probability-flow ODE solution are exact, so every error a test
sees is the sampler's own."""

import torch


class GaussianData:
    """x0 ~ N(mean, std^2 I)."""

    def __init__(self, mean: float = 0.5, std: float = 0.4):
        self.mean, self.std = mean, std

    def denoiser(self, param):
        m, s2 = self.mean, self.std**2

        def model(x, sigma, **_):
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
            if param.kind == "vp":          # x = x0 + sigma n
                return m + s2 / (s2 + sigma**2) * (x - m)
            a = 1 - sigma                   # x = a x0 + sigma n
            return m + a * s2 / (a**2 * s2 + sigma**2) * (x - a * m)

        return model

    def vp_ode_solution(self, x, sigma_from: float, sigma_to: float):
        """Exact probability-flow ODE transport in VP k-space."""
        s2 = self.std**2
        return self.mean + ((s2 + sigma_to**2) / (s2 + sigma_from**2)) ** 0.5 * (x - self.mean)
