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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import generate  # noqa: E402
from timing import Conditions, interleave, ratio, write_result  # noqa: E402

from nimblediff.core.caching import CacheSchedule  # noqa: E402
from nimblediff.core.caching import prune as laptop  # noqa: E402
from nimblediff.pipelines.caching import denoiser_of, disable_nimble_cache, enable_nimble_cache  # noqa: E402
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


def dit_arms():
    """NimbleDiff-Tiny-DiT (SD3 MM-DiT, flow Euler): first-block caching against diffusers' DiT caches."""
    arms = [("uncached", "-", None)]
    for thr in (0.05, 0.1, 0.2, 0.4):
        arms.append((f"NimbleDiff first-block cache {thr:g}", "ours", ours_cache("first_block", threshold=thr)))
    for thr in (0.05, 0.1, 0.2):
        arms.append((f"diffusers FirstBlockCache {thr:g}", "peer", diffusers_arm("fbc", threshold=thr)))
    for k in (2, 3):
        arms.append((f"diffusers TaylorSeer default N={k}", "peer",
                     diffusers_arm("taylorseer", cache_interval=k, taylor_factors_dtype=torch.float32)))
    arms.append(("diffusers PAB self 2, t in (100, 800)", "peer",
                 diffusers_arm("pab", spatial_attention_block_skip_range=2,
                               spatial_attention_timestep_skip_range=(100, 800))))
    arms.append(("diffusers FasterCache", "peer", diffusers_arm("faster", spatial_attention_block_skip_range=2)))
    return arms


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

def denoiser_flops(pipe, steps, cfg, caption):
    from torch.utils.flop_counter import FlopCounterMode

    name = type(denoiser_of(pipe)).__name__
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe([caption], height=64, width=64, num_inference_steps=steps, guidance_scale=cfg,
             generator=[torch.Generator().manual_seed(0)], output_type="latent")
    counts = counter.get_flop_counts()
    return float(sum(counts.get(name, {}).values()))


def rmse(a, b):
    d = a.astype(np.float64) - b.astype(np.float64)
    return np.sqrt((d ** 2).reshape(len(d), -1).mean(1))     # (N,) per image


def run_block(pipe, arms, a, held, net, log, steps, cfg, tag):
    """Quality, FLOPs and timing for one block of arms that share the uncached reference (the first arm)."""
    captions, scenes, seeds = held.captions, held.scenes, held.noise_seeds
    results, ok = {}, []
    for name, family, apply in arms:
        undo = (lambda: None)
        try:
            if apply is not None:
                undo = apply(pipe)
            t0 = time.perf_counter()
            images = generate(pipe, captions, steps, cfg, seeds)
            wall = time.perf_counter() - t0
            flops = denoiser_flops(pipe, steps, cfg, captions[0])
        except Exception as e:                                      # a peer that does not apply: say why
            undo()
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}" if str(e) else type(e).__name__
            if os.environ.get("NIMBLE_BENCH_DEBUG"):
                traceback.print_exc()
            results[name] = {"family": family, "error": msg}
            log(f"[{tag}] {name}: n/a ({msg})")
            continue
        undo()
        r = evaluate.evaluate_v2(images, scenes, net)
        results[name] = {"family": family, "images": images, "eval": r, "flops": flops, "wall": wall}
        ok.append((name, apply))
        log(f"[{tag}] {name}: whole {r['accuracy']['whole']:.3f}, {flops / 1e9:.1f} GFLOPs, {wall:.1f} s")
    base = results[arms[0][0]]
    for name, res in results.items():
        if "error" in res:
            continue
        res["skipped"] = 1 - res["flops"] / base["flops"]
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
                generate(pipe, tc, steps, cfg, ts)
            finally:
                undo()
        return f
    runs = interleave({name: arm_fn(apply) for name, apply in ok}, repeats=a.rounds)
    for name, _ in ok:
        rt = ratio(runs, arms[0][0], name)              # uncached / arm = speedup
        results[name]["speedup"] = rt
    return results


def table(results, n):
    head = ("| arm | family | speedup [95% CI] | FLOPs skipped | whole prompt [95% CI] | vs uncached, points [95% CI] "
            "| shape | colour | position | background | RMSE to uncached (px) | FD to uncached |")
    lines = [head, "|" + "---|" * 12]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['family']} | n/a: {r['error']} |" + " |" * 9)
            continue
        acc, ci = r["eval"]["accuracy"], r["eval"]["interval"]["whole"]
        d, (lo, hi) = r["diff"]
        sp = r["speedup"]
        lines.append(f"| {name} | {r['family']} | {sp.median:.2f}x [{sp.low:.2f}, {sp.high:.2f}] | "
                     f"{100 * r['skipped']:.0f}% | {acc['whole']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
                     f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | {acc['shape']:.3f} | {acc['colour']:.3f} | "
                     f"{acc['position']:.3f} | {acc['background']:.3f} | {r['rmse'].mean():.2f} | {r['fd']:.2f} |")
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

    cond = Conditions()
    print(cond, flush=True)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    held = heldout.heldout_scenes(a.n)
    net = evaluate.load_evaluator()
    out = []
    if os.path.isdir(a.dit):
        from diffusers import StableDiffusion3Pipeline

        dpipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None,
                                                         dtype=torch.float32)
        dpipe.set_progress_bar_config(disable=True)
        dit = run_block(dpipe, dit_arms(), a, held, net, log, STEPS, CFG, "dit")
        out += [f"### NimbleDiff-Tiny-DiT, flow Euler {STEPS} steps, CFG {CFG:g}\n", table(dit, a.n), "",
                "Matched speedup:\n", matched(dit), ""]
    if not a.only_dit:
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
            f"{a.rounds} paired rotating rounds (bench/timing.py). FLOPs skipped: UNet FLOPs of a whole one-prompt "
            "generation (FlopCounterMode), 1 - arm / uncached. Whole prompt: evaluator v2, Wilson 95% interval; "
            "'vs uncached': paired bootstrap over prompts. RMSE: per-image pixel RMSE to the uncached image of the same "
            "prompt and noise, mean over prompts. FD: Frechet distance of evaluator object features, arm vs uncached "
            "(biased upward at small n; rank only). 'n/a' rows: the peer raised or hooked nothing on this UNet; the "
            f"message is its own.\n\n{cond} Whole run {time.perf_counter() - t_start:.0f} s.\n")
    body = "\n".join(out) + "\n" + note
    print("\n" + body)
    if not a.no_write:
        write_result("compute_dit" if a.only_dit else "compute", __file__, body, mode=f"{a.n} held-out prompts")


if __name__ == "__main__":
    main()
