"""Choose NimbleDiff-Tiny-DiT's sampling settings (CFG scale, flow shift) on the calibration split, never on the
held-out prompts that bench/quality.py reports on.

    python bench/dit_calibrate.py [--dit weights/tiny/nimblediff-tiny-dit] [--n 128] [--steps 25]
        [--cfg 3 5 7 9] [--shift 1 2 3]
    python bench/dit_calibrate.py --flash [--n 256]

Prints whole-prompt, shape and colour accuracy (evaluator v2, Wilson intervals) for every (CFG, shift) pair; with
--flash, for the shipped Flash LoRA's sampler instead: flow Euler (the ODE) against LCM re-noising (x0, then fresh
noise to the next sigma) at 1, 2 and 4 steps on the recipe's uniform grid, which chose the recipe's sampler.
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import DIT_ZERO_ROWS, ROOT, generate  # noqa: E402
from timing import Conditions  # noqa: E402

from nimblediff.tiny import evaluate, heldout  # noqa: E402


def main(argv=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit", default=os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny-dit"))
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, nargs="+", default=[3.0, 5.0, 7.0, 9.0])
    p.add_argument("--shift", type=float, nargs="+", default=[1.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--flash", action="store_true", help="choose the Flash LoRA's sampler instead of CFG / shift")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cond = Conditions()
    cal = heldout.calibration_scenes(a.n)
    net = evaluate.load_evaluator()
    if a.flash:
        return flash_samplers(a, cal, net, cond)
    pipe = StableDiffusion3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    print(f"calibration split: {a.n} prompts (seed {heldout.CALIBRATION_SEED}), {a.steps} flow-Euler steps; {cond}")
    print("| CFG | shift | whole prompt [95% CI] | two shapes | shape | colour | position |\n|---|---|---|---|---|---|---|")
    for cfg, shift in itertools.product(a.cfg, a.shift):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(base, shift=shift)
        images = generate(pipe, cal.captions, a.steps, cfg, cal.noise_seeds, max_sequence_length=DIT_ZERO_ROWS)
        r = evaluate.evaluate_v2(images, cal.scenes, net)
        acc, (lo, hi) = r["accuracy"], r["interval"]["whole"]
        print(f"| {cfg:g} | {shift:g} | {acc['whole']:.3f} [{lo:.2f}, {hi:.2f}] | "
              f"{r['whole_by_count'].get(2, float('nan')):.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} | "
              f"{acc['position']:.3f} |", flush=True)


def flash_samplers(a, cal, net, cond):
    from nimblediff.pipelines.dit import FewStepSD3Pipeline

    lora = f"{a.dit.rstrip(os.sep)}-flash-lora.safetensors"
    pipe = FewStepSD3Pipeline.from_pretrained(a.dit, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_acceleration_lora(lora, recipe="nimblediff-tiny-dit-flash")
    print(f"calibration split: {a.n} prompts (seed {heldout.CALIBRATION_SEED}), Flash LoRA at CFG 1 on the "
          f"uniform flow grid; {cond}")
    print("| sampler | steps | whole prompt [95% CI] | two shapes | shape | colour | position |\n|---|---|---|---|---|---|---|")
    for sampler, steps in itertools.product(("euler", "lcm"), (4, 2, 1)):
        images = generate(pipe, cal.captions, steps, 1.0, cal.noise_seeds, max_sequence_length=DIT_ZERO_ROWS,
                          sampler=sampler)
        r = evaluate.evaluate_v2(images, cal.scenes, net)
        acc, (lo, hi) = r["accuracy"], r["interval"]["whole"]
        print(f"| {sampler} | {steps} | {acc['whole']:.3f} [{lo:.2f}, {hi:.2f}] | "
              f"{r['whole_by_count'].get(2, float('nan')):.3f} | {acc['shape']:.3f} | {acc['colour']:.3f} | "
              f"{acc['position']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
