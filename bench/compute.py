"""Less compute per step on NimbleDiff-Tiny: NimbleDiff's caches (DeepCache-branch feature reuse, A-SDM non-uniform
schedules, LAPTOP-Diff layer skipping) against the peers a user already runs (the DeepCache and tomesd packages,
diffusers 0.42's cache hooks where they apply to a UNet2DConditionModel), all in one process, on the 25-step DPM++
teacher at CFG 5 and on the Flash LoRA at 4 steps.

For each arm: wall-time speedup over the uncached pipeline (bench/timing.py paired rotating rounds, median ratio
with 95% interval, --time-n prompts per call), share of denoiser FLOPs skipped (torch FlopCounterMode over a whole
one-prompt generation), whole-prompt and per-attribute accuracy with evaluator v2 on the held-out prompts
(tiny/heldout.py, same as bench/quality.py; Wilson 95% intervals; paired bootstrap difference to uncached), and
the distance to the uncached output: per-image RMSE in pixels (0-255, paired, same noise) and the Frechet distance
between the evaluator's object features of the arm and of the uncached images.

LAPTOP's layer scores are computed on a calibration split (prompts from tiny.data with seed 4242 -- never the
held-out ones): the UNet's own inputs at 5 steps of the teacher trajectory; its additivity check (predicted =
sum of single removal effects, measured = joint removal) is printed with the Pearson correlation.

    python bench/compute.py [--n 32] [--time-n 2] [--rounds 6] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import numpy as np
import torch

import nimblediff

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import DIT_ZERO_ROWS, generate  # noqa: E402
from timing import Conditions, interleave, ratio, write_result  # noqa: E402

from nimblediff.core.caching import CacheSchedule  # noqa: E402
from nimblediff.core.caching import prune as laptop  # noqa: E402
from nimblediff.pipelines.caching import (denoiser_of, disable_nimble_cache, enable_nimble_cache,  # noqa: E402
                                          search_dit_schedule)
from nimblediff.tiny import data, evaluate, heldout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG, STEPS = 5.0, 25


# --------------------------------------------------------------------------------------------------- arms
# An arm is (name, family, apply(pipe) -> undo()). apply raises if the method cannot run on this model.

def ours_cache(method, **opts):
    def apply(pipe):
        enable_nimble_cache(pipe, method, **opts)
        return lambda: disable_nimble_cache(pipe)
    return apply


def ours_prune(skip):
    def apply(pipe):
        enable_nimble_cache(pipe, "prune", skip=skip)
        return lambda: disable_nimble_cache(pipe)
    return apply


def deepcache_pkg(interval, branch_id):
    def apply(pipe):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
        helper.enable()
        return helper.disable
    return apply


def tomesd_arm(ratio_):
    def apply(pipe):
        import tomesd

        tomesd.apply_patch(pipe, ratio=ratio_)
        return lambda: tomesd.remove_patch(pipe)
    return apply


class _Clock:
    """The current timestep for diffusers hooks that ask for it (PAB, FasterCache): set by a forward pre-hook."""
    t = 999

    def hook(self, _m, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.t = int(float(t.reshape(-1)[0]) if hasattr(t, "reshape") else float(t))


def _diffusers_hook_names(model):
    return [(m, n) for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
            for n in list(m._diffusers_hook._hook_order)]


def diffusers_arm(kind, **cfg):
    """diffusers.hooks on the UNet. diffusers keeps per-run state in StateManagers that need a cache context (its
    pipelines set one only for CacheMixin models, which UNet2DConditionModel is not), so the context is set and the
    stateful hooks are reset before every call of the UNet's first step, as a CacheMixin pipeline would."""
    def apply(pipe):
        import diffusers.hooks as H
        from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

        unet, clock = denoiser_of(pipe), _Clock()
        before = set(_diffusers_hook_names(unet))
        h = unet.register_forward_pre_hook(clock.hook, with_kwargs=True)
        cb = {"current_timestep_callback": lambda: clock.t}
        try:
            if kind == "pab":
                H.apply_pyramid_attention_broadcast(unet, H.PyramidAttentionBroadcastConfig(**cfg, **cb))
            elif kind == "faster":
                H.apply_faster_cache(unet, H.FasterCacheConfig(**cfg, **cb))
            elif kind == "taylorseer":
                H.apply_taylorseer_cache(unet, H.TaylorSeerCacheConfig(**cfg))
            elif kind == "fbc":
                H.apply_first_block_cache(unet, H.FirstBlockCacheConfig(**cfg))
            elif kind == "mag":
                H.apply_mag_cache(unet, H.MagCacheConfig(**cfg))
        except Exception:
            h.remove()
            raise
        added = [x for x in _diffusers_hook_names(unet) if x not in before]
        if not added:
            h.remove()
            raise RuntimeError(f"no module of {type(unet).__name__} matched: nothing was hooked")
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        registry.invalidate_child_registries_cache()    # else hooks added by apply_* stay invisible to the context

        def reset(_m, args, kwargs):
            t = clock.t
            if getattr(reset, "last", None) is None or t > reset.last:     # a new run
                registry.reset_stateful_hooks()
                _set_cache_context(unet, CacheContext("cond"))
            reset.last = t
        h2 = unet.register_forward_pre_hook(reset, with_kwargs=True)

        def undo():
            h.remove()
            h2.remove()
            for m, n in added:
                m._diffusers_hook.remove_hook(n, recurse=False)
            registry.invalidate_child_registries_cache()
        return undo
    return apply


# TaylorSeer on the deep path, as close to DeepCache's skip set as its hooks allow: its "skip" modules must return one
# tensor (a down block returns (hidden, residuals), an attention block a 1-tuple), so the deep resnets, down/up
# samplers, mid block and up_blocks.0 are skipped and up_blocks.1 (the input of the last up block) is predicted.
DEEP = ["down_blocks\\.[12]\\.(resnets|downsamplers)\\.\\d+", "mid_block", "up_blocks\\.0"]


