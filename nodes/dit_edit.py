"""Prompt-space editing nodes: EIM semantic editing for MM-DiTs (SD3 / Flux type) and Prompt Tuning Inversion.

- NimbleDiTSemanticEdit: LATENT + source / target CONDITIONING -> edited LATENT (core/editing/eim.py).
- NimblePromptTuningInversion: LATENT + source CONDITIONING -> the noise LATENT and tuned CONDITIONING, one entry per
  sampling step, each limited to its step's sigma (core/editing/pti.py stage 1). With SD3 / Flux conditioning the
  pooled vector (pooled_output) is tuned together with the token states.
- NimbleInterpolateConditioning: alpha * tuned + (1 - alpha) * target per entry (PTI stage 2; the pooled vector too
  when both carry one), for SamplerCustom with add_noise off, an euler sampler and the same SIGMAS.

The denoiser these nodes hand to core is the MODEL's own BaseModel.apply_model (k-space x0, ComfyUI's convention),
classifier-free guided here; the math is nimblediff.core.editing.
"""

from __future__ import annotations

import torch

from ..core.editing.eim import check_joint_model, direction, edit
from ..core.editing.hsds import DEFAULT_LEVELS, check_options, refine_direction
from ..core.editing.inversion import invert
from ..core.editing.pti import interpolate, run_per_step, tune_prompt
from ..core.sampling import run
from ..core.sampling.driver import as_floats
from ..errors import InvalidParameterError
from .editing import param_of
from .widgets import NEGATIVE, cfg_input, fixed_point_input, seed_input

# ComfyUI diffusion_model classes with joint text-image attention (comfy.ldm ... mmdit.py, flux/model.py)
_JOINT = {"OpenAISignatureMMDITWrapper": "sd3", "MMDiT": "sd3", "Flux": "flux"}


def architecture(model) -> str:
    """'sd3' / 'flux' for an MM-DiT MODEL, else '<diffusion_model class> (<BaseModel class>)', e.g. a UNet."""
    base = model.model
    net = getattr(base, "diffusion_model", None)
    for cls in type(net).__mro__:                 # subclasses count (the DiT loader's NimbleMMDiT is an MMDiT)
        if cls.__name__ in _JOINT:
            return _JOINT[cls.__name__]
    return f"{type(net).__name__} ({type(base).__name__})"


def _entry(conditioning, name: str):
    """(tokens (B, L, D), pooled (B, P) or None, the entry's dict) of a one-entry CONDITIONING."""
    if not conditioning:
        raise InvalidParameterError(f"{name}: empty CONDITIONING; connect a CLIPTextEncode")
    if len(conditioning) != 1:
        raise InvalidParameterError(f"{name}: {len(conditioning)} conditioning entries; this node edits one text "
                                    "conditioning (do not combine or concat before it)")
    tokens, extras = conditioning[0]
    return tokens, extras.get("pooled_output"), extras


def _streams(tokens, pooled):
    return (tokens,) if pooled is None else (tokens, pooled)


