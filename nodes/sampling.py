"""Sampler and schedule nodes: ComfyUI SAMPLER / SIGMAS around nimblediff.core.sampling and core.schedules."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from ..core import schedules
from ..core.parameterization import VP, Flow
from ..core.recipes import RECIPES, check_recipe_usage
from ..core.sampling import SAMPLER_OPTIONS, SAMPLERS, k_diffusion_sampler
from ..core.sampling.smc import MODES as FKC_MODES
from ..errors import InvalidParameterError, NimbleDiffError
from ..weights.paths import find_inside

log = logging.getLogger("nimblediff")


def param_from_model_sampling(model_sampling):
    """Our parameterization from ComfyUI's model_sampling object (its sigma table or its flow shift).

    ComfyUI's ModelSamplingFlux keeps Flux's mu in `shift` (sigma = e^mu / (e^mu + 1/t - 1)), which is the SD3-type
    shift e^mu (ModelSamplingDiscreteFlow's shift * t / (1 + (shift - 1) t)); our Flow takes the SD3 form."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.CONST):
        shift = float(getattr(model_sampling, "shift", 1.0))
        if isinstance(model_sampling, getattr(ms, "ModelSamplingFlux", ())):
            shift = math.exp(shift)
        return Flow(shift=shift)
    sigmas = model_sampling.sigmas.detach().double().cpu()
    return VP(1.0 / (1.0 + sigmas**2))


def _param_of_guided_model(model):
    # ComfyUI hands the sampler KSamplerX0Inpaint(guider); the guider's inner_model is the BaseModel
    return param_from_model_sampling(model.inner_model.inner_model.model_sampling)


def make_sampler(name: str, recipe=None, **options):
    """A comfy KSAMPLER for one of our samplers; with a recipe, warns when the graph contradicts it."""
    import comfy.samplers

    check_sampler_options(name, options)
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
        raise InvalidParameterError(f"denoise={denoise}: must be in (0, 1]")
    total = steps if denoise >= 1.0 else max(int(steps / denoise), steps)
    try:
        sigmas = schedules.make_sigmas(schedule, total, param)
    except InvalidParameterError as e:
        if total == steps:
            raise
        raise InvalidParameterError(f"denoise={denoise} with steps={steps} keeps the last {steps} steps of a "
                                    f"{total}-step {schedule} schedule, but {e}; raise denoise or lower "
                                    "steps") from None
    return sigmas[-(steps + 1):].float()


# the gamma widget's default: TCD's own
TCD_GAMMA = SAMPLER_OPTIONS["tcd"]["gamma"]

# Options whose value is a list (of lists) of numbers, with the nesting depth: the fitted solver's weights.
LIST_OPTIONS = {"coeffs": 2, "gains": 1, "shifts": 1}

FITTED_HINT = ("the fitted sampler needs the coefficients fitted for its sigmas: load the file written by "
               "`nimblediff schedule search --method fit` with the NimbleDiff Schedule from File node, which outputs "
               "both the SIGMAS and this SAMPLER")


def _readers(name: str) -> str:
    return " / ".join(s for s, opts in SAMPLER_OPTIONS.items() if name in opts)


def _typed_options() -> dict:
    """The typed widget of every sampler option a widget can hold (all but the fitted solver's lists), in widget
    order. An option one sampler takes defaults to that sampler's default; `order` and `beta`, which several samplers
    take with different defaults, default to 0 = "the sampler's own" (see AUTO_OPTIONS)."""
    def default(name):
        return next(opts[name] for opts in SAMPLER_OPTIONS.values() if name in opts)

    return {
        "order": ("INT", {"default": 0, "min": 0, "max": 4, "tooltip": (
            f"{_readers('order')}: multistep order (deis 1-3, plms / ghvb 1-4); 0 = the sampler's default (deis "
            f"{SAMPLER_OPTIONS['deis']['order']}, plms / ghvb {SAMPLER_OPTIONS['plms']['order']})")}),
        "beta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": (
            "dpmpp_2m / dpmpp_2m_unic / plms / ghvb: momentum in (0, 1], 1 = none; fkc: annealing exponent (> 1 "
            f"sharper, < 1 flatter); 0 = the sampler's default (ghvb {SAMPLER_OPTIONS['ghvb']['beta']}, the others "
            "1.0)")}),
        "lower_order_final": ("BOOLEAN", {"default": default("lower_order_final"), "tooltip": (
            f"{_readers('lower_order_final')}: drop to a lower order on the last steps (stabler with few steps)")}),
        "momentum": (["hb", "ghvb"], {"default": default("momentum"), "tooltip": (
            f"{_readers('momentum')}: hb = heavy ball, ghvb = generalized heavy ball (Wizadwongsa et al. 2023)")}),
        "eta": ("FLOAT", {"default": default("eta"), "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip": (
            f"{_readers('eta')}: noise injected per step; 0 = DDIM, 1 = ancestral, large = LCM-like")}),
        "substeps": ("INT", {"default": default("substeps"), "min": 0, "max": 64, "tooltip": (
            f"{_readers('substeps')}: extra stochastic substeps between two sigmas (0 = none)")}),
        "snr": ("FLOAT", {"default": default("snr"), "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": (
            f"{_readers('snr')}: Langevin corrector signal-to-noise ratio (Score SDE: 0.16 VE, 0.01 VP)")}),
        "corrector_steps": ("INT", {"default": default("corrector_steps"), "min": 0, "max": 64, "tooltip": (
            f"{_readers('corrector_steps')}: Langevin corrector steps per sigma (each costs one model call)")}),
        "mode": (list(FKC_MODES), {"default": default("mode"), "tooltip": (
            f"{_readers('mode')}: anneal = sample p^beta; cfg = guidance as a product of conditional and "
            "unconditional; product = two prompts' product")}),
        "guidance": ("FLOAT", {"default": default("guidance"), "min": -100.0, "max": 100.0, "step": 0.1,
                               "tooltip": f"{_readers('guidance')} cfg mode: the guidance weight w"}),
        "ess_threshold": ("FLOAT", {"default": default("ess_threshold"), "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": (f"{_readers('ess_threshold')}: resample the particles when the "
                                                "effective sample size falls below this fraction")}),
    }


