"""Few-step text-to-image for SDXL, PixArt-alpha, SD3 and Flux: the stock diffusers pipeline, NimbleDiff sampling and
LoRA stacking.

Why one mixin over the stock pipeline classes (one three-line class per family) and not a pipeline of our own per
family: everything that differs between the families is already written, and tested, in diffusers' ``__call__``:
prompt encoding (two CLIPs + T5 for SD3, CLIP + T5 for Flux, T5 for PixArt), SDXL's micro-conditioning, Flux's 2x2
latent packing and its resolution-dependent shift, PixArt's learned-sigma split. A copy of each would be 150-400 lines
that must track diffusers. What NimbleDiff changes is two things, and both sit behind interfaces the stock
``__call__`` already calls:

- the sampler: for the length of one call the pipeline's scheduler is a ``NimbleScheduler`` (pipelines/schedulers.py)
  built from the stock scheduler's config. A FlowMatch scheduler becomes the core ``Flow`` parameterization, any other
  the ``VP`` one; the sampler and schedule are any of ``nimblediff.core`` (default: the stock grid, so the pipeline
  equals diffusers' own FlowMatchEuler / LCM run, or the loaded recipe's);
- the LoRAs: read in any layout by ``nimblediff.weights`` and fused (or attached) by ``nimblediff.core.adapters``,
  several at once with one validation, so PixArt (which has no diffusers LoRA loader) takes LoRAs like the others.

One class per family is still needed because diffusers builds a pipeline from the ``__init__`` signature of its class
(``from_pretrained``, ``custom_pipeline=``). The mixin keeps its state in plain attributes, so it adds no
``__init__``.

    >>> pipe = FewStepSD3Pipeline.from_pretrained(folder)
    >>> pipe.load_acceleration_lora("flash-sd3.safetensors", recipe="flash-sd3")
    >>> pipe.load_lora("style.safetensors", weight=0.7)
    >>> image = pipe("a red circle").images[0]          # the recipe's sampler, steps and CFG
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from pathlib import Path

from diffusers import FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from ..core import schedules
from ..core.limits import check_latent_size, prompt_batch
from ..core.parameterization import Flow
from ..core.recipes import check_recipe_usage
from ..errors import InvalidParameterError, WeightsFormatError
from .adapters import LoRAOpsMixin
from .caching import NimbleCacheMixin
from .loading import agree_dtypes, check_pipeline_folder, missing_text_encoders
from .schedulers import NimbleScheduler

__all__ = ["FewStepDiTMixin", "FewStepSDXLPipeline", "FewStepPixArtPipeline", "FewStepSD3Pipeline",
           "FewStepFluxPipeline"]

_SCHEDULER_KEYS = set(inspect.signature(NimbleScheduler.__init__).parameters) - {"self"}
# FlowMatchEulerDiscreteScheduler options our flow scheduler does not reproduce: refuse rather than differ silently
_UNSUPPORTED_FLOW = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                     "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                     "time_shift_type": "exponential"}


def check_folder_components(path) -> None:
    """A local pipeline folder must hold every component its model_index.json names (else diffusers fails deep in
    from_pretrained with a message about the first file it misses)."""
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        return
    index = json.loads((folder / "model_index.json").read_text())
    missing = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
               and value[0] is not None and value[1] is not None and not (folder / name).is_dir()]
    if missing:
        raise WeightsFormatError(f"{folder}: model_index.json ({index.get('_class_name')}) names components "
                                 f"{missing}, but the folder has no {', '.join(m + '/' for m in missing)}; copy the "
                                 "missing component folders or set them to [null, null] in model_index.json")


class FewStepDiTMixin(LoRAOpsMixin, NimbleCacheMixin):
    """Few-step sampling and LoRA stacking for a stock diffusers text-to-image pipeline (put it first in the bases)."""

    family: str = ""              # the recipe base this pipeline runs: sdxl, pixart, sd3, flux (LoRAOpsMixin)
    _patch_multiple: int = 1      # latent pixels per transformer token side (patch size; Flux packs 2x2)

    # --- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' loader, with NimbleDiff errors for a local folder that is not a (complete) pipeline."""
        check_pipeline_folder(pretrained_model_name_or_path)
        if isinstance(pretrained_model_name_or_path, (str, Path)):
            check_folder_components(pretrained_model_name_or_path)
            if Path(pretrained_model_name_or_path).is_dir():  # an SD3 folder saved without T5 (NimbleDiff-Tiny-DiT)
                kwargs = {**missing_text_encoders(pretrained_model_name_or_path), **kwargs}
        pipe = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        agree_dtypes(pipe)
        return pipe

    # --- sampling ---------------------------------------------------------------------------------------------

    def _is_flow(self, config) -> bool:
        return type(self.scheduler).__name__.startswith("FlowMatch") or config.get("model_type") == "flow"

    def _nimble_scheduler(self, sampler: str | None, schedule: str | None) -> NimbleScheduler:
        """A NimbleScheduler on the stock scheduler's noise schedule (the stock one is left as it is)."""
        current = self.scheduler
        config = {k: v for k, v in current.config.items() if not k.startswith("_")}
        flow = self._is_flow(config)
        if flow and not isinstance(current, NimbleScheduler):
            odd = {k: config[k] for k, default in _UNSUPPORTED_FLOW.items() if config.get(k, default) != default}
            if odd:
                raise InvalidParameterError(f"{type(current).__name__} config {odd}: NimbleScheduler's flow schedule "
                                            "does not reproduce these options; use the stock pipeline class")
            config.update(model_type="flow", prediction_type="flow")
        default_sampler, default_schedule = self._default_sampling(current, flow)
        config["sampler"], config["schedule"] = sampler or default_sampler, schedule or default_schedule
        if self.recipe is not None and "gamma" in self.recipe.options:
            config["gamma"] = self.recipe.options["gamma"]
        return NimbleScheduler.from_config({k: v for k, v in config.items() if k in _SCHEDULER_KEYS})

    def _default_sampling(self, current, flow: bool) -> tuple[str, str]:
        """(sampler, schedule) when a call names none: the loaded recipe's, else those of a NimbleScheduler the user
        set, else the stock grid (FlowMatchEuler's for flow models, LCM's for the others: few steps, no recipe)."""
        if self.recipe is not None:
            return self.recipe.sampler, self.recipe.schedule
        if isinstance(current, NimbleScheduler):
            return current.config.sampler, current.config.schedule
        return ("euler", "flowmatch") if flow else ("lcm", "lcm")

    def _check_size(self, height, width) -> None:
        """Height and width must make whole latent patches (VAE factor x patch size), else the transformer cannot
        patchify the latent (SD3 and PixArt fail inside the model, Flux silently resizes)."""
        multiple = self.vae_scale_factor * self._patch_multiple
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % multiple:
                lo, hi = value // multiple * multiple, math.ceil(value / multiple) * multiple
                raise InvalidParameterError(
                    f"{name}={value}: {type(self).__name__} needs a multiple of {multiple} (VAE factor "
                    f"{self.vae_scale_factor} x {self._patch_multiple} latent pixels per patch) to patchify the "
                    f"latent; use {lo or multiple} or {hi}")

    def _check_limits(self, call: dict) -> None:
        """Refuse an absurd height, width or batch (core/limits) before the stock call encodes or allocates."""
        native = (getattr(self, "default_sample_size", None) or 128) * self.vae_scale_factor
        name = type(self).__name__
        per_prompt = call.get("num_images_per_prompt")
        batch = prompt_batch(call.get("prompt"), 1 if per_prompt is None else per_prompt, call.get("prompt_embeds"),
                             name)
        check_latent_size(batch, self.vae.config.latent_channels, call.get("height") or native,
                          call.get("width") or native, self.vae_scale_factor, name)

    def _explicit_sigmas(self, scheduler: NimbleScheduler, steps: int) -> list[float]:
        """The scheduler's named schedule as the `sigmas` a pipeline that always passes its own (Flux) forwards;
        with dynamic shifting they are made unshifted, the scheduler shifts them by the pipeline's mu."""
        param = scheduler.param
        if scheduler.config.use_dynamic_shifting:
            param = Flow(scheduler.config.num_train_timesteps, 1.0)
        return schedules.make_sigmas(scheduler.config.schedule, steps, param)[:-1].tolist()

    def __call__(self, *args, sampler: str | None = None, schedule: str | None = None, **kwargs):
        """The stock pipeline's call (same arguments) with NimbleDiff's `sampler` / `schedule` (names of
        nimblediff.core.sampling.SAMPLERS / core.schedules.SCHEDULES); steps and guidance default to the loaded
        recipe's (else 4 steps and the stock guidance)."""
        recipe = self.recipe
        steps = kwargs.get("num_inference_steps")
        if steps is not None and steps < 1:
            raise InvalidParameterError(f"num_inference_steps={steps}; it must be >= 1 (or None for the recipe's)")
        kwargs["num_inference_steps"] = steps = steps or (recipe.steps if recipe else 4)
        if recipe is not None:
            kwargs.setdefault("guidance_scale", recipe.cfg)
            for warning in check_recipe_usage(recipe, steps=steps, cfg=kwargs["guidance_scale"]):
                warnings.warn(warning, stacklevel=2)
        self._check_size(kwargs.get("height"), kwargs.get("width"))
        signature = inspect.signature(super().__call__)
        accepted = signature.parameters
        try:
            call = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:                   # a wrong argument: the stock call below names it
            call = kwargs
        self._check_limits(call)
        scheduler = self._nimble_scheduler(sampler, schedule)
        scheduler.default_generator = call.get("generator")   # stochastic steps draw from the call's generator
        if kwargs.get("eta") is None and "eta" in accepted and "gamma" in scheduler._options():
            kwargs["eta"] = scheduler._options()["gamma"]     # the stock default eta=0 would set TCD's gamma to 0
        if (self.family == "flux" and kwargs.get("sigmas") is None and kwargs.get("timesteps") is None
                and (schedule is not None or recipe is not None)):
            kwargs["sigmas"] = self._explicit_sigmas(scheduler, steps)    # FluxPipeline passes its own linspace
        stock = self.scheduler
        object.__setattr__(self, "scheduler", scheduler)    # for this call only; the saved config keeps the stock
        try:
            return super().__call__(*args, **kwargs)
        finally:
            object.__setattr__(self, "scheduler", stock)


class FewStepSDXLPipeline(FewStepDiTMixin, StableDiffusionXLPipeline):
    """SDXL: LCM / TCD / Lightning / DMD2 recipes on the stock SDXL pipeline (CFG, micro-conditioning as diffusers)."""

    family = "sdxl"


class FewStepPixArtPipeline(FewStepDiTMixin, PixArtAlphaPipeline):
    """PixArt-alpha (VP, learned sigma): the Flash PixArt recipe; LoRAs through NimbleDiff (diffusers has no PixArt
    LoRA loader)."""

    family = "pixart"

    @property
    def _patch_multiple(self) -> int:
        return self.transformer.config.patch_size


class FewStepSD3Pipeline(FewStepDiTMixin, StableDiffusion3Pipeline):
    """SD3 / SD3.5 (rectified flow, shifted schedule): flow Euler by default, the Flash SD3 recipe when loaded."""

    family = "sd3"

    @property
    def _patch_multiple(self) -> int:
        return self.transformer.config.patch_size


class FewStepFluxPipeline(FewStepDiTMixin, FluxPipeline):
    """Flux (rectified flow, resolution-dependent shift mu as FluxPipeline computes it)."""

    family = "flux"
    _patch_multiple = 2           # 2x2 latent packing
