"""Quantized UNets / transformers in diffusers pipelines: calibrate-and-quantize, save, load.

>>> report = quantize_denoiser(pipe, "int4k_g32", prompts=["a red circle"], steps=4)   # Q-Diffusion calibration
>>> save_quantized_denoiser(pipe, "unet-w4.safetensors")
>>> unet = load_quantized_unet("unet-w4.safetensors", folder + "/unet")                # or a config dict / model
>>> pipe.unet = unet

The math lives in nimblediff.core.quant; this module only supplies the diffusers pieces: the sampler callback
(the pipeline itself, so calibration follows the model's own trajectory), the skip-concatenation channels of a
UNet's up blocks, and the denoising loss for HAWQ-V2 sensitivities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..core.quant import calibrate as cal
from ..core.quant import quantize_model
from ..core.quant.modules import eligible_layers
from ..errors import InvalidParameterError, WeightsFormatError
from ..weights.quant_format import load_quantized, save_quantized
from ..weights.safetensors_io import read_metadata

__all__ = ["quantize_denoiser", "save_quantized_denoiser", "load_quantized_unet", "load_quantized_into",
           "skip_splits", "mixed_precision_plan", "KEEP_FLOAT"]

# First and last convolutions stay float: few weights, and Q-Diffusion / BRECQ keep them at high precision
# because the error they add is not averaged out by any later layer.
KEEP_FLOAT = ("conv_in", "conv_out", "proj_out_final")


def _denoiser(pipe) -> tuple[str, torch.nn.Module]:
    for name in ("unet", "transformer"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            return name, m
    raise InvalidParameterError(f"{type(pipe).__name__} has neither a unet nor a transformer to quantize")


def skip_splits(unet: torch.nn.Module) -> dict[str, int]:
    """{layer: channel} for the layers fed cat([h, skip]) in a diffusers UNet's up blocks (Q-Diffusion's split).

    Resnet j of up block i sees h with the previous resnet's channels (for j = 0: the previous up block's, or the
    mid block's for i = 0) followed by the skip."""
    out = {}
    ups = getattr(unet, "up_blocks", None)
    if ups is None:
        return out
    prev = unet.mid_block.resnets[-1].out_channels if getattr(unet, "mid_block", None) is not None else None
    for i, block in enumerate(ups):
        for j, res in enumerate(getattr(block, "resnets", [])):
            h = prev if j == 0 else block.resnets[j - 1].out_channels
            if h is not None and h < res.in_channels:
                out[f"up_blocks.{i}.resnets.{j}.conv1"] = h
                if getattr(res, "conv_shortcut", None) is not None:
                    out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = h
        if getattr(block, "resnets", None):
            prev = block.resnets[-1].out_channels
    return out


def _sampler(pipe, prompts, steps, guidance_scale: float, seed: int, pipe_kwargs=None) -> Callable[[], None]:
    if not prompts:
        raise InvalidParameterError("calibration needs at least one prompt (prompts=[...] / --prompt)")

    def run():
        for i, p in enumerate(prompts):
            pipe(p, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
                 generator=torch.Generator().manual_seed(seed + i), **(pipe_kwargs or {}))
    return run


def quantize_denoiser(pipe, scheme="int8", *, prompts=(), steps: int | None = 4, guidance_scale: float = 1.0,
                      calibrate: bool = True, per_layer=None, exclude=KEEP_FLOAT, adaround_iters: int = 0,
                      w8a8: bool = False, rows_per_call: int = 32, seed: int = 0, pipe_kwargs=None,
                      progress=None) -> dict:
    """Quantize ``pipe.unet`` (or ``pipe.transformer``) in place; return the per-layer report.

    calibrate=True samples ``prompts`` with the float pipeline (``steps`` steps each; prompt i from noise seed
    ``seed + i``; ``pipe_kwargs`` go to every pipeline call, e.g. ``sigmas=`` or ``max_sequence_length=``, so
    calibration follows the trajectory the model will be sampled on) and calibrates every layer on its inputs along
    that trajectory; calibrate=False rounds to nearest."""
    pipe.set_progress_bar_config(disable=True)
    _, model = _denoiser(pipe)
    if not calibrate:
        new = quantize_model(model, scheme, per_layer=per_layer, exclude=exclude, progress=progress)
        return {n: {"scheme": per_layer.get(n, scheme) if per_layer else scheme,
                    "bits_per_weight": m.qweight.bits_per_weight} for n, m in new.items()}
    run = _sampler(pipe, list(prompts), steps, guidance_scale, seed, pipe_kwargs)
    return cal.calibrate_model(model, scheme, run, per_layer=per_layer, exclude=exclude,
                               adaround_iters=adaround_iters, w8a8=w8a8, skip_splits=skip_splits(model),
                               rows_per_call=rows_per_call, seed=seed, progress=progress)


