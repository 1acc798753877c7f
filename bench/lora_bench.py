"""LoRA load + apply + remove: NimbleDiff (read_lora + fuse + unfuse) vs diffusers + PEFT (load_lora_weights +
fuse_lora + unfuse_lora + unload_lora_weights), and the forward cost of an unfused PEFT adapter vs a fused LoRA.

Same process, same SD1.5-shaped random UNet (tests/factories.sd15_shaped_unet), same rank-16 LoRA file on the
attention projections (attn1/attn2 to_q, to_k, to_v, to_out.0). Every time ratio follows bench/timing.py: paired
rounds in rotating order, median of per-round ratios with a 95% interval, conditions printed beside it.
The plain-torch floor (safetensors read, in-place addmm_ on every patched weight, and back) runs in the same
rounds: fusing reads and writes every patched weight once per direction, so no fused loader beats it.
Peak memory: each library runs once in a fresh child process (glibc told to return large blocks at once) while a
thread samples the resident set size; the peak over the pre-run RSS is reported beside the model's weight bytes.

Usage: python bench/lora_bench.py [--quick] [--scale 1.0 | 0.2] [--repeats 9] [--forward-repeats 15] [--rank 16]
                                   [--threads 1] [--no-memory] [--no-write]
--quick: scale 0.2 (37.5M UNet), about a minute. Writes bench/results/lora_bench.md (--no-write: print only).
The default is one thread: on a machine whose cores are busy with other work, OpenMP teams spin-waiting for a
preempted thread made a forward pass 5-15x slower (and the timings meaningless) in our runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import factories  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Conditions, interleave, median, ratio, write_result  # noqa: E402

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


# ----------------------------------------------------------------------------------------------------------- setup
def random_lora(unet, rank: int, seed: int = 0) -> dict:
    """Canonical rank-`rank` LoRAs on the attention projections, small enough to keep the weights in range."""
    from nimblediff.core.adapters.delta import LoRA

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS):
            out[f"unet.{name}"] = LoRA(torch.randn(rank, m.in_features, generator=gen) * 0.02,
                                       torch.randn(m.out_features, rank, generator=gen) * 0.02, alpha=float(rank))
    return out


def pipeline(unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=unet, vae=factories.tiny_vae(1),                 # only the UNet matters
                                   text_encoder=factories.tiny_clip_text_encoder(),
                                   tokenizer=factories.tiny_clip_tokenizer(), scheduler=factories._ddim(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------- the two runs
def ours(unet, path: str, hooks: bool = False) -> dict[str, float]:
    """read_lora, then fuse + unfuse, or (hooks=True) the run-time mode: attach + detach, no pass over the weights."""
    from nimblediff.core.adapters.apply import ModuleIndex, fuse
    from nimblediff.core.adapters.attach import attach
    from nimblediff.weights.lora_formats import Target, read_lora

    t0 = time.perf_counter()
    index = ModuleIndex({"unet": unet})   # one named_modules() walk serves the reader's names and the apply
    deltas, report = read_lora(path, Target.from_modules(index))
    t1 = time.perf_counter()
    handle = (attach if hooks else fuse)(index, deltas, 1.0, source=path)
    t2 = time.perf_counter()
    (handle.detach if hooks else handle.unfuse)()
    t3 = time.perf_counter()
    return {"load": t1 - t0, "apply": t2 - t1, "remove": t3 - t2}


def theirs(pipe, path: str, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    pipe.load_lora_weights(path, adapter_name=name)
    t1 = time.perf_counter()
    pipe.fuse_lora(lora_scale=1.0)
    t2 = time.perf_counter()
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    t3 = time.perf_counter()
    return {"load": t1 - t0, "apply": t2 - t1, "remove": t3 - t2}


def floor(unet, path: str, targets: dict) -> dict[str, float]:
    """What any fused loader must at least do, in plain torch: read the file (safetensors), then W += s B A in place
    (addmm_) on every patched weight, and back. One read and one write of each patched weight per direction: the
    memory-bandwidth floor of fuse / unfuse, which no library beats at this precision. targets: canonical key ->
    weight (the key-to-module naming is left out: it is structural, not work)."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    sd = load_file(path)
    t1 = time.perf_counter()
    pairs = [(w, sd[f"{k}.lora_B.weight"], sd[f"{k}.lora_A.weight"]) for k, w in targets.items()]
    with torch.no_grad():
        for w, up, down in pairs:
            w.addmm_(up, down, alpha=1.0)   # alpha = rank: scale 1
        t2 = time.perf_counter()
        for w, up, down in pairs:
            w.addmm_(up, down, alpha=-1.0)
    t3 = time.perf_counter()
    return {"load": t1 - t0, "apply": t2 - t1, "remove": t3 - t2}


