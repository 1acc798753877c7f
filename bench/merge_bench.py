"""LoRA merge: the fast path (QR of stacked factors for linear merges, seeded randomized SVD for TIES / DARE /
magnitude pruning; core merge(svd="fast")) against the exact path it replaces (dense merged update + full SVD per
layer; merge(svd="exact")), in one process, on an SD1.5-shaped LoRA pair: every attention / feed-forward / proj
layer and every conv of the real SD1.5 UNet (shapes from diffusers' UNet2DConditionModel on the meta device), two
random LoRAs of ranks 4 and 8, merged to rank 16.

1. Whole UNet, and its attention / ff / proj layers alone (a LoRA without conv layers), fast path only: wall and
   CPU time per method (median of --repeats); the issue's goal is <= 10 s on 2 cores. The fast path runs on one
   thread, so its CPU time is about its wall time on an idle core.
2. Paired old vs fast (bench/timing.py protocol: rotating rounds, median of per-round ratios, 95% interval): one
   layer of every distinct shape of at most --paired-max entries (--quick: 320 x 768), each merged on its own, so
   that a round's time is sum_shape count(shape) * t(shape): the time of all the UNet's layers of those shapes.
3. Accuracy against the exact truncated SVD, per method over those layers: the fast result's relative Frobenius
   error ||dW - dW_16|| / ||dW|| minus the exact one's (Eckart-Young optimum), worst layer, and for the linear
   merges the largest difference of the two rank-16 products relative to ||dW|| (exact up to float error, since
   16 >= 4 + 8).

Usage: python bench/merge_bench.py [--quick] [--threads 2] [--rounds 6] [--repeats 3] [--paired-max ENTRIES]
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

from nimblediff.core.adapters.delta import LoRA  # noqa: E402
from nimblediff.core.adapters.merge import merge  # noqa: E402
from nimblediff.core.adapters.rank import weight_shape  # noqa: E402

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """{canonical key: weight shape} of every attention / ff / proj layer and every conv of the SD1.5 UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15)
    return {f"unet.{n}": tuple(m.weight.shape) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.Linear) and ".attentions." in n)}


def random_lora(shapes: dict, rank: int, seed: int) -> dict[str, LoRA]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(shape[0], rank, *((1, 1) if len(shape) == 4 else ()), generator=g) * 0.01
        out[key] = LoRA(down, up, alpha=float(rank))
    return out


def run(adapters, method: str, svd: str, args):
    return merge(adapters, [0.8, 0.6], method, density=args.density, seed=0, rank=args.rank, svd=svd)


