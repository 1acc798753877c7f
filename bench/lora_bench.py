"""LoRA load + apply + remove: NimbleDiff (read_lora + fuse + unfuse) vs diffusers + PEFT (load_lora_weights +
fuse_lora + unfuse_lora + unload_lora_weights), and the forward cost of an unfused PEFT adapter vs a fused LoRA.

Same process, same SD1.5-shaped random UNet (tests/factories.sd15_shaped_unet), same rank-16 LoRA file on the
attention projections (attn1/attn2 to_q, to_k, to_v, to_out.0), runs interleaved (ours, theirs, ours, ...), medians.
Peak memory: each library runs once in a fresh child process (glibc told to return large blocks at once) while a
thread samples the resident set size; the peak over the pre-run RSS is reported beside the model's weight bytes.

Usage: python bench/lora_bench.py [--scale 1.0 | 0.2] [--repeats 7] [--forward-repeats 7] [--rank 16] [--threads 2]
On a machine whose cores are busy with other work, use --threads 1: OpenMP teams spin-waiting for a preempted
thread made a forward pass 5-15x slower (and the timings meaningless) in our runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import factories  # noqa: E402

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


def time_interleaved(unet, pipe, path: str, repeats: int) -> dict[str, dict[str, float]]:
    runs = {"nimblediff": [], "unfused": [], "diffusers": []}
    ours(unet, path)                      # warm-up (lazy imports, first-touch allocations)
    ours(unet, path, hooks=True)
    theirs(pipe, path, "warmup")
    for i in range(repeats):
        gc.collect()
        runs["nimblediff"].append(ours(unet, path))
        runs["unfused"].append(ours(unet, path, hooks=True))
        gc.collect()
        runs["diffusers"].append(theirs(pipe, path, f"run{i}"))
    out = {}
    for lib, rs in runs.items():
        out[lib] = {phase: statistics.median(r[phase] for r in rs) for phase in ("load", "apply", "remove")}
        out[lib]["total"] = statistics.median(sum(r.values()) for r in rs)
    return out


def time_forward(unet, path: str, repeats: int, batch: int = 2, size: int = 32) -> dict[str, float]:
    """Paired, interleaved forward passes: our fused copy vs the same UNet with the PEFT adapter unfused (diffusers'
    default after load_lora_weights). Returns medians and the median of per-pair ratios."""
    from nimblediff.core.adapters.apply import fuse
    from nimblediff.weights.lora_formats import Target, read_lora

    from nimblediff.core.adapters.attach import attach

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
    times = {"fused": [], "unfused": [], "hooked": []}
    with torch.inference_mode():
        a = fused(x, t, encoder_hidden_states=ctx).sample                                  # warm-up both
        b = peft.unet(x, t, encoder_hidden_states=ctx).sample
        rel = float((a - b).abs().max() / b.abs().max())
        for _ in range(repeats):
            for name, model in (("fused", fused), ("unfused", peft.unet), ("hooked", hooked)):
                t0 = time.perf_counter()
                model(x, t, encoder_hidden_states=ctx)
                times[name].append(time.perf_counter() - t0)
    peft.unload_lora_weights()
    del fused
    gc.collect()
    ratios = [u / f for f, u in zip(times["fused"], times["unfused"])]
    hooked_ratios = [u / f for f, u in zip(times["fused"], times["hooked"])]
    del hooked
    return {"fused": statistics.median(times["fused"]), "unfused": statistics.median(times["unfused"]),
            "hooked": statistics.median(times["hooked"]), "hooked_ratio": statistics.median(hooked_ratios),
            "ratio": statistics.median(ratios), "rel_diff": rel}


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
def table(t: dict, mem: dict | None, fwd: dict, info: str) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    nd, un, df = t["nimblediff"], t["unfused"], t["diffusers"]
    rows = [f"{info}", "",
            "| phase | NimbleDiff fused (ms) | NimbleDiff hooks (ms) | diffusers + PEFT (ms) | fused ratio | hooks ratio |",
            "|---|---:|---:|---:|---:|---:|"]
    names = {"load": "load (read_lora / load_lora_weights)", "apply": "apply (fuse / fuse_lora)",
             "remove": "remove (unfuse / unfuse_lora + unload_lora_weights)", "total": "**load + apply + remove**"}
    for phase, label in names.items():
        rows.append(f"| {label} | {ms(nd[phase])} | {ms(un[phase])} | {ms(df[phase])} | {nd[phase] / df[phase]:.3f}x "
                    f"| {un[phase] / df[phase]:.3f}x |")
    if mem is not None:
        n, d = mem["nimblediff"], mem["diffusers"]
        rows.append(f"| peak RSS over start (MB; weights {n['weights_mb']:.0f} MB) | {n['peak_mb']:.1f} | - | "
                    f"{d['peak_mb']:.1f} | {n['peak_mb'] / max(d['peak_mb'], 1e-9):.3f}x | - |")
    rows += ["", "| forward, batch 2, 4x32x32 | fused LoRA, ours (ms) | unfused PEFT adapter (ms) | unfused / fused "
             "(paired median) |", "|---|---:|---:|---:|",
             f"| UNet | {ms(fwd['fused'])} | {ms(fwd['unfused'])} | {fwd['ratio']:.3f}x |",
             f"| UNet, NimbleDiff hooks (unfused) | {ms(fwd['fused'])} | {ms(fwd['hooked'])} | "
             f"{fwd['hooked_ratio']:.3f}x |"]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="UNet width scale (1.0: full SD1.5, 0.2: quick)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--forward-repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurement")
    parser.add_argument("--memory-child", choices=("nimblediff", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # "No LoRA keys associated to CLIPTextModel" on every load
    if args.memory_child:
        memory_child(args.memory_child, args.scale, args.lora)
        return 0

    from nimblediff.weights.lora_write import save_lora

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
        mem = None if args.no_memory else {lib: measure_memory(lib, args.scale, path, args.threads)
                                           for lib in ("nimblediff", "diffusers")}
        fwd = time_forward(unet, path, args.forward_repeats)
        size_mb = os.path.getsize(path) / 1e6
    info = (f"UNet {n_params / 1e6:.1f} M params (scale {args.scale}), rank-{args.rank} LoRA on {len(deltas)} "
            f"attention projections ({lora_params / 1e6:.2f} M params, {size_mb:.1f} MB), {args.threads} threads, medians of "
            f"{args.repeats} interleaved runs. Fused weights ours vs diffusers: max |diff| {diff:.1e}; after unfuse "
            f"vs base: {back:.1e}; forward outputs unfused vs fused: rel. max diff {fwd['rel_diff']:.1e}.")
    print(table(t, mem, fwd, info))
    total = t["nimblediff"]["total"] / t["diffusers"]["total"]
    hooks = t["unfused"]["total"] / t["diffusers"]["total"]
    goals = [f"load+apply+remove {total:.3f}x diffusers (goal <= 0.1x): {'met' if total <= 0.1 else 'NOT met'}",
             f"hooked (unfused) load+attach+detach {hooks:.3f}x diffusers: {'met' if hooks <= 0.1 else 'NOT met'}; "
             f"its forward {fwd['hooked_ratio']:.3f}x the fused one (bound <= 1.05x)",
             f"unfused forward (PEFT, diffusers' default) {fwd['ratio']:.3f}x our fused forward (bound: <= 1.05x): "
             f"{'within' if fwd['ratio'] <= 1.05 else 'above'}"]
    if mem is not None:
        n = mem["nimblediff"]
        goals.append(f"no second copy of the weights: peak {n['peak_mb']:.1f} MB over start vs weights "
                     f"{n['weights_mb']:.0f} MB, weights patched in place: {n['in_place']}")
    print("\n" + "\n".join(f"- {g}" for g in goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
