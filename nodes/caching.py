"""Caching nodes: a MODEL in, a patched MODEL out (a clone; the input MODEL is untouched). The patch is a ComfyUI
model function wrapper (ModelPatcher.set_model_unet_function_wrapper) that hands each model call, its step index
(from transformer_options["sample_sigmas"]) and its cond/uncond stream to nimblediff.core.caching, which patches
the diffusion model's blocks for that call only. Composes with LoRA patches and any sampler; a wrapper already on
the MODEL is kept and called inside ours."""

from __future__ import annotations

from ..core.caching import BlockReuse, CacheSchedule, FirstBlockCache, Rettention, deepcache_paths, detect_layout
from ..core.caching import sparse_attention
from ..core.caching import prune as laptop
from ..core.caching import search as dit_search
from ..errors import InvalidParameterError
from ..weights.paths import find_inside
from .sampling import comfy_user_folders


def _step_of(timestep, options) -> int | None:
    """The step index: where this call's sigma sits in the sampler's sigma list."""
    sigmas = options.get("sample_sigmas")
    if sigmas is None:
        return None
    t = float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") else float(timestep)
    return int((sigmas.float() - t).abs().argmin())


def _wrap(model, run):
    """Clone `model` and install a function wrapper calling run(apply, args) around any existing wrapper."""
    m = model.clone()
    previous = m.model_options.get("model_function_wrapper")

    def inner(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(lambda apply_model, args: run(lambda a: inner(apply_model, a), args))
    return m


def diffusion_model_of(model):
    return model.get_model_object("diffusion_model")


class DeepCacheModel:
    """Feature inheritance / DeepCache: on off-steps the deep blocks return their features from the last full step
    and only the shallow branch runs. Full steps: the first `full_first`, the last `full_last`, and every
    `interval`-th step between (A-SDM's non-uniform mode; full_first 1 and full_last 0 = DeepCache's uniform)."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("DeepCache / feature inheritance: on off-steps the deep UNet blocks reuse their features from "
                   "the last full step and only the shallow branch runs; fewer model FLOPs per image.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a UNet model (a patched copy is returned)"}),
            "interval": ("INT", {"default": 3, "min": 1, "max": 50,
                                 "tooltip": "compute the deep blocks every N-th step; 1 = no reuse"}),
            "branch_block": ("INT", {"default": 0, "min": 0, "max": 8,
                                     "tooltip": "shallow branch level kept live (0 = outermost, fastest)"}),
            "branch_layer": ("INT", {"default": 0, "min": 0, "max": 8,
                                     "tooltip": "layer inside the branch level (0 = fewest live layers)"}),
            "full_first": ("INT", {"default": 1, "min": 1, "max": 50,
                                   "tooltip": "first steps always computed in full (layout forms early)"}),
            "full_last": ("INT", {"default": 0, "min": 0, "max": 50,
                                  "tooltip": "last steps always computed in full (fine detail)"}),
        }}

    def patch(self, model, interval, branch_block, branch_layer, full_first=1, full_last=0):
        unet = diffusion_model_of(model)
        paths = deepcache_paths(unet, branch_block, branch_layer)          # raises for an unknown model type
        CacheSchedule.edges(max(interval, full_first, full_last, 1), interval, full_first, full_last)  # validate
        cache = BlockReuse(unet, paths, CacheSchedule(interval=1))

        def run(call, args):
            sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
            if sigmas is not None and _step_of(args["timestep"], args["c"]["transformer_options"]) == 0:
                steps = max(len(sigmas) - 1, 1)        # a new run: the schedule needs its step count
                cache.schedule = CacheSchedule.edges(steps, min(interval, steps), min(full_first, steps),
                                                     min(full_last, steps))
            return _cache_call(cache, call, args)
        return (_wrap(model, run),)


def _cache_call(cache, call, args):
    """One model call through a core cache: its step index from the sampler's sigmas, cond / uncond as the stream."""
    options = args["c"].get("transformer_options", {})
    step = _step_of(args["timestep"], options)
    stream = tuple(args.get("cond_or_uncond") or ())
    return cache(lambda x: call(dict(args, input=x)), args["timestep"], args["input"], stream=stream, step=step)


class FirstBlockCacheModel:
    """First-block-residual cache for DiT MODELs (ComfyUI's SD3 MMDiT, e.g. from NimbleDiff Diffusers DiT Loader):
    every step runs the first joint block; while the accumulated relative change of its residual stays under
    `threshold`, the other blocks are skipped and their residual from the last full step is added. The decision is
    nimblediff.core.caching.FirstBlockCache, the same object `enable_nimble_cache(pipe, "first_block")` uses."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("First-block cache for DiTs (SD3 MMDiT): run the first block every step and skip the rest while "
                   "the accumulated change of its residual stays under the threshold; same rule as the diffusers "
                   "pipelines' enable_nimble_cache('first_block').")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a DiT model (ComfyUI's SD3 MMDiT); a patched copy is returned"}),
            "threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "skip while the summed relative change of the first block's residual stays under this; 0 = never "
                "skip, higher = faster and further from the uncached image")}),
            "warmup": ("INT", {"default": 5, "min": 1, "max": 100,
                               "tooltip": "first steps always computed in full (the layout forms early)"}),
            "max_skip": ("INT", {"default": 0, "min": 0, "max": 100,
                                 "tooltip": "at most this many skipped steps in a row; 0 = no cap"}),
            "rule": (list(FirstBlockCache.RULES), {"default": "accumulated", "tooltip": (
                "accumulated: sum the change step to step (TeaCache); reference: change against the last full "
                "step, as diffusers' FirstBlockCache")}),
            "order": ("INT", {"default": 0, "min": 0, "max": 1, "tooltip": (
                "0: reuse the skipped blocks' last residual; 1: extrapolate it linearly from the last two full "
                "steps")}),
        }, "optional": {
            "schedule_file": ("STRING", {"default": "", "tooltip": (
                "optional: a DiT cache schedule JSON searched offline (pipelines.caching.search_dit_schedule or "
                "bench/compute.py), by name inside ComfyUI's input or output folder; its steps compute, the others "
                "skip every block, and threshold / rule are not used. Empty = decide by the threshold")}),
        }}

    def patch(self, model, threshold, warmup, max_skip=0, rule="accumulated", order=0, schedule_file=""):
        dit = diffusion_model_of(model)
        schedule = None
        if schedule_file:
            dit_search.dit_block_paths(dit)                                 # an unknown model type is named first
            path = find_inside(comfy_user_folders(), schedule_file, "schedule_file",
                               hint="put the schedule JSON in ComfyUI's input folder and give its name there")
            schedule = dit_search.load_schedule(path, dit)                  # refuses another block count
        # raises naming the model type (e.g. a UNet or ComfyUI's Flux) before anything is cloned or patched
        cache = FirstBlockCache(dit, threshold, warmup=warmup, rule=rule, max_skip=max_skip or None, order=order,
                                schedule=schedule)

        def run(call, args):
            sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
            if schedule is not None and sigmas is not None and len(sigmas) - 1 != len(schedule.compute):
                raise InvalidParameterError(
                    f"schedule_file {schedule_file!r} was searched for {len(schedule.compute)} steps, the sampler "
                    f"runs {len(sigmas) - 1}: set steps to {len(schedule.compute)} or search a schedule for "
                    f"{len(sigmas) - 1}")
            return _cache_call(cache, call, args)
        patched = _wrap(model, run)
        patched.model_options["model_function_wrapper"].cache = cache   # .decisions / .full_calls, for inspection
        return (patched,)


class SkipLayersModel:
    """LAPTOP-Diff layer skipping: the layers named in a pruning config (`nimblediff` layer-prune JSON made for
    this architecture) pass their input through. Training-free preview of a pruned model."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("LAPTOP-Diff layer skipping: the layers named in a layer-prune JSON pass their input through, a "
                   "training-free preview of the pruned model.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the model whose layers the config names (a patched copy "
                                       "is returned)"}),
            "config_path": ("STRING", {"default": "", "tooltip": (
                "a layer-prune JSON (bench/compute.py or nimblediff.core.caching.prune.save_config), by name inside "
                "ComfyUI's input or output folder, e.g. 'prune/tiny-skip.json'")}),
        }}

    def patch(self, model, config_path):
        if not config_path:
            raise InvalidParameterError("config_path is empty: give a layer-prune JSON file")
        unet = diffusion_model_of(model)
        detect_layout(unet)
        path = find_inside(comfy_user_folders(), config_path, "config_path",
                           hint="put the layer-prune JSON in ComfyUI's input folder and give its name there")
        skip = laptop.load_config(path, unet)                             # refuses another architecture

        def run(call, args):
            with laptop.ModelPatch(unet, {p: laptop.identity for p in skip}):
                return call(args)
        return (_wrap(model, run),)