TYPED_OPTIONS = _typed_options()

AUTO_OPTIONS = {"order", "beta"}     # 0 = the chosen sampler's own default


class FewStepSampler:
    """SAMPLER for SamplerCustom / SamplerCustomAdvanced: LCM, TCD (gamma) or Euler, from nimblediff.core."""

    CATEGORY = "NimbleDiff/sampling"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"
    DESCRIPTION = ("Few-step sampler for distilled models. lcm: predict x0 and re-noise (LCM-LoRA, Flash "
                   "Diffusion). tcd: trajectory consistency with stochastic gamma in [0, 1]. euler: ODE. Each "
                   "sampler reads only its own option widgets (named in their tooltips).")

    @classmethod
    def INPUT_TYPES(cls):
        # ComfyUI cannot hide a widget per combo value without a JS extension, so every option is a widget for every
        # sampler and its tooltip names the samplers that read it. Widget order is frozen (saved workflows store
        # widget values by position): sampler_name, gamma, options, then the typed options added after it.
        return {"required": {
            "sampler_name": (list(SAMPLERS), {"default": "lcm", "tooltip": (
                "lcm / tcd: consistency-distilled models (LCM-LoRA, Flash, TCD). euler, dpmpp_2m, deis, plms, ghvb, "
                "dpmpp_2m_unic: ODE solvers. scott, pc: stochastic. fkc: Feynman-Kac particle sampler. fitted: "
                "needs coefficients fitted for its sigmas: use NimbleDiff Schedule from File instead")}),
            "gamma": ("FLOAT", {"default": TCD_GAMMA, "min": 0.0, "max": 1.0, "step": 0.01,
                                "tooltip": "tcd only (other samplers ignore it): stochasticity, 0 = deterministic "
                                           "(DDIM-like), 1 = LCM"}),
        }, "optional": {
            "options": ("STRING", {"default": "", "tooltip": (
                "optional free text, kept for saved workflows and the fitted solver's lists: name=value, "
                "comma-separated, e.g. 'order=3' or coeffs=[[], [0.5]] (JSON lists); the typed widgets below "
                "cover every other option, and a widget changed from its default must agree with the text")}),
            **TYPED_OPTIONS,
        }}

    def build(self, sampler_name, gamma, options="", **typed):
        parsed = parse_sampler_options(sampler_name, options)
        takes = SAMPLER_OPTIONS[sampler_name]
        ignored = []
        for name, value in typed.items():
            if name not in TYPED_OPTIONS:
                raise InvalidParameterError(f"unknown input {name!r}; the sampler options are "
                                            f"{', '.join(TYPED_OPTIONS)}")
            default = TYPED_OPTIONS[name][1]["default"]
            changed = value != default
            if name not in takes:
                if changed:
                    ignored.append(f"{name}={value} (read by {_readers(name)})")
            elif name in parsed:
                if changed and parsed[name] != value:
                    raise InvalidParameterError(f"sampler option {name} is given twice: {value} in its widget and "
                                                f"{parsed[name]} in the options text; keep one")
            elif not (name in AUTO_OPTIONS and value == 0):
                parsed[name] = value
        if "gamma" in takes:
            parsed.setdefault("gamma", gamma)
        elif gamma != TCD_GAMMA:
            ignored.append(f"gamma={gamma} (read by {_readers('gamma')})")
        if ignored:
            log.warning("NimbleDiff Few-Step Sampler: %s ignores %s", sampler_name, ", ".join(ignored))
        return (make_sampler(sampler_name, **parsed),)


