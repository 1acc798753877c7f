"""FewStepPipeline vs diffusers StableDiffusionPipeline + LCMScheduler: wall time in one process, same model.

Both pipelines share the same UNet, VAE and text encoder objects. Timing follows bench/timing.py: paired rounds in
rotating order, the ratio is the median of per-round ratios with a 95% interval, conditions printed beside it.
Usage: python bench/pipeline_overhead.py [--quick] [--repeats 9] [--sd15 0.2:128 1.0:256] [--threads 1] [--no-write]
--quick: the tiny model and the SD1.5-shaped UNet at width x0.2, 128x128 (about a minute); the default adds the
full-size random SD1.5 (860M UNet) at 256x256. Writes bench/results/pipeline_overhead.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import factories  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Conditions, interleave, median, ratio, write_result  # noqa: E402


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

    def run(p):
        p.set_progress_bar_config(disable=True)

        def call():
            p("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw)
        return call

    return interleave({"nimblediff": run(ours), "diffusers": run(theirs)}, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and SD1.5-shaped x0.2 only")
    parser.add_argument("--repeats", type=int, default=9, help="paired rounds per SD1.5-shaped row (tiny: 3x)")
    parser.add_argument("--sd15", nargs="*", default=None, metavar="SCALE:RES",
                        help="SD1.5-shaped rows, UNet width scale and resolution (default 0.2:128 1.0:256)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.sd15 is None:
        args.sd15 = ["0.2:128"] if args.quick else ["0.2:128", "1.0:256"]
    torch.set_num_threads(args.threads)
    cond = Conditions()
    print(cond, file=sys.stderr)
    t0 = time.perf_counter()
    rows = [("tiny SD (64x64)", time_pair(factories.tiny_sd15_components(0), 64, args.steps, args.repeats * 3))]
    for spec in args.sd15:
        scale, res = float(spec.split(":")[0]), int(spec.split(":")[1])
        comp = sd15_shaped_components(scale)
        n = sum(p.numel() for p in comp["unet"].parameters()) / 1e6
        label = f"SD1.5-shaped x{scale:g}, {n:.1f}M UNet, random weights ({res}x{res})"
        rows.append((label, time_pair(comp, res, args.steps, args.repeats)))
        print(f"{label} done {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del comp
    cond.finish()
    lines = [f"{args.steps} steps, CFG off, one prompt, {args.threads} thread(s); paired rounds in rotating order "
             f"({args.repeats * 3} for the tiny model, {args.repeats} for the others); ratio = median of per-round "
             "ratios, [95% interval] from order statistics; times are medians (loose on a shared machine).", "",
             str(cond), "",
             "| model | NimbleDiff FewStepPipeline | diffusers SD + LCMScheduler | ratio [95% CI] |",
             "|---|---:|---:|---:|"]
    fmt = lambda s: f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"  # noqa: E731
    for name, t in rows:
        lines.append(f"| {name} | {fmt(median(t, 'nimblediff'))} | {fmt(median(t, 'diffusers'))} | "
                     f"{ratio(t, 'nimblediff', 'diffusers')} |")
    body = "\n".join(lines)
    print("\n" + body)
    if not args.no_write:
        write_result("pipeline_overhead", __file__, body, argv,
                     "quick mode" if args.quick else "full run")


if __name__ == "__main__":
    main()
