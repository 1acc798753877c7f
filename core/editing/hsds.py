"""Hessian Score Distillation Sampling (HSDS): refine EIM's editing direction before the manipulate step.

Shuai et al. 2024 ("Latent Space Disentanglement in Diffusion Transformers Enables Precise Zero-shot Semantic
Editing") name HSDS as their "Identify" step, which finds from text prompts "editing directions that control
specific target attributes while preserving other image features" (abstract). The abstract and summaries are all we
could read (we found no published code); the formulation below is our reading, written so that it can be checked by
hand, and it departs from the paper wherever the paper's own equations would be needed.

What is implemented. c_s: the source embedding (every text stream: token states, pooled vector), delta_0 = c_t - c_s
the plain prompt difference, x0 the source latent, D(x, sigma, c) -> x0-prediction the denoiser. At a few noise
levels sigma_k the source latent is noised once, x_k = (1 - sigma_k) x0 + sigma_k eps_k (eps_k fixed for the whole
optimisation, drawn from `generator`), and the direction delta minimises

    E(delta) = mean_k [ 1/2 ||D(x_k, c_s + delta) - D(x_k, c_t)||^2                                     (SDS)
                        + mu/2 ||D(x_k, c_s + delta) - 2 D(x_k, c_s) + D(x_k, c_s - delta)||^2 ]        (Hessian)

(||.||^2 is the mean over the latent's elements.)

- SDS term: score distillation on the noised source latent under the edited embedding, with the target prompt's
  prediction as the distillation target; its gradient is (D(x_k, c_s + delta) - D(x_k, c_t)) pulled back through
  the embedding by autograd on the DiT (the x0-space SDS gradient with weight w(sigma) = 1). It keeps the edit:
  delta_0 makes it zero.
- Hessian term: D(c_s + delta) - 2 D(c_s) + D(c_s - delta) = delta^T (d^2 D / dc^2) delta + O(|delta|^4), the
  second directional derivative of the prediction along the direction (a finite-difference Hessian-vector
  product, two model calls, no double backward). A semantic edit is odd in delta (red -> blue one way, away from
  blue the other); what changes whichever way the embedding moves off the source (size, background, details
  regenerated differently) is even, and lands here. Penalising it keeps the direction in the part of the joint
  space where the model responds linearly, which is the paper's notion of a disentangled direction, and makes
  extrapolation (strength > 1) safe. mu = `curvature`.

delta is optimised from delta_0 with Adam (cosine-decayed learning rate; `lr` is relative to each stream's RMS
size of delta_0, so one value serves embeddings of any scale). steps = 0 returns delta_0 itself.

On a model whose prediction is affine in c the Hessian term is zero and delta_0 is already optimal (plain EIM is
HSDS on a perfectly disentangled model). Under classifier-free guidance the objective is the conditional branch's
times cfg^2 (the unconditional branch does not depend on c), so the unguided denoiser gives the same optimum.

Departures from the paper (as far as a reader of its abstract can tell): the exact HSDS loss, its weighting
w(sigma), its noise-level sampling and whether it also moves the image half of the joint embedding are not public;
here only the text half moves, the weighting is uniform in x0-space, the noise is one fixed draw per level, and the
Hessian enters as the finite-difference curvature penalty above rather than as an explicit Hessian matrix.
"""

from __future__ import annotations

import math

import torch

from ...errors import InvalidParameterError, SamplingError
from .eim import manipulate
from .pti import _like, _streams

DEFAULT_LEVELS = (0.3, 0.5, 0.7, 0.9)       # flow sigmas at which the source latent is noised