def _split_options(text: str) -> list[str]:
    """'beta=0.8, coeffs=[[], [0.5]]' -> ['beta=0.8', 'coeffs=[[], [0.5]]']: commas inside brackets stay."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _parse_value(sampler_name: str, name: str, text: str):
    default = SAMPLER_OPTIONS[sampler_name][name]
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidParameterError(f"sampler option {name}={text!r}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise InvalidParameterError(f"sampler option {name}={text!r}: expected {kind} like {default!r}") from None
    if name in LIST_OPTIONS:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise InvalidParameterError(f"sampler option {name}={text!r}: expected a JSON list "
                                        f"{_list_example(name)}") from None
    return text.strip("'\"")


def _list_example(name: str) -> str:
    return {"coeffs": "of lists of numbers, one list per step, e.g. [[], [0.5], [0.3, -0.1]]",
            "gains": "of numbers, e.g. [0.2, 0.1]", "shifts": "of numbers, one per step, e.g. [0, -0.1, 0.05]"}[name]


def parse_sampler_options(sampler_name: str, text: str) -> dict:
    """'beta=0.8, order=3' -> {"beta": 0.8, "order": 3}, checked against the sampler's options; lists are JSON."""
    valid = SAMPLER_OPTIONS[sampler_name]
    out = {}
    for item in _split_options(text or ""):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in valid:
            raise InvalidParameterError(f"sampler option {item!r}: {sampler_name} takes "
                                        f"{', '.join(f'{k}={v}' for k, v in valid.items()) or 'no options'}")
        if name in out:
            raise InvalidParameterError(f"sampler option {name} is given twice in {text!r}")
        out[name] = _parse_value(sampler_name, name, value.strip())
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampler_options(sampler_name: str, options: dict) -> None:
    """Refuse what the sampler would refuse once SamplerCustom runs it, while the node runs: unknown options,
    wrong types, NaN or inf, out-of-range values, and the fitted sampler without coefficients."""
    valid = SAMPLER_OPTIONS[sampler_name]
    for name, value in options.items():
        if name not in valid:
            raise InvalidParameterError(f"sampler option {name}: {sampler_name} takes "
                                        f"{', '.join(valid) or 'no options'}")
        default = valid[name]
        if name in LIST_OPTIONS:
            if not _is_nested_numbers(value, LIST_OPTIONS[name]):
                raise InvalidParameterError(f"sampler option {name}={value!r}: expected a list "
                                            f"{_list_example(name)}, all finite; {FITTED_HINT}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise InvalidParameterError(f"sampler option {name}={value!r}: expected true or false")
        elif isinstance(default, int):
            if not (isinstance(value, int) and not isinstance(value, bool)):
                raise InvalidParameterError(f"sampler option {name}={value!r}: expected an integer like {default}")
        elif isinstance(default, float):
            if not (_is_number(value) and math.isfinite(value)):
                raise InvalidParameterError(f"sampler option {name}={value!r}: expected a finite number like "
                                            f"{default}")
    if sampler_name == "fitted" and not options.get("coeffs"):
        raise InvalidParameterError(f"sampler fitted without coeffs would run plain first-order (DDIM) steps; "
                                    f"{FITTED_HINT}")
    _dry_run(sampler_name, options)          # each sampler checks its own ranges (tcd: 0 <= gamma <= 1) on entry


def _is_nested_numbers(value, depth: int) -> bool:
    if not isinstance(value, (list, tuple)):
        return False
    if depth == 1:
        return all(_is_number(v) and math.isfinite(v) for v in value)
    return all(_is_nested_numbers(v, depth - 1) for v in value)


def _dry_run(sampler_name: str, options: dict) -> None:
    """Start the sampler on a stand-in problem up to its first model call: each sampler checks its options on
    entry (core), so the node reports them without a second copy of the rules."""
    param = VP()
    steps = len(options.get("coeffs") or ()) or 2
    x = torch.zeros(1, 1)
    try:
        gen = SAMPLERS[sampler_name](x, schedules.make_sigmas("trailing", steps, param), param=param,
                                     noise=lambda s, s_next: torch.zeros_like(x), **options)
        next(gen)
        gen.close()
    except StopIteration:
        pass
    except NimbleDiffError as e:
        raise InvalidParameterError(f"sampler {sampler_name}: {e}") from None
    except (TypeError, ValueError, IndexError) as e:
        raise InvalidParameterError(f"sampler {sampler_name} options {options}: {e}") from None


class FewStepSchedule:
    """SIGMAS for few-step sampling: the LCM grid, trailing, Karras or exponential."""

    CATEGORY = "NimbleDiff/sampling"
    DESCRIPTION = ("SIGMAS for few-step sampling on the model's own noise schedule: the LCM grid, trailing, "
                   "Karras, exponential, sgm_uniform, flowmatch or logsnr spacing; denoise < 1 for img2img.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model to sample: its noise schedule (VP table or flow shift) sets "
                                           "the sigmas"}),
            "schedule": (list(schedules.SCHEDULES), {"default": "lcm", "tooltip": (
                "lcm: the LCM / Flash timestep grid; trailing: evenly spaced timesteps ending at the last; karras, "
                "exponential: spaced in sigma")}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip": "number of sampling steps"}),
            # min 0.01, not 0: denoise = 0 would keep no step of the schedule (make_sigmas_for_model refuses it)
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                "fraction of the schedule to run (img2img): 1 starts from pure noise; below 1 keeps the last "
                "steps of a steps / denoise schedule")}),
        }}

    def build(self, model, schedule, steps, denoise):
        return (make_sigmas_for_model(model, schedule, steps, denoise),)


