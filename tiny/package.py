"""Ship NimbleDiff-Tiny: fp16 StableDiffusionPipeline folder, the Flash LoRA file, and the model card.

    python -m nimblediff.tiny.package [--runs runs/tiny] [--dest weights/tiny] [--quality out/tiny_quality.md]

Re-run after bench/quality.py to put its table into the card.
"""

import argparse
import os
import re

import torch

from . import flash, model

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_DIR = "nimblediff-tiny"
LORA_FILE = "nimblediff-tiny-flash-lora.safetensors"


def ship_pipeline(runs, dest):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(runs, "unet", "pipeline"))
    pipe.to(torch.float16)
    pipe.save_pretrained(os.path.join(dest, PIPELINE_DIR), safe_serialization=True)
    name_float32(os.path.join(dest, PIPELINE_DIR), ("text_encoder",))
    return pipe


def name_float32(folder, text_encoders):
    """fp16 on disk, but transformers 5 loads a text encoder in the dtype its config names while diffusers loads the
    denoiser and VAE in float32: name float32 so a stock pipeline's components agree out of the box."""
    for name in text_encoders:
        config = os.path.join(folder, name, "config.json")
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace('"dtype": "float16"', '"dtype": "float32"'))


def ship_lora(runs, dest):
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(runs, "flash", "lora", "pytorch_lora_weights.safetensors"))
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    bad = [k for k in sd if not (k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k))]
    if bad:
        raise ValueError(f"unexpected keys in the Flash LoRA (expected unet.*.lora_A/B.weight): {bad[:5]}")
    save_file(sd, os.path.join(dest, LORA_FILE), metadata={"format": "pt", "rank": str(flash.RANK)})
    return sd


def read_log(runs, stage):
    """(steps, minutes, first loss, last loss, final line) from runs/tiny/<stage>/train.log."""
    path = os.path.join(runs, stage, "train.log")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    losses = [float(m.group(1)) for ln in lines if (m := re.search(r" loss ([0-9.e-]+)", ln))]
    done = [re.search(r"done: (\d+) steps, ([0-9.]+) min", ln) for ln in lines]
    done = [d for d in done if d]
    final = [ln.split("final: ", 1)[1] for ln in lines if "final: " in ln]
    return {"steps": int(done[-1].group(1)) if done else None, "minutes": float(done[-1].group(2)) if done else None,
            "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-10:]) / len(losses[-10:])
            if losses else None, "final": final[-1] if final else ""}


def folder_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def write_card(runs, dest, pipe, lora, quality_path):
    logs = {s: read_log(runs, s) for s in ("vae", "unet", "flash")}
    rows = "\n".join(f"| {s} | {d['steps']} | {d['minutes']} | {d['first_loss']} | {d['last_loss']:.4f} | {d['final']} |"
                     if d["last_loss"] is not None else f"| {s} | - | - | - | - | {d['final']} |"
                     for s, d in logs.items())
    quality = open(quality_path).read() if quality_path and os.path.exists(quality_path) else \
        "(not measured yet: run `python bench/quality.py`, then this script again)"
    size = folder_mb(os.path.join(dest, PIPELINE_DIR)) + os.path.getsize(os.path.join(dest, LORA_FILE)) / 2**20
    card = CARD.format(
        unet=model.n_params(pipe.unet), te=model.n_params(pipe.text_encoder), vae=model.n_params(pipe.vae),
        lora=sum(v.numel() for v in lora.values()), rank=flash.RANK, rows=rows, quality=quality, size=size,
        scale=pipe.vae.config.scaling_factor, teacher_steps=flash.TEACHER_STEPS, guidance=flash.GUIDANCE)
    with open(os.path.join(dest, "MODEL_CARD.md"), "w") as f:
        f.write(card)


