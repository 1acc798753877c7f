"""Ship NimbleDiff-Tiny-DiT: the fp16 StableDiffusion3Pipeline folder, the student transformers and the Flash LoRA
that exist, the BOSS schedule, and the model card.

    python -m nimblediff.tiny.package_dit [--runs runs/tiny-dit] [--dest weights/tiny]

The card's quality table is the `<!-- bench:quality_dit -->` block that `python bench/update_readme.py` fills from
bench/results/quality_dit.md (written by `python bench/quality.py --only DiT`).
"""

import argparse
import os
import shutil

import torch

from . import dit, flash
from .train_dit import COUPLE_CFG, COUPLE_STEPS
from .package import HERE, folder_mb, name_float32, read_log

PIPELINE_DIR = "nimblediff-tiny-dit"
STUDENTS = {"2rf": ("reflow", "2-rectified flow (reflow on the teacher's couples)"),
            "instaflow": ("distill", "InstaFlow one-step student (distilled from the 2-rectified flow)")}
BOSS_FILE = "nimblediff-tiny-dit-boss4.json"
FLASH_FILE = "nimblediff-tiny-dit-flash-lora.safetensors"
MAX_MB = 25.0


def ship_pipeline(runs, dest):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(os.path.join(runs, "dit", "pipeline"), text_encoder_3=None,
                                                    tokenizer_3=None)
    pipe.to(torch.float16)
    out = os.path.join(dest, PIPELINE_DIR)
    pipe.save_pretrained(out, safe_serialization=True)
    name_float32(out, ("text_encoder", "text_encoder_2"))
    return pipe


def ship_students(runs, dest):
    """{name: MB} for each student whose training finished (its transformer folder exists)."""
    from diffusers import SD3Transformer2DModel

    shipped = {}
    for name, (stage, _) in STUDENTS.items():
        src = os.path.join(runs, stage, "transformer")
        if os.path.isdir(src):
            out = os.path.join(dest, f"{PIPELINE_DIR}-{name}")
            SD3Transformer2DModel.from_pretrained(src).to(torch.float16).save_pretrained(out)
            shipped[name] = folder_mb(out)
    return shipped


def ship_flash_lora(runs, dest):
    """The Flash LoRA in fp16, diffusers layout (transformer.*.lora_A/B.weight); its MB, or None if not trained."""
    from safetensors.torch import load_file, save_file

    src = os.path.join(runs, "flash", "lora", "pytorch_lora_weights.safetensors")
    if not os.path.exists(src):
        return None
    sd = {k: v.to(torch.float16).contiguous() for k, v in load_file(src).items()}
    bad = [k for k in sd if not (k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k))]
    if bad:
        raise ValueError(f"unexpected keys in {src} (expected transformer.*.lora_A/B.weight): {bad[:5]}")
    out = os.path.join(dest, FLASH_FILE)
    save_file(sd, out, metadata={"format": "pt", "rank": str(flash.DIT_RANK)})
    return os.path.getsize(out) / 2**20


def write_card(runs, dest, pipe, students):
    logs = {s: read_log(runs, s) for s in ("dit", "reflow", "distill", "flash")}
    rows = "\n".join(f"| {s} | {d['steps']} | {d['minutes']} | {d['first_loss']} | {d['last_loss']:.4f} | {d['final']} |"
                     for s, d in logs.items() if d["last_loss"] is not None)
    couples = os.path.join(runs, "couples")
    n_couples = len([f for f in os.listdir(couples) if f.endswith(".pt")]) if os.path.isdir(couples) else 0
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    student_lines = "\n".join(f"- `{FLASH_FILE}`: Flash Diffusion LoRA for 4 steps (LCM re-noising on the flow grid) at CFG 1, rank "
                              f"{flash.DIT_RANK}, {mb:.1f} MB" if k == "flash" else
                              f"- `{PIPELINE_DIR}-{k}/`: {STUDENTS[k][1]}, {mb:.1f} MB" for k, mb in students.items()) \
        or "- none shipped yet (see Training)"
    card = CARD.format(dit_steps=logs["dit"]["steps"] or 0, dit_minutes=logs["dit"]["minutes"] or 0,
                       transformer=n(pipe.transformer), te=n(pipe.text_encoder), vae=n(pipe.vae),
                       layers=pipe.transformer.config.num_layers, size=folder_mb(os.path.join(dest, PIPELINE_DIR)),
                       rows=rows, couples=n_couples, students=student_lines, shift=dit.SHIFT,
                       rows_set=", ".join(map(str, dit.ZERO_ROWS)), couple_steps=COUPLE_STEPS,
                       couple_cfg=COUPLE_CFG, cfg=dit.CFG, flash_rank=flash.DIT_RANK,
                       flash_steps=flash.FLOW_TEACHER_STEPS)
    result = os.path.join(HERE, "bench", "results", "quality_dit.md")  # keep the card's table when re-packaging
    if os.path.exists(result):
        with open(result) as f:
            table = f.read().strip()
        card = card.replace("<!-- bench:quality_dit -->\n", f"<!-- bench:quality_dit -->\n{table}\n")
    with open(os.path.join(dest, "MODEL_CARD_DIT.md"), "w") as f:
        f.write(card)


