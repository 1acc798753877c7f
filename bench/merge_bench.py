"""LoRA merge under a rank budget on SD1.5-shaped LoRAs (issue 11: "an SD1.5 LoRA merge in <= 10 s on 2 cores").

The LoRA is kohya's default SD1.5 set: every attention / feed-forward / proj layer of the UNet's transformer blocks
(192, shapes from diffusers' UNet2DConditionModel on the meta device) and every attention / MLP projection of the
CLIP ViT-L text encoder (72): 264 layers, 352 M weight entries. Two random LoRAs (ranks from --configs, weights
0.8 / 0.6, density 0.5) are merged to a LoRA of the configured rank. --locon adds every UNet conv (LoCon).

1. Whole LoRA, the shipped path (core merge(rank=..., svd="fast"): linear merges through the stacked factors, TIES /
   DARE / magnitude pruning streamed block by block from the factors into a randomized SVD): wall and CPU seconds
   (median of --repeats) per method and torch thread setting. The merge runs its elementwise work on one thread
   whatever the setting (a second OpenMP thread on busy cores slowed it down), so the thread rows differ by noise.
2. Before / after, paired (bench/timing.py protocol: rotating rounds, median of per-round ratios, 95% interval):
   the previous path (dense update of each layer, then the randomized SVD: merge with streaming switched off) against
   the streamed one, CPU seconds, one layer of each distinct shape merged on its own and weighted by the shape's
   count (= the whole LoRA; --quick: shapes up to 1 M entries); the first config only.
3. Accuracy against the exact truncated SVD (Eckart-Young optimum) of the same dense merged update (merge without a
   rank, which equals PEFT's merge_utils), per distinct shape: the LoRA's real relative Frobenius error divided by
   the optimum's (worst layer; the goal is <= 1.05), and how far the error the report states is from the real one.
   Linear merges are exact when the rank holds the summed ranks: there the largest error is shown instead. Every
   config. --quick: the first two configs, one thread setting, 2 rounds.

Usage: python bench/merge_bench.py [--quick] [--threads 1 2] [--repeats 1] [--rounds 3] [--configs 4,8:16 ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Conditions, interleave, median, ratio, write_result  # noqa: E402

from nimblediff.core.adapters import merge as merge_module  # noqa: E402
from nimblediff.core.adapters.delta import LoRA  # noqa: E402
from nimblediff.core.adapters.merge import merge  # noqa: E402
from nimblediff.core.adapters.rank import weight_shape  # noqa: E402

METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
QUICK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_shapes(locon: bool = False) -> dict[str, tuple[int, ...]]:
    """{canonical key: weight shape}: the UNet's attention / ff / proj layers (and with locon every conv), and the
    text encoder's q / k / v / out / fc1 / fc2."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    shapes = {f"unet.{n}": tuple(m.weight.shape) for n, m in unet.named_modules()
              if (isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".attentions." in n)
              or (locon and isinstance(m, torch.nn.Conv2d))}
    for i in range(12):   # CLIP ViT-L/14 text encoder: hidden 768, MLP 3072
        layer = f"text_encoder.text_model.encoder.layers.{i}"
        shapes.update({f"{layer}.self_attn.{p}": (768, 768) for p in ("q_proj", "k_proj", "v_proj", "out_proj")})
        shapes.update({f"{layer}.mlp.fc1": (3072, 768), f"{layer}.mlp.fc2": (768, 3072)})
    return shapes


def random_lora(shapes: dict, rank: int, seed: int) -> dict[str, LoRA]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.01
        out[key] = LoRA(down, up, alpha=float(rank))
    return out


def run(adapters, method: str, rank: int | None, density: float):
    return merge(adapters, [0.8, 0.6], method, density=density, seed=0, rank=rank)