CARD = """# NimbleDiff-Tiny

A small but real text-to-image latent diffusion model, trained from scratch on CPU (two cores) for NimbleDiff's
tests, examples and benchmarks, plus a Flash-Diffusion-distilled 4-step LoRA. It draws one or two flat shapes.

## Data
Procedural, generated on the fly by `nimblediff/tiny/data.py` (seeded): 64x64 RGB, 4 shapes (circle, square,
triangle, star) x 5 colours (red, green, blue, yellow, purple) x 5 positions (left, right, top, bottom, center) x
2 sizes x 3 backgrounds (black, gray, white); two shapes (opposite slots) in 20% of images. Captions such as
"a small red circle on the left and a blue star on the right on a white background"; size and background are
left out of 30% of captions. Vocabulary: 26 words (`nimblediff/tiny/vocab.py`); other words raise
`InvalidParameterError`.

## Architecture (diffusers `StableDiffusionPipeline`, fp16 on disk)
| part | class | params |
|---|---|---|
| VAE | `AutoencoderKL`, blocks (16, 32, 64), 64x64x3 -> 4x16x16, scaling_factor {scale:.4f} | {vae:,} |
| text encoder | `CLIPTextModel`, hidden 64, 2 layers, 4 heads, 24 tokens, in-memory `CLIPTokenizer` | {te:,} |
| UNet | `UNet2DConditionModel`, blocks (64, 128, 128), cross-attention at 16x16 and 8x8 | {unet:,} |
| scheduler | `DDIMScheduler`, SD 1.x schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon, trailing) | - |
| Flash LoRA | PEFT LoRA rank {rank} on attention, feed-forward, resnet convs and time projections | {lora:,} |

Disk: {size:.1f} MB in all. The weights are fp16 on disk and load as float32 by default (every
component's config agrees); on CPU keep float32 (fp16 convolutions are slow or missing there), on a GPU pass
`dtype=torch.float16`.

## Training (`python -m nimblediff.tiny.train --stage all`)
- vae: L1 + L2 + 1e-6 KL, AdamW 1e-3, batch 16; scaling_factor = 1 / std of held-out latents.
- unet: UNet and text encoder trained jointly, epsilon-prediction DDPM loss on VAE latents, 10% empty captions
  (for CFG), AdamW 5e-4 (100-step warm-up), grad clip 1, batch 48, EMA 0.999 (shipped). The shipped run took
  its first 1,605 steps (75 minutes) with the plain loss on one contended thread, then resumed with Min-SNR-5 loss
  weights (Hang et al. 2023; now the default, `--min-snr`) on two threads, sharing the machine with other jobs, to
  150 minutes of wall time. On two free cores a step takes about 1.1 s, so its 3,121 steps take about an hour; the
  default budget is 90 minutes.
- flash: Flash Diffusion distillation into the LoRA (AdamW 1e-3, batch 16, two threads): the student (no CFG)
  predicts, in one step from a latent noised to t in {{999, 759, 499, 259}}, the x0 the teacher reaches in
  {teacher_steps} DDIM steps at CFG {guidance}; the mixture over the four timesteps shifts from low to high noise over
  training. No adversarial/DMD terms.

| stage | steps | wall min | first logged loss | last loss (mean of 10 logs) | final |
|---|---|---|---|---|---|
{rows}

Wall minutes are budgets on a shared 2-core machine (other jobs ran alongside, so steps per minute varied by 2x).
Logs: `runs/<name>/<stage>/train.log`.

## Limitations
A few-million-parameter model trained for two and a half hours on a shared 2-core CPU is under-trained: the
attribute accuracies below are below those of the real images, and position is the weakest attribute. It is meant
to be a genuine, fast, offline model for NimbleDiff's samplers, LoRA loaders and quantizers, not a good image
generator.

## Quality (`python bench/quality.py`; evaluator `nimblediff/tiny/evaluate.py`)
{quality}

## Use
```python
import torch
from diffusers import StableDiffusionPipeline, LCMScheduler
pipe = StableDiffusionPipeline.from_pretrained("weights/tiny/nimblediff-tiny", dtype=torch.float32)
img = pipe("a red circle on the left", height=64, width=64, num_inference_steps=25, guidance_scale=5).images[0]
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("weights/tiny", weight_name="nimblediff-tiny-flash-lora.safetensors")
img = pipe("a red circle on the left", height=64, width=64, num_inference_steps=4, guidance_scale=1).images[0]
```

## Reproduce
```
python -m nimblediff.tiny.train --stage all --out runs/tiny --threads 2   # resumable; at most 15 + 90 + 25 min
python -m nimblediff.tiny.evaluate                                          # shape evaluator, about 1 min
python -m nimblediff.tiny.package && python bench/quality.py && python -m nimblediff.tiny.package
```
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", default="runs/tiny")
    p.add_argument("--dest", default=os.path.join(HERE, "weights", "tiny"))
    p.add_argument("--quality", default="out/tiny_quality.md")
    a = p.parse_args(argv)
    os.makedirs(a.dest, exist_ok=True)
    pipe = ship_pipeline(a.runs, a.dest)
    lora = ship_lora(a.runs, a.dest)
    write_card(a.runs, a.dest, pipe, lora, a.quality)
    print(f"wrote {a.dest}: {folder_mb(a.dest):.1f} MB")


if __name__ == "__main__":
    main()