def teacher_arms(prune_sets):
    """The arms of the 25-step block. DeepCache-package arms reproduce ours bit for bit (tests/test_caching_core.py),
    so one interval is enough to show it; the n/a peers fail when applied, at no cost."""
    arms = [("uncached", "-", None)]
    for k in (2, 3, 5):
        arms.append((f"NimbleDiff DeepCache-branch (0,0) N={k}", "ours", ours_cache("deepcache", interval=k)))
    arms.append(("NimbleDiff DeepCache-branch (1,0) N=3", "ours", ours_cache("deepcache", interval=3, branch=(1, 0))))
    arms.append(("NimbleDiff A-SDM edges (0,0) N=5 first 3 last 2", "ours",
                 ours_cache("deepcache", schedule=CacheSchedule.edges(STEPS, 5, 3, 2))))
    for label, skip in prune_sets:
        arms.append((f"NimbleDiff LAPTOP skip {label}", "ours", ours_prune(skip)))
    arms.append(("DeepCache pkg branch 0 N=3", "peer", deepcache_pkg(3, 0)))
    arms.append(("tomesd ratio 0.5", "peer", tomesd_arm(0.5)))
    arms.append(("diffusers PAB self 2 / cross 4, t in (100, 800)", "peer",
                 diffusers_arm("pab", spatial_attention_block_skip_range=2, cross_attention_block_skip_range=4,
                               spatial_attention_timestep_skip_range=(100, 800),
                               cross_attention_timestep_skip_range=(100, 800))))
    for k in (3, 5):
        arms.append((f"diffusers TaylorSeer deep path N={k} order 1", "peer",
                     diffusers_arm("taylorseer", cache_interval=k, max_order=1, disable_cache_before_step=3,
                                   skip_predict_identifiers=DEEP, cache_identifiers=["up_blocks\\.1"],
                                   taylor_factors_dtype=torch.float32)))
    arms.append(("diffusers TaylorSeer default (attention) N=3", "peer",
                 diffusers_arm("taylorseer", cache_interval=3, taylor_factors_dtype=torch.float32)))
    arms.append(("diffusers FasterCache", "peer", diffusers_arm("faster", spatial_attention_block_skip_range=2)))
    arms.append(("diffusers FirstBlockCache 0.1", "peer", diffusers_arm("fbc", threshold=0.1)))
    arms.append(("diffusers MagCache", "peer", diffusers_arm("mag", mag_ratios=[1.0] * STEPS,
                                                            num_inference_steps=STEPS)))
    return arms


# DiT arms carry a 4th element, the method a setting belongs to (matched speedups interpolate along one method's
# sweep). SD3's transformer takes pooled_projections batched [uncond, cond] too; FasterCache's default list of
# batch-split inputs lacks it (without it: "size of tensor a (2) must match ... (4)").
DIT_BLOCKS = 8
SD3_UNCOND_COND = ["hidden_states", "encoder_hidden_states", "timestep", "pooled_projections"]


def dit_units(n):
    """FORA-style unit reuse on an SD3 MM-DiT: every block's attention and feed-forwards (the adaLN modulation,
    norms and residual adds still run with the current timestep). The last block has no context feed-forward."""
    return [f"transformer_blocks.{i}.{u}" for i in range(n) for u in ("attn", "ff", "ff_context")
            if not (u == "ff_context" and i == n - 1)]


# The warm-up of each budget's schedule (its first steps always compute), chosen on 128 calibration prompts (seed 99,
# never the held-out set) by mean pixel RMSE to the uncached images among 3 / 4 / 5:
# `python bench/compute.py --choose-warmup` prints the table it was chosen from (bench/results/compute_dit_warmup.md).
# An earlier choice on 12 prompts (3 for every budget) met one held-out image whose layout changed when step 3 was
# skipped; 12 prompts are too few to see an error that rare.
WARMUPS = (3, 4, 5)
SCHEDULE_WARMUP = {17: 5, 15: 3, 13: 4, 12: 5, 10: 4, 8: 3, 7: 4, 6: 4, 5: 4}


def dit_schedules(pipe, ks=(17, 15, 13, 12, 10, 8, 7, 6, 5), n=4, write=True, **extra):
    """Per-step cache schedules searched offline (core/caching/search.py): the uncached pipeline's block-stack residual
    change profiled on the 4 calibration prompts MagCache calibrates on, then K of 25 steps chosen by dynamic
    programming for each K, with the first SCHEDULE_WARMUP[K] steps always computed. Saved as
    bench/results/compute_dit_schedule_k<K>.json, the files the node's schedule_file and
    enable_nimble_cache(schedule=path) read. Returns ({K: CacheSchedule}, profile)."""
    from nimblediff.core.caching import search

    _, changes = search_dit_schedule(pipe, calibration_captions(n), ks[0], warmup=SCHEDULE_WARMUP[ks[0]], seed=7000,
                                     num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64, **extra)
    out = {}
    for k in ks:
        warmup = SCHEDULE_WARMUP[k]
        out[k] = search.search_schedule(changes, k, warmup)
        if write:
            search.save_schedule(os.path.join(ROOT, "bench", "results", f"compute_dit_schedule_k{k}.json"), out[k],
                                 len(pipe.transformer.transformer_blocks), warmup=warmup,
                                 profile=[round(c, 6) for c in changes], prompts=calibration_captions(n),
                                 cost=search.staleness(changes, out[k].compute),
                                 made_by="python bench/compute.py --only-dit (dit_schedules)")
    return out, changes


