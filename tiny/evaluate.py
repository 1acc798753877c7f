"""Attribute evaluator for 64x64 NimbleDiff-Tiny images against the labels of their captions.

Evaluator v2 (`evaluate_v2`, the judge to use): reads each image without its caption, then scores every word the
caption states. The background is the median border colour (and must be flat, or the image has no scene); objects
are regions far from it, cut at half their own contrast and required to be large and flat inside, so blur neither
grows nor merges them and noise yields none. Colour, position, size and background are measured from pixels; shape
is read by a small CNN (weights/tiny/evaluator.safetensors, trained on blurred and noised procedural renders) from a
colour-free 32x32 "distance from background" crop, so it cannot lean on colour. In two-shape scenes the objects are
assigned to the caption's phrases jointly over all stated attributes, so a swap or a leaked attribute is an error.
Headline: whole-prompt accuracy (every stated word right, right count), with per-attribute accuracies and Wilson
intervals beside it; `baselines` gives the chance-level images (bench/evaluator_check.py reports both).

`evaluate` is v1, kept for its callers: it pairs shapes by position, ignores the background and counts noise.
The CNN's penultimate features give a Frechet distance between a generated and a real set (`frechet`).
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


# ---------------------------------------------------------------- Evaluator v2
# v1 above pairs shapes by position, never reads the background and counts any blob of noise as a shape. v2 reads
# every object from pixels first (with no look at the caption), then scores every stated word of the caption, with
# the objects of a two-shape scene assigned to the caption's phrases jointly over all attributes.

BG_FLAT_TOL = 40.0       # border pixels this close to the background estimate count as flat background
BG_FLAT_FRACTION = 0.6   # below this the image has no flat background (noise): no scene, no objects
BG_MAX_DIST = 45.0       # a background further than this from every palette background is no named background
MIN_CONTRAST = 60.0      # an object's colour must stand this far from the background (palette: >= ~100)
MIN_AREA = 40            # pixels at half contrast; the smallest real object (small star) has ~80
MAX_SPREAD = 30.0        # flat shapes: median colour distance inside the object core; noise blobs are far wider
COLOUR_MAX_DIST = 60.0   # colour jitter is +-12 per channel (<= 21 away); further means no palette colour
POSITION_MAX_DIST = 9.0  # anchors are >= 16 px apart and jitter is +-2 px; further means no named position
LARGE_RADIUS = 11.0      # size classes: half-extent 8-10 px (small) vs 12-14 px (large)
SHAPE_AREA = {"circle": np.pi, "square": 1.7 ** 2, "triangle": 0.5 * 1.9 * 1.8, "star": 5 * 0.45 * np.sin(np.pi / 5)}
ATTRIBUTES = ("shape", "colour", "position", "size")


def find_background(image):
    """(64, 64, 3) float -> (rgb, palette name or None, flat?). The border is mostly background even when a large
    shape touches it, so its median is the estimate; its spread says whether there is a flat background at all."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3), image[:, :2].reshape(-1, 3),
                             image[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    flat = np.mean(np.linalg.norm(border - bg, axis=1) < BG_FLAT_TOL) >= BG_FLAT_FRACTION
    name = nearest(bg, data.BACKGROUNDS)
    if not flat or np.linalg.norm(bg - data.BACKGROUNDS[name]) > BG_MAX_DIST:
        name = None
    return bg, name, flat


def objects_v2(image):
    """(64, 64, 3) uint8 -> (background name or None, distance map, objects). An object is a connected region that
    stands at least MIN_CONTRAST from a flat background, is cut at half its own contrast (so blur neither grows it
    nor merges two neighbours: the gap between them stays below half contrast) and is flat inside."""
    img = ndimage.median_filter(image.astype(np.float32), size=(3, 3, 1))  # pixel noise off, edges kept
    bg, name, flat = find_background(img)
    dist = np.linalg.norm(img - bg, axis=-1)
    if not flat:
        return name, dist, []
    coarse, n = ndimage.label(dist > MIN_CONTRAST / 2, structure=np.ones((3, 3)))
    objs = []
    for k in range(1, n + 1):
        region = coarse == k
        contrast = np.percentile(dist[region], 90)
        if contrast < MIN_CONTRAST:
            continue
        fine, m = ndimage.label(region & (dist > contrast / 2), structure=np.ones((3, 3)))
        objs += [o for j in range(1, m + 1) if (o := _object(img, dist, fine == j, contrast)) is not None]
    for o in objs:
        o["colour"] = _colour(o["rgb"], bg)
        o["position"] = _named(o["centroid"], data.POSITIONS, POSITION_MAX_DIST)
    objs.sort(key=lambda o: -o["area"])
    return name, dist, objs


def _object(img, dist, mask, contrast):
    """Measurements of one half-contrast region, or None if it is too small or not flat (not a drawn shape)."""
    area = int(mask.sum())
    if area < MIN_AREA:
        return None
    core = mask & (dist > 0.75 * contrast)
    core = core if core.sum() >= 5 else mask
    rgb = np.median(img[core], axis=0)
    if np.median(np.linalg.norm(img[core] - rgb, axis=1)) > MAX_SPREAD:
        return None
    ys, xs = np.nonzero(mask)
    return {"mask": mask, "area": area, "centroid": (xs.mean(), ys.mean()), "rgb": rgb}


def read_image(image, net):
    """(64, 64, 3) uint8 -> {"background": name or None, "objects": [{shape, colour, position, size, ...}]}: what
    the image shows, read without the caption."""
    background, dist, objs = objects_v2(image)
    if objs:
        crops = [crop(dist, o, [p for p in objs if p is not o]) for o in objs]
        with torch.no_grad():
            feats = net.features(torch.from_numpy(np.stack(crops)).float()[:, None])
            pred = net.head(feats).argmax(1).numpy()
        for o, k, f in zip(objs, pred, feats.numpy()):
            o["shape"], o["features"] = data.SHAPES[k], f
            radius = np.sqrt(o["area"] / SHAPE_AREA[o["shape"]])  # area at half contrast barely moves under blur
            o["size"] = "large" if radius > LARGE_RADIUS else "small"
    return {"background": background, "objects": objs}


def _named(value, table, max_dist):
    """Nearest palette entry, or None when even the nearest is too far to be what the caption meant."""
    name = nearest(value, table)
    return name if np.linalg.norm(np.asarray(value, np.float32) - table[name]) <= max_dist else None


def _colour(rgb, bg):
    """Palette colour whose mix with the background (alpha 0.5-1) is nearest to the measured colour, or None if
    none is within COLOUR_MAX_DIST. Why the mix: blur blends a thin star arm with the background, so its brightest
    pixels lie on the line from the background to its true colour, not at the colour itself."""
    def miss(c):
        c = np.asarray(c, np.float32)
        alpha = np.clip(np.dot(rgb - bg, c - bg) / max(np.dot(c - bg, c - bg), 1e-6), 0.5, 1.0)
        return np.linalg.norm(bg + alpha * (c - bg) - rgb)
    name = min(data.COLOURS, key=lambda k: miss(data.COLOURS[k]))
    return name if miss(data.COLOURS[name]) <= COLOUR_MAX_DIST else None


def stated(scene):
    """The words the caption states: per shape phrase the attributes it names (size is sometimes left free),
    and whether it names the background. Read from the caption text, not assumed from the labels."""
    phrases = scene.caption.split(" on a ")[0].split(" and ")
    per_shape = [("shape", "colour", "position") + (("size",) if phrase.split()[1] in data.SIZES else ())
                 for phrase in phrases]
    return per_shape, scene.caption.endswith(" background")


def assign(labels, words, objs):
    """Best one-to-one assignment of caption phrases to read objects: most agreeing stated attributes (so a swap or
    a leak cannot be explained away by position), ties broken by anchor distance. Returns one object or None per
    label. At most two phrases per caption, so trying every permutation is cheap."""
    best, best_key = [None] * len(labels), None
    k = min(len(labels), len(objs))
    for chosen in itertools.permutations(range(len(objs)), k):
        for slots in itertools.permutations(range(len(labels)), k):
            pairs = list(zip(slots, chosen))
            agree = sum(getattr(labels[s], a) == objs[o][a] for s, o in pairs for a in words[s])
            far = sum(np.hypot(*np.subtract(objs[o]["centroid"], data.POSITIONS[labels[s].position])) for s, o in pairs)
            if best_key is None or (agree, -far) > best_key:
                best_key, best = (agree, -far), [None] * len(labels)
                for s, o in pairs:
                    best[s] = objs[o]
    return best


def score(scene, reading):
    """One image's reading against its caption -> {attribute: [hit, ...]} with one entry per stated word, plus
    "count" and "whole" (every stated attribute right and exactly as many objects as phrases)."""
    words, says_background = stated(scene)
    objs = reading["objects"]
    matched = assign(scene.shapes, words, objs)
    hits = {a: [] for a in ATTRIBUTES + ("background",)}
    for label, ws, obj in zip(scene.shapes, words, matched):
        for a in ws:  # a missing object is wrong on every attribute its phrase states
            hits[a].append(obj is not None and obj[a] == getattr(label, a))
    if says_background:
        hits["background"].append(reading["background"] == scene.background)
    hits["count"] = [len(objs) == len(scene.shapes)]
    hits["whole"] = [all(all(v) for v in hits.values())]
    return hits


def evaluate_v2(images, scenes, net):
    """images (N, 64, 64, 3) uint8 against the scenes of their captions -> {"accuracy": {attribute: mean},
    "interval": {attribute: Wilson 95% interval}, "hits": {attribute: [bool]}, "whole": (N,) bool,
    "whole_by_count": {shapes in caption: whole-prompt accuracy}, "features": (M, 64) object features}.
    accuracy["whole"] (every stated word right, right count) is the headline number; per-attribute accuracies come
    from the best joint assignment, so they are optimistic where whole-prompt is exact."""
    hits = {a: [] for a in ("whole", "count") + ATTRIBUTES + ("background",)}
    feats = []
    for image, scene in zip(images, scenes):
        reading = read_image(image, net)
        feats += [o["features"] for o in reading["objects"]]
        for a, v in score(scene, reading).items():
            hits[a] += v
    acc = {a: float(np.mean(v)) if v else float("nan") for a, v in hits.items()}
    ci = {a: wilson(sum(v), len(v)) for a, v in hits.items()}
    whole = np.array(hits["whole"], bool)
    n_shapes = np.array([len(s.shapes) for s in scenes])
    by_count = {k: float(whole[n_shapes == k].mean()) for k in (1, 2) if (n_shapes == k).any()}  # two is harder
    return {"accuracy": acc, "interval": ci, "hits": hits, "whole": whole, "whole_by_count": by_count,
            "features": np.stack(feats) if feats else np.zeros((0, 64), np.float32)}


def edge_sharpness(images):
    """Per image: the 99th percentile of the luma gradient magnitude (central differences, 0-255 scale).

    Flat shapes on flat backgrounds: nearly every pixel has zero gradient and the top percentile sits on the
    shapes' edges, so a soft or haloed edge lowers it. Compare with the same figure on real renders."""
    y = np.asarray(images, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])  # (N, H, W)
    gx = (y[:, 1:-1, 2:] - y[:, 1:-1, :-2]) / 2
    gy = (y[:, 2:, 1:-1] - y[:, :-2, 1:-1]) / 2
    return np.percentile(np.hypot(gx, gy).reshape(len(y), -1), 99, axis=1)


