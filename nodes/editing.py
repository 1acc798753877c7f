"""Editing nodes: inversion (LATENT -> noise LATENT), an inpaint / DDS restoration SAMPLER for SamplerCustom, and
FilterPrompt image filters. The math is nimblediff.core.editing; these nodes only translate ComfyUI types."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.editing import FILTERS, Blur, Downsample, Mask, apply_filter, check_mask, invert, sample_dds, sample_inpaint
from ..core.editing.inpaint import box_mask
from ..core.sampling import k_diffusion_sampler
from ..errors import InvalidParameterError
from .sampling import param_from_model_sampling
from .widgets import NEGATIVE, box_inputs, cfg_input, fixed_point_input


def param_of(model_sampling):
    """Our parameterization of a ComfyUI model_sampling, refusing kinds the editing operators do not follow."""
    try:
        return param_from_model_sampling(model_sampling)
    except (AttributeError, TypeError):
        raise InvalidParameterError(
            f"editing operators need a VP (eps / v) or flow model; this MODEL's model_sampling is "
            f"{type(model_sampling).__name__} without a sigma table") from None


def _guided_param(model):
    # KSAMPLER hands the sampler KSamplerX0Inpaint(guider); the guider's inner_model is the BaseModel
    return param_of(model.inner_model.inner_model.model_sampling)


def _source_latent(model):
    """The latent_image KSAMPLER gave the sampler (already process_latent_in'd): what inversion / restoration
    reads, instead of the noised x it is handed."""
    latent = getattr(model, "latent_image", None)
    if latent is None:
        raise InvalidParameterError("this sampler needs the latent_image input of SamplerCustom (the image to "
                                    "invert or restore)")
    return latent


def _invert_sampler(fixed_point: int, keep: dict | None = None):
    """A KSAMPLER function that inverts model.latent_image along the given sigmas (ignores the noised x); the whole
    trajectory goes to keep["trajectory"] when a dict is given (a later pass regenerates along it)."""
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        fn = k_diffusion_sampler(invert, _guided_param, fixed_point=fixed_point)
        trajectory = fn(model, _source_latent(model).to(x), sigmas, extra_args=extra_args, callback=callback)
        if keep is not None:
            keep["trajectory"] = trajectory
        return trajectory[-1]
    return sample


class InvertLatent:
    """Noise LATENT that regenerates the input latent along the model's ODE (DDIM / rectified-flow inversion).
    Regenerate or edit with SamplerCustom: add_noise off, the same SIGMAS, an euler sampler, this latent."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("Inverts a latent along the model's ODE (DDIM / rectified-flow inversion, optional fixed-point "
                   "refinement) into the noise that regenerates it; edit by sampling that noise with a new prompt "
                   "(SamplerCustom, add_noise off, the same SIGMAS). That recipe is for UNet (eps / v) models: "
                   "SamplerCustom starts a flow model (SD3 / Flux) from (1 - sigma) x latent, zeros at sigma 1, so "
                   "for those edit with NimbleDiff DiT Semantic Edit or Prompt Tuning Inversion's edited output.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model that will regenerate or edit the image"}),
            "positive": ("CONDITIONING", {"tooltip": "what the image shows (the source prompt)"}),
            "negative": NEGATIVE,
            "latent": ("LATENT", {"tooltip": "the image latent to invert (VAE Encode)"}),
            "sigmas": ("SIGMAS", {"tooltip": "the schedule the edit will sample; inverted back to front. "
                                             "Shorten it (denoise < 1) for an img2img-strength edit"}),
            "cfg": cfg_input(1.0, "guidance during inversion; 1 (none) inverts most faithfully"),
            "fixed_point": fixed_point_input("extra model calls per step that make inversion the exact inverse of "
                                             "euler sampling (0 = plain DDIM inversion)"),
        }}

    def invert(self, model, positive, negative, latent, sigmas, cfg, fixed_point):
        import comfy.sample
        import comfy.samplers

        param_of(model.get_model_object("model_sampling"))          # refuse an unsupported model up front
        samples = latent["samples"]
        zeros = torch.zeros_like(samples)
        sampler = comfy.samplers.KSAMPLER(_invert_sampler(fixed_point))
        out = comfy.sample.sample_custom(model, zeros, cfg, sampler, sigmas, positive, negative, samples,
                                         noise_mask=None, callback=None, disable_pbar=True, seed=0)
        result = {k: v for k, v in latent.items() if k != "noise_mask"}
        result["samples"] = out
        return (result,)


def _latent_mask(mask, latent, box):
    """MASK (B, H, W) in pixels, area-resized to the latent (a pixel mask's size is the image's), or the box."""
    if mask is None:
        return box_mask(latent.shape[-2], latent.shape[-1], box)
    mask = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    (mh, mw), (lh, lw) = mask.shape[-2:], latent.shape[-2:]
    if mh * lw != mw * lh or mh < lh:
        raise InvalidParameterError(f"mask is {mw}x{mh} but the latent is {lw}x{lh}: give a mask of the image's "
                                    "size (the latent's size times the VAE factor)")
    return F.interpolate(mask, size=latent.shape[-2:], mode="area").to(latent)