def choose_warmups(pipe, ks=(17, 15, 13, 12, 10, 8, 7, 6, 5), n=128, seed=99, **extra):
    """For each budget K, the schedule searched with each warm-up in WARMUPS run on n calibration prompts (seed
    `seed`, noise seeds 9000 + i; never the held-out set); the table of mean / p90 / worst pixel RMSE to the uncached
    images and the warm-up of least mean RMSE per K (what SCHEDULE_WARMUP holds)."""
    caps, seeds = calibration_captions(n, seed), list(range(9000, 9000 + n))
    _, profile = dit_schedules(pipe, ks, write=False, **extra)
    base = generate(pipe, caps, STEPS, CFG, seeds, **extra)
    from nimblediff.core.caching import search

    lines = [f"Warm-up per schedule budget on {n} calibration prompts (seed {seed}; noise seeds 9000 + i), flow Euler "
             f"{STEPS} steps, CFG {CFG:g}: pixel RMSE to the uncached images.\n",
             "| K | warm-up | schedule | mean RMSE | p90 | worst | images > 20 px |", "|---|---|---|---|---|---|---|"]
    chosen = {}
    for k in ks:
        scores = {}
        for w in WARMUPS:
            sched = search.search_schedule(profile, k, w)
            undo = ours_cache("first_block", schedule=sched)(pipe)
            try:
                r = rmse(generate(pipe, caps, STEPS, CFG, seeds, **extra), base)
            finally:
                undo()
            scores[w] = r.mean()
            pattern = "".join("X" if f else "." for f in sched.compute)
            lines.append(f"| {k} | {w} | `{pattern}` | {r.mean():.3f} | {np.quantile(r, 0.9):.2f} | {r.max():.1f} | "
                         f"{int((r > 20).sum())} |")
        chosen[k] = min(scores, key=scores.get)
    lines += ["", f"Chosen (least mean RMSE): {chosen}"]
    return "\n".join(lines), chosen


def dit_arms(mag_ratios=None, n_blocks=DIT_BLOCKS, schedules=None):
    """NimbleDiff-Tiny-DiT (SD3 MM-DiT, flow Euler): our first-block cache (threshold sweeps, 1 or 5 warm-up steps)
    and FORA-style unit reuse against diffusers' DiT caches, each at its documented setting and a sweep towards higher
    speedups. Documented settings (diffusers docs / docstrings): FirstBlockCache 0.05 (default) and 0.2 (example);
    MagCache threshold 0.06, K=3, retention 0.2 with ratios calibrated on this model; TaylorSeer interval 5, order 1,
    3 warm-up steps, float32 factors; PAB spatial 2 in t (100, 800); FasterCache as its CogVideoX example."""
    arms = [("uncached", "-", None, "uncached")]
    for thr in (0.15, 0.2, 0.3, 0.45, 0.6):
        arms.append((f"NimbleDiff first-block cache {thr:g}", "ours", ours_cache("first_block", threshold=thr),
                     "NimbleDiff first-block cache"))
    # Chosen on calibration prompts (seed 99, never the held-out set): skipping in the first steps, while the
    # layout forms, is what breaks images at high thresholds; 5 computed steps (MagCache's 20% retention) fixes it.
    for thr in (0.2, 0.3, 0.45, 0.6, 0.8):
        arms.append((f"NimbleDiff first-block cache {thr:g}, warmup 5", "ours",
                     ours_cache("first_block", threshold=thr, warmup=5), "NimbleDiff first-block cache, warmup 5"))
    # Searched offline on the calibration prompts (dit_schedules): the scheduled steps compute, the others skip all
    # blocks (no first block to run), as MagCache does with its calibrated ratios.
    for k, sched in (schedules or {}).items():
        arms.append((f"NimbleDiff searched schedule {k}/{STEPS} steps", "ours",
                     ours_cache("first_block", schedule=sched), "NimbleDiff searched schedule"))
    # AutoDiffusion's per-step, per-block plans (bench/block_search.py searched them on calibration prompts; read
    # here from its saved JSON), Re-ttention at bench/sparse_attention.py's chosen setting, and CLEAR's shipped window
    # with its distilled attention LoRA (bench/clear.py): the same prompts and distances as every other arm.
    for k in (17, 13, 8):
        plan = os.path.join(ROOT, "bench", "results", f"block_search_plan_k{k}.json")
        if os.path.exists(plan):
            arms.append((f"NimbleDiff block plan {k}/{STEPS} budget", "ours", ours_cache("block_plan", plan=plan),
                         "NimbleDiff block plan"))
    arms.append(("NimbleDiff Re-ttention keep 0.03, warm-up 3, refresh 5", "ours",
                 ours_cache("rettention", keep=0.03, warmup=3, refresh=5), "NimbleDiff Re-ttention"))
    arms.append(("NimbleDiff CLEAR (shipped window + distilled LoRA)", "ours",
                 ours_cache("clear", adapter=nimblediff.TINY_DIT_CLEAR_LORA), "NimbleDiff CLEAR"))
    units = dit_units(n_blocks)
    for k in (2, 3):
        arms.append((f"NimbleDiff unit reuse (attn + ff) N={k}", "ours", ours_cache("reuse", paths=units, interval=k),
                     "NimbleDiff unit reuse"))
    for thr in (0.05, 0.2):
        arms.append((f"diffusers FirstBlockCache {thr:g}", "peer", diffusers_arm("fbc", threshold=thr),
                     "diffusers FirstBlockCache"))
    # diffusers' FirstBlockCache raises on SD3 (its tail block returns no context); its exact rule, which our
    # rule="reference" reproduces bit for bit where diffusers runs (tests/test_caching_core.py), stands in for it.
    for thr in (0.05, 0.2, 0.3, 0.45):
        arms.append((f"FirstBlockCache rule (diffusers', via ours) {thr:g}", "peer",
                     ours_cache("first_block", threshold=thr, rule="reference"), "FirstBlockCache rule"))
    if mag_ratios is not None:
        for thr, k in ((0.06, 3), (0.12, 3), (0.25, 5), (0.5, 8), (1.0, 12)):
            arms.append((f"diffusers MagCache {thr:g} K={k}", "peer",
                         diffusers_arm("mag", threshold=thr, max_skip_steps=k, retention_ratio=0.2,
                                       mag_ratios=mag_ratios, num_inference_steps=STEPS), "diffusers MagCache"))
    for k in (2, 3, 5):
        arms.append((f"diffusers TaylorSeer attention N={k}", "peer",
                     diffusers_arm("taylorseer", cache_interval=k, max_order=1, disable_cache_before_step=3,
                                   taylor_factors_dtype=torch.float32), "diffusers TaylorSeer attention"))
    for k in (2, 3, 4, 5):
        arms.append((f"diffusers TaylorSeer blocks 0-{n_blocks - 2} N={k}", "peer",
                     diffusers_arm("taylorseer", cache_interval=k, max_order=1, disable_cache_before_step=3,
                                   taylor_factors_dtype=torch.float32,
                                   cache_identifiers=[f"transformer_blocks\\.[0-{n_blocks - 2}]"]),
                     "diffusers TaylorSeer blocks"))
    arms.append(("diffusers TaylorSeer lite N=5", "peer",
                 diffusers_arm("taylorseer", cache_interval=5, use_lite_mode=True, taylor_factors_dtype=torch.float32),
                 "diffusers TaylorSeer lite"))
    for k, rng in ((2, (100, 800)), (3, (100, 950))):
        arms.append((f"diffusers PAB self {k}, t in {rng}", "peer",
                     diffusers_arm("pab", spatial_attention_block_skip_range=k, spatial_attention_timestep_skip_range=rng),
                     "diffusers PAB"))
    arms.append(("diffusers FasterCache (documented)", "peer",
                 diffusers_arm("faster", spatial_attention_block_skip_range=2,
                               spatial_attention_timestep_skip_range=(-1, 681), attention_weight_callback=lambda _: 0.3,
                               unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
                               tensor_format="BCHW", _unconditional_conditional_input_kwargs_identifiers=SD3_UNCOND_COND),
                 "diffusers FasterCache"))
    return arms