class _Apply(torch.nn.Module):
    """BaseModel.apply_model as a forward, so torch.func.functional_call can stand other weights in."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, *args, **kwargs):
        return self.base.apply_model(*args, **kwargs)


def _autograd_weights(base) -> dict:
    """Ordinary clones of the weights ComfyUI created under inference_mode (loaders run inside it): autograd cannot
    save inference tensors for backward, so PTI's gradient through the model needs these stand-ins. Call it
    outside inference mode; the MODEL itself is not touched."""
    tensors = [*base.named_parameters(), *base.named_buffers()]
    # detached: a clone of a requires_grad parameter would make every forward (the unconditional one too, whose
    # inputs are inference tensors) record a graph
    return {f"base.{name}": t.detach().clone() for name, t in tensors if t.is_inference()}


def comfy_denoiser(model, negative, cfg: float, x_shape, cond_extras: dict, differentiable: bool = False):
    """model(x, sigma, c) -> x0 with c = (tokens,) or (tokens, pooled), CFG against `negative` when cfg > 1, on the
    MODEL's BaseModel (its patches applied by load_models_gpu, as a sampler would); cond_extras: the positive
    entry's dict (Flux guidance); differentiable: gradients may flow to c (see _autograd_weights)."""
    import comfy.model_management as mm

    if hasattr(mm, "load_models_gpu"):
        mm.load_models_gpu([model])
    base = model.model
    apply, weights = _Apply(base), (_autograd_weights(base) if differentiable else {})
    size = {"height": x_shape[-2] * 8, "width": x_shape[-1] * 8}
    u_tokens, u_pooled, u_extras = _entry(negative, "negative")

    def extra(pooled, extras):
        kw = {}
        adm = base.encode_adm(pooled_output=pooled, **size) if pooled is not None else None
        if adm is not None:
            kw["y"] = adm
        if "guidance" in extras:                      # Flux guidance embedding (FluxGuidance node)
            kw["guidance"] = torch.full((x_shape[0],), float(extras["guidance"]))
        return kw

    def one(x, s, tokens, pooled, extras):
        b = len(x)
        tokens = tokens.expand(b, -1, -1) if len(tokens) == 1 else tokens
        pooled = None if pooled is None else (pooled.expand(b, -1) if len(pooled) == 1 else pooled)
        kwargs = {"c_crossattn": tokens.to(x.device), **extra(pooled, extras)}
        if weights:
            return torch.func.functional_call(apply, weights, (x, s), kwargs)
        return base.apply_model(x, s, **kwargs)

    def denoise(x, sigma, c, **_):
        s = sigma if isinstance(sigma, torch.Tensor) else torch.full((len(x),), float(sigma))
        s = s.to(x.device, torch.float32).reshape(-1).expand(len(x))
        tokens, pooled = c[0], (c[1] if len(c) > 1 else None)
        cond = one(x, s, tokens, pooled, cond_extras)
        if cfg == 1.0:
            return cond.to(x.dtype)
        uncond = one(x, s, u_tokens, u_pooled, u_extras)
        return (uncond + cfg * (cond - uncond)).to(x.dtype)

    return denoise


def _progress(steps: int):
    try:
        import comfy.utils

        bar = comfy.utils.ProgressBar(steps)
        return lambda info: bar.update(1)
    except (ImportError, AttributeError):
        return None


def _latent_in(model, latent):
    base = model.model
    samples = latent["samples"].float()
    return base.process_latent_in(samples) if hasattr(base, "process_latent_in") else samples


def _latent_out(model, latent, x):
    import comfy.model_management as mm

    base = model.model
    x = base.process_latent_out(x) if hasattr(base, "process_latent_out") else x
    out = {k: v for k, v in latent.items() if k != "noise_mask"}
    out["samples"] = x.to(mm.intermediate_device())
    return out


