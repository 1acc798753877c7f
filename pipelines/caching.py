"""Diffusers surface of nimblediff.core.caching: one diffusers `ModelHook` on the denoiser (pipe.unet or
pipe.transformer) hands each call and its timestep to the core cache, which patches blocks for that call only.

    from nimblediff.pipelines.caching import enable_nimble_cache, disable_nimble_cache
    enable_nimble_cache(pipe, "deepcache", interval=3)            # UNet: reuse deep features 2 steps in 3
    enable_nimble_cache(pipe, "first_block", threshold=0.1)       # SD3 / Flux transformers
    enable_nimble_cache(pipe, "first_block", schedule="dit-cache.json")   # a schedule searched offline (below)
    enable_nimble_cache(pipe, "prune", config="laptop.json")      # LAPTOP-Diff layer skipping
    enable_nimble_cache(pipe, "block_plan", plan="plan.json")     # DiT: searched blocks per step (search_block_plan)
    enable_nimble_cache(pipe, "rettention", keep=0.1, warmup=5)   # SD3: Re-ttention sparse attention
    enable_nimble_cache(pipe, "clear", adapter=TINY_DIT_CLEAR_LORA)  # SD3: CLEAR local window + distilled LoRA
    disable_nimble_cache(pipe)

Methods: "deepcache" (branch=(block, layer), interval or schedule), "reuse" (paths=[module paths], interval or
schedule: A-SDM feature inheritance at any granularity), "first_block" (threshold, warmup, rule, max_skip, order:
see core/caching/first_block.py; schedule= a CacheSchedule or the path of one saved by search_dit_schedule), "prune"
(config file or skip=[paths]), "rettention" (keep, warmup, refresh, reshape, block: see
core/caching/sparse_attention.py; SD3 transformers, their joint-attention processors are swapped and disable puts
the originals back). A failed enable leaves the pipeline as it was.

    search_dit_schedule(pipe, prompts, full_steps=13, path="dit-cache.json", num_inference_steps=25)
runs the pipeline uncached on calibration prompts and saves the searched schedule (core/caching/search.py) that this
module and NimbleDiff First-Block Cache (DiT) both read.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..core.caching import BlockReuse, CacheSchedule, FirstBlockCache, Rettention, deepcache_paths, detect_layout
from ..core.caching import sparse_attention as rettention
from ..core.caching import prune as laptop
from ..core.caching import search as dit_search
from ..errors import InvalidParameterError

HOOK = "nimblediff_cache"
METHODS = ("deepcache", "reuse", "first_block", "prune", "rettention")
SPARSE_OPTIONS = ("keep", "warmup", "refresh", "reshape", "block")


class _CacheHook(ModelHook):
    """Passes (forward, timestep, args) to the core cache; diffusers' reset_stateful_hooks resets it."""

    _is_stateful = True

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[1]
        return self.cache(self.fn_ref.original_forward, t, *args, **kwargs)

    def reset_state(self, module):
        self.cache.reset()
        return module


class RettentionProcessor:
    """diffusers' JointAttnProcessor2_0 (SD3 / SD3.5 joint and dual attention) with its one SDPA call handed to the
    core Re-ttention state; `layer` (the attention module's path) keys the recorded statistics."""

    def __init__(self, state: Rettention, layer: str):
        self.state, self.layer = state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x, norm=None):                                   # (B, N, H*D) -> (B, H, N, D)
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        if encoder_hidden_states is not None:                      # diffusers joins image, then text
            q = torch.cat([q, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2)
            k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], 2)
        # sparse steps see text first, as ComfyUI's MMDiT joins them, so both surfaces form the same query blocks
        # (dense attention does not care about the order; keep=1 stays diffusers' own call, bit for bit)
        swap = encoder_hidden_states is not None and self.state.keep < 1
        if swap:
            q, k, v = (torch.cat([x[:, :, n_img:], x[:, :, :n_img]], 2) for x in (q, k, v))
        out = self.state.attend(q, k, v, self.layer)               # (B, H, N, D)
        if swap:
            out = torch.cat([out[:, :, -n_img:], out[:, :, :-n_img]], 2)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        if encoder_hidden_states is not None:
            out, enc = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                enc = attn.to_add_out(enc)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, enc) if encoder_hidden_states is not None else out


