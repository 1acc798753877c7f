"""An isotropic Gaussian mixture with an exact denoiser, for sampler benchmarks and tests.

x0 ~ sum_k w_k N(mu_k, s_k^2 I). Noised as x = alpha x0 + sigma n (VP k-space: alpha = 1; rectified flow:
alpha = 1 - sigma), each component stays Gaussian, so E[x0 | x] is a responsibility-weighted sum of per-component
posterior means. Every error a sampler makes on it is the sampler's own.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidParameterError


class GaussianMixture:
    """means (K, D), stds (K,), weights (K,) summing to 1."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.ndim != 2 or self.stds.shape != w.shape or len(w) != len(self.means):
            raise InvalidParameterError(
                f"GaussianMixture needs means (K, D), stds (K,), weights (K,); got {tuple(self.means.shape)}, "
                f"{tuple(self.stds.shape)}, {tuple(w.shape)}")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def circle(cls, k: int = 8, radius: float = 2.0, seed: int = 0) -> "GaussianMixture":
        """2-D: means on a circle, component std in 0.15-0.40, unequal weights (the perf-anchors data)."""
        g = torch.Generator().manual_seed(seed)
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = radius * torch.stack([angle.cos(), angle.sin()], 1)
        stds = 0.15 + 0.25 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64) * 1.5
        return cls(means, stds, weights)

    @classmethod
    def random(cls, k: int = 8, dim: int = 16, seed: int = 0) -> "GaussianMixture":
        """dim-D: N(0, I) means, component std in 0.15-0.40, unequal weights."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(k, dim, generator=g, dtype=torch.float64)
        stds = 0.15 + 0.25 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64) * 1.5
        return cls(means, stds, weights)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
        """n exact draws of x0, (n, D)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).to(dtype)

    def posterior_mean(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x] for x = alpha x0 + sigma n; x (B, D); alpha, sigma scalars or (B,)."""
        dt = x.dtype
        mu, s2, logw = self.means.to(dt), self.stds.to(dt)[:, None] ** 2, self.weights.log().to(dt)[:, None]
        alpha = torch.as_tensor(alpha, dtype=dt).reshape(1, -1)              # (1, B or 1)
        sigma = torch.as_tensor(sigma, dtype=dt).reshape(1, -1)
        var = alpha**2 * s2 + sigma**2                                        # (K, B): variance of x under k
        # |x - alpha mu_k|^2 without a (K, B, D) tensor; (K, B) keeps B contiguous (softmax over K=8 is slow)
        dist = (x * x).sum(1) - 2 * alpha * (mu @ x.T) + alpha**2 * (mu * mu).sum(1, keepdim=True)
        logits = logw - 0.5 * self.dim * var.log() - 0.5 * dist / var
        e = (logits - logits.max(0, keepdim=True).values).exp()
        r = e / e.sum(0, keepdim=True)                                        # (K, B) responsibilities
        # per component: mu_k + alpha s_k^2 / var_k (x - alpha mu_k) = mu_k sigma^2 / var_k + (alpha s_k^2 / var_k) x
        return (r * sigma**2 / var).T @ mu + (r * alpha * s2 / var).sum(0)[:, None] * x

    def denoiser(self, param):
        """The exact `model(x, sigma) -> x0` for a VP (k-space) or flow parameterization; x of any shape (B, ...)
        with prod(...) == D. sigma: a scalar or (B,); a (b,) sigma for a batch that stacks several copies of b
        (the SMC convention) must be constant and is broadcast."""
        flow = param.kind == "flow"

        def model(x, sigma, **_):
            b = x.shape[0]
            sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)
            if len(sigma) not in (1, b):
                if not bool((sigma == sigma[0]).all()):
                    raise InvalidParameterError(f"sigma has {len(sigma)} entries for a batch of {b}")
                sigma = sigma[:1]
            alpha = 1 - sigma if flow else torch.ones_like(sigma)
            return self.posterior_mean(x.reshape(b, -1), alpha, sigma).reshape(x.shape)

        return model

    def ode_solve(self, x: torch.Tensor, kind: str, sigma_from: float, steps: int = 1000,
                  sigma_end: float = 1e-4) -> torch.Tensor:
        """Reference solution of the probability-flow ODE from (x, sigma_from) to sigma 0.

        Classic RK4 in u = log(rho), rho = sigma / alpha, on y = x / alpha, where dy/du = y - E[x0 | x]; it stops at
        rho = sigma_end and returns E[x0 | x] there (along the ODE path it converges quadratically in rho). A flow
        start at sigma = 1 (rho infinite) first takes one Euler step of 1e-6 (the denoiser is the data mean there).
        """
        if kind not in ("vp", "flow"):
            raise InvalidParameterError(f"kind={kind!r}; valid: 'vp', 'flow'")
        x = x.reshape(len(x), -1)

        def split(rho):                       # rho -> (alpha, sigma)
            return (1.0, rho) if kind == "vp" else (1 / (1 + rho), rho / (1 + rho))

        if kind == "flow":
            if sigma_from >= 1.0:
                d = self.posterior_mean(x, 0.0, 1.0)
                x = x - 1e-6 * (x - d)        # dx/dsigma = (x - x0) / sigma at sigma = 1
                sigma_from = 1.0 - 1e-6
            rho = sigma_from / (1 - sigma_from)
            y = x / (1 - sigma_from)
        else:
            rho, y = sigma_from, x

        def f(y, u):
            a, s = split(math.exp(u))
            return y - self.posterior_mean(a * y, a, s)

        u0, u1 = math.log(rho), math.log(sigma_end)
        h = (u1 - u0) / steps
        for i in range(steps):
            u = u0 + i * h
            k1 = f(y, u)
            k2 = f(y + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(y + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(y + h * k3, u + h)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        a, s = split(sigma_end)
        return self.posterior_mean(a * y, a, s)


__all__ = ["GaussianMixture"]