def flux_mu(width: int, height: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift mu: linear in the number of 2x2 latent patches (256 -> base_shift, 4096 ->
    max_shift), as diffusers' calculate_shift and ComfyUI's ModelSamplingFlux compute it."""
    return base_shift + (max_shift - base_shift) / (4096 - 256) * (width * height / (16 * 16) - 256)


SHIFT_TYPES = ("model", "sd3", "flux")


def flow_param(model, shift_type: str, shift: float, width: int, height: int, base_shift: float,
               max_shift: float) -> Flow:
    """The Flow parameterization a flow schedule is made for: the MODEL's own shift, an SD3-type constant shift, or
    Flux's resolution-dependent one (exp(mu)); refuses a model that is not a rectified-flow model."""
    param = param_from_model_sampling(model.get_model_object("model_sampling"))
    if param.kind != "flow":
        raise InvalidParameterError("model: its ComfyUI model_sampling is not a flow one (it is a VP / epsilon or v "
                                    "model such as SD1.x / SDXL); flow schedules are for rectified-flow models "
                                    "(SD3, Flux, ...): use NimbleDiff Few-Step Schedule for this model")
    if shift_type not in SHIFT_TYPES:
        raise InvalidParameterError(f"shift_type={shift_type!r}; valid: {', '.join(SHIFT_TYPES)}")
    if shift_type == "sd3":
        if not (math.isfinite(shift) and shift > 0):
            raise InvalidParameterError(f"shift={shift}: the SD3 shift must be > 0 (SD3 uses 3.0)")
        return Flow(param.num_train_timesteps, shift)
    if shift_type == "flux":
        for name, value in (("width", width), ("height", height)):
            if value % 16:
                raise InvalidParameterError(
                    f"{name}={value}: Flux patchifies 2x2 latent pixels of an 8x VAE, so the image side must be a "
                    f"multiple of 16 (e.g. {value // 16 * 16 or 16} or {(value // 16 + 1) * 16}); mu is computed "
                    "from the number of patches")
        return Flow(param.num_train_timesteps, math.exp(flux_mu(width, height, base_shift, max_shift)))
    return param


class FlowSchedule:
    """SIGMAS on the rectified-flow schedule of a DiT (SD3, Flux, ...): the model's own shift, an SD3-type constant
    shift, or Flux's resolution-dependent shift (mu from width x height), for SamplerCustom with any sampler."""

    CATEGORY = "NimbleDiff/sampling"
    DESCRIPTION = ("SIGMAS on a rectified-flow DiT's schedule (SD3, Flux): the model's own shift, a constant "
                   "SD3-type shift, or Flux's resolution-dependent shift from width x height.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a rectified-flow model (SD3, Flux, NimbleDiff-Tiny-DiT)"}),
            "schedule": (list(schedules.SCHEDULES), {"default": "trailing", "tooltip": (
                "trailing / lcm: sigmas 1 ... 1/steps shifted (FluxPipeline's grid); flowmatch: diffusers' "
                "FlowMatchEulerDiscreteScheduler grid; logsnr, sgm_uniform, karras, exponential")}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip": "number of sampling steps"}),
            "shift_type": (list(SHIFT_TYPES), {"default": "model", "tooltip": (
                "model: the MODEL's own shift (as set by ModelSamplingSD3 / ModelSamplingFlux); sd3: the constant "
                "`shift` below; flux: resolution-dependent, from width, height, base_shift and max_shift")}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "sd3 shift_type only: sigma' = shift sigma / (1 + (shift - 1) sigma)"}),
            "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                              "tooltip": "flux shift_type only: image width in pixels (a multiple of 16)"}),
            "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                               "tooltip": "flux shift_type only: image height in pixels (a multiple of 16)"}),
            "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01,
                                     "tooltip": "flux shift_type only: mu at 256 patches (256x256 pixels)"}),
            "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01,
                                    "tooltip": "flux shift_type only: mu at 4096 patches (1024x1024 pixels)"}),
        }}

    def build(self, model, schedule, steps, shift_type, shift, width, height, base_shift, max_shift):
        param = flow_param(model, shift_type, shift, width, height, base_shift, max_shift)
        return (schedules.make_sigmas(schedule, steps, param).float(),)