def wilson(k, n, z=1.96):
    """Wilson score interval for k successes in n trials (stays inside [0, 1] and is honest at 0 and n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (float(max(0.0, mid - half)), float(min(1.0, mid + half)))


def paired_difference(whole_a, whole_b, n_boot=4000, seed=0):
    """Whole-prompt accuracy of method A minus method B on the same prompts and noise seeds -> (difference, 95%
    interval) by a paired bootstrap over prompts. Paired, because both methods see the same hard prompts: the
    interval of the difference is much narrower than the two separate intervals suggest."""
    d = np.asarray(whole_a, np.float64) - np.asarray(whole_b, np.float64)  # (N,) in {-1, 0, 1}
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    lo, hi = np.percentile(d[idx].mean(1), [2.5, 97.5])
    return float(d.mean()), (float(lo), float(hi))


# ---------------------------------------------------------------- v2: perturbations and chance levels


def blur(images, sigma):
    """Gaussian blur of (N, 64, 64, 3) uint8 images, sigma in pixels (a soft sample from a few-step sampler)."""
    out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")
    return out.round().clip(0, 255).astype(np.uint8)


def add_noise(images, std, seed):
    """Additive Gaussian pixel noise (std in 0-255 units), seeded."""
    noise = np.random.default_rng(seed).normal(0, std, images.shape)
    return (images + noise).round().clip(0, 255).astype(np.uint8)


def centred_blob(scene):
    """A mode-collapsed generator's image: a soft disk at the centre in the caption's first colour on the caption's
    background. It knows colour and background, so it bounds what those words alone can earn."""
    yy, xx = np.mgrid[:data.SIZE, :data.SIZE]
    a = np.clip(11.5 - np.hypot(xx - 31.5, yy - 31.5), 0, 1)[..., None]
    img = (1 - a) * np.array(data.BACKGROUNDS[scene.background]) + a * np.array(data.COLOURS[scene.shapes[0].colour])
    return blur(img[None].round().astype(np.uint8), 1.0)[0]


def smooth_noise(shape, rng):
    """Low-frequency noise: blob-like regions of many colours, the hardest noise for a count check."""
    x = blur(rng.integers(0, 256, shape, dtype=np.uint8), 3.0).astype(np.float32)
    return ((x - 128) * 4 + 128).clip(0, 255).astype(np.uint8)


def swap_positions(scene):
    """The same two-shape scene with the phrases' positions exchanged in labels and caption (same stated words)."""
    words, says_background = stated(scene)
    a, b = scene.shapes
    labels = (data.ShapeLabel(a.shape, a.colour, b.position, a.size),
              data.ShapeLabel(b.shape, b.colour, a.position, b.size))
    caption = " and ".join(data.shape_phrase(lab, "size" in w) for lab, w in zip(labels, words))
    caption += f" on a {scene.background} background" if says_background else ""
    return data.Scene(labels, scene.background, caption, scene.jitter)