def _joint_processors(model) -> list[str]:
    """Names of the model's JointAttnProcessor2_0 processors; an SD3 model without any (a user's own processors)
    raises naming what it has."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    rettention.check_model(model)
    processors = model.__dict__.get("_nimble_processors") or model.attn_processors   # an enable replacing ours
    joint = [name for name, p in processors.items() if isinstance(p, JointAttnProcessor2_0)]
    if not joint:
        raise InvalidParameterError(f"{type(model).__name__} has no JointAttnProcessor2_0 attention (its processors: "
                                    f"{', '.join(sorted({type(p).__name__ for p in processors.values()}))}); "
                                    "Re-ttention replaces that processor only")
    return joint


def _install_rettention(model, state: Rettention) -> dict:
    """Swap every JointAttnProcessor2_0 for a RettentionProcessor; returns the original processors (by name)."""
    original = dict(model.attn_processors)
    joint = set(_joint_processors(model))
    model.set_attn_processor({name: RettentionProcessor(state, name.rsplit(".processor", 1)[0]) if name in joint
                              else p for name, p in original.items()})
    return original


class _PruneHandle:
    def __init__(self, patch, skip):
        self.patch, self.skip = patch, skip

    def reset(self):
        pass


def denoiser_of(pipe):
    """pipe.unet or pipe.transformer (or the model itself when a model is given)."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    return pipe


def build_cache(model, method: str, *, steps: int | None = None, interval: int | None = None, schedule=None,
                branch=(0, 0), paths=None, threshold: float = 0.1, warmup: int | None = None,
                rule: str = "accumulated", max_skip: int | None = None, order: int = 0, **sparse):
    """The core cache object for a method (validates everything; touches nothing). sparse: Rettention's options
    (keep, warmup, refresh, reshape, block) for method="rettention"."""
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    unknown = sorted(set(sparse) - set(SPARSE_OPTIONS if method == "rettention" else ()))
    if unknown:
        raise InvalidParameterError(f"{', '.join(unknown)}: not an option of method={method!r}"
                                    + (f"; valid: {', '.join(SPARSE_OPTIONS)}" if method == "rettention" else ""))
    if method == "rettention":
        _joint_processors(model)
        return Rettention(**sparse) if warmup is None else Rettention(warmup=warmup, **sparse)
    if method == "first_block":
        detect_layout(model, ("dit",))
        if schedule is not None and not isinstance(schedule, (CacheSchedule, list, tuple)):
            schedule = dit_search.load_schedule(schedule, model)          # a saved JSON's path
        return FirstBlockCache(model, threshold, warmup=1 if warmup is None else warmup, rule=rule,
                               max_skip=max_skip, order=order, schedule=schedule)
    if schedule is None:
        schedule = CacheSchedule.parse(interval if interval is not None else 3, steps)
    if method == "deepcache":
        if not isinstance(branch, (tuple, list)) or len(branch) != 2:
            raise InvalidParameterError(f"branch={branch!r}: need (block, layer), e.g. (0, 0) for the shallowest")
        paths = deepcache_paths(model, *branch)
    else:
        detect_layout(model)
        if not paths:
            raise InvalidParameterError("method='reuse' needs paths=[module paths], e.g. ['up_blocks.1']")
    return BlockReuse(model, paths, schedule)


def enable_nimble_cache(pipe, method: str = "deepcache", *, config=None, skip=None, **options):
    """Patch the pipeline's denoiser; returns the core cache (its .full_calls / .reused_calls count model calls).
    options: see build_cache. Calling again replaces the previous cache."""
    model = denoiser_of(pipe)
    if method == "block_plan":                            # AutoDiffusion's per-step, per-block plan (below)
        return _enable_block_plan(pipe, model, **options)
    if method == "clear":                                 # CLEAR local-window attention (+ its LoRA), below
        return _enable_clear(pipe, model, **options)
    if method == "prune":
        paths = laptop.load_config(config, model) if config is not None else list(skip or [])
        if not paths:
            raise InvalidParameterError("method='prune' needs config= (a layer-pruning JSON) or skip=[paths]")
        detect_layout(model)
        laptop.resolve(model, paths)
        disable_nimble_cache(pipe)
        handle = _PruneHandle(laptop.apply_pruning(model, paths), paths)
        model._nimble_prune = handle
        return handle
    cache = build_cache(model, method, **options)        # raises before the model changes
    disable_nimble_cache(pipe)
    if method == "rettention":
        model._nimble_processors = _install_rettention(model, cache)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(cache), HOOK)
    return cache


