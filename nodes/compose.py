"""Composition node (PrimeComposer): an object LATENT + MASK placed into a box of a background LATENT, sampled with
the latent blend, self-attention injection and region-constrained cross-attention of
nimblediff.core.editing.composition. `patch_model` is the ComfyUI adapter of the core attention patch: attn1 / attn2
replace patches on a cloned ModelPatcher."""

from __future__ import annotations

import torch

from ..core.editing.attention_patch import AttentionCall, AttentionPatch
from ..core.editing.composition import CompositionPatch, place, sample_compose
from ..core.sampling import k_diffusion_sampler
from ..errors import InvalidParameterError
from .editing import _guided_param, _latent_mask, _source_latent, param_of
from .widgets import NEGATIVE, box_inputs, cfg_input, seed_input


def attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """ComfyUI's replace-patch keys (block name, number, index in its SpatialTransformer) of a UNetModel."""
    groups = [("input", getattr(diffusion_model, "input_blocks", None)),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", None))]
    if groups[0][1] is None or groups[2][1] is None:
        raise InvalidParameterError(f"composition patches UNet attention (SD1.5 / SD2 / SDXL); this MODEL's "
                                    f"diffusion model is {type(diffusion_model).__name__}, which has none")
    keys = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for module in (block or []):
                keys += [(name, number, i) for i in range(len(getattr(module, "transformer_blocks", [])))]
    if not keys:
        raise InvalidParameterError(f"{type(diffusion_model).__name__} has no transformer blocks to patch")
    return keys


def patch_model(model, patch: AttentionPatch):
    """A clone of the ModelPatcher whose attention calls of the kinds `patch` wants run through it."""
    model = model.clone()
    for key in attention_blocks(model.get_model_object("diffusion_model")):
        for kind, setter in (("self", model.set_model_attn1_replace), ("cross", model.set_model_attn2_replace)):
            if patch.wants(kind):
                def replace(q, k, v, extra_options, kind=kind, key=key):
                    tag = tuple(extra_options.get("cond_or_uncond") or ())
                    return patch(q, k, v, AttentionCall(kind, key, extra_options["n_heads"], tag)).to(q.dtype)
                setter(replace, *key)
    return model


def _concat_tokens(positive, object_positive):
    """ConditioningConcat: the object prompt's tokens after each scene entry's -> (conditioning, (start, end))."""
    extra = object_positive[0][0]
    lengths = {c[0].shape[1] for c in positive}
    if len(lengths) != 1:
        raise InvalidParameterError(f"positive has entries of {sorted(lengths)} tokens; give one scene prompt")
    start = lengths.pop()
    out = [[torch.cat([c[0], extra.to(c[0]).expand(len(c[0]), -1, -1)], 1), dict(c[1])] for c in positive]
    return out, (start, start + extra.shape[1])


def _compose_sampler(background, region, patch, injection_end):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        reference = _source_latent(model).to(x)                   # the collage, already process_latent_in'd
        evals = [0]

        def composite_only(info):                                 # progress per composite pass, not per model call
            if patch.mode != "record" and callback is not None:
                callback({**info, "i": evals[0]})
                evals[0] += 1

        fn = k_diffusion_sampler(sample_compose, _guided_param, background=background.to(x),
                                 reference=reference, region=region.to(x), patch=patch, injection_end=injection_end)
        return fn(model, x, sigmas, extra_args=extra_args, callback=composite_only)
    return sample


class Compose:
    """PrimeComposer composition: generate only the object's region of a background; outside it the result is the
    background exactly."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("Places an object (latent + mask) into a box of a background and generates only that region "
                   "(PrimeComposer): the background is kept exactly outside it, the object's self-attention is "
                   "injected from a reference pass, and the object prompt acts only inside the box.")
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("composite", "collage")
    FUNCTION = "compose"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an SD1.5 / SD2 / SDXL-type UNet model"}),
            "positive": ("CONDITIONING", {"tooltip": "the scene prompt"}),
            "negative": NEGATIVE,
            "object_positive": ("CONDITIONING", {"tooltip": (
                "the object's prompt: appended to the scene prompt's tokens and allowed only inside the box")}),
            "background": ("LATENT", {"tooltip": "the background image latent (VAE Encode)"}),
            "object": ("LATENT", {"tooltip": "the object image latent (VAE Encode)"}),
            "sigmas": ("SIGMAS", {"tooltip": "the schedule; a shortened one (denoise < 1) starts from the collage "
                                             "part way, as img2img"}),
            "noise_seed": seed_input("seed of the starting noise and of the background's re-noising"),
            "cfg": cfg_input(5.0, "classifier-free guidance scale"),
            "injection": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                "weight of the self-attention injected from the reference (collage) pass inside the box; 0 = off "
                "(then one model call per step)")}),
            "injection_end": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "inject during this fraction of the steps (the first ones)"}),
            **box_inputs((0.5, 0.25, 0.5, 0.5), (
                "the box's left edge, a fraction of the width", "the box's top edge, a fraction of the height",
                "the box's width as a fraction; width or height 0 keeps the object where it is (then the object "
                "must be the background's size)", "the box's height, a fraction")),
        }, "optional": {
            "object_mask": ("MASK", {"tooltip": "1 on the object's pixels, at the object image's size; without it "
                                                "the object is what the box holds in the object image"}),
        }}

    def compose(self, model, positive, negative, object_positive, background, object, sigmas, noise_seed, cfg,
                injection, injection_end, box_x, box_y, box_width, box_height, object_mask=None):
        import comfy.sample
        import comfy.samplers
        import comfy.utils

        param_of(model.get_model_object("model_sampling"))          # refuse an unsupported model up front
        bg, obj = background["samples"], object["samples"]
        box = None if box_width <= 0 or box_height <= 0 else (box_x, box_y, box_width, box_height)
        mask = None if object_mask is None else _latent_mask(object_mask, obj, None)
        collage, region = place(bg.float(), obj.float(), mask, box)
        cond, tokens = _concat_tokens(positive, object_positive)
        patch = CompositionPatch(region, tokens, injection)
        patched = patch_model(model, patch)
        known = patched.model.process_latent_in(bg.float())
        sampler = comfy.samplers.KSAMPLER(_compose_sampler(known, region, patch, injection_end))
        noise = comfy.sample.prepare_noise(collage, noise_seed)
        bar = comfy.utils.ProgressBar(len(sigmas) - 1)     # its callback also checks for an interrupt
        out = comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, cond, negative, collage,
                                         noise_mask=None, callback=lambda i, *_: bar.update_absolute(i + 1),
                                         disable_pbar=True, seed=noise_seed)
        keep = {k: v for k, v in background.items() if k not in ("samples", "noise_mask")}
        return ({**keep, "samples": out.to(bg.dtype)}, {**keep, "samples": collage.to(bg.dtype)})


NODES = {"NimbleCompose": (Compose, "NimbleDiff Compose (PrimeComposer)")}
