"""Composition (PrimeComposer) on NimbleDiff-Tiny: does the placed object appear in its region, and does the rest of
the scene stay right? Judged by the attribute evaluator v2 (tiny/evaluate.py) on the two-shape scene the composite
should show, in one run beside the peers: the collage itself (copy-paste, no sampling) and the plain inpaint blend
(the same sampler, injection and token masking off: what core.editing.inpaint gives).

Problems: a one-shape background scene (shape A at one slot of a PAIRS pair) and an object scene (shape B, large, at
the opposite slot, same background colour), both rendered; the box is the 36x36-pixel square around B's slot; the
composite is judged against "A and B" (whole prompt = every stated word right, right count). Held-out seeds.

    python bench/compose.py --n 24 --steps 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from nimblediff import TINY_MODEL
from nimblediff.core.editing.composition import place
from nimblediff.tiny import data
from nimblediff.tiny.evaluate import evaluate_v2, load_evaluator, wilson

BOX = 36 / 64        # box side as a fraction of the image


def problems(n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        slot_a, slot_b = data.PAIRS[rng.integers(len(data.PAIRS))][::(1 if rng.random() < 0.5 else -1)]
        bgc = list(data.BACKGROUNDS)[rng.integers(len(data.BACKGROUNDS))]
        shapes = rng.permutation(len(data.SHAPES))[:2]
        colours = rng.permutation(len(data.COLOURS))[:2]
        a = data.ShapeLabel(data.SHAPES[shapes[0]], list(data.COLOURS)[colours[0]], slot_a, "large")
        b = data.ShapeLabel(data.SHAPES[shapes[1]], list(data.COLOURS)[colours[1]], slot_b, "large")
        jit = ((0, 0, 0, (0, 0, 0)),)

        def scene(labels, j):
            caption = " and ".join(data.shape_phrase(lab) for lab in labels) + f" on a {bgc} background"
            return data.Scene(tuple(labels), bgc, caption, j)

        cx, cy = (v / 64 for v in data.POSITIONS[slot_b])
        x, y = min(max(cx - BOX / 2, 0.0), 1 - BOX), min(max(cy - BOX / 2, 0.0), 1 - BOX)
        box = (x, y, BOX, BOX)
        out.append({"background": scene([a], jit), "object": scene([b], jit), "target": scene([a, b], jit * 2),
                    "box": box, "object_prompt": data.shape_phrase(b)})
    return out


VARIANTS = {   # name: ComposePipeline options
    "inpaint blend (peer)": {"injection": 0.0, "object_prompt": False},
    "+ token mask": {"injection": 0.0, "object_prompt": True},
    "+ injection": {"injection": 1.0, "object_prompt": False},
    "PrimeComposer (all)": {"injection": 1.0, "object_prompt": True},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--injection-end", type=float, default=0.5)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=9001)
    parser.add_argument("--prompt", choices=["target", "background"], default="background", help=(
        "the scene prompt: the two-shape target caption, or the background's own caption (then only the "
        "reference and the object prompt can bring the object)"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from nimblediff.pipelines import ComposePipeline

    pipe = ComposePipeline.from_pretrained(TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    net = load_evaluator()
    items = problems(args.n, args.seed)
    targets = [it["target"] for it in items]
    rows = []
    with torch.no_grad():
        collages = []
        for it in items:
            bg, obj = (pipe.encode_image(Image.fromarray(data.render(it[k]))) for k in ("background", "object"))
            it["latents"] = (bg, obj)
            collage, _ = place(bg, obj, None, it["box"])         # the box of the object image, copied
            collages.append(pipe.decode(collage, "np")[0])
        rows.append(("collage (copy-paste, no sampling)", "-", collages, 0.0))
        for strength in args.strength:
            for name, opts in VARIANTS.items():
                start, images = time.monotonic(), []
                for i, it in enumerate(items):
                    bg, obj = it["latents"]
                    out = pipe(it[args.prompt].caption, background_latents=bg, object_latents=obj,
                               box=it["box"],
                               object_prompt=it["object_prompt"] if opts["object_prompt"] else None,
                               injection=opts["injection"], injection_end=args.injection_end, strength=strength,
                               num_inference_steps=args.steps, guidance_scale=args.cfg,
                               generator=torch.Generator().manual_seed(args.seed + i), output_type="np")
                    images.append(out.images[0])
                rows.append((name, strength, images, time.monotonic() - start))
    print(f"composition on NimbleDiff-Tiny: n={args.n} problems (seed {args.seed}), {args.steps} steps, "
          f"cfg {args.cfg}, injection_end {args.injection_end}, scene prompt: {args.prompt} caption; evaluator v2 "
          "against the two-shape target scene (shape / colour / position: per object, both objects)\n")
    print("| method | strength | whole prompt [95% CI] | shape | colour | position | s/image |")
    print("|---|---|---|---|---|---|---|")
    for name, strength, images, seconds in rows:
        images = (np.clip(np.stack(images), 0, 1) * 255).round().astype(np.uint8) \
            if np.stack(images).dtype != np.uint8 else np.stack(images)
        res = evaluate_v2(images, targets, net)
        k = int(res["whole"].sum())
        lo, hi = wilson(k, len(images))
        acc = res["accuracy"]
        print(f"| {name} | {strength} | {k / len(images):.2f} [{lo:.2f}, {hi:.2f}] | {acc['shape']:.2f} | "
              f"{acc['colour']:.2f} | {acc['position']:.2f} | {seconds / len(images):.2f} |")


if __name__ == "__main__":
    main()