def check_same_weights(unet, pipe, path: str) -> tuple[float, float]:
    """(max |ours fused - diffusers fused|, max |after our unfuse - base|) over the weights the LoRA patches (only
    those are copied: a full state-dict copy would not fit beside a full-size model twice)."""
    from nimblediff.core.adapters.apply import fuse
    from nimblediff.weights.lora_formats import Target, read_lora

    deltas, _ = read_lora(path, Target.from_modules({"unet": unet}))
    names = [f"{k[len('unet.'):]}.weight" for k in deltas]
    sd = unet.state_dict()
    base = {n: sd[n].clone() for n in names}
    handle = fuse({"unet": unet}, deltas, 1.0)
    mine = {n: sd[n].clone() for n in names}
    handle.unfuse()
    back = max(float((sd[n] - base[n]).abs().max()) for n in names)
    pipe.load_lora_weights(path, adapter_name="check")
    pipe.fuse_lora(lora_scale=1.0)
    ref = pipe.unet.state_dict()   # PEFT wraps each adapted Linear: its weight is now <module>.base_layer.weight
    diff = max(float((mine[n] - ref[n.replace(".weight", ".base_layer.weight")]).abs().max()) for n in names)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return diff, back


def time_interleaved(unet, pipe, path: str, repeats: int):
    """load / apply / remove per library, in paired rounds (bench/timing.py)."""
    names = iter(range(10**6))
    targets = {f"unet.{n}": m.weight.data for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)}
    return interleave({"nimblediff": lambda: ours(unet, path), "hooked": lambda: ours(unet, path, hooks=True),
                       "diffusers": lambda: theirs(pipe, path, f"run{next(names)}"),
                       "floor": lambda: floor(unet, path, targets)},
                      repeats, between=gc.collect)


def time_forward(unet, path: str, repeats: int, batch: int = 2, size: int = 32):
    """Paired rounds of forward passes: our fused copy, the same UNet with the PEFT adapter unfused (diffusers'
    default after load_lora_weights), and our hooks. Returns (samples, max relative output difference)."""
    from nimblediff.core.adapters.apply import fuse
    from nimblediff.core.adapters.attach import attach
    from nimblediff.weights.lora_formats import Target, read_lora

    fused = copy.deepcopy(unet)
    deltas, _ = read_lora(path, Target.from_modules({"unet": fused}))
    fuse({"unet": fused}, deltas, 1.0)
    hooked = copy.deepcopy(unet)
    attach({"unet": hooked}, read_lora(path, Target.from_modules({"unet": hooked}))[0], 1.0)
    peft = pipeline(unet)
    peft.load_lora_weights(path, adapter_name="fwd")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=gen)                                   # (B, 4, h, w)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen)           # (B, 77, 768)
    t = torch.tensor([500] * batch)
    with torch.inference_mode():
        a = fused(x, t, encoder_hidden_states=ctx).sample
        b = peft.unet(x, t, encoder_hidden_states=ctx).sample
        c = hooked(x, t, encoder_hidden_states=ctx).sample
        rel = max(float((a - b).abs().max() / b.abs().max()), float((c - b).abs().max() / b.abs().max()))

        def forward(model):
            def call():
                model(x, t, encoder_hidden_states=ctx)
            return call

        runs = interleave({"fused": forward(fused), "unfused": forward(peft.unet), "hooked": forward(hooked)}, repeats)
    peft.unload_lora_weights()
    del fused, hooked
    gc.collect()
    return runs, rel