class DiTSemanticEdit:
    """EIM: invert the latent under the source prompt, move the joint text embedding along target - source by a
    strength, regenerate. Mask-free; MM-DiT models only (SD3 / Flux type)."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("DiT semantic edit (EIM): inverts the latent under the source prompt, moves the joint text "
                   "embedding along (target - source) by strength and regenerates; strength 0 is the reconstruction. "
                   "hsds_steps > 0 first refines the direction with Hessian Score Distillation Sampling. "
                   "SD3 / Flux-type MM-DiT models only.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an MM-DiT (SD3 / Flux type); a UNet has no joint text-image space"}),
            "source": ("CONDITIONING", {"tooltip": "what the image shows (the source prompt)"}),
            "target": ("CONDITIONING", {"tooltip": "the same prompt with the attribute changed; the edit direction "
                                                   "is target minus source"}),
            "negative": NEGATIVE,
            "latent": ("LATENT", {"tooltip": "the image latent to edit (VAE Encode)"}),
            "sigmas": ("SIGMAS", {"tooltip": "the sampling schedule, inverted back to front (shorten it with "
                                             "denoise < 1 to invert only part of the way)"}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05, "tooltip": (
                "how far along the direction: 0 = reconstruction, 1 = the target prompt, more = stronger")}),
            "cfg": cfg_input(1.0, "guidance while regenerating (inversion is unguided)"),
            "window": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                "share of the steps (from the noisy end) that see the edited embedding; the rest keep the source's "
                "details")}),
            "fixed_point": fixed_point_input("extra model calls per inversion step that make it the exact inverse of "
                                             "euler sampling"),
        }, "optional": {
            "hsds_steps": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": (
                "Hessian Score Distillation Sampling: Adam steps that refine the direction on the source latent "
                "before editing (each costs 2 model calls and their backward per noise level); 0 = the plain "
                "target - source difference")}),
            "hsds_lr": ("FLOAT", {"default": 0.05, "min": 0.001, "max": 1.0, "step": 0.001, "tooltip": (
                "HSDS learning rate, relative to the direction's size")}),
            "hsds_curvature": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": (
                "HSDS weight of the Hessian term (changes that appear whichever way the embedding moves, i.e. "
                "not the edit); 0 = score distillation term only")}),
            "hsds_seed": seed_input("seed of the noise HSDS adds to the source latent"),
        }}

    def edit(self, model, source, target, negative, latent, sigmas, strength, cfg, window, fixed_point,
             hsds_steps=0, hsds_lr=0.05, hsds_curvature=1.0, hsds_seed=0):
        check_joint_model(architecture(model))
        check_options(hsds_steps, hsds_lr, hsds_curvature, DEFAULT_LEVELS)
        param = param_of(model.get_model_object("model_sampling"))
        s_tokens, s_pooled, s_extras = _entry(source, "source")
        t_tokens, t_pooled, _ = _entry(target, "target")
        x0 = _latent_in(model, latent)
        src, tgt = _streams(s_tokens, s_pooled), _streams(t_tokens, t_pooled)
        delta = direction(src, tgt)                       # checks the shapes before any model call
        if hsds_steps > 0:
            # ComfyUI runs nodes under inference_mode; the direction's gradient needs ordinary tensors
            with torch.inference_mode(False), torch.enable_grad():
                differentiable = comfy_denoiser(model, negative, 1.0, x0.shape, s_extras, differentiable=True)
                delta = refine_direction(
                    differentiable, x0.clone(), tuple(t.clone() for t in src), tuple(d.clone() for d in delta),
                    param=param, steps=hsds_steps, lr=hsds_lr, curvature=hsds_curvature,
                    generator=torch.Generator().manual_seed(hsds_seed), callback=_progress(hsds_steps))
        plain = comfy_denoiser(model, negative, 1.0, x0.shape, s_extras)
        guided = comfy_denoiser(model, negative, cfg, x0.shape, s_extras)
        out, _ = edit(guided, x0, sigmas, src, tgt, strength, param=param, fixed_point=fixed_point, window=window,
                      delta=delta, invert_model=plain,
                      callback=_progress((len(as_floats(sigmas)) - 1) * (fixed_point + 2)))
        return (_latent_out(model, latent, out),)


def _step_windows(sigmas) -> list[tuple[float, float]]:
    """(timestep_start, timestep_end) per sampling step: midpoints between neighbouring sigmas, so step i's entry is
    the only one active at sigmas[i] (ComfyUI skips an entry when sigma > start or sigma < end)."""
    s = as_floats(sigmas)
    n = len(s) - 1
    return [((s[i - 1] + s[i]) / 2 if i > 0 else float("inf"), (s[i] + s[i + 1]) / 2 if i < n - 1 else -1.0)
            for i in range(n)]


class PromptTuningInversion:
    """PTI stage 1: invert the latent (unguided), then tune one text embedding per sampling step (token states and,
    for SD3 / Flux, the pooled vector together) so that guided euler sampling from the noise retraces the inversion.
    Outputs the noise and the tuned CONDITIONING (each entry active at its own step's sigma only: sample with the
    same SIGMAS), and the edit sampled here (stage 2 with the optional target and alpha; the reconstruction without a
    target). Flow models (SD3) need that output at full depth: SamplerCustom with add_noise off starts a CONST model
    from sigma * 0 + (1 - sigma) * latent, i.e. from zeros at sigma 1, not from the inverted noise."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("Prompt Tuning Inversion: inverts the latent and optimises the source prompt's embedding per "
                   "sampling step (with SD3 / Flux conditioning, the pooled vector too) so that guided sampling "
                   "reconstructs the image. 'edited' is the edit sampled here with the optional target prompt and "
                   "alpha (euler, the same SIGMAS and cfg); or interpolate 'tuned' with a target (NimbleDiff PTI "
                   "Interpolate Conditioning) and sample 'noise' with SamplerCustom, the same SIGMAS, add_noise off, "
                   "euler (VP models such as SD1.5; flow models such as SD3 need 'edited').")
    RETURN_TYPES = ("LATENT", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("noise", "tuned", "edited")
    FUNCTION = "tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model that will sample the edit"}),
            "positive": ("CONDITIONING", {"tooltip": "what the image shows (the source prompt)"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative prompt of the edit's sampling"}),
            "latent": ("LATENT", {"tooltip": "the image latent to invert (VAE Encode)"}),
            "sigmas": ("SIGMAS", {"tooltip": "the schedule the edit will sample (the same SIGMAS go to "
                                             "SamplerCustom)"}),
            "cfg": cfg_input(5.0, "the guidance the edit will sample with; the tuned embeddings compensate for it",
                             minimum=1.0),
            "iters": ("INT", {"default": 10, "min": 0, "max": 200, "tooltip": "Adam steps per sampling step"}),
            "lr": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 1.0, "step": 0.001,
                             "tooltip": "Adam learning rate on the embedding"}),
            "fixed_point": fixed_point_input("extra model calls per inversion step (exact inverse of euler "
                                             "sampling)"),
        }, "optional": {
            "target": ("CONDITIONING", {"tooltip": (
                "the target prompt of the 'edited' output (encoded like the source); unconnected: 'edited' is the "
                "reconstruction (alpha 1)")}),
            "alpha": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "'edited' output: weight of the tuned embedding, 1 = reconstruction, 0 = the target prompt")}),
        }}

    def tune(self, model, positive, negative, latent, sigmas, cfg, iters, lr, fixed_point, target=None, alpha=0.8):
        param = param_of(model.get_model_object("model_sampling"))
        tokens, pooled, extras = _entry(positive, "positive")
        goal = None
        if target is not None:            # checked before any model call
            t_tokens, t_pooled, _ = _entry(target, "target")
            goal = _streams(t_tokens, t_pooled if pooled is not None else None)
            if len(goal) != len(_streams(tokens, pooled)) or t_tokens.shape[1:] != tokens.shape[1:]:
                raise InvalidParameterError(f"target is {tuple(t_tokens.shape)} (pooled: {t_pooled is not None}) but "
                                            f"positive is {tuple(tokens.shape)} (pooled: {pooled is not None}): "
                                            "encode both with the same text encoders and length")
        if not 0.0 <= alpha <= 1.0:
            raise InvalidParameterError(f"alpha={alpha}: need 0 <= alpha <= 1 (1 = reconstruction, 0 = target)")
        if len(as_floats(sigmas)) < 2:
            raise InvalidParameterError("sigmas has no step; connect a schedule with at least one step")
        # ComfyUI runs nodes under inference_mode; the embedding's gradient needs ordinary tensors
        with torch.inference_mode(False), torch.enable_grad():
            x0 = _latent_in(model, latent).clone()
            source = _streams(tokens.clone().float(), None if pooled is None else pooled.clone().float())
            plain = comfy_denoiser(model, negative, 1.0, x0.shape, extras)
            guided = comfy_denoiser(model, negative, cfg, x0.shape, extras, differentiable=True)
            with torch.no_grad():
                trajectory = run(invert, lambda x, s, **_: plain(x, s, source), x0, sigmas, param=param,
                                 fixed_point=fixed_point)
            # both streams (SD3: tokens and pooled vector) tuned together, as DiTEditPipeline(method="pti")
            tuned = tune_prompt(guided, trajectory, sigmas, source, iters=iters, lr=lr,
                                callback=_progress(len(as_floats(sigmas)) - 1))
            tuned = [tuple(t.detach() for t in c) for c in tuned]
            # stage 2 here: euler from the noise with the per-step interpolation (core run_per_step)
            conds = tuned if goal is None else interpolate(tuned, tuple(t.clone().float() for t in goal), alpha)
            edited = run_per_step(comfy_denoiser(model, negative, cfg, x0.shape, extras), trajectory[-1], sigmas,
                                  conds, param=param)
        entries = [[c[0], {**extras, **({"pooled_output": c[1]} if len(c) > 1 else {}),
                           "timestep_start": start, "timestep_end": end}]
                   for c, (start, end) in zip(tuned, _step_windows(sigmas))]
        return (_latent_out(model, latent, trajectory[-1].detach()), entries, _latent_out(model, latent, edited))