def baselines(images, scenes, seed=0):
    """Images that should fail, each paired with the scenes to score them against: {name: (images, scenes)}."""
    two = [i for i, s in enumerate(scenes) if len(s.shapes) == 2]
    rng = np.random.default_rng(seed)
    blank = np.stack([np.broadcast_to(np.uint8(data.BACKGROUNDS[s.background]), images.shape[1:]) for s in scenes])
    return {
        "shuffled captions (real image, another image's caption)": (images, scenes[1:] + scenes[:1]),
        "blank (the caption's own background only)": (blank, scenes),
        "pure noise (uniform pixels)": (rng.integers(0, 256, images.shape, dtype=np.uint8), scenes),
        "smooth noise (blurred, contrast x4)": (smooth_noise(images.shape, rng), scenes),
        "centred blob (caption's first colour and background)": (np.stack([centred_blob(s) for s in scenes]), scenes),
        "swapped positions (two-shape scenes, caption's positions exchanged)":
            (images[two], [swap_positions(scenes[i]) for i in two]),
    }


def real_variants(images, seed=0):
    """Real renders and mild degradations the evaluator must still read: {name: images}."""
    return {"real renders": images, "blur sigma 1": blur(images, 1.0), "blur sigma 1.5": blur(images, 1.5),
            "blur sigma 2": blur(images, 2.0), "noise std 8": add_noise(images, 8, seed),
            "blur 1.5 + noise std 8": add_noise(blur(images, 1.5), 8, seed)}


# ---------------------------------------------------------------- training the shape CNN


def training_crops(seed, n):
    """Crops and shape indices from n procedural scenes, each rendered then blurred (sigma 0-2.5 px) and noised
    (std 0-12) as generated samples are, read through the same v2 segmentation the evaluator uses."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        scene = data.sample_scene(rng)
        image = data.render(scene)[None]
        image = add_noise(blur(image, rng.uniform(0, 2.5)), rng.uniform(0, 12), rng.integers(2**31))[0]
        _, dist, objs = objects_v2(image)
        by_position = assign(scene.shapes, [("position",)] * len(scene.shapes), objs)
        for label, o in zip(scene.shapes, by_position):  # renders are labelled exactly: position pairs them
            if o is not None:
                xs.append(crop(dist, o, [p for p in objs if p is not o]))
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
    print("v1", evaluate(images, scenes, net)[0])
    for name, variant in real_variants(images).items():
        print("v2", name, evaluate_v2(variant, scenes, net)["accuracy"])
