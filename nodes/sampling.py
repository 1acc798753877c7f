"""Sampler and schedule nodes: ComfyUI SAMPLER / SIGMAS around nimblediff.core.sampling and core.schedules."""

from __future__ import annotations

import logging

import torch

from ..core import schedules
from ..core.parameterization import VP, Flow
from ..core.recipes import RECIPES, check_recipe_usage
from ..core.sampling import SAMPLER_OPTIONS, SAMPLERS, k_diffusion_sampler

log = logging.getLogger("nimblediff")


def param_from_model_sampling(model_sampling):
    """Our parameterization from ComfyUI's model_sampling object (its sigma table or its flow shift)."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):
        return Flow(shift=float(getattr(model_sampling, "shift", 1.0)))
    sigmas = model_sampling.sigmas.detach().double().cpu()
    return VP(1.0 / (1.0 + sigmas**2))


def _param_of_guided_model(model):
    # ComfyUI hands the sampler KSamplerX0Inpaint(guider); the guider's inner_model is the BaseModel
    return param_from_model_sampling(model.inner_model.inner_model.model_sampling)


def make_sampler(name: str, recipe=None, **options):
    """A comfy KSAMPLER for one of our samplers; with a recipe, warns when the graph contradicts it."""
    import comfy.samplers

    fn = k_diffusion_sampler(SAMPLERS[name], _param_of_guided_model, **options)
    if recipe is not None:
        inner = fn

        def fn(model, x, sigmas, *args, **kwargs):
            cfg = getattr(model.inner_model, "cfg", None)
            for warning in check_recipe_usage(recipe, steps=len(sigmas) - 1, cfg=cfg):
                log.warning("NimbleDiff: %s", warning)
            return inner(model, x, sigmas, *args, **kwargs)

    return comfy.samplers.KSAMPLER(fn)


def make_sigmas_for_model(model, schedule: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """SIGMAS of a named schedule for a ComfyUI MODEL; denoise < 1 keeps the last steps of a longer schedule."""
    param = param_from_model_sampling(model.get_model_object("model_sampling"))
    if not 0.0 < denoise <= 1.0:
        from ..errors import InvalidParameterError

        raise InvalidParameterError(f"denoise={denoise}: must be in (0, 1]")
    total = steps if denoise >= 1.0 else max(int(steps / denoise), steps)
    sigmas = schedules.make_sigmas(schedule, total, param)
    return sigmas[-(steps + 1):].float()


class FewStepSampler:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: LCM, TCD (gamma) or Euler, from nimblediff.core."""

    CATEGORY = "NimbleDiff/sampling"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"
    DESCRIPTION = ("Few-step sampler for distilled models. lcm: predict x0 and re-noise (LCM-LoRA, Flash "
                   "Diffusion). tcd: trajectory consistency with stochastic gamma in [0, 1]. euler: ODE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (list(SAMPLERS), {"default": "lcm"}),
            "gamma": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "TCD stochasticity (0 = deterministic, 1 = LCM); other samplers ignore it"}),
        }, "optional": {
            "options": ("STRING", {"default": "", "tooltip": "other sampler options, e.g. 'beta=0.8, order=3' "
                                   "(dpmpp_2m / plms / ghvb beta, deis order, pc snr, scott eta)"}),
        }}

    def build(self, sampler_name, gamma, options=""):
        parsed = parse_sampler_options(sampler_name, options)
        if "gamma" in SAMPLER_OPTIONS[sampler_name]:
            parsed.setdefault("gamma", gamma)
        return (make_sampler(sampler_name, **parsed),)


def parse_sampler_options(sampler_name: str, text: str) -> dict:
    """'beta=0.8, order=3' -> {"beta": 0.8, "order": 3}, checked against the sampler's options."""
    from ..errors import InvalidParameterError

    valid = SAMPLER_OPTIONS[sampler_name]
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in valid:
            raise InvalidParameterError(f"sampler option {item!r}: {sampler_name} takes "
                                        f"{', '.join(f'{k}={v}' for k, v in valid.items()) or 'no options'}")
        default = valid[name]
        try:
            out[name] = type(default)(value.strip()) if not isinstance(default, bool) else \
                value.strip().lower() in ("1", "true", "yes")
        except ValueError:
            raise InvalidParameterError(f"sampler option {name}={value.strip()!r}: expected a "
                                        f"{type(default).__name__} like {default!r}") from None
    return out


class FewStepSchedule:
    """SIGMAS for few-step sampling: the LCM grid, trailing, Karras or exponential."""

    CATEGORY = "NimbleDiff/sampling"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "schedule": (list(schedules.SCHEDULES), {"default": "lcm"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def build(self, model, schedule, steps, denoise):
        return (make_sigmas_for_model(model, schedule, steps, denoise),)


class RecipeSampler:
    """SAMPLER + SIGMAS + recommended CFG of a distillation recipe (Flash, LCM-LoRA, TCD, DMD2, Lightning...)."""

    CATEGORY = "NimbleDiff/sampling"
    RETURN_TYPES = ("SAMPLER", "SIGMAS", "FLOAT", "STRING")
    RETURN_NAMES = ("sampler", "sigmas", "cfg", "recipe")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "recipe": (list(RECIPES), {"default": "flash-sd15"}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 100}),
        }}

    def build(self, model, recipe, steps):
        r = RECIPES[recipe]
        for warning in check_recipe_usage(r, steps=steps):
            log.warning("NimbleDiff: %s", warning)
        sampler = make_sampler(r.sampler, recipe=r, **r.options)
        return (sampler, make_sigmas_for_model(model, r.schedule, steps), r.cfg, r.describe())


class ScheduleFile:
    """SIGMAS and the SAMPLER they were searched or fitted for, from a schedule JSON (`nimblediff schedule search`:
    BOSS, AutoDiffusion or a fitted solver, whose weights only make sense with these sigmas); refuses a schedule
    made for another model type. `schedule_json` (the file's contents pasted in) embeds it in the workflow and
    takes precedence over `path`."""

    CATEGORY = "NimbleDiff/sampling"
    RETURN_TYPES = ("SIGMAS", "SAMPLER")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "path": ("STRING", {"default": "schedule.json"})},
                "optional": {"schedule_json": ("STRING", {"default": "", "multiline": True,
                                                           "tooltip": "a schedule file's JSON, embedded in the "
                                                                      "workflow; overrides path"})}}

    def load(self, model, path, schedule_json=""):
        from ..core.schedule_search import load_schedule, parse_schedule, sampler_of

        param = param_from_model_sampling(model.get_model_object("model_sampling"))
        data = parse_schedule(schedule_json, param.kind) if schedule_json.strip() else load_schedule(path, param.kind)
        name, options = sampler_of(data)
        return torch.as_tensor(data["sigmas"], dtype=torch.float32), make_sampler(name, **options)


NODES = {
    "NimbleFewStepSampler": (FewStepSampler, "NimbleDiff Few-Step Sampler"),
    "NimbleFewStepSchedule": (FewStepSchedule, "NimbleDiff Few-Step Schedule"),
    "NimbleRecipeSampler": (RecipeSampler, "NimbleDiff Recipe Sampler"),
    "NimbleScheduleFile": (ScheduleFile, "NimbleDiff Schedule from File"),
}
