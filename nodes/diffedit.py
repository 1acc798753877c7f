"""DiffEdit node: invert a latent under its source prompt, find where the target prompt disagrees (or take a MASK),
regenerate only there. The math is nimblediff.core.editing.diffedit; this file runs it inside ComfyUI's sampling
(a sampler sees one conditioning and one guidance scale, so each pass is a sample_custom call of its own)."""

from __future__ import annotations

import torch

from ..core.editing import check_mask, draw_noises, edit_mask, mask_sigma, sample_masked_edit
from ..core.sampling import run
from ..errors import InvalidParameterError
from .editing import _guided_param, _invert_sampler, _latent_mask, _source_latent
from .widgets import NEGATIVE, cfg_input, seed_input


def _probe_pass(state, mask_strength, noises):
    """Sampler under the source prompt at the edit's guidance: its x0 at the mask's noised copies of the latent
    (the target pass compares them with its own; both guided alike, so the shared unconditional part cancels)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        param, x0 = _guided_param(model), _source_latent(model).to(x)
        sigma = mask_sigma(sigmas, mask_strength)
        state["sigma"] = sigma
        state["noises"] = draw_noises(x0, noises, torch.Generator().manual_seed(state["seed"]))
        state["source"] = [model(param.noise_scaling(sigma, n, x0), sigma * x0.new_ones([len(x0)]),
                                 **(extra_args or {})) for n in state["noises"]]
        return x0
    return sample


def _target_pass(state, mask, ratio, threshold, blur):
    """Sampler under the target prompt: the mask (given, or DiffEdit's from both prompts' x0), then the masked
    regeneration along the source's trajectory."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        extra_args = extra_args or {}
        param, trajectory = _guided_param(model), state["trajectory"]
        x0 = trajectory[0]
        if mask is None:
            recorded = iter(state["source"])               # replayed in the order edit_map asks for them
            m = edit_mask(lambda *_: next(recorded), lambda x_, s: model(x_, s, **extra_args), x0, state["sigma"],
                          param=param, noises=state["noises"], ratio=ratio, threshold=threshold, blur=blur)
        else:
            m = check_mask((_latent_mask(mask, x0, None) >= 0.5).to(x0.dtype), x0, "mask")
        state["mask"] = m
        return run(sample_masked_edit, model, trajectory[-1], sigmas, param=param, trajectory=trajectory, mask=m,
                   extra_args=extra_args, callback=callback)
    return sample


class DiffEdit:
    """LATENT edited from the source prompt towards the target only where they disagree (DiffEdit), or inside a
    MASK; elsewhere the latent is the input's, exactly. Also returns the mask used, at latent size."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("Mask-guided edit (DiffEdit): inverts the latent under the source prompt, finds the region where "
                   "the target prompt changes the model's prediction (or takes a MASK), and regenerates only that "
                   "region under the target along the same SIGMAS; the rest stays the input latent exactly. "
                   "For VP (UNet) and flow models.")
    RETURN_TYPES = ("LATENT", "MASK")
    RETURN_NAMES = ("latent", "mask")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model to edit with"}),
            "source": ("CONDITIONING", {"tooltip": "what the image shows (the source prompt)"}),
            "target": ("CONDITIONING", {"tooltip": "what it should show (the target prompt)"}),
            "negative": NEGATIVE,
            "latent": ("LATENT", {"tooltip": "the image latent to edit (VAE Encode)"}),
            "sigmas": ("SIGMAS", {"tooltip": "the edit's schedule; a shortened one (denoise < 1) edits less deeply"}),
            "cfg": cfg_input(5.0, "guidance while regenerating and while comparing the prompts (inversion runs at "
                                  "1)"),
            "mask_strength": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip": (
                "how far into the schedule the image is noised to compare the prompts (diffusers' "
                "mask_encode_strength); raise it for changes of shape or place")}),
            "mask_noises": ("INT", {"default": 10, "min": 1, "max": 64, "tooltip": "noise draws averaged"}),
            "mask_ratio": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.5, "tooltip": (
                "clip the difference map at this many times its mean before thresholding (diffusers' "
                "mask_thresholding_ratio); 0 = scale min-max instead")}),
            "mask_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.99, "step": 0.05,
                                         "tooltip": "edit where the scaled map exceeds this"}),
            "mask_blur": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 8.0, "step": 0.25,
                                    "tooltip": "smooth the map first (Gaussian std in latent cells)"}),
            "seed": seed_input("seed of the noise draws that compare the prompts"),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "1 = edit, 0 = keep, at the image's size; replaces the automatic mask"}),
        }}

    def edit(self, model, source, target, negative, latent, sigmas, cfg, mask_strength, mask_noises, mask_ratio,
             mask_threshold, mask_blur, seed, mask=None):
        import comfy.sample
        import comfy.samplers

        from .editing import param_of

        param_of(model.get_model_object("model_sampling"))          # refuse an unsupported model up front
        if len(sigmas) < 1:
            raise InvalidParameterError("sigmas is empty: give the edit's schedule (a scheduler node's SIGMAS)")
        samples = latent["samples"]
        zeros = torch.zeros_like(samples)
        state = {"seed": seed}
        passes = [(source, 1.0, _invert_sampler(0, keep=state))]
        if mask is None:
            passes.append((source, cfg, _probe_pass(state, mask_strength, mask_noises)))
        passes.append((target, cfg, _target_pass(state, mask, mask_ratio or None, mask_threshold, mask_blur)))
        for positive, scale, fn in passes:
            out = comfy.sample.sample_custom(model, zeros, scale, comfy.samplers.KSAMPLER(fn), sigmas, positive,
                                             negative, samples, noise_mask=None, callback=None, disable_pbar=True,
                                             seed=seed)
        result = {k: v for k, v in latent.items() if k != "noise_mask"}
        result["samples"] = out
        return result, state["mask"][:, 0].float().cpu()


NODES = {"NimbleDiffEdit": (DiffEdit, "NimbleDiff DiffEdit (mask-guided edit)")}