# ---------------------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample the resident set size on a thread; `peak - start` after the block."""

    def __enter__(self):
        sys.setswitchinterval(0.0002)             # let the sampler run between Python bytecodes of the workload
        gc.collect()
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())


def memory_child(lib: str, scale: float, path: str) -> None:
    """One load + apply + remove in this fresh process; prints JSON {peak_mb, weights_mb}."""
    import diffusers  # noqa: F401  (imports outside the measurement)
    import peft  # noqa: F401

    from nimblediff.weights import lora_formats  # noqa: F401

    unet = factories.sd15_shaped_unet(scale)
    pipe = pipeline(unet) if lib == "diffusers" else None
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    ptrs = [p.data_ptr() for p in unet.parameters()]
    with PeakRSS() as m:
        ours(unet, path) if lib == "nimblediff" else theirs(pipe, path, "mem")
    in_place = ptrs == [p.data_ptr() for p in unet.parameters()]
    print(json.dumps({"peak_mb": (m.peak - m.start) / 1e6, "weights_mb": weights / 1e6, "in_place": in_place}))


def measure_memory(lib: str, scale: float, path: str, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, __file__, "--memory-child", lib, "--scale", str(scale), "--lora", path,
                           "--threads", str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {lib} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------ main
PHASES = {"load": "load (read_lora / load_lora_weights)", "apply": "apply (fuse or attach / fuse_lora)",
          "remove": "remove (unfuse or detach / unfuse_lora + unload_lora_weights)",
          "total": "**load + apply + remove**"}


def table(t, mem: dict | None, fwd, info: str) -> str:
    """Medians in ms (loose on a shared machine) and paired ratios with 95% intervals (the result)."""
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    rows = [info, "",
            "| phase | NimbleDiff fused (ms) | NimbleDiff hooks (ms) | diffusers + PEFT (ms) | fused / diffusers "
            "[95% CI] | hooks / diffusers [95% CI] | plain-torch floor (ms) | floor / diffusers [95% CI] | fused / "
            "floor [95% CI] |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, label in PHASES.items():
        rows.append(f"| {label} | {ms(median(t, 'nimblediff', phase))} | {ms(median(t, 'hooked', phase))} | "
                    f"{ms(median(t, 'diffusers', phase))} | {ratio(t, 'nimblediff', 'diffusers', phase)} | "
                    f"{ratio(t, 'hooked', 'diffusers', phase)} | {ms(median(t, 'floor', phase))} | "
                    f"{ratio(t, 'floor', 'diffusers', phase)} | {ratio(t, 'nimblediff', 'floor', phase)} |")
    if mem is not None:
        n, d = mem["nimblediff"], mem["diffusers"]
        rows.append(f"| peak RSS over start, one fused run in a fresh process (MB; weights {n['weights_mb']:.0f} MB) "
                    f"| {n['peak_mb']:.1f} | - | {d['peak_mb']:.1f} | {n['peak_mb'] / max(d['peak_mb'], 1e-9):.3f}x "
                    "(single run) | - | - | - | - |")
    rows += ["", "| forward, batch 2, 4x32x32 | median (ms) | / our fused UNet [95% CI] |", "|---|---:|---:|",
             f"| our fused LoRA (NimbleDiff `fuse`) | {ms(median(fwd, 'fused'))} | 1 |",
             f"| diffusers' unfused PEFT adapter (its default after `load_lora_weights`) | "
             f"{ms(median(fwd, 'unfused'))} | {ratio(fwd, 'unfused', 'fused')} |",
             f"| our hooks (NimbleDiff `attach`, unfused) | {ms(median(fwd, 'hooked'))} | "
             f"{ratio(fwd, 'hooked', 'fused')} |"]
    return "\n".join(rows)


def goals(t, mem, fwd) -> list[str]:
    total, hooks = ratio(t, "nimblediff", "diffusers"), ratio(t, "hooked", "diffusers")
    fu, fh = ratio(fwd, "unfused", "fused"), ratio(fwd, "hooked", "fused")
    verdict = lambda r, bound: ("met" if r.high <= bound else "NOT met" if r.low > bound  # noqa: E731
                                else "undecided (interval straddles the bound)")
    low, over = ratio(t, "floor", "diffusers"), ratio(t, "nimblediff", "floor")
    out = [f"fused load+apply+remove {total} of diffusers (goal <= 0.1x): {verdict(total, 0.1)}; the plain-torch "
           f"floor (safetensors read + in-place addmm_ and back) is {low} of diffusers"
           + (" (the goal is below the floor: unreachable at this precision)" if low.low > 0.1 else "")
           + f", and fused is {over} of the floor",
           f"hooked load+attach+detach {hooks} of diffusers (goal <= 0.1x): {verdict(hooks, 0.1)}",
           f"hooked forward {fh} of the fused one (bound <= 1.05x): {verdict(fh, 1.05)}",
           f"unfused PEFT forward (diffusers' default) {fu} of our fused one (bound <= 1.05x): {verdict(fu, 1.05)}"]
    if mem is not None:
        n = mem["nimblediff"]
        out.append(f"no second copy of the weights: peak {n['peak_mb']:.1f} MB over start vs weights "
                   f"{n['weights_mb']:.0f} MB, weights patched in place: {n['in_place']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scale 0.2 (37.5M UNet): about a minute")
    parser.add_argument("--scale", type=float, default=None, help="UNet width scale (default 1.0: full SD1.5)")
    parser.add_argument("--repeats", type=int, default=9, help="paired rounds of load + apply + remove")
    parser.add_argument("--forward-repeats", type=int, default=15, help="paired rounds of forward passes")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurement")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/lora_bench.md")
    parser.add_argument("--memory-child", choices=("nimblediff", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale is None:
        args.scale = 0.2 if args.quick else 1.0
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # "No LoRA keys associated to CLIPTextModel" on every load
    if args.memory_child:
        memory_child(args.memory_child, args.scale, args.lora)
        return 0

    from nimblediff.weights.lora_write import save_lora

    cond = Conditions()
    print(cond, file=sys.stderr)
    t0 = time.perf_counter()
    unet = factories.sd15_shaped_unet(args.scale)
    pipe = pipeline(unet)
    n_params = sum(p.numel() for p in unet.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        deltas = random_lora(unet, args.rank)
        path = str(save_lora(deltas, Path(tmp) / "lora.safetensors", "peft"))
        lora_params = sum(d.numel() for d in deltas.values())
        print(f"setup {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        diff, back = check_same_weights(unet, pipe, path)
        t = time_interleaved(unet, pipe, path, args.repeats)
        print(f"load/apply/remove done {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        mem = None if args.no_memory else {lib: measure_memory(lib, args.scale, path, args.threads)
                                           for lib in ("nimblediff", "diffusers")}
        fwd, rel = time_forward(unet, path, args.forward_repeats)
        size_mb = os.path.getsize(path) / 1e6
    cond.finish()
    info = (f"UNet {n_params / 1e6:.1f} M params (scale {args.scale}), rank-{args.rank} LoRA on {len(deltas)} "
            f"attention projections ({lora_params / 1e6:.2f} M params, {size_mb:.1f} MB); {args.repeats} paired rounds "
            f"of load + apply + remove, {args.forward_repeats} of forward passes, order rotating each round; ratio = "
            f"median of per-round ratios, [95% interval] from order statistics. Fused weights ours vs diffusers: "
            f"max |diff| {diff:.1e}; after unfuse vs base: {back:.1e}; forward outputs (fused, hooks) vs unfused "
            f"PEFT: rel. max diff {rel:.1e}.\n\n{cond}")
    body = table(t, mem, fwd, info) + "\n\n" + "\n".join(f"- {g}" for g in goals(t, mem, fwd))
    print(body)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not args.no_write:
        mode = ("quick mode: scale 0.2" if args.quick else f"full run, scale {args.scale}")
        write_result("lora_bench", __file__, body, argv, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