def timed(adapters, method: str, args) -> tuple[float, float]:
    """Median wall and CPU seconds of --repeats fast merges."""
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run(adapters, method, "fast", args)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def dense(d) -> torch.Tensor:
    return d.delta_weight(weight_shape(d)).flatten(1).double()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="paired shapes up to 320 x 768, 2 rounds, no whole-UNet runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="paired rounds per method")
    p.add_argument("--repeats", type=int, default=3, help="whole-UNet runs per method")
    p.add_argument("--paired-max", type=int, default=None, help="largest layer (entries) in the paired comparison "
                   "(default: all; the exact path takes ~30 s on one 1280 x 2560 x 3 x 3 conv)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.paired_max = 2, 320 * 768
    torch.set_num_threads(args.threads)
    cond = Conditions()
    print(cond, flush=True)
    shapes = sd15_shapes()
    a, b = random_lora(shapes, 4, seed=0), random_lora(shapes, 8, seed=1)
    counts = Counter(shapes.values())
    reps = {}  # one layer per distinct shape
    for key, shape in shapes.items():
        if shape not in reps.values() and (args.paired_max is None or math.prod(shape) <= args.paired_max):
            reps[key] = shape
    entries = sum(math.prod(s) for s in shapes.values())
    a_attn, b_attn = ({k: d for k, d in x.items() if ".attentions." in k} for x in (a, b))
    rows = []
    for method in args.methods:
        # 1. the whole UNet, and its attention / ff / proj layers alone (a kohya LoRA without conv_dim), fast path
        whole = attn = None
        if not args.quick:
            whole, attn = (timed([a, b], method, args), timed([a_attn, b_attn], method, args))
            print(f"{method}: fast path, whole UNet {whole[0]:.2f} s wall / {whole[1]:.2f} s CPU, attention / ff / "
                  f"proj layers {attn[0]:.2f} s / {attn[1]:.2f} s", flush=True)

        # 2. paired rounds, old (exact) vs fast, per layer so each shape is weighted by its count in the UNet
        def arm(svd):
            def fn():
                unet_equiv = 0.0
                for key, shape in reps.items():
                    t0 = time.perf_counter()
                    run([{key: a[key]}, {key: b[key]}], method, svd, args)
                    unet_equiv += (time.perf_counter() - t0) * counts[shape]
                return {"unet_equiv": unet_equiv}
            return fn

        runs = interleave({"exact": arm("exact"), "fast": arm("fast")}, repeats=args.rounds, warmup=0)
        speedup = ratio(runs, "exact", "fast")
        # 3. accuracy against the exact truncated SVD (Eckart-Young optimum), on the same layers
        pick = {k: a[k] for k in reps}, {k: b[k] for k in reps}
        fast, rf = run(list(pick), method, "fast", args)
        exact, re = run(list(pick), method, "exact", args)
        excess = {k: rf.rank.rel_error[k] - re.rank.rel_error[k] for k in reps}
        worst = max(excess, key=lambda k: excess[k] / max(re.rank.rel_error[k], 1e-300))
        # ||fast - exact|| relative to ||dW|| = ||exact|| / sqrt(1 - err^2)
        diff = max(float((dense(fast[k]) - dense(exact[k])).norm() / dense(exact[k]).norm())
                   * math.sqrt(max(1 - re.rank.rel_error[k] ** 2, 0.0)) for k in reps)
        rows.append((method, median(runs, "exact"), median(runs, "fast"), speedup, whole, attn,
                     max(re.rank.rel_error.values()), max(excess.values()),
                     excess[worst] / max(re.rank.rel_error[worst], 1e-300), diff))
        print(f"{method}: exact {rows[-1][1]:.1f} s, fast {rows[-1][2]:.2f} s (count-weighted), {speedup}; "
              f"excess error {rows[-1][7]:.2e}, max |fast - exact| / |dW| {diff:.1e}", flush=True)
    cond.finish()
    lines = [str(cond), "",
             f"SD1.5-shaped LoRA pair: {len(shapes)} layers (every attention / ff / proj layer and every conv; "
             f"{entries / 1e6:.0f} M weight entries; attention / ff / proj alone: {len(a_attn)} layers, "
             f"{sum(math.prod(shapes[k]) for k in a_attn) / 1e6:.0f} M), ranks 4 and 8, weights 0.8 / 0.6, merged to "
             f"rank {args.rank}, "
             f"density {args.density}. Paired: one layer of each of {len(reps)} of the {len(counts)} distinct shapes "
             f"(the {sum(counts[s] for s in reps.values())} UNet layers of those shapes, "
             f"{sum(math.prod(s) * counts[s] for s in reps.values()) / 1e6:.0f} M entries, by count-weighting), "
             f"{args.rounds} rotating rounds per method.", "",
             "| method | exact path, paired layers (s) | fast path, paired layers (s) | exact / fast (95% interval) | "
             "fast, whole UNet: wall / CPU (s) | fast, attention / ff / proj only: wall / CPU (s) | optimal rel. "
             "error, worst layer | fast minus optimal rel. error, worst | same, relative to optimal | "
             "max ‖fast − exact‖ / ‖dW‖ |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pair = lambda t: "-" if t is None else f"{t[0]:.2f} / {t[1]:.2f}"  # noqa: E731
    for method, old, new, speedup, whole, attn, opt, exc, rel, diff in rows:
        lines.append(f"| {method} | {old:.1f} | {new:.2f} | {speedup} | {pair(whole)} | {pair(attn)} "
                     f"| {opt:.3g} | {exc:.1e} | {rel:.1e} | {diff:.1e} |")
    text = "\n".join(lines)
    print(text)
    write_result("merge_bench", __file__, text, argv, mode="quick" if args.quick else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
