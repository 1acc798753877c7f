"""AutoDiffusion's block search on NimbleDiff-Tiny-DiT (25 flow-Euler steps, CFG 5): per-step, per-block plans
(core/caching/block_search.py) searched at the block-evaluation budgets of the per-step schedules that
bench/compute.py searched (bench/results/compute_dit_schedule_k<K>.json: K of 25 steps compute every block, about
1.5x / 2x / 3x fewer block evaluations), against those schedules, all in one process.

1. Search (calibration split only: bench/compute.calibration_captions, seed 4242, noise seeds 7000 + i -- the 4
   prompts and noises the per-step schedules were searched on, and the next ones from the same generator; never the
   held-out prompts): for each K, the plan of K x 8
   block evaluations with the least latent MSE to the uncached pipeline, by evolution (pipelines.caching.
   search_block_plan), its first population holding the K-step schedule as a plan (so the search can only improve
   on it on the calibration prompts) and the profile allocation (block_search.allocate_plan: each block's residual
   change profiled on the uncached calibration run, the budget split over blocks by dynamic programming, the first 3
   steps computed in full as the schedules do). Fitness: latent MSE to the uncached latents (AutoDiffusion uses FID
   to real samples; the cache's target is the uncached image). Saved as bench/results/block_search_plan_k<K>.json.
2. Report on held-out prompts (tiny/heldout.py) with bench/compute.run_block: FLOPs skipped (FlopCounterMode over
   a one-prompt generation), wall-time speedup (bench/timing.py paired rotating rounds), whole-prompt accuracy
   (evaluator v2, Wilson 95% interval), pixel RMSE to uncached; plus, per budget, plan minus schedule RMSE with a
   paired bootstrap interval.

    python bench/block_search.py [--n 32] [--cal 6] [--population 12] [--generations 8] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compute import (CFG, ROOT, STEPS, calibration_captions, ours_cache, rmse_difference,  # noqa: E402
                     run_block, table)
from quality import DIT_ZERO_ROWS  # noqa: E402
from timing import Conditions, write_result  # noqa: E402

from nimblediff.core.caching import BlockPlan  # noqa: E402
from nimblediff.core.caching import search as dit_search  # noqa: E402
from nimblediff.pipelines.caching import search_block_plan  # noqa: E402
from nimblediff.tiny import evaluate, heldout  # noqa: E402

KS = (17, 13, 8)                     # per-step schedules: 1.47x / 1.92x / 3.1x fewer block evaluations
RESULTS = os.path.join(ROOT, "bench", "results")


def picture(plan: BlockPlan) -> str:
    """One column per step, one row per block: X computes, . reuses its residual."""
    return "<br>".join("`" + "".join("X" if row[j] else "." for row in plan.blocks) + "`"
                       for j in range(plan.n_blocks))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dit", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-dit"))
    p.add_argument("--n", type=int, default=32, help="held-out prompts for the report")
    p.add_argument("--cal", type=int, default=6, help="calibration prompts for the search")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the search's seed")
    p.add_argument("--time-n", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from diffusers import StableDiffusion3Pipeline

    cond = Conditions()
    print(cond, flush=True)
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    pipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": DIT_ZERO_ROWS}
    n_blocks = len(pipe.transformer.transformer_blocks)
    captions = calibration_captions(a.cal)

    # 1. search on the calibration split, one budget per per-step schedule
    schedules, plans, searches = {}, {}, {}
    for k in KS:
        schedules[k] = dit_search.load_schedule(os.path.join(RESULTS, f"compute_dit_schedule_k{k}.json"),
                                                pipe.transformer)
        t0 = time.perf_counter()
        out = search_block_plan(pipe, captions, k / STEPS, init=[schedules[k]], warmup=3, population=a.population,
                                generations=a.generations, search_seed=a.seed,
                                path=None if a.no_write else os.path.join(RESULTS, f"block_search_plan_k{k}.json"),
                                num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64, **extra)
        plans[k], searches[k] = out["plan"], dict(out, seconds=time.perf_counter() - t0)
        log(f"[search] K={k}: {out['plan'].evaluations()} of {STEPS * n_blocks} block evaluations, calibration MSE "
            f"{out['init_errors'][0]:.3e} (schedule), {out['init_errors'][1]:.3e} (profile allocation) -> "
            f"{out['error']:.3e} (plan), {out['evaluations']} evaluations, {searches[k]['seconds']:.0f} s")

    # 2. the report on held-out prompts
    held = heldout.heldout_scenes(a.n)
    net = evaluate.load_evaluator()
    arms = [("uncached", "-", None, "uncached")]
    for k in KS:
        arms.append((f"searched schedule {k}/{STEPS} steps", "schedule",
                     ours_cache("first_block", schedule=schedules[k]), "searched schedule"))
        arms.append((f"block plan at {k}/{STEPS} budget", "plan", ours_cache("block_plan", plan=plans[k]),
                     "block plan"))
    res = run_block(pipe, arms, a, held, net, log, STEPS, CFG, "dit", extra)

    lines = ["| budget (block evaluations) | calibration latent MSE: schedule / profile allocation -> searched plan | "
             "held-out RMSE: plan - schedule [95% CI] | lower distance |", "|---|---|---|---|"]
    for k in KS:
        s, pl = res.get(f"searched schedule {k}/{STEPS} steps", {}), res.get(f"block plan at {k}/{STEPS} budget", {})
        if "rmse" not in s or "rmse" not in pl:
            lines.append(f"| {k * n_blocks}/{STEPS * n_blocks} | - | n/a | - |")
            continue
        d, (lo, hi) = rmse_difference(pl["rmse"], s["rmse"])
        win = "plan" if hi < 0 else ("schedule" if lo > 0 else "no difference shown")
        lines.append(f"| {k * n_blocks}/{STEPS * n_blocks} ({STEPS / k:.2f}x fewer) | "
                     f"{searches[k]['init_errors'][0]:.2e} / {searches[k]['init_errors'][1]:.2e} -> "
                     f"{searches[k]['error']:.2e} | {d:+.2f} [{lo:+.2f}, "
                     f"{hi:+.2f}] | {win} |")
    pics = "\n".join(f"| {k}/{STEPS} | {picture(plans[k])} |" for k in KS)
    cond.finish()
    body = "\n".join([
        f"### NimbleDiff-Tiny-DiT (`{os.path.relpath(a.dit, ROOT)}`), flow Euler {STEPS} steps, CFG {CFG:g}: searched "
        "block plans vs searched per-step schedules at equal block evaluations\n",
        table(res, a.n), "", "Paired, per budget (same held-out prompts and noise):\n", "\n".join(lines), "",
        f"Search: {a.cal} calibration prompts (bench/compute.calibration_captions, seed 4242; noise seeds 7000 + i), "
        f"population {a.population}, {a.generations} generations, seed {a.seed}, fitness = latent MSE to the uncached "
        "25-step latents; the first population holds the per-step schedule of the same budget and the profile "
        "allocation (block_search.allocate_plan, first 3 steps in full). Search time per budget: "
        + ", ".join(f"K={k} {searches[k]['seconds']:.0f} s ({searches[k]['evaluations']} evaluations)" for k in KS)
        + ".\n",
        "Plans (one row per block 0-7, one column per step; X computes, . adds its residual from the last step it "
        "computed; `bench/results/block_search_plan_k<K>.json`):\n", "| budget | plan |", "|---|---|", pics, "",
        f"{a.n} held-out prompts (`nimblediff.tiny.heldout`), one noise seed each, 64x64, {a.threads} thread(s). "
        f"Speedup: uncached / arm wall time for a {a.time_n}-prompt call (full pipeline incl. text encoders and VAE), "
        f"{a.rounds} paired rotating rounds (bench/timing.py). FLOPs skipped: transformer FLOPs of a one-prompt "
        "generation (FlopCounterMode), 1 - arm / uncached; blocks skipped: transformer blocks that did not compute. "
        "Whole prompt: evaluator v2, Wilson 95% interval; 'vs uncached': paired bootstrap over prompts. RMSE: "
        "per-image pixel RMSE (0-255) to the uncached image of the same prompt and noise, mean over prompts. FD: "
        "Frechet distance of evaluator object features to uncached (biased upward at small n; rank only).",
        "", f"{cond} Whole run {time.perf_counter() - t_start:.0f} s."])
    print("\n" + body)
    if not a.no_write:
        write_result("block_search", __file__, body, mode=f"{a.n} held-out prompts")


if __name__ == "__main__":
    main()
