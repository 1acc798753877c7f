"""The guided denoiser a sampler sees, built from a pipeline: x0 = D_u + cfg (D_c - D_u) in k-diffusion's convention
(model(x, sigma) -> denoised), for UNet pipelines (eps / v prediction) and SD3-style flow transformers alike.

Offline searches (BOSS, solver fitting) need the model as a plain function of (x, sigma); building it here keeps the
text-encoding and timestep rules of each family in the pipeline layer and the search in core.
"""

from __future__ import annotations

import torch

from ..core.parameterization import Flow


def _sd3_embeds(pipe, prompts):
    e, _, p, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                    max_sequence_length=pipe.tokenizer_max_length, device=torch.device("cpu"))
    return e, p


def guided_denoiser(pipe, prompts, cfg: float):
    """(denoiser, param, latent shape (C, H, W) for the pipeline's default size) with the prompts cycled over the batch."""
    if hasattr(pipe, "transformer") and pipe.transformer is not None:
        return _flow_transformer(pipe, prompts, cfg)
    from .schedulers import NimbleScheduler

    param = NimbleScheduler.from_config(pipe.scheduler.config, sampler="euler").param
    with torch.no_grad():
        context = pipe.encode_prompt(prompts, "cpu")[0]                  # (P, L, D)
        uncond = pipe.encode_prompt("", "cpu")[0]
    unet = pipe.unet.requires_grad_(False)

    def denoiser(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        t = param.sigma_to_t(sigma).to(x.dtype)
        ctx = context[torch.arange(len(x)) % len(prompts)]
        if cfg == 1:
            return param.denoised(x, s, unet(x * param.c_in(s), t, encoder_hidden_states=ctx).sample)
        out = unet(torch.cat([x, x]) * param.c_in(torch.cat([s, s])), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([uncond.expand(len(x), -1, -1), ctx])).sample
        d_u, d_c = param.denoised(torch.cat([x, x]), torch.cat([s, s]), out).chunk(2)
        return d_u + cfg * (d_c - d_u)

    size = unet.config.sample_size
    return denoiser, param, (unet.config.in_channels, size, size)


def _flow_transformer(pipe, prompts, cfg):
    config = pipe.scheduler.config
    param = Flow(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))
    with torch.no_grad():
        context, pooled = _sd3_embeds(pipe, prompts)
        null_context, null_pooled = _sd3_embeds(pipe, [""])
    model = pipe.transformer.requires_grad_(False)

    def denoiser(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        t = param.sigma_to_t(sigma).to(x.dtype).expand(len(x))
        i = torch.arange(len(x)) % len(prompts)
        if cfg == 1:
            v = model(hidden_states=x, timestep=t, encoder_hidden_states=context[i], pooled_projections=pooled[i])
            return param.denoised(x, s, v.sample)
        n = len(x)
        v = model(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                  encoder_hidden_states=torch.cat([null_context.expand(n, -1, -1), context[i]]),
                  pooled_projections=torch.cat([null_pooled.expand(n, -1), pooled[i]])).sample
        d_u, d_c = param.denoised(torch.cat([x, x]), torch.cat([s, s]), v).chunk(2)
        return d_u + cfg * (d_c - d_u)

    size = model.config.sample_size
    return denoiser, param, (model.config.in_channels, size, size)
