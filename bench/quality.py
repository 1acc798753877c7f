"""NimbleDiff-Tiny quality vs steps: the teacher with multistep solvers, the Flash LoRA with LCM, and LCM steps with
no distillation, on the held-out prompt set (tiny/heldout.py: 512 prompts from a seed training never uses, one fixed
noise seed per prompt), judged by evaluator v2: whole-prompt accuracy (every stated word right) with a 95% interval,
per-attribute accuracy, chance levels, and paired 95% intervals for every comparison the README states.
Prints a Markdown table, writes out/tiny_quality.md and a grid PNG.

    python bench/quality.py [--quick] [--threads 1] [--model weights/tiny/nimblediff-tiny]
                            [--lora weights/tiny/nimblediff-tiny-flash-lora.safetensors] [--no-write]

--quick: 16 prompts instead of 512 and no 25-step teacher row (about a minute; accuracies move by several points).
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

from nimblediff.tiny import dit, evaluate, heldout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Conditions, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = 5.0
# (name, scheduler, steps, guidance, LoRA on)
CONFIGS = [("teacher DPM++", "dpm", 50, CFG, False), ("teacher DPM++", "dpm", 25, CFG, False),
           ("teacher DPM++", "dpm", 8, CFG, False), ("teacher DPM++", "dpm", 4, CFG, False),
           ("teacher DDIM", "ddim", 4, CFG, False), ("teacher fitted solver", "fitted", 4, CFG, False),
           ("no distillation LCM", "lcm", 1, 1.0, False), ("no distillation LCM", "lcm", 2, 1.0, False),
           ("no distillation LCM", "lcm", 4, 1.0, False),
           ("Flash LoRA LCM", "lcm", 1, 1.0, True), ("Flash LoRA LCM", "lcm", 2, 1.0, True),
           ("Flash LoRA LCM", "lcm", 4, 1.0, True), ("Flash LoRA LCM", "lcm", 8, 1.0, True)]
# NimbleDiff-Tiny-DiT (rectified flow, StableDiffusion3Pipeline): (name, sampler, steps, guidance, weights)
DIT_ZERO_ROWS = 24  # the T5 stand-in's length: the card's recommended value (3x faster than the default 256)
# (weights: None = the teacher; "flash" = the teacher with its Flash LoRA, weights/tiny/nimblediff-tiny-dit-flash-lora
# .safetensors, through FewStepSD3Pipeline.load_acceleration_lora and its recipe (the product path; sampler "lcm" =
# the recipe's, "flow-euler" = the same LoRA on flow Euler); else the student transformer folder
# weights/tiny/nimblediff-tiny-dit-<weights>)
DIT_CFG = dit.CFG  # chosen on the calibration split (bench/dit_calibrate.py), never on these held-out prompts
DIT_CONFIGS = [("DiT teacher flow Euler", "flow-euler", k, DIT_CFG, None) for k in (25, 8, 4, 2, 1)] + [
    ("DiT teacher BOSS", "boss", 4, DIT_CFG, None)] + [
    ("DiT 2-rectified flow", "flow-euler", k, 1.0, "2rf") for k in (1, 2, 4)] + [
    ("DiT InstaFlow student", "flow-euler", 1, 1.0, "instaflow")] + [
    ("DiT Flash LoRA", "lcm", k, 1.0, "flash") for k in (4, 2, 1)] + [
    ("DiT Flash LoRA (flow Euler)", "flow-euler", 4, 1.0, "flash")]
# Quantized denoisers (issue 14), each model at one near-converged setting: the UNet with DPM++ 8 steps at CFG, the
# DiT with uniform flow Euler 8 steps at DIT_CFG. (name, sampler, steps, guidance, (model, scheme, calibrated)):
# scheme None = the float model; "Q4_K" = a GGUF file written by weights.gguf_io (our Q4_K block writer, byte-exact
# to llama.cpp's) and loaded back by pipelines.quantized_gguf; else a core.quant scheme through
# pipelines.quantized, calibrated (Q-Diffusion: GPTQ / clipping on the layer inputs of QUANT_CALIBRATION_PROMPTS
# calibration-split prompts sampled by the same sampler) or rounded to nearest. Row names say "quant UNet" / "quant
# dit" so `--only DiT` keeps selecting the DiT family alone.
QUANT_W4 = "int4k_g32"  # 4.4 bits per weight (6-bit scale / minimum codes): within GGUF Q4_K's 4.5
QUANT_SCHEMES = [("float", None, False), ("W8 round-to-nearest", "int8", False), ("W8 calibrated", "int8", True),
                 ("W4 round-to-nearest", QUANT_W4, False), ("W4 calibrated", QUANT_W4, True),
                 ("GGUF Q4_K", "Q4_K", False)]
QUANT_CONFIGS = [(f"quant UNet {label}", "dpm", 8, CFG, ("unet", s, c)) for label, s, c in QUANT_SCHEMES] + [
    (f"quant dit {label}", "flow-euler", 8, DIT_CFG, ("dit", s, c)) for label, s, c in QUANT_SCHEMES]
QUANT_CALIBRATION_PROMPTS = 8
# first and last layers stay float (Q-Diffusion / BRECQ keep them at high precision): the UNet's conv_in / conv_out
# (pipelines.quantized.KEEP_FLOAT), the DiT's patch embedding and output projection
QUANT_KEEP_DIT = ("pos_embed.proj", "proj_out")


def scheduler(kind, config, schedule_file=None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    if kind == "fitted":  # NimbleScheduler with a solver fitted to this model (`nimblediff schedule search`)
        from nimblediff.pipelines import NimbleScheduler

        return NimbleScheduler.from_schedule_file(schedule_file, **config)
    return {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "lcm": LCMScheduler}[kind].from_config(config)


def generate(pipe, captions, steps, guidance, seeds, **kwargs):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(captions, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
               generator=gens, output_type="np", **kwargs).images  # (N, 64, 64, 3) in [0, 1]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def save_grid(rows, labels, path, n=8):
    """One row per configuration (first row: real images), n columns, 2x nearest upscaling."""
    grid = np.concatenate([np.concatenate(list(r[:n]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("rows: " + "; ".join(labels) + "\n")


def _cell(r, key="whole"):
    lo, hi = r["interval"][key]
    return f"{r['accuracy'][key]:.3f} [{lo:.2f}, {hi:.2f}]"


def _compare(label, a, b):
    """A sentence on A minus B in whole-prompt accuracy, paired over the same prompts and seeds; a difference is
    claimed only when its interval excludes 0."""
    d, (lo, hi) = evaluate.paired_difference(a["whole"], b["whole"])
    verdict = "no difference shown" if lo <= 0 <= hi else ("better" if d > 0 else "worse")
    return f"{label}: {100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] ({verdict})."


def readme_table(results, n, threads):
    """README's short table and the comparisons it supports, computed from `results` so no figure is typed by hand.
    results: {config: evaluate_v2 result + "fd", "ms"}."""
    lines = ["| model | steps | CFG | whole prompt [95% CI] | one shape | two shapes | shape | colour | position | "
             "background | feature dist | ms/img |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, kind, steps, guidance, lora), r in results.items():
        label = f"**{name}**" if lora else name
        acc, by = r["accuracy"], r["whole_by_count"]
        lines.append(f"| {label} | {steps} | {guidance:g} | {_cell(r)} | {by.get(1, float('nan')):.3f} | "
                     f"{by.get(2, float('nan')):.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} | "
                     f"{acc['position']:.3f} | {acc['background']:.3f} | {r['fd']:.0f} | {r['ms']:.0f} |")
    get = {(c[0], c[2]): r for c, r in results.items()}
    say = []
    pairs = [("Flash LoRA at 4 steps minus the 50-step teacher", ("Flash LoRA LCM", 4), ("teacher DPM++", 50)),
             ("Flash LoRA at 4 steps minus the teacher's DPM++ at 4 steps", ("Flash LoRA LCM", 4),
              ("teacher DPM++", 4)),
             ("The fitted 4-step solver minus DPM++ at 4 steps", ("teacher fitted solver", 4), ("teacher DPM++", 4))]
    pairs += [(f"Flash LoRA minus undistilled LCM at {k} step{'s' if k > 1 else ''}", ("Flash LoRA LCM", k),
               ("no distillation LCM", k)) for k in (1, 2, 4)]
    for label, a, b in pairs:
        if a in get and b in get:
            say.append(_compare(label, get[a], get[b]))
    note = (f"{n} held-out prompts (`nimblediff.tiny.heldout`), one fixed noise seed each, 64x64, {threads} CPU "
            "thread(s); whole prompt = every word the caption states (shape, colour, size, position, background, "
            "count) read back by evaluator v2 with two-shape scenes matched jointly; [95% CI] Wilson; comparisons "
            "below are paired bootstrap 95% intervals over prompts. Chance levels and the full table: "
            "`weights/tiny/MODEL_CARD.md`; grid: `out/tiny_quality_grid.png`.")
    return "\n".join(lines) + "\n\n" + note + "\n\n" + " ".join(say)


def _card_row(name, kind, steps, guidance, r, fd, wall, n):
    acc = r["accuracy"]
    two = r["whole_by_count"].get(2, float("nan"))
    fd_s = "-" if fd is None else f"{fd:.2f}"
    time_s = "- | -" if wall is None else f"{wall:.2f} | {1000 * wall / n:.1f}"
    sharp = "-" if r.get("sharpness") is None else f"{r['sharpness']:.2f}"
    return (f"| {name} | {kind} | {steps} | {guidance if isinstance(guidance, str) else f'{guidance:g}'} | {_cell(r)} | "
            f"{two:.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} | {acc['size']:.3f} | {acc['position']:.3f} | "
            f"{acc['background']:.3f} | {acc['count']:.3f} | {fd_s} | {sharp} | {time_s} |")


def _wanted(a, config):
    name, _, steps, _, _ = config
    return (not a.only or any(o in name for o in a.only)) and not (a.quick and steps == 25)


def unet_jobs(a):
    """(config, make(captions, seeds) -> images) for the UNet rows; the pipeline loads only if a row is wanted."""
    from diffusers import StableDiffusionPipeline

    configs = [c for c in CONFIGS if _wanted(a, c) and (not c[4] or os.path.exists(a.lora))
               and (c[1] != "fitted" or os.path.exists(a.schedule))]
    if not configs:
        return
    pipe = StableDiffusionPipeline.from_pretrained(a.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    has_lora = any(c[4] for c in configs)  # a LoRA made for the shipped UNet need not fit another --model
    if has_lora:
        pipe.load_lora_weights(os.path.dirname(a.lora), weight_name=os.path.basename(a.lora), adapter_name="flash")
    for config in configs:
        _, kind, steps, guidance, lora = config
        pipe.scheduler = scheduler(kind, base_config, a.schedule)
        if has_lora:
            pipe.enable_lora() if lora else pipe.disable_lora()
        yield config, lambda caps, seeds: generate(pipe, caps, steps, guidance, seeds)


def dit_jobs(a):
    """The DiT rows: the stock StableDiffusion3Pipeline with its T5 absent (the tiny DiT has none), the T5 stand-in
    DIT_ZERO_ROWS long; student rows swap in the student's transformer."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    boss = os.path.join(a.dit, "..", "nimblediff-tiny-dit-boss4.json")
    student = {w: f"{a.dit.rstrip(os.sep)}-{w}" for w in ("2rf", "instaflow")}
    flash_lora = f"{a.dit.rstrip(os.sep)}-flash-lora.safetensors"
    configs = [c for c in DIT_CONFIGS if _wanted(a, c) and (c[1] != "boss" or os.path.exists(boss))
               and (c[4] in (None, "flash") or os.path.isdir(student[c[4]]))
               and (c[4] != "flash" or os.path.exists(flash_lora))]
    if not configs or not os.path.isdir(a.dit):
        return
    pipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.transformer
    fast = None
    if any(c[4] == "flash" for c in configs):
        from nimblediff.pipelines.dit import FewStepSD3Pipeline

        fast = FewStepSD3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
        fast.set_progress_bar_config(disable=True)
        fast.load_acceleration_lora(flash_lora, recipe="nimblediff-tiny-dit-flash")
    for config in configs:
        _, kind, steps, guidance, weights = config
        extra = {"max_sequence_length": DIT_ZERO_ROWS}
        if weights == "flash":  # the recipe's uniform flow grid; "lcm" is its sampler, "flow-euler" the ODE's
            extra["sampler"] = "euler" if kind == "flow-euler" else kind
            yield config, lambda caps, seeds, extra=extra: generate(fast, caps, steps, guidance, seeds, **extra)
            continue
        pipe.transformer = teacher if weights is None else \
            SD3Transformer2DModel.from_pretrained(student[weights], dtype=torch.float32).eval()
        if kind == "boss":
            import json

            with open(boss) as f:
                extra["sigmas"] = json.load(f)["sigmas"][:-1]  # the pipeline appends the final 0 itself
        else:  # uniform flow Euler, t = 1, (k-1)/k, ..., 1/k, as rectified-flow papers count steps; FlowMatchEuler's
            # own grid ends at sigma 1/1000, so its last step does nothing (2 stock steps are 1 step's image)
            extra["sigmas"] = np.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
        yield config, lambda caps, seeds, extra=extra: generate(pipe, caps, None, guidance, seeds, **extra)


