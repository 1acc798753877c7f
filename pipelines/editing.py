"""Editing and restoration pipelines for Stable-Diffusion-family UNets, on FewStepPipeline's components.

- `EditPipeline`: DDIM inversion (optionally fixed-point exact) of an image under its source prompt, then
  regeneration under a target prompt (prompt swap), with Prompt Tuning Inversion embeddings (PTI, alpha), or of
  only the region where the two prompts disagree (DiffEdit: automatic mask, the rest kept on the inversion path).
- `RestorePipeline`: inpainting (per-step blend, soft or differential masks) and linear restoration with the
  Decomposed Diffusion Sampler (mask, super-resolution, deblur) in latent space.

All math is in `nimblediff.core.editing`; this file turns images, prompts and the UNet into its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from ..core import schedules
from ..core.editing import (Blur, Downsample, Mask, check_mask, draw_noises, edit_mask, interpolate, invert,
                            latent_psnr, mask_sigma, run_per_step, sample_dds, sample_inpaint, sample_masked_edit,
                            truncate, tune_prompt)
from ..core.limits import check_latent_size, image_size
from ..core.parameterization import VP, Flow, sd_alphas_cumprod
from ..core.sampling import run
from ..core.sampling.ode import sample_euler
from ..errors import InvalidParameterError
from .fewstep import FewStepPipeline

MAX_SCALE = 2    # images up to this many times the model's native side (the UNet was trained at native size)


@dataclass
class InversionOutput(BaseOutput):
    latents: torch.Tensor          # the noise the image inverts to, (B, C, h, w) in k-space at sigmas[0]
    trajectory: list               # k-space latents from the clean image (sigma 0) up to the noise
    sigmas: list                   # the sampling schedule that regenerates the image from `latents`
    reconstruction_psnr: float | None = None    # latent PSNR (dB) of Euler regeneration, when asked for


@dataclass
class EditOutput(BaseOutput):
    images: object
    source_latents: torch.Tensor
    reconstruction_psnr: float | None = None
    mask: torch.Tensor | None = None     # method "diffedit": the latent-size mask edited (1) and kept (0)


def latent_mask(mask_image, height: int, width: int, latents: torch.Tensor) -> torch.Tensor:
    """A mask image (PIL, numpy or tensor; white = 1) of the image's size, area-averaged to the latent grid."""
    from diffusers.image_processor import VaeImageProcessor

    if isinstance(mask_image, torch.Tensor):
        mask = mask_image.float()
    else:       # grey, in [0, 1], not binarised: soft and differential masks keep their values
        mask = VaeImageProcessor(do_normalize=False, do_convert_grayscale=True).preprocess(mask_image)
    mask = mask if mask.ndim == 4 else mask.reshape(1, 1, *mask.shape[-2:])
    if tuple(mask.shape[-2:]) != (height, width):
        raise InvalidParameterError(f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                                    f"{width}x{height}; give a mask of the image's size")
    # area average: a latent cell is as "to generate" as the share of its pixels the mask covers
    return F.interpolate(mask.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")


def edit_region(mask_image, x0: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """DiffEdit's region from a user's mask image: at latent size, binarised at 0.5, neither empty nor full."""
    height, width = x0.shape[-2] * vae_scale_factor, x0.shape[-1] * vae_scale_factor
    mask = latent_mask(mask_image, height, width, x0)
    return check_mask((mask >= 0.5).to(x0.dtype), x0, "mask_image")


class _Editing:
    """Shared by the two pipelines: the k-space denoiser around the UNet, image encoding and size checks."""

    def editing_param(self):
        """The core parameterization of this pipeline's noise schedule (LCM boundary when a Flash/LCM recipe is
        loaded: the distilled model's output includes it)."""
        cfg = self.scheduler.config
        if cfg.get("model_type", "vp") == "flow" or "shift" in cfg and "beta_start" not in cfg:
            return Flow(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0))
        acp = sd_alphas_cumprod(cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 0.00085),
                                cfg.get("beta_end", 0.012), cfg.get("beta_schedule", "scaled_linear"))
        boundary = 10.0 if self.recipe is not None and self.recipe.sampler == "lcm" else None
        return VP(acp, cfg.get("prediction_type", "epsilon"), consistency_timestep_scaling=boundary)

    def denoiser(self, param, cond, uncond=None, guidance_scale: float = 1.0):
        """model(x, sigma, c=None) -> x0 in k-space, classifier-free guided when guidance_scale > 1; `c` replaces
        the conditional embedding (PTI) and may require grad."""
        unet = self.unet

        def model(x, sigma, c=None, **_):
            s = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
            c = cond if c is None else c
            t = param.sigma_to_t(s).to(x.device, torch.float32)
            x_in = (x * param.c_in(s)).to(unet.dtype)
            if guidance_scale > 1.0:
                out_u, out_c = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([uncond, c]),
                                    return_dict=False)[0].chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = unet(x_in, t, encoder_hidden_states=c, return_dict=False)[0]
            return param.denoised(x, s, out.to(x.dtype))

        return model

    def check_image_size(self, height: int, width: int):
        native = self.unet.config.sample_size * self.vae_scale_factor
        step = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height > MAX_SCALE * native or width > MAX_SCALE * native:
            raise InvalidParameterError(
                f"image is {width}x{height} but this model supports up to {MAX_SCALE * native}x{MAX_SCALE * native} "
                f"(native {native}x{native}); resize the image")
        if height % step or width % step:
            raise InvalidParameterError(f"image is {width}x{height}; both sides must be multiples of {step} for this "
                                        "UNet and VAE")

    def encode_image(self, image, height=None, width=None) -> torch.Tensor:
        """An image (PIL, numpy or tensor in the diffusers image-processor conventions) -> scaled VAE latents
        (the distribution's mode: deterministic, so inversion of the same image is repeatable)."""
        size = image_size(image)
        if size is not None:      # absurd sizes are refused from the image's header, before its pixels are converted
            check_latent_size(size[0], self.vae.config.latent_channels, height or size[1], width or size[2],
                              self.vae_scale_factor, f"{type(self).__name__} image")
        pixels = self.image_processor.preprocess(image, height=height, width=width)
        self.check_image_size(*pixels.shape[-2:])
        pixels = pixels.to(self._execution_device, self.vae.dtype)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mode()
        return latents.float() * self.vae.config.scaling_factor

    def decode(self, latents, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        with torch.no_grad():
            images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype),
                                     return_dict=False)[0]
        return self.image_processor.postprocess(images, output_type=output_type)

    def _embeds(self, prompt, n: int, guidance_scale: float, negative_prompt=None):
        with torch.no_grad():
            cond, uncond = self.encode_prompt(prompt, self._execution_device, 1, guidance_scale > 1.0,
                                              negative_prompt)
        if len(cond) == 1 and n > 1:
            cond = cond.expand(n, -1, -1)
            uncond = None if uncond is None else uncond.expand(n, -1, -1)
        return cond, uncond

    def _progress(self, steps: int, per_step: int = 1):
        bar = self.progress_bar(total=steps * per_step)

        def callback(info):
            bar.update()
            if info["i"] + 1 >= steps * per_step:
                bar.close()

        return callback

    def _sigmas(self, param, steps: int, schedule: str):
        if not isinstance(steps, int) or steps < 1:
            raise InvalidParameterError(f"num_inference_steps={steps!r}: need an integer >= 1")
        return schedules.make_sigmas(schedule, steps, param).tolist()