def disable_nimble_cache(pipe) -> None:
    model = denoiser_of(pipe)
    registry = getattr(model, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK) is not None:
        registry.remove_hook(HOOK, recurse=False)
    handle = model.__dict__.pop("_nimble_prune", None)
    if handle is not None:
        handle.patch.remove()
    processors = model.__dict__.pop("_nimble_processors", None)
    if processors is not None:
        model.set_attn_processor(processors)
    adapter = model.__dict__.pop("_nimble_clear_adapter", None)
    if adapter is not None:                               # CLEAR's attention LoRA goes with its window
        _remove_adapter(model, adapter)


class NimbleCacheMixin:
    """pipe.enable_nimble_cache(...) / pipe.disable_nimble_cache() for pipeline classes that mix this in."""

    def enable_nimble_cache(self, method: str = "deepcache", **options):
        return enable_nimble_cache(self, method, **options)

    def disable_nimble_cache(self):
        disable_nimble_cache(self)


def search_dit_schedule(pipe, prompts, full_steps: int, *, warmup: int = 1, path=None, seed: int = 0, **call):
    """Offline search (core/caching/search.py): the pipeline runs uncached on `prompts` (one generator seed each,
    from `seed`), the blocks' residual change is profiled per step, and the `full_steps` steps to compute are chosen
    by dynamic programming. Returns (CacheSchedule, profile); saves the JSON at `path` when given. call: pipeline
    arguments (num_inference_steps, guidance_scale, ...)."""
    import torch

    model = denoiser_of(pipe)
    detect_layout(model, ("dit",))
    profile = dit_search.ResidualProfile(model)
    disable_nimble_cache(pipe)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(profile), HOOK)
    try:
        for i, prompt in enumerate(prompts):
            profile.reset()
            pipe(prompt, generator=torch.Generator().manual_seed(seed + i), output_type="latent", **call)
    finally:
        disable_nimble_cache(pipe)
    changes = profile.profile()
    schedule = dit_search.search_schedule(changes, full_steps, warmup)
    if path is not None:
        dit_search.save_schedule(path, schedule, len(dit_search.dit_block_paths(model)), warmup=warmup,
                                 profile=[round(c, 6) for c in changes], prompts=list(prompts),
                                 cost=dit_search.staleness(changes, schedule.compute))
    return schedule, changes


# ---------------------------------------------------------------------------------------- block plans (AutoDiffusion)
METHODS = METHODS + ("block_plan",)


def block_plan_cache(model, plan):
    """core BlockPlanCache for a DiT: `plan` a BlockPlan or the path of a saved one (refused when made for another
    model family or block count)."""
    from ..core.caching import block_search

    detect_layout(model, ("dit",))
    if plan is None:
        raise InvalidParameterError("method='block_plan' needs plan= (a BlockPlan or the path of a plan JSON from "
                                    "search_block_plan / `nimblediff cache plan-search`)")
    if not isinstance(plan, block_search.BlockPlan):
        plan = block_search.load_plan(plan, model)
    return block_search.BlockPlanCache(model, plan)


def _enable_block_plan(pipe, model, plan=None, **rest):
    if rest:
        raise InvalidParameterError(f"{', '.join(sorted(rest))}: method='block_plan' takes plan= only")
    cache = block_plan_cache(model, plan)                 # raises before the model changes
    disable_nimble_cache(pipe)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(cache), HOOK)
    return cache