def _stored_bits(model, float_model):
    """Bits per weight over every Linear / Conv2d weight of the float model: a quantized layer's stored bytes
    (scales included), a layer left float at 16 (fp16 is how a float layer would ship)."""
    mods = dict(model.named_modules())
    bits = numel = 0
    for name, m in float_model.named_modules():
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d):
            q = getattr(mods[name], "qweight", None)
            bits += 8 * q.nbytes if q is not None else 16 * m.weight.numel()
            numel += m.weight.numel()
    return bits / numel


def _file_weight_bits(path):
    """Bits per weight over the >= 2-D ".weight" tensors as a file stores them (a safetensors file's dtypes; a
    GGUF file's block types: its loader may hand some back as float, e.g. split fused qkv)."""
    if path.endswith(".gguf"):
        from nimblediff.weights.gguf_io import read_gguf

        ts = [t for k, t in read_gguf(path).tensors.items() if k.endswith(".weight") and len(t.shape) >= 2]
        bits = [8 * t.nbytes if hasattr(t, "blocks") else 8 * t.element_size() * t.numel() for t in ts]
        return sum(bits) / sum(int(np.prod(t.shape)) for t in ts)
    from safetensors import safe_open

    bits = numel = 0
    with safe_open(path, "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            if k.endswith(".weight") and len(t.get_shape()) >= 2:
                n = int(np.prod(t.get_shape()))
                bits, numel = bits + n * {"F32": 32, "F16": 16, "BF16": 16}[t.get_dtype()], numel + n
    return bits / numel


def quant_jobs(a):
    """The quantized rows: each scheme on a copy of the float denoiser, the same pipeline and sampler for all rows of
    a model. Records (bits/weight of the layers, bits/weight of the whole file, file MB) in a.quant_sizes."""
    import copy
    import tempfile

    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    from nimblediff.pipelines.quantized import KEEP_FLOAT, quantize_denoiser, save_quantized_denoiser
    from nimblediff.pipelines.quantized_gguf import load_gguf_denoiser
    from nimblediff.weights.gguf_io import to_original, write_gguf

    a.quant_sizes = {}
    calib = heldout.calibration_scenes(QUANT_CALIBRATION_PROMPTS)  # never the held-out prompts
    tmp = tempfile.mkdtemp(prefix="nimblediff-quality-quant-")
    for family, folder, component, arch in (("unet", a.model, "unet", "sd15"), ("dit", a.dit, "transformer", "sd3")):
        configs = [c for c in QUANT_CONFIGS if c[4][0] == family and _wanted(a, c)]
        if not configs or not os.path.isdir(folder):
            continue
        if family == "unet":
            pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
            extra, exclude = {}, KEEP_FLOAT
        else:
            pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                            dtype=torch.float32)
            extra, exclude = {"max_sequence_length": DIT_ZERO_ROWS}, KEEP_FLOAT + QUANT_KEEP_DIT
        pipe.set_progress_bar_config(disable=True)
        float_model = getattr(pipe, component)
        n_params = sum(p.numel() for p in float_model.parameters())
        for config in configs:
            _, kind, steps, guidance, (_, scheme, calibrated) = config
            kwargs = dict(extra)
            if kind == "flow-euler":  # uniform sigmas, as dit_jobs
                kwargs["sigmas"] = np.linspace(1.0, 0.0, steps + 1)[:-1].tolist()
            else:
                pipe.scheduler = scheduler(kind, pipe.scheduler.config)
            n_steps = None if "sigmas" in kwargs else steps
            path = os.path.join(tmp, f"{family}-{len(a.quant_sizes)}")
            if scheme is None:
                model, path = float_model, os.path.join(folder, component, "diffusion_pytorch_model.safetensors")
            elif scheme == "Q4_K":
                sd = to_original(float_model.state_dict(), arch, float_model.config)
                write_gguf(path + ".gguf", sd, arch, scheme)
                model, path = load_gguf_denoiser(path + ".gguf", folder), path + ".gguf"
            else:
                model = copy.deepcopy(float_model)
                setattr(pipe, component, model)
                quantize_denoiser(pipe, scheme, prompts=calib.captions, steps=n_steps, guidance_scale=guidance,
                                  calibrate=calibrated, exclude=exclude, seed=calib.noise_seeds[0],
                                  pipe_kwargs=kwargs)
                path = str(save_quantized_denoiser(pipe, path + ".safetensors"))
            setattr(pipe, component, model)
            size = os.path.getsize(path)
            layer_bits = _stored_bits(model, float_model) if path.endswith(".safetensors") and scheme else \
                _file_weight_bits(path)
            a.quant_sizes[config] = (layer_bits, 8 * size / n_params, size / 1e6)
            yield config, lambda caps, seeds: generate(pipe, caps, n_steps, guidance, seeds, **kwargs)