class InterpolateConditioning:
    """PTI stage 2: alpha * tuned + (1 - alpha) * target, entry by entry (each keeps its step window); the pooled
    vector (pooled_output) is interpolated too when the tuned entry and the target both carry one."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("Interpolates Prompt Tuning Inversion's tuned conditioning with a target prompt: alpha = 1 "
                   "reconstructs the image, 0 is the target prompt alone; in between trades fidelity for the edit.")
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "interpolate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tuned": ("CONDITIONING", {"tooltip": "NimbleDiff Prompt Tuning Inversion's tuned output"}),
            "target": ("CONDITIONING", {"tooltip": "the target prompt"}),
            "alpha": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "weight of the tuned embedding: 1 = reconstruction, 0 = target"}),
        }}

    def interpolate(self, tuned, target, alpha):
        t_tokens, t_pooled, _ = _entry(target, "target")
        if not tuned:
            raise InvalidParameterError("tuned: empty CONDITIONING; connect NimbleDiff Prompt Tuning Inversion")
        for i, (c, _) in enumerate(tuned):
            if c.shape[1:] != t_tokens.shape[1:]:
                raise InvalidParameterError(f"tuned entry {i} is {tuple(c.shape)} but target is "
                                            f"{tuple(t_tokens.shape)}: encode the target with the same text "
                                            "encoder and length as the source")
        out = []
        for c, extras in tuned:
            pooled = extras.get("pooled_output")
            if pooled is None or t_pooled is None:
                (m,) = interpolate([c], t_tokens, alpha)
                out.append([m, dict(extras)])
            else:
                if pooled.shape[1:] != t_pooled.shape[1:]:
                    raise InvalidParameterError(f"tuned pooled_output is {tuple(pooled.shape)} but the target's is "
                                                f"{tuple(t_pooled.shape)}: encode the target with the same text "
                                                "encoders as the source")
                ((m, q),) = interpolate([(c, pooled)], (t_tokens, t_pooled), alpha)
                out.append([m, {**extras, "pooled_output": q}])
        return (out,)


NODES = {
    "NimbleDiTSemanticEdit": (DiTSemanticEdit, "NimbleDiff DiT Semantic Edit (EIM)"),
    "NimblePromptTuningInversion": (PromptTuningInversion, "NimbleDiff Prompt Tuning Inversion"),
    "NimbleInterpolateConditioning": (InterpolateConditioning, "NimbleDiff PTI Interpolate Conditioning"),
}