def mixed_precision_plan(pipe, schemes, bits_per_weight: float, *, prompts=(), steps: int = 4,
                         timesteps: int = 4, probes: int = 4, exclude=KEEP_FLOAT, method: str = "greedy",
                         seed: int = 0) -> dict:
    """HAWQ-V2 per-layer schemes for ``pipe``'s denoiser under an average ``bits_per_weight`` budget.

    The loss is the denoising loss on the model's own samples (latents of ``prompts``), averaged over
    ``timesteps`` evenly spaced noise levels."""
    pipe.set_progress_bar_config(disable=True)
    _, model = _denoiser(pipe)
    prompts = list(prompts)
    if not prompts:
        raise InvalidParameterError("mixed precision needs at least one prompt for its denoising loss")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        x0 = pipe(prompts, num_inference_steps=steps, output_type="latent", generator=gens).images
        cond = pipe.encode_prompt(prompts, x0.device, 1, False)[0]
    sched = pipe.scheduler
    n_train = sched.config.num_train_timesteps
    ts = torch.linspace(n_train * 0.05, n_train - 1, timesteps).long()
    gen = torch.Generator().manual_seed(seed)

    def loss():
        total = 0.0
        for t in ts:
            noise = torch.randn(x0.shape, generator=gen)
            tt = t.expand(x0.shape[0])
            xt = sched.add_noise(x0, noise, tt)
            target = sched.get_velocity(x0, noise, tt) if sched.config.prediction_type == "v_prediction" else noise
            total = total + (model(xt, tt, encoder_hidden_states=cond).sample - target).pow(2).mean()
        return total / len(ts)

    layers = eligible_layers(model, exclude=exclude)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # Hessian-vector products need double backward; CPU flash SDPA has none
        traces = cal.hutchinson_traces(loss, {n: m.weight for n, m in layers.items()}, probes=probes, seed=seed)
    options = cal.sensitivities(layers, traces, schemes)
    budget = bits_per_weight * sum(m.weight.numel() for m in layers.values())
    return cal.allocate(options, budget, method=method)


def save_quantized_denoiser(pipe, path, *, overwrite: bool = False) -> Path:
    name, model = _denoiser(pipe)
    config = dict(getattr(model, "config", {}) or {})
    return save_quantized(model, path, model_class=type(model).__name__, model_config=config,
                          extra={"component": name}, overwrite=overwrite)


def _build_model(path, config_or_model):
    if isinstance(config_or_model, torch.nn.Module):
        return config_or_model
    import diffusers

    meta = read_metadata(path)
    cls_name = meta.get("model_class", "UNet2DConditionModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise WeightsFormatError(f"{path}: model_class {cls_name!r} is not a diffusers model class")
    config = config_or_model
    if config is None:
        if "model_config" not in meta:
            raise InvalidParameterError(f"{path} stores no model config; pass the model's config or folder")
        config = json.loads(meta["model_config"])
    elif isinstance(config, (str, Path)):
        config = cls.load_config(str(config))
    return cls.from_config(config)


def load_quantized_unet(path, config_or_model=None, *, device: str = "cpu") -> torch.nn.Module:
    """A diffusers UNet / transformer with the file's quantized layers. ``config_or_model``: a float model of the
    architecture (filled in place), a config dict, a component folder, or None (the config stored in the file)."""
    model = _build_model(path, config_or_model)
    load_quantized(model, path, device=device)
    return model.eval()


def load_quantized_into(pipe, path) -> torch.nn.Module:
    """Replace the pipeline's UNet / transformer layers by the file's (the pipeline's own model is the target)."""
    _, model = _denoiser(pipe)
    load_quantized(model, path)
    return model