def _per_prompt(hits, scenes, attribute):
    """(N,) hits and (N,) stated words of one attribute per prompt (evaluate_v2's hits list, one entry per word)."""
    counts = np.array([sum(attribute in ws for ws in evaluate.stated(s)[0]) for s in scenes])
    sums = np.add.reduceat(np.asarray(hits[attribute], np.float64), np.r_[0, np.cumsum(counts)[:-1]])
    return np.where(counts > 0, sums, 0.0), counts


def quant_comparisons(results, scenes, n_boot=4000, seed=0):
    """Per quantized row: shape and colour accuracy as a share of the fp row's, with a paired bootstrap 95% interval
    over prompts (same prompts and noise), and the whole-prompt difference; the issue's acceptance for calibrated
    W4 (>= 97% of the fp model's shape and colour accuracy) stated with its interval."""
    lines = ["| row | shape / fp [95% CI] | colour / fp [95% CI] | whole prompt minus fp, points [95% CI] |",
             "|---|---|---|---|"]
    said = []
    idx = np.random.default_rng(seed).integers(0, len(scenes), (n_boot, len(scenes)))
    for family in ("unet", "dit"):
        rows = {c[4][1:]: (c, results[c]) for c in QUANT_CONFIGS if c[4][0] == family and c in results}
        if (None, False) not in rows:
            continue
        fp = rows[(None, False)][1]
        for key, (config, r) in rows.items():
            if key == (None, False):
                continue
            cells, share = [], {}
            for attribute in ("shape", "colour"):
                hq, n = _per_prompt(r["hits"], scenes, attribute)
                hf, _ = _per_prompt(fp["hits"], scenes, attribute)
                share[attribute] = hq.sum() / hf.sum()
                lo, hi = np.percentile(hq[idx].sum(1) / hf[idx].sum(1), [2.5, 97.5])
                cells.append(f"{100 * share[attribute]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]")
            d, (lo, hi) = evaluate.paired_difference(r["whole"], fp["whole"])
            lines.append(f"| {config[0]} | {cells[0]} | {cells[1]} | {100 * d:+.1f} [{100 * lo:+.1f}, "
                         f"{100 * hi:+.1f}] |")
            if key == (QUANT_W4, True):
                met = "met" if min(share.values()) >= 0.97 else "missed"
                said.append(f"{config[0]} keeps {100 * share['shape']:.1f}% of the fp model's shape accuracy and "
                            f"{100 * share['colour']:.1f}% of its colour accuracy (goal >= 97%: {met}).")
    return "\n".join(lines) + "\n\n" + " ".join(said)