class EditPipeline(_Editing, FewStepPipeline):
    """Inversion + edit. `invert()` gives the noise and trajectory of an image; calling the pipeline edits it.

    >>> pipe = EditPipeline.from_pretrained(folder)
    >>> out = pipe(image, source_prompt="a red circle", prompt="a blue circle", strength=0.6)
    >>> out = pipe(image, source_prompt="a red circle", prompt="a blue circle", method="pti", alpha=0.6)
    """

    def invert(self, image=None, prompt="", *, latents=None, num_inference_steps: int = 50,
               guidance_scale: float = 1.0, fixed_point: int = 0, strength: float = 1.0,
               schedule: str = "trailing", report_psnr: bool = False) -> InversionOutput:
        """Invert an image (or its `latents`) under `prompt` along the Euler/DDIM ODE of `num_inference_steps`
        steps, up to `strength` of the schedule. report_psnr regenerates it to measure the round trip."""
        param = self.editing_param()
        x0 = self.encode_image(image) if latents is None else latents.float()
        cond, uncond = self._embeds(prompt, len(x0), guidance_scale)
        model = self.denoiser(param, cond, uncond, guidance_scale)
        sigmas = truncate(self._sigmas(param, num_inference_steps, schedule), strength)
        with torch.no_grad():
            trajectory = run(invert, model, x0, sigmas, param=param, fixed_point=fixed_point,
                             callback=self._progress(len(sigmas) - 1, fixed_point + 1))
            psnr = None
            if report_psnr:
                psnr = latent_psnr(run(sample_euler, model, trajectory[-1], sigmas, param=param), x0)
        return InversionOutput(latents=trajectory[-1], trajectory=trajectory, sigmas=sigmas,
                               reconstruction_psnr=psnr)

    def edit_mask(self, image=None, prompt=None, source_prompt="", *, latents=None, num_inference_steps: int = 50,
                  guidance_scale: float = 1.0, negative_prompt=None, mask_strength: float = 0.5,
                  mask_noises: int = 10, mask_ratio: float = 3.0, mask_threshold: float = 0.5,
                  mask_blur: float = 0.0, schedule: str = "trailing", generator=None) -> torch.Tensor:
        """DiffEdit's mask of what changes from `source_prompt` to `prompt`: (B, 1, h, w) at latent size, 1 = edit.

        The image is noised `mask_noises` times to the level `mask_strength` of the schedule reaches; the mask is
        where the two prompts' predictions differ by more than `mask_threshold` of `mask_ratio` times their mean
        difference (diffusers' generate_mask: num_maps_per_mask, mask_encode_strength, mask_thresholding_ratio);
        mask_ratio None scales the map min-max instead; mask_blur smooths it first (std in latent cells).
        """
        if prompt is None:
            raise InvalidParameterError("pass prompt= (the target description)")
        param = self.editing_param()
        x0 = self.encode_image(image) if latents is None else latents.float()
        sigma = mask_sigma(self._sigmas(param, num_inference_steps, schedule), mask_strength)
        noises = draw_noises(x0, mask_noises, generator)
        source, uncond = self._embeds(source_prompt, len(x0), guidance_scale, negative_prompt)
        target, _ = self._embeds(prompt, len(x0), guidance_scale, negative_prompt)
        with torch.no_grad():
            return edit_mask(self.denoiser(param, source, uncond, guidance_scale),
                             self.denoiser(param, target, uncond, guidance_scale), x0, sigma, param=param,
                             noises=noises, ratio=mask_ratio, threshold=mask_threshold, blur=mask_blur)

    def __call__(self, image=None, prompt=None, source_prompt="", *, latents=None, strength: float = 1.0,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt=None,
                 method: str = "swap", alpha: float = 0.8, pti_iters: int = 10, pti_lr: float = 1e-2,
                 fixed_point: int = 0, schedule: str = "trailing", mask_image=None, mask_strength: float = 0.5,
                 mask_noises: int = 10, mask_ratio: float = 3.0, mask_threshold: float = 0.5, mask_blur: float = 0.0,
                 generator=None,
                 output_type: str = "pil", return_dict: bool = True, **_unused):
        """Edit `image` from `source_prompt` (what it shows) towards `prompt`.

        method "swap": invert under the source prompt up to `strength` (as img2img's strength), regenerate under
        the target prompt with CFG `guidance_scale`. method "pti": tune per-step embeddings that make guided
        sampling retrace the inversion, then regenerate with alpha * tuned + (1 - alpha) * target.
        method "diffedit": as swap, but only inside a mask (`mask_image`, white = edit, or else DiffEdit's
        automatic mask, see `edit_mask`); outside it the latent is the source's, exactly.
        strength 0 runs no step and returns the input (the reconstruction).
        """
        if method not in ("swap", "pti", "diffedit"):
            raise InvalidParameterError(f"method={method!r}; valid: 'swap' (inversion + prompt swap), 'pti', "
                                        "'diffedit' (swap inside a mask)")
        if prompt is None:
            raise InvalidParameterError("pass prompt= (the target description)")
        param = self.editing_param()
        inv = self.invert(image, source_prompt, latents=latents, num_inference_steps=num_inference_steps,
                          fixed_point=fixed_point, strength=strength, schedule=schedule)
        x0, sigmas = inv.trajectory[0], inv.sigmas
        target, uncond = self._embeds(prompt, len(x0), guidance_scale, negative_prompt)
        mask = None
        if method == "pti":
            source, _ = self._embeds(source_prompt, len(x0), guidance_scale, negative_prompt)
            model = self.denoiser(param, source, uncond, guidance_scale)
            tuned = tune_prompt(model, inv.trajectory, sigmas, source, iters=pti_iters, lr=pti_lr)
            out = run_per_step(lambda x, s, c: model(x, s, c), inv.latents, sigmas,
                               interpolate(tuned, target, alpha), param=param)
        elif method == "swap":
            with torch.no_grad():
                out = run(sample_euler, self.denoiser(param, target, uncond, guidance_scale), inv.latents, sigmas,
                          param=param)
        else:
            mask = self._diffedit_mask(x0, prompt, source_prompt, mask_image, num_inference_steps, guidance_scale,
                                       negative_prompt, mask_strength, mask_noises, mask_ratio, mask_threshold,
                                       mask_blur, schedule, generator)
            with torch.no_grad():
                out = run(sample_masked_edit, self.denoiser(param, target, uncond, guidance_scale), inv.latents,
                          sigmas, param=param, trajectory=inv.trajectory, mask=mask)
        images = self.decode(out, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EditOutput(images=images, source_latents=x0, mask=mask)

    def _diffedit_mask(self, x0, prompt, source_prompt, mask_image, steps, guidance_scale, negative_prompt,
                       strength, noises, ratio, threshold, blur, schedule, generator):
        """The given mask_image at latent size (binarised), or DiffEdit's automatic one."""
        if mask_image is not None:
            return edit_region(mask_image, x0, self.vae_scale_factor)
        return self.edit_mask(latents=x0, prompt=prompt, source_prompt=source_prompt, num_inference_steps=steps,
                              guidance_scale=guidance_scale, negative_prompt=negative_prompt, mask_strength=strength,
                              mask_noises=noises, mask_ratio=ratio, mask_threshold=threshold, mask_blur=blur,
                              schedule=schedule, generator=generator)


class RestorePipeline(_Editing, FewStepPipeline):
    """Inpainting and restoration. task: "inpaint" (method "blend" or "dds"), "super_resolution" or "deblur"
    (method "dds"). The measurement is taken in latent space (VAE encoding is treated as commuting with the
    operator: exact for a mask up to the latent grid, an approximation for downsampling and blur).

    >>> pipe = RestorePipeline.from_pretrained(folder)
    >>> out = pipe("a red circle", image=image, mask_image=mask, task="inpaint", method="dds")
    """

    TASKS = {"inpaint": ("blend", "dds"), "super_resolution": ("dds",), "deblur": ("dds",)}

    def __call__(self, prompt=None, image=None, mask_image=None, *, task: str = "inpaint", method: str = "dds",
                 num_inference_steps: int = 20, guidance_scale: float = 1.0, negative_prompt=None,
                 factor: int = 2, blur_sigma: float = 2.0, cg_steps: int = 5, eta: float = 0.0, gamma: float = 0.0,
                 differential: bool = False, schedule: str = "trailing", generator=None,
                 output_type: str = "pil", return_dict: bool = True, **_unused):
        if task not in self.TASKS or method not in self.TASKS[task]:
            valid = "; ".join(f"{t}: {', '.join(m)}" for t, m in self.TASKS.items())
            raise InvalidParameterError(f"task={task!r} with method={method!r} is not available; valid: {valid}")
        if image is None or prompt is None:
            raise InvalidParameterError("pass prompt= and image= (the degraded or masked image)")
        param = self.editing_param()
        if task == "super_resolution":                  # the low-resolution image, upsampled to the output size
            size = image_size(image)
            if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
                raise InvalidParameterError(f"factor={factor!r}; valid: an integer >= 1 (the upsampling factor)")
            if size is not None:
                check_latent_size(size[0], self.vae.config.latent_channels, size[1] * factor, size[2] * factor,
                                  self.vae_scale_factor, f"{type(self).__name__} super_resolution x{factor}")
            low = self.image_processor.preprocess(image)
            image = F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)
        known = self.encode_image(image)
        height, width = known.shape[-2] * self.vae_scale_factor, known.shape[-1] * self.vae_scale_factor
        cond, uncond = self._embeds(prompt, len(known), guidance_scale, negative_prompt)
        model = self.denoiser(param, cond, uncond, guidance_scale)
        sigmas = self._sigmas(param, num_inference_steps, schedule)
        noise = torch.randn(known.shape, generator=generator, dtype=known.dtype).to(known.device)
        x = param.noise_scaling(sigmas[0], noise, torch.zeros_like(known))
        progress = self._progress(num_inference_steps)
        if task == "inpaint":
            if mask_image is None:
                raise InvalidParameterError("task='inpaint' needs mask_image= (white = repaint, black = keep)")
            mask = check_mask(latent_mask(mask_image, height, width, known), known, "mask_image")
            if method == "blend":
                with torch.no_grad():
                    out = run(sample_inpaint, model, x, sigmas, param=param, seed=_seed(generator), known=known,
                              mask=mask, differential=differential, callback=progress)
                return self._finish(out, output_type, return_dict)
            operator = Mask(1 - mask)
        elif task == "super_resolution":
            operator = Downsample(factor)
        else:
            operator = Blur(blur_sigma / self.vae_scale_factor)
        y = operator.forward(known)
        with torch.no_grad():
            out = run(sample_dds, model, x, sigmas, param=param, seed=_seed(generator), y=y, operator=operator,
                      cg_steps=cg_steps, eta=eta, gamma=gamma, callback=progress)
        return self._finish(out, output_type, return_dict)

    def _finish(self, latents, output_type, return_dict):
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return EditOutput(images=images, source_latents=latents)


def _seed(generator) -> int:
    """A seed for the sampler's own noise draws, taken from the caller's generator (deterministic per call)."""
    if generator is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=generator))


__all__ = ["EditPipeline", "RestorePipeline", "InversionOutput", "EditOutput"]