def _restore_sampler(method, operator, cg_steps, factor, blur_sigma, eta, differential, mask, box):
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **_):
        known = _source_latent(model).to(x)
        if method == "blend" or operator == "mask":
            m = check_mask(_latent_mask(mask, known, box), known, "mask")
        if method == "blend":
            fn = k_diffusion_sampler(sample_inpaint, _guided_param, known=known, mask=m, differential=differential)
        else:
            op = {"mask": lambda: Mask(1 - m), "downsample": lambda: Downsample(factor),
                  "blur": lambda: Blur(blur_sigma)}[operator]()
            fn = k_diffusion_sampler(sample_dds, _guided_param, y=op.forward(known), operator=op,
                                     cg_steps=cg_steps, eta=eta)
        return fn(model, x, sigmas, extra_args=extra_args, callback=callback)
    return sample


class RestoreSampler:
    """SAMPLER for SamplerCustom that inpaints or restores its latent_image: blend (the known region re-noised at
    every step; exact outside the mask) or DDS (Tweedie x0, conjugate gradients on ||y - A x||^2, re-noise) with
    a mask, downsampling (super-resolution: latent of the upscaled image) or blur operator in latent space."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("SAMPLER that inpaints or restores its latent_image: blend (the known region re-noised at every "
                   "step) or DDS (data consistency by conjugate gradients) with a mask, downsampling or blur "
                   "operator.")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "method": (["dds", "blend"], {"default": "dds", "tooltip": (
                "dds: data-consistency steps (conjugate gradients) for any operator; blend: re-noise the known "
                "region at every step (inpainting)")}),
            "operator": (["mask", "downsample", "blur"], {"default": "mask", "tooltip": (
                "dds only: what degraded the latent. blend always inpaints with the mask")}),
            "cg_steps": ("INT", {"default": 5, "min": 0, "max": 50, "tooltip": "conjugate-gradient steps per "
                                                                               "sampling step (dds)"}),
            "factor": ("INT", {"default": 2, "min": 1, "max": 8, "tooltip": "downsampling factor in latent "
                                                                           "pixels (downsample)"}),
            "blur_sigma": ("FLOAT", {"default": 0.5, "min": 0.05, "max": 10.0, "step": 0.05,
                                     "tooltip": "Gaussian blur std in latent pixels (blur)"}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                              "tooltip": "fresh noise share at each re-noise (dds); 0 = deterministic"}),
            "differential": ("BOOLEAN", {"default": False, "tooltip": "blend: read the mask as per-pixel "
                                                                       "strength (differential diffusion)"}),
            **box_inputs((0.25, 0.25, 0.5, 0.5), (
                "without a MASK: the region to repaint, as fractions of the image",
                "without a MASK: the region's top edge, a fraction of the image",
                "without a MASK: the region's width, a fraction of the image",
                "without a MASK: the region's height, a fraction of the image")),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "1 = repaint, 0 = keep, at the image's size; overrides the box"}),
        }}

    def build(self, method, operator, cg_steps, factor, blur_sigma, eta, differential, box_x, box_y, box_width,
              box_height, mask=None):
        import comfy.samplers

        if method == "blend" and operator != "mask":
            raise InvalidParameterError(f"method 'blend' inpaints with a mask; operator {operator!r} needs "
                                        "method 'dds'")
        fn = _restore_sampler(method, operator, cg_steps, factor, blur_sigma, eta, differential, mask,
                              (box_x, box_y, box_width, box_height))
        return (comfy.samplers.KSAMPLER(fn),)


class FilterPrompt:
    """FilterPrompt image filter in front of image conditioning (img2img, ControlNet, IP-Adapter): low / high pass,
    edges, grey (colour stripped) or colour (structure stripped)."""

    CATEGORY = "NimbleDiff/editing"
    DESCRIPTION = ("FilterPrompt image filter in front of image conditioning (img2img, ControlNet, IP-Adapter): "
                   "low or high pass, edges, grey (colour removed) or colour (structure removed).")
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "the image to filter before it conditions the sampling"}),
            "filter": (list(FILTERS), {"default": "low_pass", "tooltip": (
                "low_pass: layout and colour; high_pass: texture and edges; edges: structure; grey: structure "
                "without colour; colour: palette without structure")}),
            "radius": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 64.0, "step": 0.5,
                                 "tooltip": "filter scale in pixels"}),
        }}

    def apply(self, image, filter, radius):
        rgb = image[..., :3].permute(0, 3, 1, 2)                      # (B, H, W, C) -> (B, 3, H, W)
        return (apply_filter(rgb, filter, radius).permute(0, 2, 3, 1).contiguous(),)


NODES = {
    "NimbleInvertLatent": (InvertLatent, "NimbleDiff Invert Latent"),
    "NimbleRestoreSampler": (RestoreSampler, "NimbleDiff Inpaint / Restore Sampler (DDS)"),
    "NimbleFilterPrompt": (FilterPrompt, "NimbleDiff FilterPrompt Image Filter"),
}
