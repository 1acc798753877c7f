"""NimbleDiff-Tiny quality vs steps: the teacher with multistep solvers, the Flash LoRA with LCM, and 4 steps with
no distillation, on fixed prompts and seeds. Prints a Markdown table, writes out/tiny_quality.md and a grid PNG.

    python bench/quality.py [--quick] [--threads 1] [--model weights/tiny/nimblediff-tiny]
                            [--lora weights/tiny/nimblediff-tiny-flash-lora.safetensors] [--no-write]

--quick: 16 prompts instead of 64 and no 25-step teacher row (about a minute; accuracies move by several points).
Writes bench/results/quality.md (README's table and its summary sentences, computed here) and
bench/results/quality_card.md (the model card's full table; also out/tiny_quality.md between its markers, which
`python -m nimblediff.tiny.package` puts into the card). `python bench/update_readme.py` copies them in.

Uses diffusers' own StableDiffusionPipeline and schedulers; the "teacher fitted solver" row swaps in NimbleScheduler
with the shipped 4-step solver fitted to the teacher at CFG 5 (`nimblediff schedule search --method fit`).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

from nimblediff.tiny import data, evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Conditions, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_SEED = 2024  # the prompts are the captions of these procedural scenes; their images are the real set
CFG = 5.0
# (name, scheduler, steps, guidance, LoRA on)
CONFIGS = [("teacher DPM++", "dpm", 50, CFG, False), ("teacher DPM++", "dpm", 25, CFG, False),
           ("teacher DPM++", "dpm", 8, CFG, False), ("teacher DPM++", "dpm", 4, CFG, False),
           ("teacher DDIM", "ddim", 4, CFG, False), ("teacher fitted solver", "fitted", 4, CFG, False),
           ("no distillation LCM", "lcm", 1, 1.0, False), ("no distillation LCM", "lcm", 2, 1.0, False),
           ("no distillation LCM", "lcm", 4, 1.0, False),
           ("Flash LoRA LCM", "lcm", 1, 1.0, True), ("Flash LoRA LCM", "lcm", 2, 1.0, True),
           ("Flash LoRA LCM", "lcm", 4, 1.0, True), ("Flash LoRA LCM", "lcm", 8, 1.0, True)]


def scheduler(kind, config, schedule_file=None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    if kind == "fitted":  # NimbleScheduler with a solver fitted to this model (`nimblediff schedule search`)
        from nimblediff.pipelines import NimbleScheduler

        return NimbleScheduler.from_schedule_file(schedule_file, **config)
    return {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "lcm": LCMScheduler}[kind].from_config(config)


def generate(pipe, captions, steps, guidance):
    gens = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    out = pipe(captions, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
               generator=gens, output_type="np").images  # (N, 64, 64, 3) in [0, 1]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def to_uint8(images):
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()


def save_grid(rows, labels, path, n=8):
    """One row per configuration (first row: real images), n columns, 2x nearest upscaling."""
    grid = np.concatenate([np.concatenate(list(r[:n]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("rows: " + "; ".join(labels) + "\n")


def readme_table(results, n, threads):
    """README's short table and the sentences it supports, computed from `results` so no figure is typed by hand.
    results: {(name, steps): {"shape", "colour", "position", "fd", "ms"}}."""
    lines = ["| model | steps | CFG | shape | colour | position | feature dist | ms/img |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, kind, steps, guidance, lora), r in results.items():
        label = f"**{name}**" if lora else name
        lines.append(f"| {label} | {steps} | {guidance:g} | {r['shape']:.3f} | {r['colour']:.3f} | "
                     f"{r['position']:.3f} | {r['fd']:.0f} | {r['ms']:.0f} |")
    get = {(c[0], c[2]): r for c, r in results.items()}
    say = []
    t50, f4 = get.get(("teacher DPM++", 50)), get.get(("Flash LoRA LCM", 4))
    pct = lambda a, b: f"{100 * a / b:.0f}%"  # noqa: E731
    pts = lambda a, b: f"{100 * (a - b):+.0f}"  # noqa: E731
    if t50 and f4:
        say.append(f"The 50-step teacher gets shape and colour right in {pct(t50['shape'], 1)} / "
                   f"{pct(t50['colour'], 1)} of images; the Flash LoRA at 4 steps without CFG reaches "
                   f"{pct(f4['shape'], t50['shape'])} / {pct(f4['colour'], t50['colour'])} of that in "
                   f"{f4['ms'] / t50['ms']:.2f}x the teacher's 50-step time.")
    for k in (1, 4):
        u, f = get.get(("no distillation LCM", k)), get.get(("Flash LoRA LCM", k))
        if u and f:
            say.append(f"At {k} step{'s' if k > 1 else ''}, undistilled LCM minus Flash LoRA: "
                       f"shape {pts(u['shape'], f['shape'])} / "
                       f"colour {pts(u['colour'], f['colour'])} points, feature distance "
                       f"{u['fd'] / f['fd']:.2f}x.")
    fit, d4 = get.get(("teacher fitted solver", 4)), get.get(("teacher DPM++", 4))
    if fit and d4:
        say.append(f"The fitted 4-step solver vs DPM++ at 4 steps: shape {pts(fit['shape'], d4['shape'])} / colour "
                   f"{pts(fit['colour'], d4['colour'])} points, feature distance {fit['fd'] / d4['fd']:.2f}x.")
    pos = [r["position"] for r in results.values()]
    say.append(f"Position accuracy ranges over {min(pos):.2f}-{max(pos):.2f} across rows.")
    note = (f"{n} prompts and seeds, 64x64, {threads} CPU thread(s), one batch of {n} per row; ms/img is the batch "
            "wall time / n. Full table (count accuracy, batch wall time): `weights/tiny/MODEL_CARD.md`; grid: "
            "`out/tiny_quality_grid.png`.")
    return "\n".join(lines) + "\n\n" + note + "\n\n" + " ".join(say)


def main():
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny"))
    p.add_argument("--lora", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-flash-lora.safetensors"))
    p.add_argument("--schedule", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-fit4.json"),
                   help="fitted 4-step solver for the teacher row 'teacher fitted solver' (skipped if missing)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out")
    p.add_argument("--quick", action="store_true", help="16 prompts, no 25-step teacher row: about a minute")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/quality*.md")
    a = p.parse_args()
    if a.quick:
        a.n = min(a.n, 16)
    torch.set_num_threads(a.threads)
    cond = Conditions()
    print(cond, flush=True)
    t_start = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)

    real, captions, scenes = data.make_batch(PROMPT_SEED, a.n)
    real = to_uint8(real)
    net = evaluate.load_evaluator()
    real_acc, real_feats = evaluate.evaluate(real, scenes, net)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    has_lora = os.path.exists(a.lora)
    if has_lora:
        pipe.load_lora_weights(os.path.dirname(a.lora), weight_name=os.path.basename(a.lora), adapter_name="flash")

    header = "| model | sampler | steps | CFG | shape acc | colour acc | position acc | count acc | feature dist | wall s | ms/img |"
    lines = [header, "|" + "---|" * 11,
             f"| real images (evaluator check) | - | - | - | {real_acc['shape']:.3f} | {real_acc['colour']:.3f} | "
             f"{real_acc['position']:.3f} | {real_acc['count']:.3f} | 0 | - | - |"]
    rows, labels, results = [real], ["real"], {}
    for config in CONFIGS:
        name, kind, steps, guidance, lora = config
        if (lora and not has_lora) or (kind == "fitted" and not os.path.exists(a.schedule)):
            continue
        if a.quick and steps == 25:
            continue
        pipe.scheduler = scheduler(kind, base_config, a.schedule)
        if has_lora:
            pipe.enable_lora() if lora else pipe.disable_lora()
        generate(pipe, captions[:2], steps, guidance)  # warm-up
        t0 = time.perf_counter()
        images = generate(pipe, captions, steps, guidance)
        wall = time.perf_counter() - t0
        acc, feats = evaluate.evaluate(images, scenes, net)
        fd = evaluate.frechet(feats, real_feats) if len(feats) > 2 else float("nan")
        lines.append(f"| {name} | {kind} | {steps} | {guidance:g} | {acc['shape']:.3f} | {acc['colour']:.3f} | "
                     f"{acc['position']:.3f} | {acc['count']:.3f} | {fd:.2f} | {wall:.2f} | {1000 * wall / a.n:.1f} |")
        print(lines[-1], flush=True)
        results[config] = dict(acc, fd=fd, ms=1000 * wall / a.n)
        rows.append(images)
        labels.append(f"{name} {steps} steps")
    table = "\n".join(lines)
    note = (f"\n\n{a.n} prompts (captions of procedural scenes, seed {PROMPT_SEED}), seeds 0..{a.n - 1}, 64x64, "
            f"{a.threads} CPU thread(s), batch of {a.n}; wall time is for the whole batch. Feature distance: "
            "Frechet distance between the evaluator's penultimate features of generated and real shapes.\n")
    cond.finish()
    note += f"\n{cond} Whole run {time.perf_counter() - t_start:.0f} s.\n"
    print("\n" + table + note)
    save_grid(rows, labels, os.path.join(a.out, "tiny_quality_grid.png"))
    if a.no_write:
        return
    mode = "quick mode: 16 prompts, no 25-step row" if a.quick else f"full run, {a.n} prompts"
    write_result("quality", __file__, readme_table(results, a.n, a.threads) + "\n\n" + str(cond), mode=mode)
    card = write_result("quality_card", __file__, table + note, mode=mode).read_text().strip()
    with open(os.path.join(a.out, "tiny_quality.md"), "w") as f:   # for nimblediff.tiny.package's card template
        f.write(f"<!-- bench:quality_card -->\n{card}\n<!-- /bench:quality_card -->\n")


if __name__ == "__main__":
    main()
