"""Held-out prompts for NimbleDiff-Tiny: captions (with exact labels) and noise seeds no training or development
run has used, so a score on them measures generalisation to new prompts, not memory of seen ones.

    from nimblediff.tiny.heldout import heldout_scenes
    held = heldout_scenes(512)   # held.scenes[i], held.captions[i], held.noise_seeds[i]

Seeds and why they are disjoint (checked against the code, December 2026):
- scenes: numpy generator seed HELDOUT_SEED = 10**9 + 12. tiny/train.py draws its batches from
  batch_seed = (seed * 1000 + k) * 10**7 + step with k in {1, 2, 3} (vae, unet, flash) and step < 10**7, so every
  training seed has (s // 10**7) % 1000 in {1, 2, 3}; HELDOUT_SEED has 100. train.py's VAE held-out batch is
  10**9 + 1; the evaluator's CNN trains on seed 0; tests and benchmarks use small seeds (3-99, 2024, 12345).
- noise: prompt i is generated from torch.Generator().manual_seed(NOISE_BASE + i), NOISE_BASE = 12 * 10**12.
  Training seeds its noise with the same batch_seed values (reaching 12 * 10**12 needs k = 0: never), and
  bench/quality.py uses 0..n-1.
- calibration split (calibration_scenes): CALIBRATION_SEED = 10**9 + 13 and CALIBRATION_NOISE_BASE = 13 * 10**12,
  disjoint from both the training seeds and the held-out ones by the same argument.
"""

from dataclasses import dataclass

import numpy as np

from . import data

HELDOUT_SEED = 10**9 + 12
NOISE_BASE = 12 * 10**12
# the calibration split: settings (CFG, sampling shift, schedules) are chosen on it, never on the held-out prompts
CALIBRATION_SEED = 10**9 + 13
CALIBRATION_NOISE_BASE = 13 * 10**12


@dataclass(frozen=True)
class Heldout:
    scenes: list       # of data.Scene, with exact labels (the evaluator's reference)
    captions: list     # of str, the prompts
    noise_seeds: list  # of int, one torch generator seed per prompt


def heldout_scenes(n=512, seed=HELDOUT_SEED, noise_base=NOISE_BASE):
    """n held-out scenes with exactly round(P_TWO_SHAPES * n) two-shape scenes (the data's proportion, without
    the sampling wobble of a free draw), in draw order, plus a fixed noise seed per prompt."""
    rng = np.random.default_rng(seed)
    want_two = round(data.P_TWO_SHAPES * n)
    want = {1: n - want_two, 2: want_two}
    scenes = []
    while len(scenes) < n:
        scene = data.sample_scene(rng)
        k = len(scene.shapes)
        if want[k] > 0:
            want[k] -= 1
            scenes.append(scene)
    return Heldout(scenes, [s.caption for s in scenes], [noise_base + i for i in range(n)])


def calibration_scenes(n=256):
    """The calibration split: drawn like the held-out set from other seeds (scenes and noise), for choosing
    settings; a setting chosen here is then reported on heldout_scenes."""
    return heldout_scenes(n, CALIBRATION_SEED, CALIBRATION_NOISE_BASE)


def render(held):
    """(N, 64, 64, 3) uint8 real images of the held-out scenes (the 'real' row of a quality table)."""
    return np.stack([data.render(s) for s in held.scenes])
