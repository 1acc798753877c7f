"""The loops that drive ask/tell samplers. A sampler is a generator that yields (x, sigma), receives the denoised
x0 and finally returns the sample; these are the only places that call a model."""

from __future__ import annotations

import torch

from ...errors import SamplingError


def noise_from_seed(x: torch.Tensor, seed: int | None = None, generator: torch.Generator | None = None):
    """Fresh Gaussian noise per call, from one seeded generator (ComfyUI's default_noise_sampler draws the same)."""
    if generator is None and seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)

    def noise(sigma, sigma_next):
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return noise


def as_floats(sigmas) -> list[float]:
    """The schedule as python floats, the one scalar type samplers step with: the drivers convert with this (so a
    sampler gets the same numbers from each and its samples agree to the last bit) and so do the samplers at entry
    (so direct callers with tensors get the same arithmetic). Per-step scalar math then stays in Python, where a 0-d
    tensor op would cost a kernel launch (~3 µs)."""
    return sigmas.tolist() if isinstance(sigmas, torch.Tensor) else [float(s) for s in sigmas]


def checked(denoised: torch.Tensor, step: int, sigma) -> torch.Tensor:
    """Stop on NaN/inf from the model instead of sampling garbage to the end."""
    if not torch.isfinite(denoised).all():
        raise SamplingError(
            f"the model returned NaN or inf at step {step} (sigma={float(sigma):.6g}); check the model's dtype, "
            "the LoRA strengths and the CFG scale")
    return denoised


def run(method, model, x, sigmas, *, param, noise=None, seed=None, extra_args=None, callback=None, **options):
    """Sample with `method` (a generator function from SAMPLERS) and a denoiser `model(x, sigma, **extra) -> x0`.

    The model gets sigma as a tensor of shape (batch,) like k-diffusion. `callback` gets k-diffusion's dict per
    model evaluation (sigma as a 0-d tensor); raising from it interrupts sampling.
    """
    extra_args = extra_args or {}
    noise = noise or noise_from_seed(x, seed)
    # python floats, as the scheduler hands them (see as_floats); sigmas that require grad stay tensors: a solver
    # fit (schedule_search.fit_solver) differentiates through the sampler
    if not (isinstance(sigmas, torch.Tensor) and sigmas.requires_grad):
        sigmas = as_floats(sigmas)
    steps = method(x, sigmas, param=param, noise=noise, **options)
    i = 0
    try:
        x_ask, sigma = next(steps)
        while True:
            # sigma per row of what is asked (a particle sampler may ask for a larger batch than x)
            s_in = sigma * x_ask.new_ones([x_ask.shape[0]])
            denoised = checked(model(x_ask, s_in, **extra_args), i, sigma)
            if callback is not None:
                callback({"x": x_ask, "i": i, "sigma": s_in[0], "sigma_hat": s_in[0], "denoised": denoised})
            i += 1
            x_ask, sigma = steps.send(denoised)
    except StopIteration as done:
        return done.value


def k_diffusion_sampler(method, param_of, **options):
    """`method` with k-diffusion's sampler signature, the one ComfyUI's KSAMPLER calls.

    param_of(model) returns the parameterization of the host's model (the host knows how its model adds noise);
    the seed comes from extra_args["seed"] as in ComfyUI's own samplers, so the same seed draws the same noise.
    """

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, **overrides):
        extra_args = extra_args or {}
        noise = noise_sampler or noise_from_seed(x, extra_args.get("seed"))   # the model takes seed= too
        return run(method, model, x, sigmas, param=param_of(model), noise=noise, extra_args=extra_args,
                   callback=callback, **{**options, **overrides})

    sample.__name__ = f"sample_{method.__name__.removeprefix('sample_')}"
    return sample