class RecipeSampler:
    """SAMPLER + SIGMAS + recommended CFG of a distillation recipe (Flash, LCM-LoRA, TCD, DMD2, Lightning...)."""

    CATEGORY = "NimbleDiff/sampling"
    DESCRIPTION = ("The SAMPLER, SIGMAS and recommended CFG of a distillation recipe (Flash, LCM-LoRA, TCD, DMD2, "
                   "Lightning, Hyper-SD) for a LoRA loaded by another node.")
    RETURN_TYPES = ("SAMPLER", "SIGMAS", "FLOAT", "STRING")
    RETURN_NAMES = ("sampler", "sigmas", "cfg", "recipe")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model to sample: its noise schedule sets the sigmas"}),
            "recipe": (list(RECIPES), {"default": "flash-sd15", "tooltip": (
                "the distilled model or LoRA: gives the sampler, schedule and CFG it was trained for")}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip": (
                "sampling steps; a warning is logged when the recipe was not distilled for this count")}),
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
    DESCRIPTION = ("SIGMAS and the SAMPLER they were made for, from a schedule JSON written by `nimblediff "
                   "schedule search` (BOSS, AutoDiffusion or a fitted solver), or pasted into the workflow; "
                   "refuses a schedule made for another model type.")
    RETURN_TYPES = ("SIGMAS", "SAMPLER")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the model the schedule was searched for (its type "
                                                           "is checked)"}),
                             "path": ("STRING", {"default": "schedule.json", "tooltip": (
                                 "a schedule JSON written by `nimblediff schedule search` (BOSS, AutoDiffusion or "
                                 "--method fit), by name inside ComfyUI's input or output folder (e.g. "
                                 "'schedules/boss4.json'), or a shipped one: "
                                 f"{', '.join(embedded_schedules()) or 'none'}")})},
                "optional": {"schedule_json": ("STRING", {"default": "", "multiline": True,
                                                           "tooltip": "a schedule file's JSON, embedded in the "
                                                                      "workflow; overrides path"})}}

    def load(self, model, path, schedule_json=""):
        from ..core.schedule_search import load_schedule, parse_schedule, sampler_of, warn_if_fitted_elsewhere

        param = param_from_model_sampling(model.get_model_object("model_sampling"))
        if schedule_json.strip():
            data = parse_schedule(schedule_json, param.kind)
        else:
            data = load_schedule(schedule_path(path), param.kind)
        warn_if_fitted_elsewhere(data, param)
        name, options = sampler_of(data)
        return torch.as_tensor(data["sigmas"], dtype=torch.float32), make_sampler(name, **options)