CARD = """# NimbleDiff-Tiny-DiT

A small rectified-flow MM-DiT text-to-image model, trained from scratch on CPU for NimbleDiff's DiT samplers, LoRA
loaders, quantizers, editing and caching, with InstaFlow's students (a 2-rectified flow and a one-step model
distilled from it) and a 4-step Flash Diffusion LoRA. Same procedural data and vocabulary as NimbleDiff-Tiny (`weights/tiny/MODEL_CARD.md`): one or two flat
shapes, 64x64.

## Why SD3's MM-DiT (not Flux's)
The stock `StableDiffusion3Pipeline` runs with its T5 encoder absent (`text_encoder_3=None`, as diffusers documents
for dropping T5), so the text side is two small CLIP encoders on NimbleDiff-Tiny's in-memory 26-word tokenizer.
`FluxPipeline` requires a T5 encoder and tokenizer, a third vocabulary for no gain on this grammar. Both families
share the joint-attention block, the flow parameterization and the LoRA layouts NimbleDiff maps.

## Architecture (diffusers `StableDiffusion3Pipeline`, fp16 on disk, {size:.1f} MB)
| part | class | params |
|---|---|---|
| VAE | NimbleDiff-Tiny's `AutoencoderKL` (shift_factor 0 added for the SD3 pipeline), 64x64x3 -> 4x16x16 | {vae:,} |
| text encoders | 2 x `CLIPTextModelWithProjection`, hidden 64, 3 layers, projection 64 (penultimate states side by side: 24 x 128; pooled: 128) | 2 x {te:,} |
| transformer | `SD3Transformer2DModel`, {layers} joint blocks, hidden 128 (4 heads x 32), patch 2 (64 image tokens), RMS qk-norm | {transformer:,} |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {shift:g} (16x16 latents need no resolution shift) | - |

The pipeline's T5 stand-in is `max_sequence_length` rows of zeros (256 by default); training drew that count from
({rows_set}) so the default and short values (faster: `max_sequence_length=24`) both work.

Students:
{students}

## Training (`python -m nimblediff.tiny.train_dit --stage dit|couples|reflow|distill|flash`, each resumable)
- dit: rectified flow, x_s = (1 - s) x0 + s eps, the transformer predicts eps - x0, s ~ logit-normal(0, 1) as in
  SD3; both CLIP encoders trained jointly; 10% empty captions (CFG); AdamW 5e-4 (3e-4 in the third run),
  100-step warm-up, grad clip 1, batch 48, EMA 0.999 (shipped); two-shape scenes over-sampled (half of each batch in
  the second run, 40% in the third; the data has 20%).
- couples: {couples} shards of 48 (noise, the teacher's own sample from it by {couple_steps} flow-Euler steps at CFG
  {couple_cfg:g}, the CFG chosen on the calibration split by `bench/dit_calibrate.py`).
- reflow (2-rectified flow, InstaFlow's first stage): the teacher's transformer retrained on straight lines between
  each couple; text encoders frozen; the guidance is baked in, so it runs at CFG 1.
- distill: one step from the 2-RF model, z1 - v(z1, 1) regressed onto the teacher's sample (L2 in latent space;
  InstaFlow uses LPIPS, which needs downloaded weights).
- flash (Flash Diffusion, `tiny/flash.py`): a rank-{flash_rank} LoRA on the teacher's attention and MLP layers
  (AdamW 1e-3, batch 24) learns, with no CFG, to land each mode of the 4-step flow-Euler grid (sigma 1, 0.75, 0.5,
  0.25) in one evaluation on the teacher's CFG sample from there (round({flash_steps} s) flow-Euler steps from a
  real latent noised to sigma s; at sigma 1, the couples); modes drawn from Flash's shifting mixture, low noise
  first. Flash's adversarial and DMD terms are left out. Its logged loss rises over the run because the mixture
  moves to the noisy modes, whose targets are far from the input. It samples as it was trained: each mode's input
  is an x0 estimate noised with fresh noise (LCM re-noising, the recipe's sampler), which beat flow Euler, whose
  next input reuses the first noise, on the calibration split (`python bench/dit_calibrate.py --flash`).

| stage | steps | wall min | first logged loss | last loss (mean of 10 logs) | final |
|---|---|---|---|---|---|
{rows}

Wall minutes are budgets of step time on a shared 2-core machine (other jobs ran alongside).

## Sampling settings
CFG {cfg:g} for the teacher, chosen on the calibration split (`python bench/dit_calibrate.py`: 128 prompts and noises
disjoint from the held-out ones; CFG 2 to 5 were within noise of each other, 7 was worse); flow shift 1. The
students bake the guidance in and run at CFG 1. The BOSS 4-step schedule was searched on the shipped teacher at the
same CFG, with 8 calibration-split prompts.

## Limitations
The shipped teacher had {dit_steps:,} steps ({dit_minutes:.0f} minutes of step time in three runs on one core). The
students had one short run each (table above), far less than InstaFlow's; their gap to the teacher is in the table
below. Later runs warm-start from the shipped weights (`--init weights/tiny/nimblediff-tiny-dit --init-steps
{dit_steps}`); students must then be distilled again. 64x64 flat shapes only: this model exists to measure methods,
not to make pictures.

## Quality (`python bench/quality.py --only DiT`; evaluator `nimblediff/tiny/evaluate.py`, held-out prompts)
<!-- bench:quality_dit -->
<!-- /bench:quality_dit -->

## Use
```python
import torch
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained("weights/tiny/nimblediff-tiny-dit", text_encoder_3=None,
                                                tokenizer_3=None, dtype=torch.float32)
img = pipe("a red circle on the left", height=64, width=64, num_inference_steps=25, guidance_scale={cfg:g},
           max_sequence_length=24).images[0]

# the one-step InstaFlow student: its transformer in the same pipeline, CFG 1
from diffusers import SD3Transformer2DModel
pipe.transformer = SD3Transformer2DModel.from_pretrained("weights/tiny/nimblediff-tiny-dit-instaflow")
img = pipe("a red circle on the left", height=64, width=64, num_inference_steps=1, guidance_scale=1,
           max_sequence_length=24).images[0]

# the Flash LoRA on the teacher: 4 steps on sigmas 1, 0.75, 0.5, 0.25 with LCM re-noising (x0, then fresh
# noise to the next sigma: FlowMatchEuler's stochastic_sampling), CFG 1. The stock SD3 pipeline draws that noise
# from torch's global generator; NimbleDiff's FewStepSD3Pipeline draws it from the call's generator.
from diffusers import FlowMatchEulerDiscreteScheduler
pipe = StableDiffusion3Pipeline.from_pretrained("weights/tiny/nimblediff-tiny-dit", text_encoder_3=None,
                                                tokenizer_3=None, dtype=torch.float32)
pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
pipe.load_lora_weights("weights/tiny", weight_name="nimblediff-tiny-dit-flash-lora.safetensors")
torch.manual_seed(0)
img = pipe("a red circle on the left", height=64, width=64, sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=1,
           max_sequence_length=24).images[0]
```

## Reproduce
```
python -m nimblediff.tiny.train_dit --stage dit --p-two 0.4 --threads 2     # resumable, 90 min budget
python -m nimblediff.tiny.train_dit --stage couples --minutes 25            # then reflow, then distill
python -m nimblediff.tiny.train_dit --stage flash --minutes 75              # after couples
python -m nimblediff.tiny.package_dit && python bench/quality.py --only DiT && python bench/update_readme.py
```
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", default="runs/tiny-dit")
    p.add_argument("--dest", default=os.path.join(HERE, "weights", "tiny"))
    a = p.parse_args(argv)
    pipe = ship_pipeline(a.runs, a.dest)
    students = ship_students(a.runs, a.dest)
    flash_mb = ship_flash_lora(a.runs, a.dest)
    if flash_mb is not None:
        students["flash"] = flash_mb
    boss = os.path.join(a.runs, BOSS_FILE)
    if os.path.exists(boss):
        shutil.copy(boss, os.path.join(a.dest, BOSS_FILE))
    size = folder_mb(os.path.join(a.dest, PIPELINE_DIR))
    if size > MAX_MB:
        raise SystemExit(f"{PIPELINE_DIR} is {size:.1f} MB, over the {MAX_MB:g} MB budget")
    write_card(a.runs, a.dest, pipe, students)
    print(f"wrote {a.dest}/{PIPELINE_DIR}: {size:.1f} MB; students: {students or 'none'}")


if __name__ == "__main__":
    main()
