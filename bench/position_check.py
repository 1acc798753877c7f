"""Where NimbleDiff-Tiny puts an object, and why: the position confusion of one-shape prompts, and probes of the
text encoder and UNet that say whether the model can tell two position words apart at all.

    python bench/position_check.py                      # the shipped teacher, 512 held-out prompts
    python bench/position_check.py --model A --model B  # several teachers on the same prompts and noise, paired

Images: DDIM, 20 steps, CFG 5 (the editing bench's teacher setting), evaluator v2. Confusion: one-shape prompts,
the position read off the image against the caption's ("other": no object, several, or none near an anchor).
Probes, on "a <colour> <shape> <position phrase>" over the 5 x 4 colour/shape captions: the distance between the
text encoder's outputs for two position words, and the distance between the UNet's noise predictions at t = 999 on
the same noise (how differently the model starts to draw the two). A pair whose probes are near zero is a pair the
model cannot tell apart: its images put the object in either slot at about chance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

from nimblediff.tiny import data, evaluate, heldout
from nimblediff.tiny.train import tokenize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from timing import Conditions, write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "weights", "tiny", "nimblediff-tiny")
POSITIONS = list(data.POSITIONS)
PAIRS = (("top", "bottom"), ("left", "right"), ("top", "left"), ("center", "top"))
STEPS, CFG = 20, 5.0


def load(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts, batch=64):
    """(N, 64, 64, 3) uint8, prompt i from its own noise seed (bench/quality.py's generate, in batches)."""
    return np.concatenate([quality.generate(pipe, prompts.captions[i:i + batch], STEPS, CFG,
                                            prompts.noise_seeds[i:i + batch])
                           for i in range(0, len(prompts.captions), batch)])


def read_positions(images, scenes, net):
    """(true, read) position of every one-shape prompt; read is "other" unless exactly one object sits at an anchor."""
    pairs = []
    for image, scene in zip(images, scenes):
        if len(scene.shapes) == 1:
            objs = evaluate.read_image(image, net)["objects"]
            read = objs[0]["position"] if len(objs) == 1 and objs[0]["position"] else "other"
            pairs.append((scene.shapes[0].position, read))
    return pairs


def confusion_table(pairs) -> list[str]:
    counts = Counter(pairs)
    cols = POSITIONS + ["other"]
    lines = ["| caption \\ image | " + " | ".join(cols) + " | right [95% CI] |", "|---" * (len(cols) + 2) + "|"]
    for p in POSITIONS:
        row = [counts[(p, c)] for c in cols]
        right, n = row[POSITIONS.index(p)], sum(row)
        lo, hi = evaluate.wilson(right, n)
        lines.append(f"| {p} | " + " | ".join(map(str, row)) + f" | {right / max(n, 1):.2f} [{lo:.2f}, {hi:.2f}] |")
    return lines


def axis_hits(pairs, words) -> np.ndarray:
    """Per one-shape prompt whose caption says one of `words`: 1 where the image reads that word."""
    return np.array([t == r for t, r in pairs if t in words], float)


def probes(pipe) -> dict:
    """pair -> (text-encoder output distance, UNet t=999 prediction distance), means over the 20 captions."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    out = {}
    with torch.no_grad():
        for a, b in PAIRS:
            te, un = [], []
            for colour in data.COLOURS:
                for shape in data.SHAPES:
                    caps = [f"a {colour} {shape} {data.POSITION_PHRASES[w]}" for w in (a, b)]
                    h = pipe.text_encoder(tokenize(pipe.tokenizer, caps))[0]
                    eps = pipe.unet(noise.expand(2, -1, -1, -1), 999, h).sample
                    te.append(float((h[0] - h[1]).norm()))
                    un.append(float((eps[0] - eps[1]).norm()))
            out[(a, b)] = (float(np.mean(te)), float(np.mean(un)))
    return out


def paired(a, b) -> str:
    d, (lo, hi) = evaluate.paired_difference(b, a)
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="teacher pipeline folder(s); default: the shipped one")
    p.add_argument("--n", type=int, default=512, help="prompts (the data's share of one-shape scenes)")
    p.add_argument("--calibration", action="store_true", help="the calibration split instead of the held-out one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="position_check", help="bench/results/<out>.md")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cond, t0 = Conditions(), time.time()
    models = a.model or [SHIPPED]
    prompts = heldout.calibration_scenes(a.n) if a.calibration else heldout.heldout_scenes(a.n)
    net = evaluate.load_evaluator()
    split = "calibration" if a.calibration else "held-out"
    lines = [f"{a.n} {split} prompts (`nimblediff.tiny.heldout`), DDIM {STEPS} steps, CFG {CFG:g}, one noise seed "
             "per prompt, evaluator v2. Whole = every stated word right; top/bottom and left/right = one-shape "
             "prompts whose caption says that word, read right. Intervals: Wilson 95%; differences to the first "
             "model: paired bootstrap 95% over the same prompts and noise. Probes: distance between the two "
             "captions' text-encoder outputs / UNet noise predictions at t = 999 on one noise, mean over the 20 "
             "colour x shape captions.", ""]
    summary = ["| model | whole [95% CI] | position | top/bottom right | left/right right | whole - first | "
               "top/bottom - first | " + " | ".join(f"probe {x}/{y} (text, UNet)" for x, y in PAIRS) + " |",
               "|---" * (7 + len(PAIRS)) + "|"]
    tables, first = [], None
    for folder in models:
        pipe = load(folder)
        images = generate(pipe, prompts)
        r = evaluate.evaluate_v2(images, prompts.scenes, net)
        pairs = read_positions(images, prompts.scenes, net)
        tb, lr = axis_hits(pairs, ("top", "bottom")), axis_hits(pairs, ("left", "right"))
        name = os.path.relpath(folder, ROOT) if folder.startswith(ROOT) else folder
        cur = (r["whole"].astype(float), tb)
        gaps = ("-", "-") if first is None else (paired(first[0], cur[0]), paired(first[1], cur[1]))
        first = first or cur
        pr = probes(pipe)
        lo, hi = r["interval"]["whole"]
        summary.append(f"| {name} | {r['accuracy']['whole']:.3f} [{lo:.2f}, {hi:.2f}] | "
                       f"{r['accuracy']['position']:.3f} | {tb.mean():.2f} ({int(tb.sum())}/{len(tb)}) | "
                       f"{lr.mean():.2f} ({int(lr.sum())}/{len(lr)}) | {gaps[0]} | {gaps[1]} | "
                       + " | ".join(f"{pr[k][0]:.2f}, {pr[k][1]:.2f}" for k in PAIRS) + " |")
        tables += [f"**{name}**: position of one-shape prompts, caption (rows) against image (columns)", "",
                   *confusion_table(pairs), ""]
        print(summary[-1], f"({time.time() - t0:.0f} s)", file=sys.stderr)
    body = "\n".join(lines + summary + [""] + tables + [f"{cond.finish()} Whole run {time.time() - t0:.0f} s."])
    print(body)
    if not a.no_write:
        write_result(a.out, __file__, body, argv)


if __name__ == "__main__":
    main()