FLASH_STEPS = 4


def dit_flash_arms(pipe, n_blocks=DIT_BLOCKS, **extra):
    """What a cache still buys on the distilled DiT (the Flash LoRA at 4 steps, CFG 1, its recipe's LCM sampler):
    our schedules searched on the calibration prompts at 4 steps (1 or 2 of the 4 steps skip every block; the first
    step always computes) and first-block thresholds, against the peers that apply at 4 steps (MagCache calibrated on
    the same pipeline, 1 step retained; TaylorSeer on blocks 0..n-2 every 2nd step after the first; the FirstBlockCache
    rule). Returns (arms, schedule patterns)."""
    from nimblediff.core.caching import search

    _, changes = search_dit_schedule(pipe, calibration_captions(4), FLASH_STEPS - 1, warmup=1, seed=7000,
                                     num_inference_steps=FLASH_STEPS, guidance_scale=1.0, height=64, width=64, **extra)
    ratios = mag_calibrate(pipe, steps=FLASH_STEPS, cfg=1.0, **extra)
    arms, patterns = [("uncached", "-", None, "uncached")], {}
    for k in (3, 2):
        sched = search.search_schedule(changes, k, 1)
        patterns[k] = "".join("X" if f else "." for f in sched.compute)
        arms.append((f"NimbleDiff searched schedule {k}/{FLASH_STEPS} steps `{patterns[k]}`", "ours",
                     ours_cache("first_block", schedule=sched), "NimbleDiff searched schedule"))
    for thr in (0.2, 0.45):
        arms.append((f"NimbleDiff first-block cache {thr:g}", "ours", ours_cache("first_block", threshold=thr),
                     "NimbleDiff first-block cache"))
        arms.append((f"FirstBlockCache rule (diffusers', via ours) {thr:g}", "peer",
                     ours_cache("first_block", threshold=thr, rule="reference"), "FirstBlockCache rule"))
    for thr, k in ((0.12, 1), (0.25, 2)):
        arms.append((f"diffusers MagCache {thr:g} K={k}", "peer",
                     diffusers_arm("mag", threshold=thr, max_skip_steps=k, retention_ratio=0.25, mag_ratios=ratios,
                                   num_inference_steps=FLASH_STEPS), "diffusers MagCache"))
    arms.append((f"diffusers TaylorSeer blocks 0-{n_blocks - 2} N=2", "peer",
                 diffusers_arm("taylorseer", cache_interval=2, max_order=1, disable_cache_before_step=1,
                               taylor_factors_dtype=torch.float32,
                               cache_identifiers=[f"transformer_blocks\\.[0-{n_blocks - 2}]"]),
                 "diffusers TaylorSeer blocks"))
    return arms, {"schedules": patterns, "profile": [round(c, 3) for c in changes],
                  "mag_ratios": [round(r, 4) for r in ratios]}


def dit_flash_block(a, held, net, log):
    """The DiT Flash block: FewStepSD3Pipeline with the shipped Flash LoRA and its recipe (the product path, as
    bench/quality.py runs it). Returns the markdown section."""
    from nimblediff.pipelines.dit import FewStepSD3Pipeline

    fast = FewStepSD3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    fast.set_progress_bar_config(disable=True)
    fast.load_acceleration_lora(f"{a.dit.rstrip(os.sep)}-flash-lora.safetensors", recipe="nimblediff-tiny-dit-flash")
    extra = {"max_sequence_length": DIT_ZERO_ROWS}
    arms, info = dit_flash_arms(fast, len(fast.transformer.transformer_blocks), **extra)
    res = run_block(fast, arms, a, held, net, log, FLASH_STEPS, 1.0, "dit-flash", extra)
    return "\n".join([
        f"### NimbleDiff-Tiny-DiT + its Flash LoRA (recipe nimblediff-tiny-dit-flash: LCM, {FLASH_STEPS} steps, CFG 1): "
        "what a cache still buys on the distilled model\n", table(res, a.n), "",
        "Matched speedup (as above):\n", matched_dit(res), "",
        f"Searched on 4 calibration prompts at {FLASH_STEPS} steps (X = step computes): "
        + "; ".join(f"{k}/{FLASH_STEPS} `{p}`" for k, p in info["schedules"].items())
        + f"; block-stack residual change per step {info['profile']}; MagCache ratios {info['mag_ratios']}.", ""])


