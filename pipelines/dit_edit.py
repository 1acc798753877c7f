"""DiT editing on a StableDiffusion3Pipeline: invert an image under its source prompt along the flow ODE, then
either move the joint text embedding along (target - source) by a strength (EIM, the default) or tune the source
embedding so that guided sampling retraces the inversion and interpolate it with the target's (Prompt Tuning
Inversion, method="pti": the same API as EditPipeline's for UNets), regenerate, decode. method="diffedit"
regenerates only where the two prompts' predictions disagree (or inside a mask_image), as EditPipeline's does.

    >>> pipe = DiTEditPipeline.from_pretrained(folder)       # an SD3 folder; without T5 as NimbleDiff-Tiny-DiT
    >>> out = pipe(image, prompt="a blue circle", source_prompt="a red circle", strength=1.5)
    >>> out = pipe(image, prompt="a blue circle", source_prompt="a red circle", hsds_steps=10)   # HSDS direction
    >>> out = pipe(image, prompt="a blue circle", source_prompt="a red circle", method="pti", alpha=0.6,
    ...            guidance_scale=3.0)
    >>> out = pipe(image, prompt="a blue circle", source_prompt="a red circle", method="diffedit", mask_strength=0.8)

The math is `nimblediff.core.editing.eim`, `.pti` and `.diffedit`; this file turns images, prompts and the
transformer into their inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core import schedules
from ..core.editing.diffedit import draw_noises, edit_mask, mask_sigma, sample_masked_edit
from ..core.editing.eim import check_joint_model, direction, edit, manipulate
from ..core.editing.hsds import DEFAULT_LEVELS, check_options, refine_direction
from ..core.editing.inversion import invert, latent_psnr, truncate
from ..core.editing.pti import interpolate, run_per_step, tune_prompt
from ..core.parameterization import Flow
from ..core.sampling import run
from ..errors import InvalidParameterError
from .dit import FewStepSD3Pipeline
from .editing import EditOutput, InversionOutput, edit_region

_ARCHITECTURES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def architecture_of(denoiser) -> str:
    """'sd3' / 'flux' for an MM-DiT transformer, else the class name (a UNet: 'UNet2DConditionModel')."""
    name = type(denoiser).__name__
    return _ARCHITECTURES.get(name, name)


class DiTEditPipeline(FewStepSD3Pipeline):
    """EIM editing (encode, identify, manipulate), Prompt Tuning Inversion (method="pti") and DiffEdit
    (method="diffedit") for SD3-type MM-DiTs;
    `invert()` gives the joint embedding's noise half and the trajectory, calling the pipeline edits. The stock
    text-to-image call stays as `generate`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        index = Path(str(pretrained_model_name_or_path)) / "model_index.json"
        if index.is_file():
            config = json.loads(index.read_text())
            if "unet" in config:                          # EIM on a UNet: refuse before diffusers tries to build it
                check_joint_model(f"UNet ({config.get('_class_name')}, {index.parent})")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """Text to image: FewStepSD3Pipeline's call."""
        return super().__call__(*args, **kwargs)

    # --- translation ------------------------------------------------------------------------------------------

    def editing_param(self) -> Flow:
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            raise InvalidParameterError("the scheduler uses dynamic (resolution-dependent) shifting; EIM needs a "
                                        "fixed shift (SD3's FlowMatchEulerDiscreteScheduler config)")
        return Flow(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0))

    def denoiser(self, param, uncond=None, guidance_scale: float = 1.0):
        """model(x, sigma, c) -> x0 with c = (prompt_embeds (B, L, D), pooled (B, P)); classifier-free guided with
        uncond (same structure) when guidance_scale > 1."""
        check_joint_model(architecture_of(self.transformer))
        transformer = self.transformer

        def model(x, sigma, c, **_):
            s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
            t = param.sigma_to_t(s).to(x.device).expand(len(x))
            x_in = x.to(transformer.dtype)
            embeds, pooled = c
            if guidance_scale > 1.0:
                out_u, out_c = transformer(
                    hidden_states=torch.cat([x_in, x_in]), timestep=torch.cat([t, t]),
                    encoder_hidden_states=torch.cat([uncond[0], embeds]),
                    pooled_projections=torch.cat([uncond[1], pooled]), return_dict=False)[0].chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = transformer(hidden_states=x_in, timestep=t, encoder_hidden_states=embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
            return param.denoised(x, s, out.to(x.dtype))

        return model

    def embeds(self, prompt, n: int, negative_prompt=None, guidance_scale: float = 1.0,
               max_sequence_length: int = 256):
        """((prompt_embeds, pooled), (negative_embeds, negative_pooled) or None), expanded to n images."""
        with torch.no_grad():
            pe, npe, pooled, npooled = self.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=self._execution_device,
                do_classifier_free_guidance=guidance_scale > 1.0, negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length)
        if len(pe) == 1 and n > 1:
            pe, pooled = pe.expand(n, -1, -1), pooled.expand(n, -1)
            npe = None if npe is None else npe.expand(n, -1, -1)
            npooled = None if npooled is None else npooled.expand(n, -1)
        cond = (pe.float(), pooled.float())
        return cond, (None if npe is None else (npe.float(), npooled.float()))

    def check_image_size(self, height: int, width: int) -> None:
        patch = self.transformer.config.patch_size
        step = self.vae_scale_factor * patch
        limit = self.transformer.config.pos_embed_max_size * step
        if height > limit or width > limit:
            raise InvalidParameterError(f"image is {width}x{height} but this transformer supports up to "
                                        f"{limit}x{limit} (pos_embed_max_size); resize the image")
        if height % step or width % step:
            raise InvalidParameterError(f"image is {width}x{height}; both sides must be multiples of {step} (VAE "
                                        f"factor {self.vae_scale_factor} x patch {patch})")

    def encode_image(self, image) -> torch.Tensor:
        """Image (PIL / numpy / tensor in [0, 1]) -> SD3-scaled latents (the distribution's mode: deterministic)."""
        pixels = self.image_processor.preprocess(image)
        self.check_image_size(*pixels.shape[-2:])
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self._execution_device, self.vae.dtype)).latent_dist.mode()
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents.float() - shift) * self.vae.config.scaling_factor

    def decode(self, latents, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        shift = self.vae.config.get("shift_factor") or 0.0
        with torch.no_grad():
            images = self.vae.decode((latents / self.vae.config.scaling_factor + shift).to(self.vae.dtype),
                                     return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    def _sigmas(self, param, steps, depth: float):
        if not isinstance(steps, int) or steps < 1:
            raise InvalidParameterError(f"num_inference_steps={steps!r}: need an integer >= 1")
        return truncate(schedules.make_sigmas("trailing", steps, param).tolist(), depth)

    # --- the operator -----------------------------------------------------------------------------------------

    def invert(self, image=None, prompt="", *, latents=None, num_inference_steps: int = 28, depth: float = 1.0,
               fixed_point: int = 0, max_sequence_length: int = 256, report_psnr: bool = False) -> InversionOutput:
        """Encode: the image (or its `latents`) inverted under `prompt` along the flow ODE (CFG 1), up to `depth`
        of the schedule (1 = pure noise)."""
        param = self.editing_param()
        x0 = self.encode_image(image) if latents is None else latents.float()
        cond, _ = self.embeds(prompt, len(x0), max_sequence_length=max_sequence_length)
        model = self.denoiser(param)
        sigmas = self._sigmas(param, num_inference_steps, depth)
        with torch.no_grad():
            trajectory = run(invert, lambda x, s, **_: model(x, s, cond), x0, sigmas, param=param,
                             fixed_point=fixed_point)
            psnr = None
            if report_psnr:
                out = run_per_step(model, trajectory[-1], sigmas, [cond] * (len(sigmas) - 1), param=param)
                psnr = latent_psnr(out, x0)
        return InversionOutput(latents=trajectory[-1], trajectory=trajectory, sigmas=sigmas,
                               reconstruction_psnr=psnr)

    def edit_mask(self, image=None, prompt=None, source_prompt="", *, latents=None, strength: float = 1.0,
                  num_inference_steps: int = 28, guidance_scale: float = 1.0, negative_prompt=None,
                  mask_strength: float = 0.5, mask_noises: int = 10, mask_ratio: float = 3.0,
                  mask_threshold: float = 0.5, mask_blur: float = 0.0, max_sequence_length: int = 256,
                  generator=None) -> torch.Tensor:
        """DiffEdit's mask of what changes from `source_prompt` to `prompt` (moved by `strength` along EIM's
        direction: 1 = the target prompt): (B, 1, h, w) at latent size, 1 = edit. The mask_* options are
        EditPipeline.edit_mask's."""
        if prompt is None:
            raise InvalidParameterError("pass prompt= (the target description)")
        x0 = self.encode_image(image) if latents is None else latents.float()
        embeds = self._edit_embeds(prompt, source_prompt, len(x0), negative_prompt, guidance_scale, strength,
                                   max_sequence_length)
        return self._auto_mask(x0, embeds, num_inference_steps, guidance_scale, mask_strength=mask_strength,
                               mask_noises=mask_noises, mask_ratio=mask_ratio, mask_threshold=mask_threshold,
                               mask_blur=mask_blur, generator=generator)

    def _auto_mask(self, x0, embeds, steps, guidance_scale, *, mask_strength, mask_noises, mask_ratio,
                   mask_threshold, mask_blur, generator):
        param = self.editing_param()
        sigma = mask_sigma(self._sigmas(param, steps, 1.0), mask_strength)
        noises = draw_noises(x0, mask_noises, generator)
        source, target, uncond = embeds
        model = self.denoiser(param, uncond, guidance_scale)
        with torch.no_grad():
            return edit_mask(lambda x, s: model(x, s, source), lambda x, s: model(x, s, target), x0, sigma,
                             param=param, noises=noises, ratio=mask_ratio, threshold=mask_threshold, blur=mask_blur)

    def _edit_embeds(self, prompt, source_prompt, n, negative_prompt, guidance_scale, strength, max_sequence_length):
        """(source, source + strength * (target - source), unconditional) joint embeddings for n images."""
        source, uncond = self.embeds(source_prompt, n, negative_prompt, guidance_scale, max_sequence_length)
        target, _ = self.embeds(prompt, n, max_sequence_length=max_sequence_length)
        return source, manipulate(source, direction(source, target), strength), uncond

    def __call__(self, image=None, prompt=None, source_prompt="", *, strength: float = 1.0, latents=None,
                 num_inference_steps: int = 28, guidance_scale: float = 1.0, negative_prompt=None,
                 depth: float = 1.0, window: float = 1.0, fixed_point: int = 0, max_sequence_length: int = 256,
                 output_type: str = "pil", return_dict: bool = True, hsds_steps: int = 0, hsds_lr: float = 0.05,
                 hsds_curvature: float = 1.0, hsds_levels=DEFAULT_LEVELS, generator=None, method: str = "eim",
                 alpha: float = 0.8, pti_iters: int = 10, pti_lr: float = 1e-2, mask_image=None,
                 mask_strength: float = 0.5, mask_noises: int = 10, mask_ratio: float = 3.0,
                 mask_threshold: float = 0.5, mask_blur: float = 0.0, **_unused):
        """Edit `image` (described by `source_prompt`) towards `prompt`.

        method "eim" (default): along the direction source -> `prompt` by `strength`.

        strength 0 regenerates the inversion under the source prompt (the reconstruction); 1 is the target prompt;
        larger values move further along the direction. depth: share of the schedule inverted (1 = to pure
        noise); window: share of the regeneration steps (from the noisy end) that see the edited embedding;
        guidance_scale applies while regenerating (inversion runs unguided).
        hsds_steps > 0 refines the direction with Hessian Score Distillation Sampling first (core/editing/hsds.py:
        Adam steps at learning rate hsds_lr on the source latent noised at hsds_levels, Hessian-term weight
        hsds_curvature, noise from `generator`); 0 keeps the plain prompt difference.

        method "pti" (Prompt Tuning Inversion, as EditPipeline's): after the same unguided inversion, tune one
        embedding per step, both streams (token states and pooled vector) together, with `pti_iters` Adam steps at
        `pti_lr` so that sampling at `guidance_scale` retraces the inversion, then regenerate with
        alpha * tuned + (1 - alpha) * target (alpha 1 = reconstruction, 0 = the target prompt). strength,
        window and hsds_* are EIM's and not used; pti_iters 0 is the plain inversion + regeneration path.

        method "diffedit" (as EditPipeline's): after the same unguided inversion, regenerate at `guidance_scale`
        under source + strength * (target - source) only inside a mask (`mask_image`, white = edit, or else
        DiffEdit's automatic mask, see `edit_mask`); outside it the latent is the source's, exactly. window and
        hsds_* are EIM's and not used.
        """
        if method not in ("eim", "pti", "diffedit"):
            raise InvalidParameterError(f"method={method!r}; valid: 'eim' (semantic edit by strength; strength 1 "
                                        "= inversion + prompt swap), 'pti' (Prompt Tuning Inversion, alpha), "
                                        "'diffedit' (the edit inside a mask)")
        if prompt is None:
            raise InvalidParameterError("pass prompt= (the target description; the direction is prompt minus "
                                        "source_prompt)")
        if method == "pti":
            return self._pti(image, prompt, source_prompt, latents=latents, steps=num_inference_steps,
                             guidance_scale=guidance_scale, negative_prompt=negative_prompt, depth=depth,
                             fixed_point=fixed_point, max_sequence_length=max_sequence_length, alpha=alpha,
                             iters=pti_iters, lr=pti_lr, hsds_steps=hsds_steps, output_type=output_type,
                             return_dict=return_dict)
        if method == "diffedit":
            if hsds_steps:
                raise InvalidParameterError(f"hsds_steps={hsds_steps}: HSDS refines EIM's direction; method "
                                            "'diffedit' uses the plain one (use method='eim' or hsds_steps=0)")
            mask_options = dict(mask_strength=mask_strength, mask_noises=mask_noises, mask_ratio=mask_ratio,
                                mask_threshold=mask_threshold, mask_blur=mask_blur, generator=generator)
            return self._diffedit(image, prompt, source_prompt, latents=latents, steps=num_inference_steps,
                                  strength=strength, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                  depth=depth, fixed_point=fixed_point, max_sequence_length=max_sequence_length,
                                  mask_image=mask_image, mask_options=mask_options, output_type=output_type,
                                  return_dict=return_dict)
        check_options(hsds_steps, hsds_lr, hsds_curvature, hsds_levels)
        param = self.editing_param()
        x0 = self.encode_image(image) if latents is None else latents.float()
        n = len(x0)
        source, uncond = self.embeds(source_prompt, n, negative_prompt, guidance_scale, max_sequence_length)
        target, _ = self.embeds(prompt, n, max_sequence_length=max_sequence_length)
        sigmas = self._sigmas(param, num_inference_steps, depth)
        steps = len(sigmas) - 1
        bar = self.progress_bar(total=hsds_steps + steps * (fixed_point + 2))   # HSDS, inversion, regeneration
        delta = direction(source, target)
        if hsds_steps > 0:          # unguided: CFG scales HSDS's objective by cfg^2 and leaves its optimum
            delta = refine_direction(self.denoiser(param), x0, source, delta, hsds_levels, param=param,
                                     steps=hsds_steps, lr=hsds_lr, curvature=hsds_curvature,
                                     generator=generator[0] if isinstance(generator, list) else generator,
                                     callback=lambda info: bar.update())
        out, _ = edit(self.denoiser(param, uncond, guidance_scale), x0, sigmas, source, target, strength,
                      param=param, fixed_point=fixed_point, window=window, invert_model=self.denoiser(param),
                      delta=delta, callback=lambda info: bar.update())
        bar.close()
        return self._finish(out, x0, output_type, return_dict)

    def _pti(self, image, prompt, source_prompt, *, latents, steps, guidance_scale, negative_prompt, depth,
             fixed_point, max_sequence_length, alpha, iters, lr, hsds_steps, output_type, return_dict):
        """Prompt Tuning Inversion (core/editing/pti.py) on the joint embedding (prompt_embeds, pooled)."""
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
            raise InvalidParameterError(f"pti_iters={iters!r}: need an integer >= 0 (Adam steps per sampling step; "
                                        "0 = plain inversion + regeneration)")
        if not lr > 0:
            raise InvalidParameterError(f"pti_lr={lr!r}: need a learning rate > 0")
        if not 0.0 <= alpha <= 1.0:
            raise InvalidParameterError(f"alpha={alpha!r}: need 0 <= alpha <= 1 (1 = reconstruction, 0 = target "
                                        "prompt)")
        if hsds_steps:
            raise InvalidParameterError(f"hsds_steps={hsds_steps}: HSDS refines EIM's direction; method 'pti' has "
                                        "none (use method='eim' or hsds_steps=0)")
        param = self.editing_param()
        # 1. invert under the source prompt along the flow ODE, unguided (DiTEditPipeline.invert)
        inv = self.invert(image, source_prompt, latents=latents, num_inference_steps=steps, depth=depth,
                          fixed_point=fixed_point, max_sequence_length=max_sequence_length)
        x0, sigmas = inv.trajectory[0], inv.sigmas
        source, uncond = self.embeds(source_prompt, len(x0), negative_prompt, guidance_scale, max_sequence_length)
        target, _ = self.embeds(prompt, len(x0), max_sequence_length=max_sequence_length)
        guided = self.denoiser(param, uncond, guidance_scale)
        n = len(sigmas) - 1
        bar = self.progress_bar(total=2 * n)                              # tuning, regeneration
        # 2. tune both streams per step against guided sampling, 3. regenerate with the interpolation
        tuned = tune_prompt(guided, inv.trajectory, sigmas, source, iters=iters, lr=lr,
                            callback=lambda info: bar.update())
        out = run_per_step(guided, inv.latents, sigmas, interpolate(tuned, target, alpha), param=param)
        bar.update(n)
        bar.close()
        return self._finish(out, x0, output_type, return_dict)

    def _diffedit(self, image, prompt, source_prompt, *, latents, steps, strength, guidance_scale, negative_prompt,
                  depth, fixed_point, max_sequence_length, mask_image, mask_options, output_type, return_dict):
        """DiffEdit (core/editing/diffedit.py): the unguided inversion's trajectory, then the guided regeneration
        under the moved embedding inside the mask, the rest kept on the trajectory."""
        param = self.editing_param()
        inv = self.invert(image, source_prompt, latents=latents, num_inference_steps=steps, depth=depth,
                          fixed_point=fixed_point, max_sequence_length=max_sequence_length)
        x0, sigmas = inv.trajectory[0], inv.sigmas
        embeds = self._edit_embeds(prompt, source_prompt, len(x0), negative_prompt, guidance_scale, strength,
                                   max_sequence_length)
        if mask_image is not None:
            mask = edit_region(mask_image, x0, self.vae_scale_factor)
        else:
            mask = self._auto_mask(x0, embeds, steps, guidance_scale, **mask_options)
        _, target, uncond = embeds
        guided = self.denoiser(param, uncond, guidance_scale)
        with torch.no_grad():
            out = run(sample_masked_edit, lambda x, s, **_: guided(x, s, target), inv.latents, sigmas, param=param,
                      trajectory=inv.trajectory, mask=mask)
        return self._finish(out, x0, output_type, return_dict, mask)

    def _finish(self, latents, x0, output_type, return_dict, mask=None):
        """Decode the edited latents, release offloaded models, and return as diffusers pipelines do."""
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EditOutput(images=images, source_latents=x0, mask=mask)


__all__ = ["DiTEditPipeline", "architecture_of"]