def cpu_and_wall(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


class previous_path:
    """The path before streaming: the dense update of each layer, then the randomized SVD."""

    def __enter__(self):
        self.saved = merge_module._streamable
        merge_module._streamable = lambda *a, **k: False

    def __exit__(self, *exc):
        merge_module._streamable = self.saved


def dense(d) -> torch.Tensor:
    return d.delta_weight(weight_shape(d)).flatten(1).double()


def parse_config(text: str) -> tuple[int, int, int]:
    ranks, rank = text.split(":")
    a, b = ranks.split(",")
    return int(a), int(b), int(rank)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one config, 4 methods, 1 thread setting, paired and "
                   "accuracy on shapes up to 1 M entries, 2 rounds (about a minute of CPU)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="whole-LoRA runs per method and thread setting")
    p.add_argument("--rounds", type=int, default=3, help="paired before/after rounds per method")
    p.add_argument("--configs", nargs="+", default=None,
                   help="rank of LoRA 1, rank of LoRA 2 : merged rank (default 4,8:16 16,16:32 8,8:8; --quick: the "
                   "first two); section 2 uses the first")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--locon", action="store_true", help="also every UNet conv (a LoCon LoRA)")
    args = p.parse_args(argv)
    methods = args.methods or (QUICK_METHODS if args.quick else METHODS)
    configs = [parse_config(c) for c in args.configs or ["4,8:16", "16,16:32", "8,8:8"][:2 if args.quick else 3]]
    max_paired = None
    if args.quick:
        args.threads, args.rounds, max_paired = args.threads[:1], 2, 1 << 20
    cond = Conditions()
    print(cond, flush=True)
    shapes = sd15_shapes(args.locon)
    entries = sum(math.prod(s) for s in shapes.values())
    counts = Counter(shapes.values())
    reps = {}  # one layer per distinct shape
    for key, shape in shapes.items():
        if shape not in reps.values() and (max_paired is None or math.prod(shape) <= max_paired):
            reps[key] = shape
    lines = []

    # 1. the whole LoRA, shipped path
    whole = []
    for ra, rb, rank in configs:
        a, b = random_lora(shapes, ra, seed=0), random_lora(shapes, rb, seed=1)
        for method in methods:
            for threads in args.threads:
                torch.set_num_threads(threads)
                runs = [cpu_and_wall(lambda: run([a, b], method, rank, args.density)) for _ in range(args.repeats)]
                wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                whole.append((f"{ra} + {rb} -> {rank}", method, threads, wall, cpu, os_load()))
                print(f"whole LoRA, ranks {ra} + {rb} -> {rank}, {method}, {threads} thread(s): {wall:.2f} s wall, "
                      f"{cpu:.2f} s CPU (load {os_load():.1f})", flush=True)
    torch.set_num_threads(args.threads[0])

    # 2. before / after, paired, per distinct shape weighted by its count (first config); 3. accuracy on the same
    #    layers (every config)
    paired, accuracy = [], []
    for ci, (ra, rb, rank) in enumerate(configs):
        a, b = random_lora(shapes, ra, seed=0), random_lora(shapes, rb, seed=1)
        paired_and_accuracy(ci == 0, a, b, rank, f"{ra} + {rb} -> {rank}", methods, reps, counts, args, paired,
                            accuracy)
    cond.finish()
    ra, rb, rank = configs[0]

    lines = [str(cond), "",
             f"SD1.5-shaped LoRA pair: {len(shapes)} layers (UNet attention / ff / proj"
             f"{' and every conv' if args.locon else ''}, text encoder q / k / v / out / fc1 / fc2; "
             f"{entries / 1e6:.0f} M weight entries), weights 0.8 / 0.6, density {args.density}. Whole LoRA, shipped "
             "path (goal: <= 10 s):", "",
             "| ranks -> merged rank | method | torch threads | wall (s) | CPU (s) | load (1 min) |",
             "|---|---|---|---|---|---|"]
    for cfg, method, threads, wall, cpu, load in whole:
        lines.append(f"| {cfg} | {method} | {threads} | {wall:.2f} | {cpu:.2f} | {load:.1f} |")
    covered = sum(counts[s] for s in reps.values())
    lines += ["", f"Before / after (ranks {ra} + {rb} -> {rank}): one layer of each of {len(reps)} of the "
              f"{len(counts)} distinct shapes, weighted by count ({covered} of the {len(shapes)} layers, "
              f"{sum(math.prod(s) * counts[s] for s in reps.values()) / 1e6:.0f} M entries), CPU seconds, "
              f"{args.rounds} rotating rounds:", "",
              "| method | before: dense update + randomized SVD (s) | after: streamed (s) | before / after (95% "
              "interval) |", "|---|---|---|---|"]
    for method, old, new, r in paired:
        lines.append(f"| {method} | {old:.2f} | {new:.2f} | {r} |")
    lines += ["", "Accuracy on the same layers: the merged LoRA's relative Frobenius error against the dense merged "
              "update, divided by the optimum's (the truncated SVD of that update), worst layer:", "",
              "| ranks -> merged rank | method | error / optimum, worst layer | largest error | largest abs(reported - "
              "real error) |", "|---|---|---|---|---|"]
    for cfg, method, worst, biggest, rep in accuracy:
        lines.append(f"| {cfg} | {method} | {'exact (rank holds the sum)' if worst == 0 else f'{worst:.4f}'} | "
                     f"{biggest:.3g} | {rep:.1e} |")
    text = "\n".join(lines)
    print(text)
    write_result("merge_bench", __file__, text, argv, mode="quick" if args.quick else "")
    return 0


def paired_and_accuracy(timed: bool, a, b, rank, label, methods, reps, counts, args, paired, accuracy) -> None:
    for method in methods:
        def arm(previous):
            def fn():
                cpu = 0.0
                for key, shape in reps.items():
                    with previous_path() if previous else _null():
                        c0 = time.process_time()
                        run([{key: a[key]}, {key: b[key]}], method, rank, args.density)
                        cpu += (time.process_time() - c0) * counts[shape]
                return {"cpu": cpu}
            return fn

        if timed and method != "linear":   # linear merges never formed a dense update: nothing changed
            runs = interleave({"before": arm(True), "after": arm(False)}, repeats=args.rounds, warmup=0)
            paired.append((method, median(runs, "before"), median(runs, "after"), ratio(runs, "before", "after")))
            print(f"{method}: before {paired[-1][1]:.1f} s CPU, after {paired[-1][2]:.2f} s ({paired[-1][3]})",
                  flush=True)
        pick = [{k: a[k] for k in reps}, {k: b[k] for k in reps}]
        low, report = run(pick, method, rank, args.density)
        full, _ = run(pick, method, None, args.density)           # the dense merged update (= PEFT merge_utils)
        worst_ratio, worst_report, worst_abs = 0.0, 0.0, 0.0
        for key in reps:
            W = full[key].weight.flatten(1).double()
            err = float((W - dense(low[key])).norm() / W.norm())
            S = torch.linalg.svdvals(W)
            opt = float(S[low[key].rank:].norm() / S.norm())
            worst_abs = max(worst_abs, err)
            if opt > 1e-6:
                worst_ratio = max(worst_ratio, err / opt)
            worst_report = max(worst_report, abs(report.rank.rel_error[key] - err))
        accuracy.append((label, method, worst_ratio, worst_abs, worst_report))
        print(f"{label}, {method}: error / optimum worst {worst_ratio:.4f}, largest error {worst_abs:.3g}, "
              f"|reported - real| {worst_report:.1e}", flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def os_load() -> float:
    import os

    return os.getloadavg()[0]


if __name__ == "__main__":
    sys.exit(main())