def calibration_captions(n, seed=4242):
    """Prompts from tiny.data's generator with a seed the held-out set never uses (settings are chosen here)."""
    rng = np.random.default_rng(seed)
    return [data.sample_scene(rng).caption for _ in range(n)]


def mag_calibrate(pipe, n=4, steps=STEPS, cfg=CFG, **extra):
    """MagCache's documented calibration (MagCacheConfig(calibrate=True), one run; it prints the ratios) on
    calibration prompts; returns the ratios it printed."""
    import contextlib
    import io
    import re

    undo = diffusers_arm("mag", calibrate=True, num_inference_steps=steps)(pipe)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            generate(pipe, calibration_captions(n), steps, cfg, list(range(7000, 7000 + n)), **extra)
    finally:
        undo()
    found = re.findall(r"\[([-0-9.,e\s]+)\]", buf.getvalue())
    if not found:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[:200]!r}")
    return [float(v) for v in found[-1].split(",")]


# ---------------------------------------------------------------------------------------------------- LAPTOP

def calibration_inputs(pipe, n=2, steps_kept=(0, 6, 12, 18, 24)):
    """The UNet's own inputs (x_t, t, context) at a few steps of the teacher trajectory on calibration prompts."""
    rng = np.random.default_rng(4242)
    caps = [data.sample_scene(rng).caption for _ in range(n)]
    seen = []
    h = pipe.unet.register_forward_pre_hook(
        lambda _m, a, k: seen.append((a[0].clone(), a[1], k["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        pipe(caps, height=64, width=64, num_inference_steps=STEPS, guidance_scale=CFG,
             generator=[torch.Generator().manual_seed(7000 + i) for i in range(n)], output_type="latent")
    finally:
        h.remove()
    unet = pipe.unet
    return [(lambda x=x, t=t, c=c: unet(x, t, encoder_hidden_states=c).sample) for i, (x, t, c) in enumerate(seen)
            if i in steps_kept]   # (2n, 4, 16, 16) per call: uncond and cond halves


def laptop_plan(pipe, log):
    batches = calibration_inputs(pipe)
    unet = pipe.unet
    cands = laptop.candidates(unet, batches[0])
    scores = laptop.score_layers(unet, batches, cands)
    costs = laptop.flop_costs(unet, batches[0], cands)
    pred, meas, r = laptop.additivity(unet, batches, scores, n_sets=8, size=2, seed=0)
    pred3, meas3, r3 = laptop.additivity(unet, batches, scores, n_sets=8, size=3, seed=1)
    batch = len(batches[0]())
    lines = [f"| layer | removal score (rel. output change) | GFLOPs per call (batch {batch}) |", "|---|---|---|"]
    for p in sorted(cands, key=scores.get):
        lines.append(f"| {p} | {scores[p]:.2e} | {costs[p] / 1e9:.3f} |")
    lines.append("")
    lines.append(f"Additivity (LAPTOP-Diff's claim): over 8 random pairs, predicted (sum of single effects) vs "
                 f"measured joint effect: Pearson r = {r:.3f} (mean predicted {np.mean(pred):.4f}, measured "
                 f"{np.mean(meas):.4f}); 8 random triples: r = {r3:.3f} (mean predicted {np.mean(pred3):.4f}, "
                 f"measured {np.mean(meas3):.4f}).")
    log("\n".join(lines))
    sets = []
    for share in (0.15,):
        skip = laptop.choose(scores, costs, share)
        sets.append((f"{int(share * 100)}% of candidate FLOPs ({len(skip)} layers)", skip))
    return sets, "\n".join(lines)


# --------------------------------------------------------------------------------------------------- metrics

def block_probes(model):
    """A leaf that runs first inside each transformer block (SD3: norm1's linear): it runs only when the block
    computes, whichever cache skips it (ours, or a diffusers hook returning early)."""
    from nimblediff.core.caching import dit_block_paths

    try:
        return [f"{p}.norm1.linear" for p in dit_block_paths(model)]
    except Exception:
        return []                                            # a UNet: no block count


def denoiser_flops(pipe, steps, cfg, caption, extra=None):
    """(denoiser FLOPs, transformer blocks that computed) over a whole one-prompt generation."""
    from torch.utils.flop_counter import FlopCounterMode

    from nimblediff.core.caching import count_calls

    model = denoiser_of(pipe)
    name = type(model).__name__
    with FlopCounterMode(display=False) as counter, torch.no_grad(), count_calls(model, block_probes(model)) as calls:
        pipe([caption], height=64, width=64, num_inference_steps=steps, guidance_scale=cfg,
             generator=[torch.Generator().manual_seed(0)], output_type="latent", **(extra or {}))
    counts = counter.get_flop_counts()
    return float(sum(counts.get(name, {}).values())), sum(calls.values())


def rmse(a, b):
    d = a.astype(np.float64) - b.astype(np.float64)
    return np.sqrt((d ** 2).reshape(len(d), -1).mean(1))     # (N,) per image


def run_block(pipe, arms, a, held, net, log, steps, cfg, tag, extra=None):
    """Quality, FLOPs and timing for one block of arms that share the uncached reference (the first arm).
    extra: pipeline call options (the DiT's max_sequence_length)."""
    captions, scenes, seeds = held.captions, held.scenes, held.noise_seeds
    extra = extra or {}
    results, ok = {}, []
    for name, family, apply, *method in arms:
        undo = (lambda: None)
        try:
            if apply is not None:
                undo = apply(pipe)
            t0 = time.perf_counter()
            images = generate(pipe, captions, steps, cfg, seeds, **extra)
            wall = time.perf_counter() - t0
            flops, blocks = denoiser_flops(pipe, steps, cfg, captions[0], extra)
        except Exception as e:                                      # a peer that does not apply: say why
            undo()
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}" if str(e) else type(e).__name__
            if os.environ.get("NIMBLE_BENCH_DEBUG"):
                traceback.print_exc()
            results[name] = {"family": family, "error": msg, "method": (method or [name])[0]}
            log(f"[{tag}] {name}: n/a ({msg})")
            continue
        undo()
        r = evaluate.evaluate_v2(images, scenes, net)
        results[name] = {"family": family, "images": images, "eval": r, "flops": flops, "blocks": blocks,
                         "wall": wall, "method": (method or [name])[0]}
        ok.append((name, apply))
        log(f"[{tag}] {name}: whole {r['accuracy']['whole']:.3f}, {flops / 1e9:.2f} GFLOPs, {blocks} block runs, "
            f"{wall:.1f} s")
    base = results[arms[0][0]]
    for name, res in results.items():
        if "error" in res:
            continue
        res["skipped"] = 1 - res["flops"] / base["flops"]
        res["blocks_skipped"] = 1 - res["blocks"] / base["blocks"] if base["blocks"] else float("nan")
        res["rmse"] = rmse(res["images"], base["images"])
        f, g = res["eval"]["features"], base["eval"]["features"]
        res["fd"] = evaluate.frechet(f, g) if min(len(f), len(g)) > 2 else float("nan")
        res["diff"] = evaluate.paired_difference(res["eval"]["whole"], base["eval"]["whole"])
    # timing: every working arm against uncached, paired rotating rounds
    tc, ts = captions[:a.time_n], seeds[:a.time_n]

    def arm_fn(apply):
        def f():
            undo = apply(pipe) if apply is not None else (lambda: None)
            try:
                generate(pipe, tc, steps, cfg, ts, **extra)
            finally:
                undo()
        return f
    runs = interleave({name: arm_fn(apply) for name, apply in ok}, repeats=a.rounds)
    for name, _ in ok:
        rt = ratio(runs, arms[0][0], name)              # uncached / arm = speedup
        results[name]["speedup"] = rt
    return results


def table(results, n):
    head = ("| arm | family | speedup [95% CI] | FLOPs skipped | blocks skipped | whole prompt [95% CI] | vs uncached, "
            "points [95% CI] | shape | colour | position | background | RMSE to uncached (px) | RMSE p90 / max | "
            "FD to uncached |")
    lines = [head, "|" + "---|" * 14]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['family']} | n/a: {r['error']} |" + " |" * 11)
            continue
        acc, ci = r["eval"]["accuracy"], r["eval"]["interval"]["whole"]
        d, (lo, hi) = r["diff"]
        sp = r["speedup"]
        bs = "-" if r["blocks_skipped"] != r["blocks_skipped"] else f"{100 * r['blocks_skipped']:.0f}%"
        lines.append(f"| {name} | {r['family']} | {sp.median:.2f}x [{sp.low:.2f}, {sp.high:.2f}] | "
                     f"{100 * r['skipped']:.0f}% | {bs} | {acc['whole']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                     f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {acc['shape']:.3f} | {acc['colour']:.3f} | "
                     f"{acc['position']:.3f} | {acc['background']:.3f} | {r['rmse'].mean():.2f} | "
                     f"{np.quantile(r['rmse'], 0.9):.2f} / {r['rmse'].max():.2f} | {r['fd']:.2f} |")
    return "\n".join(lines)


def matched(results, targets=(1.5, 2.0, 3.0), tol=0.05):
    """At each target speedup: the arm of each family with the lowest RMSE to uncached among arms whose median
    speedup is at least target - tol."""
    lines = ["| target speedup | best NimbleDiff arm (speedup, RMSE, whole) | best peer arm (speedup, RMSE, whole) | "
             "lower distance |", "|---|---|---|---|"]
    for tgt in targets:
        best = {}
        for fam in ("ours", "peer"):
            cands = [(r["rmse"].mean(), name) for name, r in results.items()
                     if r["family"] == fam and "error" not in r and r["speedup"].median >= tgt - tol]
            best[fam] = min(cands) if cands else None

        def cell(b):
            if b is None:
                return "none reaches it"
            r = results[b[1]]
            return f"{b[1]} ({r['speedup'].median:.2f}x, {b[0]:.2f}, {r['eval']['accuracy']['whole']:.3f})"
        o, p = best["ours"], best["peer"]
        win = "-" if o is None and p is None else ("NimbleDiff" if p is None or (o is not None and o[0] < p[0])
                                                    else ("tie" if o is not None and o[0] == p[0] else "peer"))
        lines.append(f"| {tgt:g}x | {cell(o)} | {cell(p)} | {win} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- matched (DiT claims)
SPEEDUPS = {"measured": lambda r: r["speedup"].median,                # wall time, noisy on a shared machine
            "FLOPs": lambda r: 1 / max(1 - r["skipped"], 1e-9)}       # transformer FLOPs: the stable measure


def interpolated(results, method, target, speed):
    """(RMSE, FD) of a method's sweep at `target` speedup: linear in speedup between the two settings that bracket
    it (sorted by speedup); None when no pair brackets it (no extrapolation). Every sweep starts at the uncached
    model (1x, distance 0): each method's 'off' setting (threshold 0, interval 1) is the uncached model."""
    pts = sorted([(1.0, 0.0, 0.0)] + [(speed(r), r["rmse"].mean(), r["fd"]) for r in results.values()
                                      if r.get("method") == method and "error" not in r])
    for (s0, e0, f0), (s1, e1, f1) in zip(pts, pts[1:]):
        if s0 <= target <= s1:
            w = 0.0 if s1 == s0 else (target - s0) / (s1 - s0)
            return e0 + w * (e1 - e0), f0 + w * (f1 - f0)
    return None


def nearest(results, family, target, speed):
    """The arm of a family with the lowest RMSE among arms at or above `target` (within 5%)."""
    cands = [(r["rmse"].mean(), name) for name, r in results.items()
             if r["family"] == family and "error" not in r and speed(r) >= target * 0.95]
    return min(cands)[1] if cands else None


def rmse_difference(a, b, n_boot=4000, seed=0):
    """Mean per-image RMSE of a minus b (same prompts and noise) with a paired bootstrap 95% interval."""
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    return float(d.mean()), (float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975)))


