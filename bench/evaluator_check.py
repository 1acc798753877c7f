"""Evaluator v2 on its own: real renders (clean, blurred, noised) should score ~1, and images that carry no
information about the caption should score ~0. Prints a Markdown table and writes bench/results/evaluator.md.

    python bench/evaluator_check.py [--quick] [--n 512] [--weights weights/tiny/evaluator.safetensors]
                                    [--compare other.safetensors] [--no-write]

--quick: 128 held-out prompts instead of 512 (about a minute on one thread). The prompts are
nimblediff.tiny.heldout.heldout_scenes(n); the reference is the renderer's exact labels.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

from nimblediff.tiny import evaluate, heldout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_result  # noqa: E402

COLUMNS = ("count", "shape", "colour", "size", "position", "background")


def row(name, result):
    acc, (lo, hi) = result["accuracy"], result["interval"]["whole"]
    cells = " | ".join(f"{acc[a]:.3f}" for a in COLUMNS)
    return f"| {name} | **{acc['whole']:.3f}** [{lo:.3f}, {hi:.3f}] | {cells} |"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="128 prompts")
    p.add_argument("--weights", default=evaluate.DEFAULT_PATH)
    p.add_argument("--compare", default=None, help="another weights file: its real-render rows are added below")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    n = min(a.n, 128) if a.quick else a.n
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    net = evaluate.load_evaluator(a.weights)
    held = heldout.heldout_scenes(n)
    images = heldout.render(held)
    lines = ["| images | whole-prompt [95% CI] | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    beyond = {"beyond mild: blur sigma 2.5": evaluate.blur(images, 2.5),
              "beyond mild: noise std 16": evaluate.add_noise(images, 16, seed=1)}
    for name, imgs in {**evaluate.real_variants(images, seed=1), **beyond}.items():
        lines.append(row(name, evaluate.evaluate_v2(imgs, held.scenes, net)))
        print(lines[-1], flush=True)
    refs = evaluate.baselines(images, held.scenes, seed=2)
    v1 = ["| images | shape | colour | position | count |", "|---|---|---|---|---|"]
    for name, (imgs, scenes) in refs.items():
        lines.append(row(f"chance: {name}", evaluate.evaluate_v2(imgs, scenes, net)))
        print(lines[-1], flush=True)
        acc = evaluate.evaluate(imgs, scenes, net)[0]  # v1 on the same inputs: what the old judge let through
        v1.append(f"| {name} | " + " | ".join(f"{acc[k]:.3f}" for k in ("shape", "colour", "position", "count")) + " |")
    if a.compare:
        other = evaluate.load_evaluator(a.compare)
        tag = os.path.basename(a.compare)
        for name, imgs in evaluate.real_variants(images, seed=1).items():
            lines.append(row(f"{name} [{tag}]", evaluate.evaluate_v2(imgs, held.scenes, other)))
            print(lines[-1], flush=True)
    two = sum(len(s.shapes) == 2 for s in held.scenes)
    note = (f"{n} held-out prompts (`nimblediff.tiny.heldout.heldout_scenes({n})`, {two} two-shape), rendered by "
            "`tiny.data.render`; reference = the renderer's labels. Whole-prompt: every stated word right (shape, "
            "colour, position, size where stated, background where stated) and exactly as many objects as phrases; "
            "two-shape scenes are assigned jointly over all attributes, so swaps and leaks count as errors. "
            "Per-attribute columns average over stated words (count and background over images). Interval: Wilson "
            "95%. Noise is Gaussian in 0-255 units; blur is Gaussian in pixels. "
            f"Weights: `{os.path.relpath(a.weights)}`. One CPU thread, {time.perf_counter() - t0:.0f} s.")
    if a.compare:
        note += f" Rows marked [{os.path.basename(a.compare)}] read the shapes with that weights file instead."
    v1_head = "v1 (`evaluate.evaluate`, pairing by position, no background) on the same chance-level inputs:"
    body = "\n".join(lines) + "\n\n" + note + "\n\n" + v1_head + "\n\n" + "\n".join(v1)
    print("\n" + body)
    if not a.no_write:
        write_result("evaluator", __file__, body, mode="quick: 128 prompts" if a.quick else f"{n} prompts")


if __name__ == "__main__":
    main()