def plan_sigmas(pipe, plan) -> list[float]:
    """The `sigmas=` to call the pipeline with so that its scheduler steps through a jointly searched plan's noise
    levels: the stock FlowMatchEulerDiscreteScheduler shifts the sigmas it is given (shift s: s x / (1 + (s - 1) x)),
    so they are un-shifted here; a NimbleScheduler takes them as they are.

        cache = enable_nimble_cache(pipe, "block_plan", plan="plan.json")
        pipe(prompt, sigmas=plan_sigmas(pipe, cache.plan), ...)"""
    from ..core.caching import block_search

    if not isinstance(plan, block_search.BlockPlan):
        plan = block_search.load_plan(plan, denoiser_of(pipe))
    if plan.sigmas is None:
        raise InvalidParameterError(f"this plan has no sigmas (searched for the blocks only); call the pipeline with "
                                    f"num_inference_steps={plan.steps} instead")
    from .schedulers import NimbleScheduler

    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting", False):
        raise InvalidParameterError(f"{type(pipe.scheduler).__name__} uses dynamic (resolution-dependent) shifting; "
                                    "a plan's sigmas need a fixed shift (SD3's scheduler config)")
    sigmas = list(plan.sigmas[:-1])
    if isinstance(pipe.scheduler, NimbleScheduler):
        return sigmas
    s = float(config.get("shift", 1.0))
    return [x / (s - (s - 1) * x) for x in sigmas]


