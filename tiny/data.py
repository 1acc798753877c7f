"""Procedural captioned scenes for NimbleDiff-Tiny: one or two flat shapes on a plain background, 64x64 RGB.

The grammar is kept small on purpose (4 shapes x 5 colours x 5 positions x 2 sizes x 3 backgrounds) so that a
few-million-parameter latent diffusion model can learn it on one CPU thread in about an hour. Every sample carries
its exact labels, which the evaluator and the tests use as the independent reference.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # draw at 256x256 and box-filter down: anti-aliased edges, like a real photo of a flat shape

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (235, 210, 40), "purple": (150, 60, 200)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
SIZES = {"small": 9.0, "large": 13.0}  # half-extent in pixels; large + jitter still fits inside the canvas
PAIRS = (("left", "right"), ("top", "bottom"))  # two-shape scenes use opposite slots, so shapes never overlap
P_TWO_SHAPES = 0.2
P_MENTION_SIZE = 0.7  # unmentioned attributes are still labelled; the prompt just leaves them free
P_MENTION_BACKGROUND = 0.7


@dataclass(frozen=True)
class ShapeLabel:
    shape: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    shapes: tuple  # of ShapeLabel, in caption order
    background: str
    caption: str
    jitter: tuple  # per shape (dx, dy, dr, (3,) colour offset) used only for rendering


def shape_phrase(label, mention_size=True):
    size = f"{label.size} " if mention_size else ""
    return f"a {size}{label.colour} {label.shape} {POSITION_PHRASES[label.position]}"


def sample_scene(rng, p_two=P_TWO_SHAPES):
    """Draw labels and a caption that states them (size and background are sometimes left unsaid).

    p_two: share of two-shape scenes; training may over-sample them, evaluation keeps the data's proportion."""
    if rng.random() < p_two:
        positions = list(PAIRS[rng.integers(len(PAIRS))])
        rng.shuffle(positions)
    else:
        positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    labels = tuple(ShapeLabel(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                              pos, list(SIZES)[rng.integers(len(SIZES))]) for pos in positions)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    phrases = [shape_phrase(lab, rng.random() < P_MENTION_SIZE) for lab in labels]
    caption = " and ".join(phrases)
    if rng.random() < P_MENTION_BACKGROUND:
        caption += f" on a {background} background"
    jitter = tuple((rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-1, 1),
                    tuple(int(v) for v in rng.integers(-12, 13, size=3)))
                   for _ in labels)
    return Scene(labels, background, caption, jitter)


def _polygon(shape, cx, cy, r):
    """Vertices of a shape centred on (cx, cy) with half-extent r (canvas units)."""
    if shape == "square":
        s = 0.85 * r  # a square of half-side r looks much bigger than a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def render(scene):
    """Scene -> (64, 64, 3) uint8 image."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for label, (dx, dy, dr, dc) in zip(scene.shapes, scene.jitter):
        x, y = POSITIONS[label.position]
        cx, cy, r = (x + dx) * k, (y + dy) * k, (SIZES[label.size] + dr) * k
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[label.colour]) + dc, 0, 255))
        if label.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(label.shape, cx, cy, r), fill=colour)
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def to_tensor(images):
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def make_batch(seed, n, p_two=P_TWO_SHAPES):
    """n scenes from one seed: (images (N, 3, 64, 64) in [-1, 1], captions, scenes). Same seed, same batch."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, p_two) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return to_tensor(images), [s.caption for s in scenes], scenes
