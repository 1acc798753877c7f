"""Feynman-Kac correctors (Skreta et al. 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and
Product of Experts"): the batch is a population of particles with log-weights, resampled when the effective sample
size drops, so that the weighted particles follow the marginals of a *tilted* target instead of the model's own.

Targets: q_t proportional to prod_i p_t^(i)(x)^gamma_i, the geometric combination of the marginals of n diffusion
models (or prompts) at the same noise level. Modes:

    anneal   n = 1, gamma = (beta,)                   sampling p^beta (beta > 1 sharper, beta < 1 flatter)
    cfg      n = 2, gamma = (guidance, 1 - guidance)  CFG as the product p(x|c)^w p(x)^(1-w)
    product  n = 2, gamma = (beta, beta)              product of two prompts / models (composition)

Batch convention (the denoiser interface for several predictions). The sampler yields the n copies of the
particles stacked along the batch, torch.cat([x] * n) of shape (n * P, ...), and expects the denoised predictions
in the same layout: rows [i * P, (i + 1) * P) are expert i (prompt i, or cond then uncond for "cfg"). The caller
stacks the conditions the same way (ComfyUI's CFG guider does not: use "cfg" / "product" through the core driver
with a model that splits the batch; "anneal" has n = 1 and works with every driver).

Derivation (in y = x / alpha, u = rho^2, where every marginal solves the heat equation d_u p = 1/2 Lap p). Simulate
dy = sum_i gamma_i s_i du + dW backwards in u with s_i = grad log p^(i) = -eps_i / rho. The Feynman-Kac weight that
makes the particles follow q is d log w = A du with

    A = d_tau log q + div b + b . grad log q - 1/2 (Lap log q + |grad log q|^2)
      = 1/2 (|sum g_i s_i|^2 - sum g_i |s_i|^2)

(the Laplacians cancel for any exponents): for a product s1 . s2, for annealing beta (beta - 1) / 2 |s|^2, for CFG
w (w - 1) / 2 |s_c - s_u|^2, as in the paper. Over one step, A du = 1/2 (|sum g eps|^2 - sum g |eps|^2)(1 - c^2) with
c = rho' / rho. The particles move by the exact transition of that SDE with the predictions frozen (an
Ornstein-Uhlenbeck step towards xbar = sum g_i D_i / G, G = sum g_i), which is the ancestral step when G = 1. The
start is the product of the Gaussian priors, N(0, sigma_max^2 / G) (exact for flow at sigma = 1).
"""

from __future__ import annotations

import math

import torch

from ...errors import InvalidParameterError, SamplingError
from .driver import as_floats
from .multistep import alpha_of
from .stochastic import rho_ratio

MODES = ("anneal", "cfg", "product")


def exponents(mode: str, beta: float, guidance: float) -> tuple[float, ...]:
    """The gamma_i of a mode (see the module docstring)."""
    if mode == "anneal":
        return (beta,)
    if mode == "cfg":
        return (guidance, 1.0 - guidance)
    if mode == "product":
        return (beta, beta)
    raise InvalidParameterError(f"mode={mode!r} is unknown; valid: {', '.join(MODES)}")


def systematic_resample(logw: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of a systematic resampling of the particles with log-weights logw, from one uniform u in [0, 1)."""
    w = (logw - logw.max()).exp()
    cdf = (w / w.sum()).cumsum(0)
    positions = (u + torch.arange(len(logw), dtype=cdf.dtype, device=cdf.device)) / len(logw)
    return torch.searchsorted(cdf, positions).clamp(max=len(logw) - 1)


def effective_sample_size(logw: torch.Tensor) -> float:
    w = (logw - logw.max()).exp()
    return float(w.sum() ** 2 / (w * w).sum())


def _uniform(noise, s, s_next) -> float:
    z = float(noise(s, s_next).flatten()[0])                # one standard normal -> U(0, 1)
    return min(0.5 * (1 + math.erf(z / math.sqrt(2))), 1 - 1e-12)


def _split(out: torch.Tensor, n: int, p: int) -> list[torch.Tensor]:
    if out.shape[0] == n * p:
        return list(out.chunk(n)) if n > 1 else [out]
    if out.shape[0] == 1:                                   # a scalar dry run (the diffusers scheduler's)
        return [out] * n
    raise SamplingError(
        f"the model returned a batch of {out.shape[0]} for {n} prediction(s) of {p} particles; the FKC sampler "
        f"stacks the experts along the batch and expects {n * p} rows back (see nimblediff.core.sampling.smc)")


def sample_fkc(x, sigmas, *, param, noise, mode: str = "anneal", beta: float = 1.0, guidance: float = 3.0,
               ess_threshold: float = 0.5):
    """Sequential Monte Carlo with Feynman-Kac weights (module docstring). The particles are the batch x (P, ...);
    each step asks for n predictions at once (stacked, see "batch convention"), and the result is resampled by the
    final weights, so the returned batch is equally weighted. ess_threshold: resample when ESS < ess_threshold * P.
    """
    gam = exponents(mode, beta, guidance)
    total = sum(gam)
    if not total > 0:
        raise InvalidParameterError(f"the exponents {gam} of mode={mode!r} must sum to > 0 (beta, guidance)")
    if not 0 <= ess_threshold <= 1:
        raise InvalidParameterError(f"ess_threshold={ess_threshold!r}: need 0 <= ess_threshold <= 1")
    sigmas = as_floats(sigmas)
    n, p = len(gam), x.shape[0]
    if alpha_of(param, sigmas[0]) == 0 and total <= 0.5:
        raise InvalidParameterError(
            f"exponents summing to {total} <= 0.5 cannot start at sigma = 1 of a flow model; start below 1")
    x = x / total**0.5                                      # prior of the tilted path: N(0, sigma^2 / G)
    logw = x.new_zeros(p, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        out = yield (torch.cat([x] * n) if n > 1 else x), s
        preds = _split(out, n, p)
        eps = [param.eps(x, s, d) for d in preds]
        c = rho_ratio(param, s, s_next)
        # 1. Feynman-Kac weight of the step (left point)
        mix = sum(g * e for g, e in zip(gam, eps))
        sq = sum(g * e.square().reshape(p, -1).sum(1) for g, e in zip(gam, eps))
        logw = logw + (0.5 * (mix.square().reshape(p, -1).sum(1) - sq) * (1 - c * c)).double()
        # 2. exact transition of dy = G (xbar - y) / rho^2 du + dW with frozen predictions
        xbar = sum(g * d for g, d in zip(gam, preds)) / total
        if s_next == 0:
            x = xbar
        else:
            a, a_next = alpha_of(param, s), alpha_of(param, s_next)
            k = 2 * total - 1
            keep = a_next * c ** (2 * total) / a if a > 0 else 0.0
            var = -2 * math.log(c) if abs(k) < 1e-8 else (1 - c ** (2 * k)) / k
            z = noise(s, s_next)[:p]
            x = a_next * xbar + keep * (x - a * xbar) + (s_next * var**0.5) * z
        # 3. resample when the weights degenerate
        if effective_sample_size(logw) < ess_threshold * p:
            idx = systematic_resample(logw, _uniform(noise, s, s_next))
            x, logw = x[idx], torch.zeros_like(logw)
    if logw.abs().max() > 0:
        x = x[systematic_resample(logw, _uniform(noise, sigmas[-2], sigmas[-1]))]
    return x


__all__ = ["sample_fkc", "exponents", "systematic_resample", "effective_sample_size", "MODES"]