def search_block_plan(pipe, prompts, budget: float, *, path=None, seed: int = 7000, search_sigmas: bool = False,
                      reference_steps: int | None = None, init=(), profile: bool = True, warmup: int = 1,
                      population: int = 12, generations: int = 8, search_seed: int = 0, progress=None, **call):
    """AutoDiffusion's joint step + block search on a DiT pipeline (core/caching/block_search.py): the uncached
    pipeline's final latents on `prompts` (fixed noise: generator seed + i for prompt i) at `reference_steps`
    (default: the same num_inference_steps, i.e. what the cache should reproduce; give more with search_sigmas)
    are the reference; a plan's fitness is the latent MSE of the pipeline following it. `budget`: the share of
    steps x blocks evaluations a plan may use. `init`: plans (or per-step CacheSchedules) for the first population;
    profile=True adds block_search.allocate_plan's plan (each block's residual change profiled on the uncached run,
    the budget split over blocks by dynamic programming; the first `warmup` steps compute every block).
    Returns search_plan's dict; saves the JSON at `path` (read by enable_nimble_cache(pipe, "block_plan", plan=path)
    and NimbleDiff Block Plan (DiT)). call: pipeline arguments (num_inference_steps required, guidance_scale, ...)."""
    import torch

    from ..core.caching import block_search

    model = denoiser_of(pipe)
    detect_layout(model, ("dit",))
    steps = call.pop("num_inference_steps", None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"num_inference_steps={steps!r}: the plan's step count is required (int >= 1)")
    n = len(block_search.dit_block_paths(model))
    prompts = list(prompts)
    call = {k: v for k, v in call.items() if k not in ("generator", "output_type", "sigmas")}

    def run(k, sigmas=None):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        bars = dict(getattr(pipe, "_progress_bar_config", {}))     # no bar per evaluation; the caller's kept
        pipe.set_progress_bar_config(**{**bars, "disable": True})
        try:
            with torch.no_grad():
                return pipe(prompts, num_inference_steps=k, generator=gens, output_type="latent",
                            **({"sigmas": sigmas} if sigmas is not None else {}), **call).images
        finally:
            pipe._progress_bar_config = bars

    disable_nimble_cache(pipe)
    init = [p if isinstance(p, block_search.BlockPlan) else block_search.BlockPlan.from_schedule(p, n) for p in init]
    profiler = block_search.BlockProfile(model) if profile else None
    profiled = _profile_run(pipe, model, profiler, lambda: run(steps)) if profiler is not None else None
    # the profiled run computes every block: it is the reference when that has the plan's step count
    reference = profiled if profiled is not None and (reference_steps or steps) == steps \
        else run(reference_steps or steps)
    if profiler is not None:
        total = block_search.budget_cells(steps, n, budget)
        init.append(block_search.allocate_plan(profiler.profile(), total, min(warmup, total // n)))
    start = None
    if search_sigmas:                                     # the scheduler's own K-step sigmas start the search
        pipe.scheduler.set_timesteps(steps)
        start = [float(s) for s in pipe.scheduler.sigmas]

    def evaluate(plan):
        _enable_block_plan(pipe, model, plan)
        try:
            return block_search.latent_mse(run(steps, plan_sigmas(pipe, plan) if plan.sigmas else None), reference)
        finally:
            disable_nimble_cache(pipe)

    result = block_search.search_plan(evaluate, steps, n, budget, population=population, generations=generations,
                                      seed=search_seed, init=init, sigmas=start, search_sigmas=search_sigmas,
                                      progress=progress)
    if path is not None:
        block_search.save_plan(path, result["plan"], model, budget=budget, error=result["error"],
                               fitness="latent MSE to the uncached pipeline", reference_steps=reference_steps or steps,
                               prompts=prompts, seed=seed, search_seed=search_seed, population=population,
                               generations=generations, history=result["history"])
    return result


def _profile_run(pipe, model, profiler, run):
    """run() with the block profile hooked on the denoiser (every block computes)."""
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(profiler), HOOK)
    try:
        return run()
    finally:
        disable_nimble_cache(pipe)


# ---------------------------------------------------------------------------------------- CLEAR local attention
METHODS = METHODS + ("clear",)
CLEAR_ADAPTER = "nimblediff_clear"


def _enable_clear(pipe, model, radius=None, adapter=None, **rest):
    """CLEAR on an SD3 transformer: every JointAttnProcessor2_0 attends within a window of `radius` image tokens
    (core/caching/local_attention.py), and `adapter` (a LoRA distilled for that window by `python -m
    nimblediff.tiny.train_dit --stage clear`) is loaded with diffusers' own LoRA loader. radius defaults to the
    adapter's. Returns the core LocalAttention (its flops_kept). A failed enable leaves the pipeline as it was."""
    import warnings

    from ..core.caching.local_attention import LocalAttention
    from ..weights.clear import read_clear_adapter

    if rest:
        raise InvalidParameterError(f"{', '.join(sorted(rest))}: method='clear' takes radius= and adapter= only")
    state, meta = read_clear_adapter(adapter) if adapter is not None else ({}, {})
    trained = float(meta["radius"]) if "radius" in meta else None
    if radius is None:
        if trained is None:
            raise InvalidParameterError("method='clear' needs radius= (window radius in image tokens) or an adapter= "
                                        "whose metadata names the radius it was distilled for")
        radius = trained
    elif trained is not None and float(radius) != trained:
        warnings.warn(f"CLEAR adapter {adapter} was distilled for radius {trained:g}; running it at radius {radius}",
                      stacklevel=3)
    local = LocalAttention(radius, int(model.config.get("patch_size", 2)))       # raises on a bad radius
    _joint_processors(model)                                                     # raises for other models
    disable_nimble_cache(pipe)
    if state:
        active = list(model.active_adapters()) if getattr(model, "peft_config", None) else []
        try:
            model.load_lora_adapter({k: v.float() for k, v in state.items()}, prefix="transformer",
                                    adapter_name=CLEAR_ADAPTER)
            if active:                                    # loading makes ours the only active one: keep the user's
                model.set_adapters(active + [CLEAR_ADAPTER])
        except Exception:
            if CLEAR_ADAPTER in getattr(model, "peft_config", {}):
                _remove_adapter(model, CLEAR_ADAPTER)
            raise
        model._nimble_clear_adapter = CLEAR_ADAPTER
    model._nimble_processors = _install_rettention(model, local)  # Re-ttention's processor, our state
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_CacheHook(local), HOOK)
    return local


def _remove_adapter(model, name):
    """Delete a LoRA we loaded; the last adapter on the model takes PEFT's wrapper layers with it (the model's own
    modules back), others' adapters stay."""
    if set(getattr(model, "peft_config", {})) <= {name}:
        model.unload_lora()
    else:
        model.delete_adapters(name)


def load_clear(pipe, path, radius=None):
    """enable_nimble_cache(pipe, "clear", adapter=path, radius=radius): the CLEAR LoRA plus its window."""
    return enable_nimble_cache(pipe, "clear", adapter=path, radius=radius)
