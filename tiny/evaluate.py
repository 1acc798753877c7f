"""Attribute evaluator for 64x64 NimbleDiff-Tiny images against the labels of their captions.

Colour, position and size are measured from pixels: the background is the median border colour, shapes are the
connected components of pixels far from it. Shape is read by a small CNN (trained on the procedural data, saved in
weights/tiny/evaluator.safetensors) from a colour-free 32x32 "distance from background" crop of each component, so
it cannot lean on colour. Its penultimate features give a Frechet distance between a generated and a real set.
"""

import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg, ndimage

from . import data

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "tiny", "evaluator.safetensors")
FG_THRESHOLD = 60.0  # RGB distance from the background; palette colours are >= 110 away from every background
MIN_PIXELS = 12
CROP = 32
LARGE_EXTENT = 20.5  # bbox side in pixels: small shapes measure 15-18, large ones 22-27


class ShapeNet(torch.nn.Module):
    """(B, 1, 32, 32) distance map -> (B, 4) shape logits; `features` is the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(i, o, 3, padding=1) for i, o in [(1, 16), (16, 32), (32, 64)]])
        self.fc = torch.nn.Linear(64 * 4 * 4, 64)
        self.head = torch.nn.Linear(64, len(data.SHAPES))

    def features(self, x):
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 32 -> 16 -> 8 -> 4
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def segment(image):
    """(64, 64, 3) uint8 -> (background rgb, distance map (64, 64), components largest first)."""
    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    labelled, n = ndimage.label(dist > FG_THRESHOLD, structure=np.ones((3, 3)))
    comps = []
    for k in range(1, n + 1):
        mask = labelled == k
        if mask.sum() >= MIN_PIXELS:
            ys, xs = np.nonzero(mask)
            comps.append({"mask": mask, "centroid": (xs.mean(), ys.mean()),
                          "extent": max(np.ptp(xs), np.ptp(ys)) + 1, "rgb": np.median(img[mask], axis=0)})
    comps.sort(key=lambda c: -c["mask"].sum())
    return bg, dist, comps


def crop(dist, comp, others):
    """Colour-free 32x32 crop of the distance map around a component, other components blanked."""
    d = dist.copy()
    for o in others:
        d[ndimage.binary_dilation(o["mask"], iterations=2)] = 0
    d = np.pad(np.clip(d / 150.0, 0, 1), CROP // 2)
    x, y = (int(round(v)) for v in comp["centroid"])
    return d[y:y + CROP, x:x + CROP]  # padded coordinates: the centroid sits at (16, 16)


def nearest(value, table):
    return min(table, key=lambda k: np.linalg.norm(np.asarray(value, dtype=np.float32) - table[k]))


def match(scene, image):
    """Pair each labelled shape with a measured component (nearest anchors; None where a shape is missing)."""
    _, dist, comps = segment(image)
    comps = comps[:len(scene.shapes)]
    best, best_cost = None, np.inf
    for perm in itertools.permutations(range(len(scene.shapes)), len(comps)):
        cost = sum(np.linalg.norm(np.subtract(comps[i]["centroid"], data.POSITIONS[scene.shapes[j].position]))
                   for i, j in enumerate(perm))
        if cost < best_cost:
            best, best_cost = perm, cost
    pairs = [None] * len(scene.shapes)
    for i, j in enumerate(best or ()):
        pairs[j] = (comps[i], crop(dist, comps[i], [c for c in comps if c is not comps[i]]))
    return pairs


def measure(pairs):
    """Measured attributes per pair (None stays None); shape is filled in later by the CNN."""
    out = []
    for p in pairs:
        if p is None:
            out.append(None)
            continue
        comp = p[0]
        out.append({"colour": nearest(comp["rgb"], data.COLOURS), "position": nearest(comp["centroid"], data.POSITIONS),
                    "size": "large" if comp["extent"] > LARGE_EXTENT else "small"})
    return out


def load_evaluator(path=DEFAULT_PATH):
    from safetensors.torch import load_file

    net = ShapeNet()
    net.load_state_dict(load_file(path))
    return net.eval()


def evaluate(images, scenes, net):
    """images (N, 64, 64, 3) uint8 against the scenes of their captions -> (accuracies, component features)."""
    hits = {"shape": [], "colour": [], "position": [], "size": [], "count": []}
    crops, crop_labels = [], []
    for image, scene in zip(images, scenes):
        _, _, comps = segment(image)
        hits["count"].append(len(comps) == len(scene.shapes))
        pairs = match(scene, image)
        for label, p, m in zip(scene.shapes, pairs, measure(pairs)):
            if m is None:  # a missing shape is wrong on every attribute
                for k in ("shape", "colour", "position"):
                    hits[k].append(False)
                continue
            hits["colour"].append(m["colour"] == label.colour)
            hits["position"].append(m["position"] == label.position)
            if data.shape_phrase(label, True) in scene.caption:  # size only counts where the caption states it
                hits["size"].append(m["size"] == label.size)
            crops.append(p[1])
            crop_labels.append(label.shape)
    feats = np.zeros((0, 64), np.float32)
    if crops:
        with torch.no_grad():
            x = torch.from_numpy(np.stack(crops)).float()[:, None]
            feats = net.features(x)
            pred = net.head(feats).argmax(1).numpy()
        hits["shape"] += [data.SHAPES[k] == s for k, s in zip(pred, crop_labels)]
        feats = feats.numpy()
    # Missing shapes were counted in colour/position but have no crop: pad shape with the same misses.
    hits["shape"] += [False] * (len(hits["colour"]) - len(hits["shape"]))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}, feats


def frechet(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (as FID, on the evaluator's features)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    eye = 1e-6 * np.eye(f1.shape[1])  # ReLU features have dead dimensions: keep sqrtm off a singular matrix
    s1, s2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def training_crops(seed, n):
    """Crops and shape indices from n procedural scenes, through the same segmentation the evaluator uses."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        scene = data.sample_scene(rng)
        for label, p in zip(scene.shapes, match(scene, data.render(scene))):
            if p is not None:
                xs.append(p[1])
                ys.append(data.SHAPES.index(label.shape))
    return torch.from_numpy(np.stack(xs)).float()[:, None], torch.tensor(ys)


def augment(x, gen):
    """Blur and noise: generated images are softer and noisier than the rendered ones."""
    x = x * (0.6 + 0.6 * torch.rand(len(x), 1, 1, 1, generator=gen))  # contrast of a washed-out sample
    sigma = float(torch.rand(1, generator=gen)) * 1.5
    if sigma > 0.2:
        k = torch.arange(-2, 3).float()
        w = torch.exp(-k ** 2 / (2 * sigma ** 2))
        w = (w / w.sum())
        x = F.conv2d(x, (w[:, None] * w[None, :])[None, None], padding=2)
    return (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_evaluator(path=DEFAULT_PATH, steps=1500, seed=0, n_scenes=6000, log=print):
    """Train ShapeNet on procedural crops and save it (a few minutes on one thread)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = training_crops(seed, n_scenes)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(net(augment(x[idx], gen)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            log(f"evaluator step {step} loss {loss.item():.4f}")
    net.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path,
              metadata={"model": "nimblediff-tiny ShapeNet", "classes": ",".join(data.SHAPES)})
    return net


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Train the NimbleDiff-Tiny shape evaluator and check it on real data.")
    p.add_argument("--out", default=DEFAULT_PATH)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    net = train_evaluator(a.out, a.steps)
    imgs, _, scenes = data.make_batch(12345, 500)
    images = ((imgs.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    print(evaluate(images, scenes, net)[0])