EMBEDDED_SUFFIX = " (embedded)"
SHIPPED_SCHEDULES = Path(__file__).resolve().parents[1] / "weights" / "tiny"


def embedded_schedules() -> list[str]:
    """The schedules shipped beside the small models (weights/tiny/*.json), as `path` names them."""
    return [p.stem + EMBEDDED_SUFFIX for p in sorted(SHIPPED_SCHEDULES.glob("*.json"))]


def comfy_user_folders() -> list[str]:
    """ComfyUI's input and output folders: where a workflow's file names may point (never outside them)."""
    try:
        import folder_paths
    except ImportError:       # outside ComfyUI: no folder a workflow may read from
        return []
    return [f() for f in (getattr(folder_paths, "get_input_directory", None),
                          getattr(folder_paths, "get_output_directory", None)) if f is not None]


def schedule_path(name: str) -> Path:
    """The file a ScheduleFile `path` names: a shipped schedule ('<stem> (embedded)') or a relative name inside
    ComfyUI's input or output folder; '..', absolute and drive paths are refused before the disk is touched."""
    if isinstance(name, str) and name.strip().endswith(EMBEDDED_SUFFIX):
        stem = name.strip()[: -len(EMBEDDED_SUFFIX)]
        if stem + EMBEDDED_SUFFIX not in embedded_schedules():
            raise InvalidParameterError(f"path={name!r}: no such shipped schedule; shipped: "
                                        f"{', '.join(embedded_schedules()) or 'none'}")
        return SHIPPED_SCHEDULES / f"{stem}.json"
    return find_inside(comfy_user_folders(), name, "path", hint=(
        "put the schedule file in ComfyUI's input folder and give its name there, or paste its JSON into "
        "schedule_json"))


NODES = {
    "NimbleFewStepSampler": (FewStepSampler, "NimbleDiff Few-Step Sampler"),
    "NimbleFewStepSchedule": (FewStepSchedule, "NimbleDiff Few-Step Schedule"),
    "NimbleRecipeSampler": (RecipeSampler, "NimbleDiff Recipe Sampler"),
    "NimbleScheduleFile": (ScheduleFile, "NimbleDiff Schedule from File"),
    "NimbleFlowSchedule": (FlowSchedule, "NimbleDiff Flow Schedule (SD3 / Flux shift)"),
}