def matched_dit(results, targets=(1.5, 2.0, 3.0)):
    """The issue's claim at matched speedups, two ways: nearest setting (lowest RMSE at or above the target, with a
    paired interval on the RMSE difference) and interpolation along each method's sweep; on the measured speedup
    and on the FLOP speedup."""
    lines = ["| speedup basis | target | best NimbleDiff (setting: speedup, RMSE, FD) | best peer (setting: speedup, "
             "RMSE, FD) | RMSE ours - peer [95% CI] | interpolated RMSE: best ours / best peer (method) | lower "
             "distance |", "|---|---|---|---|---|---|---|"]
    methods = {fam: sorted({r["method"] for r in results.values() if r["family"] == fam and "error" not in r})
               for fam in ("ours", "peer")}
    for basis, speed in SPEEDUPS.items():
        for tgt in targets:
            near = {fam: nearest(results, fam, tgt, speed) for fam in ("ours", "peer")}

            def cell(name):
                if name is None:
                    return "none reaches it"
                r = results[name]
                return f"{name}: {speed(r):.2f}x, {r['rmse'].mean():.2f}, {r['fd']:.1f}"
            o, p = near["ours"], near["peer"]
            diff = "-"
            if o is not None and p is not None:
                d, (lo, hi) = rmse_difference(results[o]["rmse"], results[p]["rmse"])
                diff = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
            interp = {}
            for fam in ("ours", "peer"):
                vals = [(v[0], m) for m in methods[fam] if (v := interpolated(results, m, tgt, speed)) is not None]
                interp[fam] = min(vals) if vals else None
            icell = " / ".join("-" if interp[f] is None else f"{interp[f][0]:.2f} ({interp[f][1]})"
                               for f in ("ours", "peer"))
            if o is None and p is None:
                win = "-"
            elif p is None:
                win = "NimbleDiff (no peer reaches it)"
            elif o is None:
                win = "peer (ours does not reach it)"
            else:
                win = "NimbleDiff" if hi < 0 else ("peer" if lo > 0 else "no difference shown")
            lines.append(f"| {basis} | {tgt:g}x | {cell(o)} | {cell(p)} | {diff} | {icell} | {win} |")
    return "\n".join(lines)


