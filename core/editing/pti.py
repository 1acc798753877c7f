"""Prompt Tuning Inversion (Dong et al. 2023): encode an image into conditional embeddings that make guided
sampling retrace its inversion trajectory, then edit by interpolating them with the target prompt's embedding."""

from __future__ import annotations

import torch

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats


def _euler(x, denoised, sigma, sigma_next):
    return torch.lerp(denoised, x, sigma_next / sigma)     # sample_euler's step (DDIM in k-space)


def tune_prompt(model, trajectory, sigmas, cond, *, iters: int = 10, lr: float = 1e-2, tol: float = 0.0,
                callback=None):
    """Stage 1 (reconstruction): one embedding per sampling step, each optimised with Adam so that one Euler step
    from the current point lands on the inversion trajectory, and initialised from the previous step's result.

    model(x, sigma, cond) -> denoised, differentiable in cond (guidance inside: the embeddings compensate for CFG,
    which breaks plain DDIM inversion); trajectory: `invert`'s output on `sigmas` (the sampling schedule);
    cond: the source prompt's embedding, one tensor or a tuple of streams (SD3: (prompt_embeds, pooled)), all
    streams tuned together by one Adam. Returns the list of tuned embeddings (same structure), one per step.
    """
    sigmas = as_floats(sigmas)
    n = len(sigmas) - 1
    if len(trajectory) != n + 1:
        raise InvalidParameterError(f"trajectory has {len(trajectory)} points but sigmas has {n} steps; pass the "
                                    "trajectory `invert` returned for the same sigmas")
    if iters < 0 or lr <= 0:
        raise InvalidParameterError(f"iters={iters}, lr={lr}: need iters >= 0 and lr > 0")
    x = trajectory[-1]
    c = _streams(cond)
    tuned = []
    for i in range(n):
        target = trajectory[n - 1 - i]
        c = tuple(t.detach().clone().requires_grad_(True) for t in c)
        opt = torch.optim.Adam(c, lr=lr)
        for _ in range(iters):
            with torch.enable_grad():
                denoised = model(x, sigmas[i], _like(cond, c))
                loss = ((_euler(x, denoised, sigmas[i], sigmas[i + 1]) - target) ** 2).mean()
                if float(loss.detach()) <= tol:
                    break
                # grads of c only: the model's own parameters stay untouched (no .grad left on them)
                grads = torch.autograd.grad(loss, c, allow_unused=True)
            for t, g in zip(c, grads):
                t.grad = torch.zeros_like(t) if g is None else g     # a stream the model ignores stays put
            opt.step()
        c = tuple(t.detach() for t in c)
        with torch.no_grad():
            x = _euler(x, model(x, sigmas[i], _like(cond, c)), sigmas[i], sigmas[i + 1])
        tuned.append(_like(cond, c))
        if callback is not None:
            callback({"i": i, "x": x, "cond": tuned[-1]})
    return tuned


def _streams(c) -> tuple:
    return tuple(c) if isinstance(c, (tuple, list)) else (c,)


def _like(c, streams):
    """streams in c's structure: a tuple / list of streams, or the one tensor."""
    return type(c)(streams) if isinstance(c, (tuple, list)) else streams[0]


def interpolate(tuned, target, alpha: float):
    """Stage 2 (editing): alpha * tuned + (1 - alpha) * target per step. alpha = 1 reconstructs, alpha = 0 is the
    target prompt alone; in between trades fidelity against editability. Tuples are interpolated stream by stream."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha={alpha}: need 0 <= alpha <= 1 (1 = reconstruction, 0 = target prompt)")
    t = _streams(target)
    out = []
    for c in tuned:
        if len(_streams(c)) != len(t):
            raise InvalidParameterError(f"tuned embedding has {len(_streams(c))} streams, target {len(t)}: encode "
                                        "the target with the same text encoders as the source")
        out.append(_like(c, tuple(torch.lerp(b.to(a.dtype), a, alpha) for a, b in zip(_streams(c), t))))
    return out


def sample_per_step(x, sigmas, *, param, noise, conds):
    """Euler sampling that asks with a per-step conditioning: yields (x, sigma, cond); drive it with a loop that
    passes cond to the model (the PTI edit)."""
    sigmas = as_floats(sigmas)
    if len(conds) != len(sigmas) - 1:
        raise InvalidParameterError(f"{len(conds)} conditionings for {len(sigmas) - 1} steps")
    for i in range(len(sigmas) - 1):
        denoised = yield x, sigmas[i], conds[i]
        x = _euler(x, denoised, sigmas[i], sigmas[i + 1])
    return x


def run_per_step(model, x, sigmas, conds, *, param):
    """Drive sample_per_step with model(x, sigma, cond) -> denoised."""
    steps = sample_per_step(x, sigmas, param=param, noise=None, conds=conds)
    try:
        x_ask, sigma, c = next(steps)
        while True:
            with torch.no_grad():
                x_ask, sigma, c = steps.send(model(x_ask, sigma, c))
    except StopIteration as done:
        return done.value


__all__ = ["tune_prompt", "interpolate", "sample_per_step", "run_per_step"]