def jobs(a):
    yield from unet_jobs(a)
    yield from dit_jobs(a)
    yield from quant_jobs(a)


def main():

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny"))
    p.add_argument("--lora", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-flash-lora.safetensors"))
    p.add_argument("--schedule", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-fit4.json"),
                   help="fitted 4-step solver for the teacher row 'teacher fitted solver' (skipped if missing)")
    p.add_argument("--dit", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-dit"),
                   help="NimbleDiff-Tiny-DiT folder for the DiT rows (skipped if missing)")
    p.add_argument("--only", action="append", default=[],
                   help="run only rows whose name contains this text (repeatable), e.g. --only 'DiT teacher'")
    p.add_argument("--n", type=int, default=512)
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

    held = heldout.heldout_scenes(a.n)
    captions, scenes, seeds = held.captions, held.scenes, held.noise_seeds
    real = heldout.render(held)
    net = evaluate.load_evaluator()
    real_r = evaluate.evaluate_v2(real, scenes, net)
    real_feats = real_r["features"]
    header = ("| model | sampler | steps | CFG | whole prompt [95% CI] | two shapes | shape | colour | size | position "
              "| background | count | feature dist | edge sharpness | wall s | ms/img |")
    real_edges = np.median(evaluate.edge_sharpness(real))
    lines = [header, "|" + "---|" * 16, _card_row("real renders (evaluator check)", "-", "-", "-",
                                                  dict(real_r, sharpness=1.0), 0, None, a.n)]
    for label, (imgs, scs) in evaluate.baselines(real, scenes).items():      # chance levels, printed every run
        lines.append(_card_row(f"chance: {label}", "-", "-", "-", evaluate.evaluate_v2(imgs, scs, net), None, None,
                               a.n))
    head_lines = list(lines)
    rows, labels, results, family_lines = [real], ["real"], {}, {"unet": [], "dit": [], "quant": []}
    for config, make in jobs(a):
        name, kind, steps, guidance, _ = config
        make(captions[:2], seeds[:2])  # warm-up
        t0 = time.perf_counter()
        images = make(captions, seeds)
        wall = time.perf_counter() - t0
        r = evaluate.evaluate_v2(images, scenes, net)
        r["sharpness"] = np.median(evaluate.edge_sharpness(images)) / real_edges
        fd = evaluate.frechet(r["features"], real_feats) if len(r["features"]) > 2 else float("nan")
        lines.append(_card_row(name, kind, steps, guidance, r, fd, wall, a.n))
        if config in QUANT_CONFIGS:  # the quant family's table has the sizes beside each row
            family_lines["quant"].append(lines[-1] + " {:.2f} | {:.2f} | {:.2f} |".format(*a.quant_sizes[config]))
        else:
            family_lines["dit" if config in DIT_CONFIGS else "unet"].append(lines[-1])
        print(lines[-1], flush=True)
        results[config] = dict(r, fd=fd, ms=1000 * wall / a.n)
        rows.append(images)
        labels.append(f"{name} {steps} steps")
    note = (f"\n\n{a.n} held-out prompts (`nimblediff.tiny.heldout`, seed {heldout.HELDOUT_SEED}, noise seeds from "
            f"{heldout.NOISE_BASE}), 64x64, {a.threads} CPU thread(s), batch of {a.n}; wall time is for the whole "
            "batch. Whole prompt: every stated word right (evaluator v2), Wilson 95% interval. Chance rows: what the "
            "evaluator gives images that should fail. Feature distance: Frechet distance between the evaluator's "
            "penultimate features of generated and real shapes. Edge sharpness: median over images of the 99th "
            "percentile of the luma gradient (the shapes' edges), relative to the real renders' (1.00 = as sharp).\n")
    cond.finish()
    note += f"\n{cond} Whole run {time.perf_counter() - t_start:.0f} s.\n"
    print("\n" + "\n".join(lines) + note)
    if any(c in QUANT_CONFIGS for c in results):  # printed by any run with quant rows (an --only run too)
        print(quant_comparisons(results, scenes) + "\n")
    save_grid(rows, labels, os.path.join(a.out, "tiny_quality_grid.png"))
    if a.no_write:
        return
    mode = "quick mode: 16 prompts, no 25-step row" if a.quick else f"full run, {a.n} held-out prompts"
    # a family's tables are rewritten only by a run that made all of its rows (an --only run leaves the rest alone)
    unet_done = [c for c in results if c in CONFIGS]
    if unet_done and all(_wanted(a, c) for c in CONFIGS):
        write_result("quality", __file__, readme_table({c: results[c] for c in unet_done}, a.n, a.threads)
                     + "\n\n" + str(cond), mode=mode)
        table = "\n".join(head_lines + family_lines["unet"])
        card = write_result("quality_card", __file__, table + note, mode=mode).read_text().strip()
        with open(os.path.join(a.out, "tiny_quality.md"), "w") as f:   # for nimblediff.tiny.package's card template
            f.write(f"<!-- bench:quality_card -->\n{card}\n<!-- /bench:quality_card -->\n")
    dit_done = [c for c in results if c in DIT_CONFIGS]
    if dit_done and all(_wanted(a, c) for c in DIT_CONFIGS):
        table = "\n".join(head_lines + family_lines["dit"])
        dit_note = (f"\n\nDiT rows: stock StableDiffusion3Pipeline without T5, max_sequence_length={DIT_ZERO_ROWS}; "
                    "flow Euler on uniform sigmas 1, (k-1)/k, ..., 1/k (passed as sigmas=: FlowMatchEuler's default "
                    "grid ends at 1/1000 and wastes the last of a few steps); the teacher at CFG "
                    f"{DIT_CFG:g} (chosen on the calibration split), the students and the Flash LoRA at CFG 1 (both bake guidance in). The Flash LoRA "
                    "rows run FewStepSD3Pipeline with its recipe nimblediff-tiny-dit-flash (LCM re-noising on the same "
                    "uniform grid, noise from each prompt's generator; chosen over flow Euler on the calibration split, "
                    "`python bench/dit_calibrate.py --flash`); the flow Euler row is the same LoRA on the ODE.")
        write_result("quality_dit", __file__, table + "\n\n" + dit_comparisons(results) + dit_note + note,
                     mode=mode)
    if all(c in results for c in QUANT_CONFIGS):  # every quant row ran (both models present, no --only left one out)
        table = "\n".join([head_lines[0] + " bits/weight (layers) | bits/weight (file) | file MB |",
                           head_lines[1] + "---|" * 3] + [x + " - | - | - |" for x in head_lines[2:]]
                          + family_lines["quant"])
        quant_note = (f"\n\nQuantized rows: the UNet with DPM++ 8 steps at CFG {CFG:g}, the DiT (stock "
                      f"StableDiffusion3Pipeline without T5, max_sequence_length={DIT_ZERO_ROWS}) with flow Euler on "
                      f"8 uniform sigmas at CFG {DIT_CFG:g}. W8 = int8 per output channel; W4 = {QUANT_W4} (groups "
                      "of 32, 6-bit scale and minimum codes per group); calibrated = Q-Diffusion calibration on "
                      f"{QUANT_CALIBRATION_PROMPTS} prompts of the calibration split (`heldout.calibration_scenes`) "
                      "sampled by the same sampler (GPTQ and per-row clipping, kept only where they lower held-out "
                      "rows' output error); round-to-nearest = the same grid without calibration; GGUF Q4_K = "
                      "`weights.gguf_io.write_gguf` (original key layout, ComfyUI-GGUF's rules: tensors <= 1024 "
                      "values F32, conv kernels as rows of 256, F16 where Q4_K blocks do not fit) loaded by "
                      "`load_gguf_denoiser`. First and last layers stay float in our files (UNet conv_in / conv_out, "
                      "DiT pos_embed.proj / proj_out). The float row computes in fp32 from the shipped file. "
                      "bits/weight (layers): over every Linear / Conv2d weight, scales included, float layers of our "
                      "files counted at 16; for the float and GGUF rows over the file's >= 2-D weight tensors as "
                      "stored; bits/weight (file): 8 x file bytes / denoiser parameters; file MB: the file as saved "
                      "(the float row: the shipped safetensors).")
        write_result("quality_quant", __file__, table + "\n\n" + quant_comparisons(results, scenes) + quant_note
                     + note, mode=mode)


def dit_comparisons(results):
    """The DiT claims, each as a paired interval over the same prompts and noise."""
    get = {(c[0], c[2]): r for c, r in results.items() if c in DIT_CONFIGS}
    pairs = [("BOSS at 4 steps minus uniform flow Euler at 4 steps", ("DiT teacher BOSS", 4),
              ("DiT teacher flow Euler", 4)),
             ("One-step InstaFlow student minus the 25-step teacher", ("DiT InstaFlow student", 1),
              ("DiT teacher flow Euler", 25)),
             ("One-step InstaFlow student minus the teacher's flow Euler at 1 step", ("DiT InstaFlow student", 1),
              ("DiT teacher flow Euler", 1)),
             ("2-rectified flow at 2 steps minus the teacher's flow Euler at 2 steps", ("DiT 2-rectified flow", 2),
              ("DiT teacher flow Euler", 2)),
             ("2-rectified flow at 4 steps minus the teacher's flow Euler at 4 steps", ("DiT 2-rectified flow", 4),
              ("DiT teacher flow Euler", 4)),
             ("Flash LoRA at 4 steps minus the 25-step teacher", ("DiT Flash LoRA", 4), ("DiT teacher flow Euler", 25)),
             ("Flash LoRA at 4 steps minus the teacher's flow Euler at 4 steps", ("DiT Flash LoRA", 4),
              ("DiT teacher flow Euler", 4)),
             ("Flash LoRA at 4 steps, its recipe's LCM re-noising minus flow Euler", ("DiT Flash LoRA", 4),
              ("DiT Flash LoRA (flow Euler)", 4)),
             ("Flash LoRA at 4 steps minus 2-rectified flow at 4 steps", ("DiT Flash LoRA", 4),
              ("DiT 2-rectified flow", 4)),
             ("Flash LoRA at 4 steps minus the teacher's BOSS schedule at 4 steps", ("DiT Flash LoRA", 4),
              ("DiT teacher BOSS", 4)),
             ("Flash LoRA at 2 steps minus the teacher's flow Euler at 2 steps", ("DiT Flash LoRA", 2),
              ("DiT teacher flow Euler", 2)),
             ("Flash LoRA at 1 step minus the teacher's flow Euler at 1 step", ("DiT Flash LoRA", 1),
              ("DiT teacher flow Euler", 1))]
    said = [_compare(label, get[x], get[y]) for label, x, y in pairs if x in get and y in get]
    teacher = get.get(("DiT teacher flow Euler", 25))
    for name, steps in (("DiT InstaFlow student", 1), ("DiT 2-rectified flow", 1), ("DiT 2-rectified flow", 2),
                        ("DiT Flash LoRA", 4), ("DiT Flash LoRA", 2), ("DiT Flash LoRA", 1)):
        if teacher is not None and (name, steps) in get:  # the goal is stated as a share of the teacher
            acc, ref = get[(name, steps)]["accuracy"], teacher["accuracy"]
            share = ", ".join(f"{k} {100 * acc[k] / ref[k]:.0f}%" for k in ("shape", "colour", "whole") if ref[k])
            said.append(f"{name} at {steps} step{'s' if steps > 1 else ''} as a share of the 25-step teacher: "
                        f"{share}.")
    return " ".join(said)


if __name__ == "__main__":
    main()
