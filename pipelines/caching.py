"""Diffusers surface of nimblediff.core.caching: one diffusers `ModelHook` on the denoiser (pipe.unet or
pipe.transformer) hands each call and its timestep to the core cache, which patches blocks for that call only.

    from nimblediff.pipelines.caching import enable_nimble_cache, disable_nimble_cache
    enable_nimble_cache(pipe, "deepcache", interval=3)            # UNet: reuse deep features 2 steps in 3
    enable_nimble_cache(pipe, "first_block", threshold=0.1)       # SD3 / Flux transformers
    enable_nimble_cache(pipe, "first_block", schedule="dit-cache.json")   # a schedule searched offline (below)
    enable_nimble_cache(pipe, "prune", config="laptop.json")      # LAPTOP-Diff layer skipping
    disable_nimble_cache(pipe)

Methods: "deepcache" (branch=(block, layer), interval or schedule), "reuse" (paths=[module paths], interval or
schedule: A-SDM feature inheritance at any granularity), "first_block" (threshold, warmup, rule, max_skip, order:
see core/caching/first_block.py; schedule= a CacheSchedule or the path of one saved by search_dit_schedule), "prune"
(config file or skip=[paths]). A failed enable leaves the pipeline as it was.

    search_dit_schedule(pipe, prompts, full_steps=13, path="dit-cache.json", num_inference_steps=25)
runs the pipeline uncached on calibration prompts and saves the searched schedule (core/caching/search.py) that this
module and NimbleDiff First-Block Cache (DiT) both read.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook

from ..core.caching import BlockReuse, CacheSchedule, FirstBlockCache, deepcache_paths, detect_layout
from ..core.caching import prune as laptop
from ..core.caching import search as dit_search
from ..errors import InvalidParameterError

HOOK = "nimblediff_cache"
METHODS = ("deepcache", "reuse", "first_block", "prune")


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
                branch=(0, 0), paths=None, threshold: float = 0.1, warmup: int = 1, rule: str = "accumulated",
                max_skip: int | None = None, order: int = 0):
    """The core cache object for a method (validates everything; touches nothing)."""
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r} is unknown; valid: {', '.join(METHODS)}")
    if method == "first_block":
        detect_layout(model, ("dit",))
        if schedule is not None and not isinstance(schedule, (CacheSchedule, list, tuple)):
            schedule = dit_search.load_schedule(schedule, model)          # a saved JSON's path
        return FirstBlockCache(model, threshold, warmup=warmup, rule=rule, max_skip=max_skip, order=order,
                               schedule=schedule)
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