class SparseAttentionModel:
    """Re-ttention sparse attention for DiT MODELs (ComfyUI's SD3 MMDiT): after `warmup` dense steps each query block
    attends to the top `keep` share of keys, and the softmax mass of the dropped keys is restored from statistics
    recorded at the last dense step (nimblediff.core.caching.Rettention, the object enable_nimble_cache(pipe,
    "rettention") uses). Installed as ComfyUI's transformer_options["optimized_attention_override"] (the hook
    comfy.ldm.modules.attention.wrap_attn calls) plus a model function wrapper that tells the state the step and
    the cond / uncond stream. An attention override already on the MODEL still serves dense and masked calls."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("Re-ttention sparse attention for DiTs (SD3 MMDiT): after the dense warm-up steps, attention uses "
                   "only the top share of keys and restores the dropped softmax mass from statistics kept from the "
                   "last dense step; fewer attention FLOPs per step. Same rule as the diffusers pipelines' "
                   "enable_nimble_cache('rettention').")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a DiT model (ComfyUI's SD3 MMDiT); a patched copy is returned"}),
            "keep": ("FLOAT", {"default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                "share of keys each query block attends to on sparse steps; 1 = dense attention, lower = fewer "
                "attention FLOPs and further from the dense image")}),
            "warmup": ("INT", {"default": 3, "min": 1, "max": 100, "tooltip": (
                "first steps computed with dense attention; they choose the kept keys and record the statistics")}),
            "refresh": ("INT", {"default": 5, "min": 0, "max": 100, "tooltip": (
                "after the warm-up, one dense step in every N re-records the statistics; 0 = never")}),
            "reshape": ("BOOLEAN", {"default": True, "tooltip": (
                "restore the dropped keys' softmax mass and contribution from the recorded statistics (Re-ttention); "
                "off = plain renormalised top-k sparse attention")}),
        }, "optional": {
            "block": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": (
                "consecutive query tokens that share one set of kept keys; 1 = per-query top-k")}),
        }}

    def patch(self, model, keep, warmup, refresh=5, reshape=True, block=16):
        # raises naming the model type (a UNet, ComfyUI's Flux) or the bad value before anything is cloned
        sparse_attention.check_model(diffusion_model_of(model))
        state = Rettention(keep, warmup, refresh, reshape=reshape, block=block)
        return (_attention_patch(model, state),)


def _attention_patch(model, state):
    """Clone `model` with its attention calls handed to a core attention state (Rettention, LocalAttention):
    ComfyUI's transformer_options["optimized_attention_override"] (the hook comfy.ldm.modules.attention.wrap_attn
    calls) plus a model function wrapper that gives the state each call's latent, step and cond / uncond stream."""
    patched = _wrap(model, lambda call, args: _cache_call(state, call, args))
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get("optimized_attention_override")

    def override(func, q, k, v, heads, *args, mask=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
        def dense():
            if previous is not None:
                return previous(func, q, k, v, heads, *args, mask=mask, skip_reshape=skip_reshape,
                                skip_output_reshape=skip_output_reshape, **kwargs)
            return func(q, k, v, heads, *args, mask=mask, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        if mask is not None or args:              # masked (or positional extras): not a joint attention call
            return dense()
        b = q.shape[0]
        d = q.shape[-1] if skip_reshape else q.shape[-1] // heads
        qh, kh, vh = (x if skip_reshape else x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
        def dense_bhnd():                         # ComfyUI's own attention, (B, H, N, D)
            out = dense()
            return out if skip_output_reshape else out.reshape(b, -1, heads, d).transpose(1, 2)
        out = state.attend(qh, kh, vh, state.next_layer(), dense=dense_bhnd)     # (B, H, N, D)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)

    options["optimized_attention_override"] = override
    override.state = patched.model_options["model_function_wrapper"].state = state   # for inspection
    return patched


NODES = {
    "NimbleDiffDeepCache": (DeepCacheModel, "NimbleDiff DeepCache / Feature Inheritance"),
    "NimbleDiffFirstBlockCache": (FirstBlockCacheModel, "NimbleDiff First-Block Cache (DiT)"),
    "NimbleDiffSkipLayers": (SkipLayersModel, "NimbleDiff Skip Layers (LAPTOP)"),
    "NimbleDiffSparseAttention": (SparseAttentionModel, "NimbleDiff Sparse Attention (Re-ttention)"),
}


class BlockPlanModel:
    """AutoDiffusion's searched blocks per step for DiT MODELs (ComfyUI's SD3 MMDiT): at each sampler step the joint
    blocks a plan file marks compute; any other block adds the residual it produced at the last step it computed. The
    plan is the JSON `nimblediff cache plan-search` / pipelines.caching.search_block_plan write, followed by
    nimblediff.core.caching.BlockPlanCache, the object enable_nimble_cache(pipe, "block_plan") uses. SIGMAS: the
    plan's searched noise levels, or without them the model's "normal" schedule for the plan's step count."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("Block plan for DiTs (SD3 MMDiT), AutoDiffusion's architecture search: per sampler step only the "
                   "blocks a searched plan file names compute, the others reuse their residual from the last step "
                   "they ran. Connect SIGMAS to SamplerCustom for a plan searched jointly with its steps.")
    RETURN_TYPES = ("MODEL", "SIGMAS")
    RETURN_NAMES = ("model", "sigmas")
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a DiT model (ComfyUI's SD3 MMDiT); a patched copy is returned"}),
            "plan_file": ("STRING", {"default": "", "tooltip": (
                "a block plan JSON (`nimblediff cache plan-search`), by name inside ComfyUI's input or output "
                "folder; made for this model's block count, sampled with its number of steps")}),
        }}

    def patch(self, model, plan_file):
        from ..core.caching import block_search

        if not plan_file:
            raise InvalidParameterError("plan_file is empty: give a block plan JSON (nimblediff cache plan-search)")
        dit = diffusion_model_of(model)
        block_search.model_family(dit)                                  # an unknown model type is named first
        path = find_inside(comfy_user_folders(), plan_file, "plan_file",
                           hint="put the plan JSON in ComfyUI's input folder and give its name there")
        plan = block_search.load_plan(path, dit)                        # refuses another family or block count
        cache = block_search.BlockPlanCache(dit, plan)

        def run(call, args):
            sigmas = args["c"].get("transformer_options", {}).get("sample_sigmas")
            if sigmas is not None and len(sigmas) - 1 != plan.steps:
                raise InvalidParameterError(
                    f"plan_file {plan_file!r} was searched for {plan.steps} steps, the sampler runs "
                    f"{len(sigmas) - 1}: set steps to {plan.steps} (or use this node's SIGMAS) or search a plan "
                    f"for {len(sigmas) - 1}")
            return _cache_call(cache, call, args)
        patched = _wrap(model, run)
        patched.model_options["model_function_wrapper"].cache = cache   # .decisions, for inspection
        return patched, _plan_sigmas(model, plan)


def _plan_sigmas(model, plan):
    import torch

    if plan.sigmas is not None:
        return torch.tensor(plan.sigmas, dtype=torch.float32)
    try:
        from comfy.samplers import calculate_sigmas
    except ImportError:                                                 # outside ComfyUI (stub tests): none
        return None
    return calculate_sigmas(model.get_model_object("model_sampling"), "normal", plan.steps).cpu()


NODES["NimbleDiffBlockPlan"] = (BlockPlanModel, "NimbleDiff Block Plan (DiT)")


CLEAR_EMBEDDED = "nimblediff-tiny-dit-clear (embedded)"
CLEAR_NONE = "none (window only)"


def _clear_adapter_path(name: str):
    """The file of a CLEAR adapter choice: the embedded one, none, or a LoRA in models/loras."""
    from .adapters import lora_path

    if name == CLEAR_NONE:
        return None
    if name == CLEAR_EMBEDDED:
        from .. import TINY_DIT_CLEAR_LORA

        return TINY_DIT_CLEAR_LORA
    return lora_path(name)


class ClearLocalAttentionModel:
    """CLEAR (Liu et al. 2024) for DiT MODELs (ComfyUI's SD3 MMDiT): every image query attends only to the image
    tokens within `radius` of its own position (and to all text tokens; text queries keep full attention), with the
    attention LoRA distilled for that window applied through ComfyUI's own weight patches (NimbleDiff's LoRA loader,
    nodes/adapters.py). The window is nimblediff.core.caching.local_attention.LocalAttention, the object
    enable_nimble_cache(pipe, "clear") uses, installed as transformer_options["optimized_attention_override"]."""

    CATEGORY = "NimbleDiff/caching"
    DESCRIPTION = ("CLEAR local-window attention for DiTs (SD3 MMDiT): each image token attends only to the image "
                   "tokens within a radius of it plus all text tokens, with the attention-layer LoRA distilled from "
                   "the full model for that window. Same rule and adapter as the diffusers pipelines' "
                   "enable_nimble_cache('clear', adapter=...).")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        from .adapters import lora_choices

        choices = [CLEAR_EMBEDDED, CLEAR_NONE] + [c for c in lora_choices() if "(embedded)" not in c]
        return {"required": {
            "model": ("MODEL", {"tooltip": "a DiT model (ComfyUI's SD3 MMDiT); a patched copy is returned"}),
            "adapter": (choices, {"tooltip": (
                "the attention LoRA distilled for the window (nimblediff.tiny.train_dit --stage clear): the embedded "
                "one is for NimbleDiff-Tiny-DiT at radius 2 on its 8x8 token grid (64x64 images); 'none' = the "
                "window alone, untrained (further from the full model)")}),
            "radius": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip": (
                "window radius in image tokens (latent patches), Euclidean; use the radius the adapter was "
                "distilled for; a radius past the grid diagonal = full attention")}),
        }, "optional": {
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": (
                "strength of the attention LoRA (1 = as distilled, 0 = window only)")}),
        }}

    def patch(self, model, adapter, radius, strength=1.0):
        import logging

        from ..core.caching.local_attention import LocalAttention
        from .adapters import load_lora

        dit = diffusion_model_of(model)
        sparse_attention.check_model(dit)                  # names a UNet / Flux / PixArt before anything is cloned
        state = LocalAttention(radius, int(getattr(dit, "patch_size", 2)))     # raises on a bad radius
        path = _clear_adapter_path(adapter)
        if path is not None:
            from ..weights.clear import read_clear_adapter       # the file's checks and its trained radius

            _, meta = read_clear_adapter(path)
            if "radius" in meta and float(meta["radius"]) != float(radius):
                logging.getLogger("nimblediff").warning("NimbleDiff CLEAR: %s was distilled for radius %s, running "
                                                        "at %s", adapter, meta["radius"], radius)
            if strength != 0:
                model, _, _ = load_lora(model, None, path, strength, 0.0)
        return (_attention_patch(model, state),)


NODES["NimbleDiffClearAttention"] = (ClearLocalAttentionModel, "NimbleDiff CLEAR Local Attention (DiT)")
