"""Few-step text-to-image for Stable-Diffusion-family UNets (SD1.5 / SD2 and their fine-tunes).

The Flash Diffusion / LCM-LoRA recipe: an acceleration LoRA on the base model, a consistency sampler on a
trailing/LCM schedule, 2-8 steps, CFG off. The sampler is any `nimblediff.core.sampling` method driven by
`NimbleScheduler`; LoRAs in any layout `nimblediff.weights` reads are fused with `nimblediff.core.adapters`.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

from ..core.limits import check_latent_size, prompt_batch
from ..core.recipes import check_recipe_usage
from ..errors import InvalidParameterError
from ..tiny.vocab import CLOSED_VOCAB_SIZE, check_words
from .adapters import LoRAOpsMixin
from .caching import NimbleCacheMixin
from .loading import agree_dtypes, check_pipeline_folder
from .schedulers import NimbleScheduler


def _as_list(texts) -> list:
    return [] if texts is None else [texts] if isinstance(texts, str) else list(texts)


class FewStepPipeline(LoRAOpsMixin, NimbleCacheMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` components, NimbleDiff sampling, LoRA stacking.

    >>> pipe = FewStepPipeline.from_pretrained(folder)
    >>> pipe.load_acceleration_lora("flash-sd.safetensors", recipe="flash-sd15")
    >>> pipe.load_lora("style.safetensors", weight=0.7)
    >>> image = pipe("a red circle", num_inference_steps=4).images[0]
    """

    default_recipe = "flash-sd15"  # family None: any UNet recipe (SD1.5, SD2.x, TCD, LCM-LoRA) fits

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                 image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder, requires_safety_checker)
        self.recipe = None
        agree_dtypes(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' loader, with a NimbleDiff error for a local folder that is not a diffusers pipeline."""
        check_pipeline_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # --- scheduler ------------------------------------------------------------------------------------------------

    def _nimble_scheduler(self, sampler: str | None, schedule: str | None) -> NimbleScheduler:
        """The pipeline's scheduler if it is ours, else one built from its noise-schedule config (left untouched)."""
        current = self.scheduler
        if isinstance(current, NimbleScheduler) and sampler in (None, current.config.sampler) \
                and schedule in (None, current.config.schedule):
            return current
        config = dict(current.config)
        base = self.recipe
        config["sampler"] = sampler or (base.sampler if base else config.get("sampler", "lcm"))
        config["schedule"] = schedule or (base.schedule if base else config.get("schedule", "lcm"))
        return NimbleScheduler.from_config(config)

    # --- prompts --------------------------------------------------------------------------------------------------

    def _embed(self, prompts: list[str], clip_skip: int | None, device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        te = self.text_encoder
        if clip_skip is None:
            return te(ids)[0]
        hidden = te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        # transformers 5 flattened CLIPTextModel (no .text_model); diffusers' own clip_skip breaks on it (#14124)
        return getattr(te, "text_model", te).final_layer_norm(hidden)

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=False,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, lora_scale=None,
                      clip_skip=None):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(self.tokenizer) < CLOSED_VOCAB_SIZE:     # e.g. NimbleDiff-Tiny: name unknown words, never drop them
            check_words([p for p in list(prompts or []) + _as_list(negative_prompt) if isinstance(p, str)],
                        self.tokenizer.get_vocab())
        # diffusers' _execution_device walks every module's hooks (~2 ms on a small model): ask once per call
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt_embeds = self._embed(list(prompts), clip_skip, device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            n = len(prompt_embeds) // num_images_per_prompt
            negative = negative_prompt or ""
            negative = [negative] * n if isinstance(negative, str) else list(negative)
            negative_prompt_embeds = self._embed(negative, clip_skip, device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype).repeat_interleave(num_images_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, prompt=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float | None = None, negative_prompt=None,
                 num_images_per_prompt: int = 1, eta: float | None = None, generator=None, latents=None,
                 prompt_embeds=None, negative_prompt_embeds=None, output_type: str = "pil",
                 return_dict: bool = True, clip_skip: int | None = None, sampler: str | None = None,
                 schedule: str | None = None, callback_on_step_end=None, **_unused):
        recipe = self.recipe
        if num_inference_steps is not None and num_inference_steps < 1 and timesteps is None and sigmas is None:
            raise InvalidParameterError(f"num_inference_steps={num_inference_steps}; it must be >= 1 (or None for "
                                        "the recipe's default)")
        steps = num_inference_steps or (recipe.steps if recipe else 4)
        cfg = guidance_scale if guidance_scale is not None else (recipe.cfg if recipe else 1.0)
        if recipe is not None:
            for warning in check_recipe_usage(recipe, steps=steps, cfg=cfg):
                import warnings

                warnings.warn(warning, stacklevel=2)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # refuse an absurd size or batch here, before the text encoder or torch allocates anything
        check_latent_size(prompt_batch(prompt, num_images_per_prompt, prompt_embeds, type(self).__name__),
                          self.unet.config.in_channels, height, width, self.vae_scale_factor, type(self).__name__)
        device = self._execution_device
        use_cfg = cfg > 1.0

        if prompt_embeds is None and prompt is None:
            raise InvalidParameterError("pass prompt= or prompt_embeds=")
        cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, use_cfg, negative_prompt,
                                          prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip)
        context = torch.cat([uncond, cond]) if use_cfg else cond

        scheduler = self._nimble_scheduler(sampler, schedule)
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        elif sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        else:
            scheduler.set_timesteps(steps, device=device)
        latents = self.prepare_latents(len(cond), self.unet.config.in_channels, height, width, cond.dtype, device,
                                       generator, latents)
        step_kwargs = {"generator": generator} if eta is None else {"generator": generator, "eta": eta}
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            out = self.unet(model_in, t, encoder_hidden_states=context, return_dict=False)[0]
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + cfg * (out_cond - out_uncond)
            latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
