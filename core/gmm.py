"""An isotropic Gaussian mixture with an exact denoiser, for sampler benchmarks and tests.

x0 ~ sum_k w_k N(mu_k, s_k^2 I). Noised as x = alpha x0 + sigma n (VP k-space: alpha = 1; rectified flow:
alpha = 1 - sigma), each component stays Gaussian, so E[x0 | x] is a responsibility-weighted sum of per-component
posterior means. Every error a sampler makes on it is the sampler's own.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

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

    # --- problem families: the benchmark designs and tunes on DESIGN_FAMILIES only; the others are held out ------

    @classmethod
    def family(cls, name: str, dim: int, seed: int) -> "GaussianMixture":
        """A mixture drawn from a named family with a seed (see FAMILIES). "circle" (2-D) and "random" (any dim)
        are the design families: seed 0 is the benchmark's original mixture, which the logsnr schedule constants
        and FLOW_START_LOG_RHO were fitted on. "grid", "clusters" and "wide" are held out: never used to design or
        tune a sampler, only to report on."""
        if name not in FAMILIES:
            raise InvalidParameterError(f"family={name!r} is unknown; valid: {', '.join(FAMILIES)}")
        if name == "circle" and dim != 2:
            raise InvalidParameterError(f"family 'circle' is 2-D; got dim={dim} (use 'random' for other dims)")
        return FAMILIES[name](dim, seed)

    @classmethod
    def _grid(cls, dim: int, seed: int) -> "GaussianMixture":
        """Means at jittered corners of a scaled hypercube (2-D: a 3x3 lattice), equal-ish weights, std 0.1-0.3."""
        g = torch.Generator().manual_seed(10_000 + seed)
        if dim == 2:
            ij = torch.cartesian_prod(torch.arange(3.0), torch.arange(3.0)).double() - 1.0
            means = 1.6 * ij
        else:
            means = 1.2 * (2 * torch.randint(0, 2, (10, dim), generator=g).double() - 1)
        means = means + 0.15 * torch.randn(means.shape, generator=g, dtype=torch.float64)
        k = len(means)
        stds = 0.1 + 0.2 * torch.rand(k, generator=g, dtype=torch.float64)
        weights = 0.8 + 0.4 * torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    @classmethod
    def _clusters(cls, dim: int, seed: int) -> "GaussianMixture":
        """Two or three far super-clusters of tight components (std 0.05-0.2), strongly unequal weights: a data
        law off the origin with a heavy imbalance (the rare modes are where a sampler's tail errors show)."""
        g = torch.Generator().manual_seed(20_000 + seed)
        centres = 3.0 * torch.randn(2 + seed % 2, dim, generator=g, dtype=torch.float64) / dim**0.5 * 2**0.5
        parent = torch.arange(12) % len(centres)
        means = centres[parent] + 0.6 * torch.randn(12, dim, generator=g, dtype=torch.float64) / dim**0.25
        stds = 0.05 + 0.15 * torch.rand(12, generator=g, dtype=torch.float64)
        weights = torch.rand(12, generator=g, dtype=torch.float64) ** 3 + 0.01
        return cls(means, stds, weights)

    @classmethod
    def _wide(cls, dim: int, seed: int) -> "GaussianMixture":
        """Four broad, overlapping components (std 0.5-1.0) with means of scale 2.5: data wider than unit scale."""
        g = torch.Generator().manual_seed(30_000 + seed)
        means = 2.5 * torch.randn(4, dim, generator=g, dtype=torch.float64) / (dim / 2) ** 0.5
        stds = 0.5 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(4, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    # --- as data -----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_dict(cls, data, source: str = "mixture") -> "GaussianMixture":
        if not isinstance(data, dict) or any(k not in data for k in ("means", "stds", "weights")):
            raise InvalidParameterError(f"{source}: expected a JSON object with keys means (K x D), stds (K), "
                                        "weights (K)")
        mix = cls(data["means"], data["stds"], data["weights"])
        if not (bool((mix.stds > 0).all()) and bool((mix.weights > 0).all()) and bool(mix.means.isfinite().all())):
            raise InvalidParameterError(f"{source}: stds and weights must be > 0 and means finite")
        return mix

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "GaussianMixture":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise InvalidParameterError(f"cannot read the mixture file {str(path)!r}: {e}") from e
        return cls.from_dict(data, source=f"mixture file {str(path)!r}")

    def fingerprint(self) -> str:
        """A short hash of the parameters (6 significant digits), to record what a solver was fitted on."""
        text = json.dumps({k: [float(f"{v:.6g}") for v in torch.as_tensor(t).flatten().tolist()]
                           for k, t in (("means", self.means), ("stds", self.stds), ("weights", self.weights))})
        return "gmm:" + hashlib.sha256(text.encode()).hexdigest()[:16]

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


FAMILIES = {
    "circle": lambda dim, seed: GaussianMixture.circle(seed=seed),
    "random": lambda dim, seed: GaussianMixture.random(dim=dim, seed=seed),
    "grid": GaussianMixture._grid,
    "clusters": GaussianMixture._clusters,
    "wide": GaussianMixture._wide,
}
DESIGN_FAMILIES = ("circle", "random")          # what the samplers were designed and tuned on
HELD_OUT_FAMILIES = ("grid", "clusters", "wide")

__all__ = ["GaussianMixture", "FAMILIES", "DESIGN_FAMILIES", "HELD_OUT_FAMILIES"]