def goal_sentence(results, min_speedup=2.0, points=2.0):
    """The issue's goal: >= 2x wall-time speedup with whole-prompt accuracy within 2 points of uncached."""
    said = []
    for name, r in results.items():
        if r["family"] != "ours" or "error" in r:
            continue
        sp, (d, (lo, hi)) = r["speedup"], r["diff"]
        if sp.median >= min_speedup and 100 * d >= -points:
            shown = sp.coverage >= 0.95 and sp.low >= min_speedup and 100 * lo >= -points
            said.append(f"{name}: {sp.median:.2f}x [{sp.low:.2f}, {sp.high:.2f}], {100 * d:+.1f} points "
                        f"[{100 * lo:+.1f}, {100 * hi:+.1f}] ({'shown' if shown else 'point estimates only'})")
    head = f"Goal (>= {min_speedup:g}x, within {points:g} points of uncached): "
    return head + ("; ".join(said) + "." if said else "no NimbleDiff setting meets it on the point estimates.")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny"))
    p.add_argument("--lora", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-flash-lora.safetensors"))
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--time-n", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--only-flash", action="store_true", help="skip the 25-step teacher block")
    p.add_argument("--dit", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-dit"),
                   help="NimbleDiff-Tiny-DiT folder (its block runs if the folder exists)")
    p.add_argument("--only-dit", action="store_true", help="run only the DiT block")
    p.add_argument("--choose-warmup", action="store_true",
                   help="choose each DiT schedule budget's warm-up on calibration prompts (writes "
                        "bench/results/compute_dit_warmup.md); nothing else runs")
    p.add_argument("--dit-flash", action="store_true",
                   help="run only the DiT + Flash LoRA block (4 steps; writes bench/results/compute_dit_flash.md)")
    p.add_argument("--arm", action="append", default=[],
                   help="DiT block: run only arms whose name contains this text (repeatable; uncached always runs); "
                        "such a run never writes the result file")
    a = p.parse_args()
    if a.arm:
        a.no_write = True
    torch.set_num_threads(a.threads)
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    cond = Conditions()
    print(cond, flush=True)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    held = heldout.heldout_scenes(a.n)
    net = evaluate.load_evaluator()
    out = []
    if a.choose_warmup:
        from diffusers import StableDiffusion3Pipeline

        dpipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None,
                                                         dtype=torch.float32)
        dpipe.set_progress_bar_config(disable=True)
        body, chosen = choose_warmups(dpipe, max_sequence_length=DIT_ZERO_ROWS)
        body += f"\n\n{cond.finish() or cond} Whole run {time.perf_counter() - t_start:.0f} s.\n"
        print(body)
        if not a.no_write:
            write_result("compute_dit_warmup", __file__, body)
        return
    if a.dit_flash:
        out.append(dit_flash_block(a, held, net, log))
    elif os.path.isdir(a.dit):
        from diffusers import StableDiffusion3Pipeline

        dpipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None,
                                                         dtype=torch.float32)
        dpipe.set_progress_bar_config(disable=True)
        extra = {"max_sequence_length": DIT_ZERO_ROWS}
        try:
            ratios = mag_calibrate(dpipe, **extra)
            log(f"[dit] MagCache ratios calibrated on 4 calibration prompts: {[round(r, 4) for r in ratios]}")
        except Exception as e:                      # MagCache rows then say why they are missing
            ratios = None
            log(f"[dit] MagCache calibration failed: {type(e).__name__}: {e}")
        try:
            schedules, profile = dit_schedules(dpipe, write=not a.no_write, **extra)
            log(f"[dit] schedules searched on 4 calibration prompts: "
                f"{ {k: ''.join('X' if f else '.' for f in s.compute) for k, s in schedules.items()} }")
        except Exception as e:                      # the schedule rows are then missing, and the log says why
            schedules, profile = None, None
            log(f"[dit] schedule search failed: {type(e).__name__}: {e}")
        arms = [arm for arm in dit_arms(ratios, len(dpipe.transformer.transformer_blocks), schedules)
                if arm[1] == "-" or not a.arm or any(x in arm[0] for x in a.arm)]
        dit = run_block(dpipe, arms, a, held, net, log, STEPS, CFG, "dit", extra)
        out += [f"### NimbleDiff-Tiny-DiT (`{os.path.relpath(a.dit, ROOT)}`), flow Euler {STEPS} steps, CFG {CFG:g}, "
                f"max_sequence_length {DIT_ZERO_ROWS}\n", table(dit, a.n), "",
                "Matched speedup (nearest: lowest RMSE among a family's settings at or above 95% of the target, RMSE "
                "difference paired over prompts; interpolated: linear along each method's own sweep, no "
                "extrapolation):\n", matched_dit(dit), "", goal_sentence(dit), ""]
        if ratios is not None:
            out += [f"MagCache ratios (calibrated here, 4 calibration prompts): {[round(r, 4) for r in ratios]}", ""]
        if schedules is not None:
            out += ["Searched schedules (same 4 calibration prompts; the first SCHEDULE_WARMUP[K] steps always compute, "
                    f"{SCHEDULE_WARMUP} as chosen by `python bench/compute.py --choose-warmup`; X = step computes, . = "
                    "every block skipped; "
                    "`bench/results/compute_dit_schedule_k<K>.json`): "
                    + "; ".join(f"{k}/{STEPS} `{''.join('X' if f else '.' for f in s.compute)}`"
                                for k, s in schedules.items())
                    + f". Block-stack residual change per step: {[round(c, 3) for c in profile]}", ""]
    if not a.only_dit and not a.dit_flash:
        pipe = StableDiffusionPipeline.from_pretrained(a.model, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base_config = pipe.scheduler.config
        if not a.only_flash:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(base_config)
            prune_sets, laptop_md = laptop_plan(pipe, log)
            teacher = run_block(pipe, teacher_arms(prune_sets), a, held, net, log, STEPS, CFG, "teacher")
            out += [f"### 25-step DPM++ teacher, CFG {CFG:g}\n", table(teacher, a.n), "",
                    "Matched speedup (lowest RMSE to the uncached images among arms at or above the target):\n",
                    matched(teacher), "", "LAPTOP-Diff scores on the calibration split:\n", laptop_md, ""]
        pipe.load_lora_weights(os.path.dirname(a.lora), weight_name=os.path.basename(a.lora),
                               adapter_name="flash")
        pipe.scheduler = LCMScheduler.from_config(base_config)
        flash_arms = [("uncached", "-", None),
                      ("NimbleDiff DeepCache-branch (0,0) N=2", "ours", ours_cache("deepcache", interval=2)),
                      ("DeepCache pkg branch 0 N=2", "peer", deepcache_pkg(2, 0))]
        flash = run_block(pipe, flash_arms, a, held, net, log, 4, 1.0, "flash")
        out += ["### Flash LoRA, LCM 4 steps, CFG 1 (what a cache still buys on a distilled model)\n",
                table(flash, a.n)]
    cond.finish()
    note = (f"\n{a.n} held-out prompts (`nimblediff.tiny.heldout`), one noise seed each, 64x64, {a.threads} thread(s). "
            f"Speedup: uncached / arm wall time for a {a.time_n}-prompt call (full pipeline incl. text encoder and VAE), "
            f"{a.rounds} paired rotating rounds (bench/timing.py). FLOPs skipped: denoiser (UNet / transformer) FLOPs "
            "of a whole one-prompt generation (FlopCounterMode), 1 - arm / uncached; blocks skipped (DiT): transformer "
            "blocks that did not compute (a leaf inside each block counted), 1 - arm / uncached. Whole prompt: evaluator v2, Wilson 95% interval; "
            "'vs uncached': paired bootstrap over prompts. RMSE: per-image pixel RMSE to the uncached image of the same "
            "prompt and noise, mean over prompts; p90 / max: its 90th percentile and worst image over prompts (a layout that "
            "changed reads as tens of px). FD: Frechet distance of evaluator object features, arm vs uncached "
            "(biased upward at small n; rank only). 'n/a' rows: the peer raised or hooked nothing on this model; the "
            f"message is its own.\n\n{cond} Whole run {time.perf_counter() - t_start:.0f} s.\n")
    body = "\n".join(out) + "\n" + note
    print("\n" + body)
    if not a.no_write:
        name = "compute_dit_flash" if a.dit_flash else ("compute_dit" if a.only_dit else "compute")
        write_result(name, __file__, body, mode=f"{a.n} held-out prompts")


if __name__ == "__main__":
    main()
