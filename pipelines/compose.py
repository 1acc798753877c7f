"""Image composition (PrimeComposer) for Stable-Diffusion-family UNets, on FewStepPipeline's components.

`ComposePipeline` places an object (image + mask) into a region of a background image and generates only the
region: latent blend outside it, self-attention injection from the reference (collage) pass, and the object prompt's
tokens confined to the region. The math is `nimblediff.core.editing.composition`; this file turns images, prompts
and the UNet into its inputs, and `attention_patched` is the diffusers adapter of the core attention patch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..core.editing import truncate
from ..core.editing.attention_patch import AttentionCall, AttentionPatch
from ..core.editing.composition import CompositionPatch, place, sample_compose
from ..core.sampling import run
from ..errors import InvalidParameterError
from .editing import EditOutput, _Editing, _seed
from .fewstep import FewStepPipeline


class PatchedAttnProcessor:
    """A diffusers attention processor that computes attention with a core `AttentionPatch`: the module's own
    projections (to_q / to_k / to_v, to_out) around patch(q, k, v, call)."""

    def __init__(self, patch: AttentionPatch, layer: str, kind: str):
        self.patch, self.layer, self.kind = patch, layer, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise InvalidParameterError(f"attention layer {self.layer} uses an attention mask, spatial norm or q/k "
                                        "norm, which the composition patch does not support")
        residual, shape = hidden_states, hidden_states.shape
        if hidden_states.ndim == 4:                                           # (B, C, H, W) -> (B, HW, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = self.patch(q, k, v, AttentionCall(self.kind, self.layer, attn.heads)).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def attention_patched(unet, patch: AttentionPatch):
    """Swap the processors of the attention calls `patch` wants (attn1 = self, attn2 = cross) for the duration;
    the UNet's own processors come back afterwards, also on error."""
    saved = dict(unet.attn_processors)
    new, patched = {}, 0
    for name, proc in saved.items():
        layer = name.removesuffix(".processor")
        kind = {"attn1": "self", "attn2": "cross"}.get(layer.rsplit(".", 1)[-1])
        if kind is not None and patch.wants(kind):
            new[name], patched = PatchedAttnProcessor(patch, layer, kind), patched + 1
        else:
            new[name] = proc
    if not any(n.endswith((".attn1.processor", ".attn2.processor")) for n in saved):
        raise InvalidParameterError(f"{type(unet).__name__} has no UNet transformer attention (attn1 / attn2); "
                                    "composition supports Stable-Diffusion-type UNets")
    unet.set_attn_processor(new)
    try:
        yield patched
    finally:
        unet.set_attn_processor(saved)


class ComposePipeline(_Editing, FewStepPipeline):
    """Place an object into a background (PrimeComposer).

    >>> pipe = ComposePipeline.from_pretrained(folder)
    >>> out = pipe("a red circle on the left on a black background", image=background,
    ...            object_image=obj, object_mask=mask, object_prompt="a green star", box=(0.5, 0.25, 0.5, 0.5))
    """

    def _object_mask(self, mask, obj: torch.Tensor) -> torch.Tensor:
        """object_mask (PIL / numpy / tensor, 1 = object) at the object image's size, or a tensor at its latent
        size -> latent mask (area average: a latent cell is as much object as the share of its pixels)."""
        from diffusers.image_processor import VaeImageProcessor

        if not isinstance(mask, torch.Tensor):          # grey in [0, 1], not binarised
            mask = VaeImageProcessor(do_normalize=False, do_convert_grayscale=True).preprocess(mask)
        mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
        latent, image = tuple(obj.shape[-2:]), tuple(s * self.vae_scale_factor for s in obj.shape[-2:])
        if tuple(mask.shape[-2:]) == latent:
            return mask.to(obj.device)
        if tuple(mask.shape[-2:]) != image:
            raise InvalidParameterError(f"object_mask is {mask.shape[-1]}x{mask.shape[-2]} but the object image is "
                                        f"{image[1]}x{image[0]}; give a mask of the object image's size")
        return F.interpolate(mask.to(obj.device), size=latent, mode="area")

    def __call__(self, prompt=None, image=None, object_image=None, object_mask=None, *, object_prompt=None,
                 box=None, strength: float = 1.0, num_inference_steps: int = 20, guidance_scale: float = 1.0,
                 negative_prompt=None, injection: float = 1.0, injection_end: float = 0.5,
                 schedule: str = "trailing", generator=None, background_latents=None, object_latents=None,
                 output_type: str = "pil", return_dict: bool = True, **_unused):
        """prompt: the scene; image / background_latents: the background; object_image / object_latents and
        object_mask (1 = object, at the object image's size; None: the object is what the box holds in the object
        image); box (x, y, width, height) as fractions of the background, or None when the object image is already
        where it goes (background's size).
        object_prompt: its tokens are appended to the scene prompt's and allowed only inside the region.
        injection (0..1) and injection_end (fraction of steps): self-attention injection from the reference pass.
        strength < 1 starts from the collage re-noised part way (img2img), 1 from noise."""
        if prompt is None or (image is None and background_latents is None) \
                or (object_image is None and object_latents is None):
            raise InvalidParameterError("pass prompt=, image= (background) and object_image= (with object_mask= "
                                        "or a box)")
        param = self.editing_param()
        bg = self.encode_image(image) if background_latents is None else background_latents.float()
        obj = self.encode_image(object_image) if object_latents is None else object_latents.float()
        mask = None if object_mask is None else self._object_mask(object_mask, obj)
        collage, region = place(bg, obj, mask, box)

        cond, uncond = self._embeds(prompt, len(bg), guidance_scale, negative_prompt)
        tokens = None
        if object_prompt is not None:          # [scene tokens, object tokens]; the negative repeated to match
            extra, _ = self._embeds(object_prompt, len(bg), 1.0)
            tokens = (cond.shape[1], cond.shape[1] + extra.shape[1])
            cond = torch.cat([cond, extra], 1)
            uncond = None if uncond is None else torch.cat([uncond, uncond], 1)
        patch = CompositionPatch(region, tokens, injection)
        model = self.denoiser(param, cond, uncond, guidance_scale)
        sigmas = truncate(self._sigmas(param, num_inference_steps, schedule), strength)
        if len(sigmas) < 2:
            raise InvalidParameterError(f"strength={strength} with {num_inference_steps} steps runs no step")
        noise = torch.randn(bg.shape, generator=generator, dtype=bg.dtype).to(bg.device)
        x = param.noise_scaling(sigmas[0], noise, collage)
        bar = self.progress_bar(total=len(sigmas) - 1)

        def progress(info):                 # one tick per composite evaluation, not per reference pass
            if patch.mode != "record":
                bar.update()

        with torch.no_grad(), attention_patched(self.unet, patch), bar:
            out = run(sample_compose, model, x, sigmas, param=param, seed=_seed(generator), background=bg,
                      reference=collage, region=region, patch=patch, injection_end=injection_end,
                      callback=progress)
        images = self.decode(out, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EditOutput(images=images, source_latents=collage)


__all__ = ["ComposePipeline", "PatchedAttnProcessor", "attention_patched"]