def check_options(steps: int, lr: float, curvature: float, levels) -> tuple:
    """Validate HSDS's options (before any model call); returns the levels as floats."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InvalidParameterError(f"hsds steps={steps!r}: need an integer >= 0 (0 = the plain prompt "
                                    "difference, no refinement)")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidParameterError(f"hsds lr={lr!r}: need a finite number > 0 (relative to the direction's RMS "
                                    "size; 0.05 is a good start)")
    if not (isinstance(curvature, (int, float)) and math.isfinite(curvature) and curvature >= 0):
        raise InvalidParameterError(f"hsds curvature={curvature!r}: need a finite number >= 0 (weight of the "
                                    "Hessian term; 0 = SDS term only)")
    levels = [float(s) for s in (levels.tolist() if isinstance(levels, torch.Tensor) else levels)]
    if not levels or not all(0.0 < s <= 1.0 for s in levels):
        raise InvalidParameterError(f"hsds levels={levels}: need one or more flow noise levels in (0, 1]")
    return levels


def objective(model, xs, source, delta, targets, sources, curvature: float) -> torch.Tensor:
    """E(delta) of the module docstring on the noised latents xs [(sigma_k, x_k)], with the target's and the
    source's predictions D(x_k, c_t), D(x_k, c_s) precomputed."""
    plus, minus = manipulate(source, delta, 1.0), manipulate(source, delta, -1.0)
    total = 0.0
    for (sigma, x), t, s in zip(xs, targets, sources):
        d_plus = model(x, sigma, plus)
        total = total + 0.5 * ((d_plus - t) ** 2).mean()
        if curvature > 0:
            total = total + 0.5 * curvature * ((d_plus - 2 * s + model(x, sigma, minus)) ** 2).mean()
    return total / len(xs)


def refine_direction(model, x0, source, delta, levels=DEFAULT_LEVELS, *, param, steps: int = 10, lr: float = 0.05,
                     curvature: float = 1.0, generator=None, callback=None):
    """HSDS: the editing direction delta (same streams as `source`) refined on the source latent x0 (B, C, H, W).

    model(x, sigma, c) -> x0, differentiable in c (autograd runs through it; its weights get no .grad); levels:
    flow noise levels; callback: {"i", "loss"} after every Adam step. Returns the refined direction (detached),
    or `delta` itself when steps == 0.
    """
    levels = check_options(steps, lr, curvature, levels)
    if param.kind != "flow":
        raise InvalidParameterError(f"HSDS noises the source latent along a rectified flow (SD3 / Flux); got a "
                                    f"model of kind {param.kind!r}")
    if len(_streams(delta)) != len(_streams(source)):
        raise InvalidParameterError(f"delta has {len(_streams(delta))} streams, source {len(_streams(source))}: "
                                    "pass direction(source, target)")
    if steps == 0:
        return delta
    x0 = x0.detach()
    source = _like(source, tuple(a.detach() for a in _streams(source)))
    d0 = tuple(d.detach().to(a.dtype) for a, d in zip(_streams(source), _streams(delta)))
    target = manipulate(source, d0, 1.0)

    # 1. one noise draw per level: x_k = (1 - sigma_k) x0 + sigma_k eps_k, and the fixed predictions
    xs = [(s, param.noise_scaling(s, torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device), x0))
          for s in levels]
    with torch.no_grad():
        targets = [model(x, s, target).detach() for s, x in xs]
        sources = [model(x, s, source).detach() for s, x in xs]

    # 2. delta = delta_0 + scale * u per stream, u from 0 by Adam on E (scale: the stream's RMS, so lr is relative)
    scales = [float(d.pow(2).mean().sqrt()) or 1.0 for d in d0]
    us = [torch.zeros_like(d, requires_grad=True) for d in d0]
    opt = torch.optim.Adam(us, lr=lr)

    def current():
        return _like(source, tuple(d + k * u for d, k, u in zip(d0, scales, us)))

    for i in range(steps):
        for group in opt.param_groups:       # cosine decay to 0: Adam settles on the optimum instead of circling it
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        with torch.enable_grad():
            loss = objective(model, xs, source, current(), targets, sources, curvature)
            # grads of the direction only: the model's own parameters stay untouched (no .grad left on them)
            grads = torch.autograd.grad(loss, us)
        for u, g in zip(us, grads):
            u.grad = g
        opt.step()
        if callback is not None:
            callback({"i": i, "loss": float(loss.detach())})
    refined = tuple(t.detach() for t in _streams(current()))
    if not all(bool(torch.isfinite(t).all()) for t in refined):
        raise SamplingError(f"HSDS diverged (non-finite direction) at lr={lr}; lower hsds lr")
    return _like(delta, refined)


__all__ = ["DEFAULT_LEVELS", "check_options", "objective", "refine_direction"]
