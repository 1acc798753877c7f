"""FewStepPipeline vs diffusers StableDiffusionPipeline + LCMScheduler: wall time in one process, same model.

Runs are interleaved (ours, theirs, ours, ...) so machine drift hits both equally; prints medians and the ratio.
Usage: python bench/pipeline_overhead.py [--repeats 7] [--sd15-scale 1.0] [--res 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import factories  # noqa: E402


def sd15_shaped_components(scale: float):
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers import AutoencoderKL

    unet = factories.sd15_shaped_unet(scale)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).eval()
    return dict(unet=unet, text_encoder=te, vae=vae, tokenizer=factories.tiny_clip_tokenizer(),
                scheduler=factories._ddim(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def time_pair(components, res: int, steps: int, repeats: int):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from nimblediff.pipelines import FewStepPipeline

    theirs = StableDiffusionPipeline(**components)
    theirs.scheduler = LCMScheduler.from_config(theirs.scheduler.config, timestep_spacing="trailing")
    ours = FewStepPipeline(**components)
    kw = dict(num_inference_steps=steps, guidance_scale=1.0, height=res, width=res, output_type="np")
    times = {"nimblediff": [], "diffusers": []}
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
        p("warm up", generator=torch.Generator().manual_seed(0), **kw)
    for _ in range(repeats):
        for name, p in (("nimblediff", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            p("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sd15-scale", type=float, default=1.0)
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    rows.append(("tiny SD (64x64)", time_pair(factories.tiny_sd15_components(0), 64, args.steps, args.repeats * 3)))
    rows.append((f"SD1.5-shaped x{args.sd15_scale} ({args.res}x{args.res})",
                 time_pair(sd15_shaped_components(args.sd15_scale), args.res, args.steps, args.repeats)))
    print(f"\n{args.steps} steps, CFG off, {args.threads} threads, median of interleaved runs\n")
    print("| model | NimbleDiff FewStepPipeline | diffusers SD + LCMScheduler | ratio |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t['nimblediff'] * 1e3:.1f} ms | {t['diffusers'] * 1e3:.1f} ms | "
              f"{t['nimblediff'] / t['diffusers']:.3f}x |")


if __name__ == "__main__":
    main()
