"""A diffusers scheduler that drives any NimbleDiff ask/tell sampler from `step()`.

Diffusers pipelines call `set_timesteps` once and `step(model_output, t, sample)` once per model evaluation. This
class converts the model output to the denoised x0 with the core parameterization, sends it to the sampler
generator, and converts the generator's next k-space sample back to the pipeline's sample space. The sampling math
lives only in `nimblediff.core.sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..core import schedules
from ..core.parameterization import VP, Flow, sd_alphas_cumprod
from ..core.sampling import SAMPLER_OPTIONS, SAMPLERS
from ..core.sampling.driver import as_floats
from ..errors import InvalidParameterError


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype), skipping the no-op call: its ~1 µs dispatch, three times a step, is ~10% of a flow Euler step."""
    return x if x.dtype == dtype else x.to(dtype)


@dataclass
class NimbleSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class NimbleScheduler(SchedulerMixin, ConfigMixin):
    """Any NimbleDiff sampler (`sampler=`) on any NimbleDiff schedule (`schedule=`) as a diffusers scheduler.

    `NimbleScheduler(sampler="lcm", schedule="lcm")` is the LCM / Flash Diffusion recipe and matches diffusers'
    `LCMScheduler`; `sampler="tcd"` takes its gamma from `gamma` or from the pipeline's `eta`.
    """

    order = 1
    _compatibles = ["LCMScheduler", "TCDScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                    "DPMSolverMultistepScheduler", "PNDMScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        sampler: str = "lcm",
        schedule: str = "lcm",
        original_inference_steps: int = 50,
        gamma: float = 0.3,
        model_type: str = "vp",
        shift: float = 1.0,
        timestep_scaling: float = 10.0,
        sampler_options: dict | None = None,
        use_dynamic_shifting: bool = False,
        schedule_sigmas: list | None = None,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
    ):
        # the last four are FlowMatchEulerDiscreteScheduler's: FluxPipeline reads them from the config to compute mu
        if sampler not in SAMPLERS:
            raise InvalidParameterError(f"sampler={sampler!r} is unknown; valid: {', '.join(SAMPLERS)}")
        if model_type == "vp":
            acp = sd_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
            # LCM-distilled models include the consistency boundary condition in their output (LCMScheduler does too)
            boundary = timestep_scaling if sampler == "lcm" and timestep_scaling else None
            self.param = VP(acp, prediction_type, consistency_timestep_scaling=boundary)
        elif model_type == "flow":
            self.param = Flow(num_train_timesteps, shift, "sample" if prediction_type == "sample" else "flow")
        else:
            raise InvalidParameterError(f"model_type={model_type!r}; valid: 'vp', 'flow'")
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.sigmas = None
        self.timesteps = None
        self._steps = None
        self._step_index = None
        self._begin_index = None
        self._generator = None
        # noise for stochastic samplers when a pipeline's step() call passes no generator (SD3 and Flux pipelines
        # never do): FewStepDiTMixin sets the call's `generator` here, so a seeded call stays reproducible
        self.default_generator = None

    # --- schedule -------------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu: float | None = None, **_ignored):
        """Steps from a count (with the configured schedule), explicit integer `timesteps`, or explicit k-space
        `sigmas` (a trailing 0 is appended when missing; flow models with use_dynamic_shifting shift them by `mu`
        first, as Flux pipelines expect). Other keyword arguments (`strength`) are ignored."""
        given = [a is not None for a in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise InvalidParameterError(
                "pass exactly one of num_inference_steps, timesteps or sigmas to NimbleScheduler.set_timesteps")
        if timesteps is not None:
            t = [int(v) for v in timesteps]
            if any(b >= a for a, b in zip(t, t[1:])):
                raise InvalidParameterError(f"timesteps must be strictly decreasing; got {t}")
            sig = schedules.sigmas_from_timesteps(self.param, t)
        elif sigmas is not None:
            sig = torch.as_tensor(sigmas, dtype=torch.float32).flatten().cpu()
            if self.param.kind == "flow" and self.config.use_dynamic_shifting:
                # Flux-style resolution-dependent shift, as FlowMatchEulerDiscreteScheduler applies it
                if mu is None:
                    raise InvalidParameterError("use_dynamic_shifting=True needs mu= in set_timesteps (the "
                                                "pipeline computes it from the image size)")
                sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1))
            if float(sig[-1]) != 0:
                sig = torch.cat([sig, sig.new_zeros(1)])
            sig = schedules.check_sigmas(sig)
        else:
            sig = self._named_sigmas(num_inference_steps)
        self.sigmas = sig.to(device)
        self._asked = self._evaluation_sigmas(sig)          # where the sampler will ask for the model
        t = self.param.sigma_to_t(self._asked)
        rounded = t.round()
        self.timesteps = (rounded.long() if (t - rounded).abs().max() < 1e-3 else t).to(device)
        self.num_inference_steps = len(self.timesteps)
        self._steps = None
        self._step_index = None
        self._begin_index = None

    def _options(self) -> dict:
        """The sampler's options: registry defaults, then `gamma`, then `sampler_options` from the config."""
        options = dict(SAMPLER_OPTIONS[self.config.sampler])
        if "gamma" in options:
            options["gamma"] = self.config.gamma
        extra = dict(self.config.sampler_options or {})
        unknown = set(extra) - set(options)
        if unknown:
            raise InvalidParameterError(
                f"sampler_options {sorted(unknown)} are not options of sampler {self.config.sampler!r}; "
                f"valid: {sorted(options)}")
        return {**options, **extra}

    def _evaluation_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Where the sampler will ask for the model, found by a dry run on a scalar (a method with several
        evaluations per step, such as a corrector, asks more than once per sigma interval)."""
        method = SAMPLERS[self.config.sampler]
        options = self._options()
        x = torch.zeros(1, dtype=torch.float64)
        steps = method(x, as_floats(sigmas), param=self.param, noise=lambda a, b: torch.zeros_like(x), **options)
        asked = []
        try:
            _, sigma = next(steps)
            while True:
                asked.append(float(sigma))
                _, sigma = steps.send(torch.zeros_like(x))
        except StopIteration:
            pass
        return torch.tensor(asked, dtype=torch.float64)

    def _named_sigmas(self, steps: int) -> torch.Tensor:
        cfg = self.config
        if cfg.schedule_sigmas:                    # a searched / fitted schedule: its step count is part of it
            if steps != len(cfg.schedule_sigmas) - 1:
                raise InvalidParameterError(
                    f"this scheduler samples a fixed {len(cfg.schedule_sigmas) - 1}-step schedule (from a schedule "
                    f"file); num_inference_steps={steps} does not match it")
            return schedules.check_sigmas(cfg.schedule_sigmas)
        if cfg.schedule == "lcm" and self.param.kind == "vp":
            return schedules.sigmas_from_timesteps(
                self.param, schedules.lcm_timesteps(steps, cfg.num_train_timesteps, cfg.original_inference_steps))
        return schedules.make_sigmas(cfg.schedule, steps, self.param)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The sample as the model's input. Only the first call differs: the start latents are at the schedule's
        first sigma, while a sampler with a time shift (`fitted`, `shifts`) asks the model at another level; the
        model must see the input of that level (later samples are already returned at the asked level)."""
        if self._steps is not None or self.sigmas is None:
            return sample
        begin = self._begin_index or 0
        start = float(self.sigmas[begin])
        asked = float(self._asked[0]) if begin == 0 else float(self._evaluation_sigmas(self.sigmas[begin:].cpu())[0])
        if asked == start:
            return sample
        return self._from_k(self._to_k(sample, start), asked)

    # --- stepping -------------------------------------------------------------------------------------------------

    def _to_k(self, sample, sigma):
        c = self.param.c_in(sigma)
        return sample if c == 1.0 else sample / c        # flow models: the spaces coincide, skip the kernel

    def _from_k(self, x, sigma):
        c = self.param.c_in(sigma)
        return x if c == 1.0 else x * c

    def _noise(self, sigma, sigma_next):
        ref = self._ref
        return randn_tensor(ref.shape, generator=self._generator, device=ref.device, dtype=ref.dtype)

    def _start(self, x_k: torch.Tensor, eta):
        options = self._options()
        if eta is not None and "gamma" in options:
            options["gamma"] = eta        # diffusers pipelines pass TCD's gamma as `eta`
        method = SAMPLERS[self.config.sampler]
        # python floats, as run() hands them: the same scalar arithmetic in every driver, to the last bit
        self._steps = method(x_k, as_floats(self.sigmas[self._begin_index or 0:]), param=self.param,
                             noise=self._noise, **options)
        _, self._sigma = next(self._steps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, eta=None,
             return_dict: bool = True):
        if self.sigmas is None:
            raise InvalidParameterError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        self._generator = generator if generator is not None else self.default_generator
        self._ref = model_output
        dtype = torch.promote_types(sample.dtype, torch.float32)
        sample_up = _cast(sample, dtype)
        if self._steps is None:          # the start latents are at the schedule's first sigma
            x_k = self._to_k(sample_up, float(self.sigmas[self._begin_index or 0]))
            self._start(x_k, eta)
        else:                            # later ones at the level the sampler asked at (_from_k below)
            x_k = self._to_k(sample_up, self._sigma)
        sigma = self._sigma              # where the sampler asked for this evaluation (a python float)
        denoised = self.param.denoised(x_k, sigma, _cast(model_output, dtype))
        try:
            x_next, self._sigma = self._steps.send(denoised)
            prev = self._from_k(x_next, self._sigma)
        except StopIteration as done:
            final = getattr(SAMPLERS[self.config.sampler], "final_sigma", None)
            prev = done.value if final is None else self._from_k(done.value, final(self.sigmas, self.param))
        self._step_index += 1
        prev = _cast(prev, sample.dtype)
        if not return_dict:
            return (prev, denoised)
        return NimbleSchedulerOutput(prev_sample=prev, denoised=denoised)

    @classmethod
    def from_schedule_file(cls, path, **config):
        """The sampler, options and sigmas of a `nimblediff schedule search` file (BOSS, AutoDiffusion or a fitted
        solver, whose weights only make sense with its own sigmas) on the noise schedule in `config` (e.g.
        `**pipe.scheduler.config`); refuses a file made for another model type. Sample with
        num_inference_steps = the file's nfe."""
        from ..core.schedule_search import load_schedule, sampler_of, warn_if_fitted_elsewhere

        config = {k: v for k, v in config.items() if not k.startswith("_")}
        data = load_schedule(path, model_type=config.get("model_type", "vp"))
        sampler, options = sampler_of(data)
        scheduler = cls.from_config({**config, "sampler": sampler, "sampler_options": options,
                                     "schedule_sigmas": data["sigmas"].tolist()})
        warn_if_fitted_elsewhere(data, scheduler.param)
        return scheduler

    def add_noise(self, original_samples, noise, timesteps):
        sigma = self.param.t_to_sigma(timesteps.float().cpu()).to(original_samples.device)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        x_k = self.param.noise_scaling(sigma, noise, original_samples)
        return self._from_k(x_k, sigma).to(original_samples.dtype)

    def __len__(self):
        return self.config.num_train_timesteps
