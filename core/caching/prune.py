"""LAPTOP-Diff's one-shot layer pruning criterion (Zhang et al. 2024), training-free part.

1. Candidates: residual layers whose output has their input's shape, so removing one = passing its input through.
2. Score: remove one layer, run the model on calibration inputs taken from its own trajectory across timesteps,
   score = sum ||f_-l - f||^2 / sum ||f||^2 (relative output change).
3. Additivity: the paper's claim that the effect of removing a set is the sum of single effects; measured on
   random sets as the Pearson correlation of predicted (sum of scores) and measured (joint removal) change.
4. Choose: least score per unit of cost until the requested share of candidate cost is removed (greedy knapsack).
5. Save the chosen paths with the architecture's signature; `load_config` refuses a config made for another model.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from .layouts import detect_layout
from .patch import ModelPatch, resolve

# Layers with a skip connection around their body (removal = identity), by class name in each framework.
RESIDUAL_LAYERS = {"ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "JointTransformerBlock",
                   "FluxTransformerBlock", "FluxSingleTransformerBlock", "ResBlock", "SpatialTransformer"}
FORMAT = "nimblediff-layer-prune"


def _first(args, kwargs):
    for k in ("hidden_states", "input_tensor", "x"):
        if k in kwargs:
            return kwargs[k]
    return args[0]


def _joint(kwargs) -> bool:
    """diffusers' SD3 / Flux blocks: called with hidden_states, encoder_hidden_states and temb, return (enc, hid)."""
    return "encoder_hidden_states" in kwargs and "temb" in kwargs


def identity(original, *args, **kwargs):
    """A removed layer: its input, in the container its caller expects (diffusers' return_dict=False -> a 1-tuple;
    joint DiT blocks -> (encoder, hidden))."""
    hid = _first(args, kwargs)
    if _joint(kwargs):
        return kwargs["encoder_hidden_states"], hid
    if kwargs.get("return_dict", True) is False:
        return (hid,)
    return hid


def candidates(model: torch.nn.Module, probe: Callable[[], object]) -> list[str]:
    """Residual layers (RESIDUAL_LAYERS) whose output hidden state has the input's shape on the probe call,
    outermost first; layers nested inside a candidate are left out (removing the outer one covers them)."""
    shapes: dict[str, bool] = {}
    hooks = []
    for name, m in model.named_modules():
        if name and type(m).__name__ in RESIDUAL_LAYERS:
            def hook(_m, args, kwargs, out, name=name):
                hid = _first(args, kwargs)
                o = (out[1] if _joint(kwargs) else out[0]) if isinstance(out, tuple) else getattr(out, "sample", out)
                shapes[name] = hasattr(o, "shape") and o.shape == hid.shape
            hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in hooks:
            h.remove()
    chosen = [n for n, ok in shapes.items() if ok]
    return [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]


def _outputs(batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [b().float() for b in batches]


def removal_effect(model, batches: Sequence[Callable[[], torch.Tensor]], paths: Sequence[str],
                   reference: list[torch.Tensor] | None = None) -> float:
    """sum ||f_{-paths} - f||^2 / sum ||f||^2 over the calibration calls `batches` (each returns the output)."""
    ref = reference if reference is not None else _outputs(batches)
    with ModelPatch(model, {p: identity for p in paths}):
        out = _outputs(batches)
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref))
    return num / max(sum(float((r ** 2).sum()) for r in ref), 1e-30)


def score_layers(model, batches, paths, progress=None) -> dict[str, float]:
    """Step 2: one removal score per layer."""
    resolve(model, paths)
    ref = _outputs(batches)
    scores = {}
    for i, p in enumerate(paths):
        scores[p] = removal_effect(model, batches, [p], ref)
        if progress:
            progress(i + 1, len(paths))
    return scores


def additivity(model, batches, scores: dict[str, float], n_sets: int = 12, size: int = 3, seed: int = 0):
    """Step 3: (predicted, measured, Pearson r) over `n_sets` random sets of `size` scored layers."""
    rng = random.Random(seed)
    names = sorted(scores)
    if len(names) < size:
        raise InvalidParameterError(f"size={size}: only {len(names)} scored layers")
    ref = _outputs(batches)
    pred, meas = [], []
    for _ in range(n_sets):
        s = rng.sample(names, size)
        pred.append(sum(scores[p] for p in s))
        meas.append(removal_effect(model, batches, s, ref))
    p, m = torch.tensor(pred, dtype=torch.float64), torch.tensor(meas, dtype=torch.float64)
    r = float(torch.corrcoef(torch.stack([p, m]))[0, 1]) if len(pred) > 1 else float("nan")
    return pred, meas, r


def choose(scores: dict[str, float], costs: dict[str, float], share: float) -> list[str]:
    """Step 4: remove layers in order of score per cost until `share` (0..1) of the total candidate cost is gone."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise InvalidParameterError(f"share={share!r}: need a fraction in [0, 1] of the candidates' cost to remove")
    total = sum(costs[p] for p in scores)
    out, removed = [], 0.0
    for p in sorted(scores, key=lambda p: scores[p] / max(costs[p], 1e-12)):
        if removed >= share * total - 1e-9:
            break
        out.append(p)
        removed += costs[p]
    return out


def param_costs(model, paths) -> dict[str, float]:
    mods = resolve(model, paths)
    return {p: float(sum(q.numel() for q in m.parameters())) for p, m in mods.items()}


def signature(model) -> str:
    """Architecture fingerprint: class and every parameter's name and shape (not values: a fine-tune still fits)."""
    items = [type(model).__name__] + [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def save_config(path, model, skip: Sequence[str], scores: dict[str, float] | None = None, **meta) -> None:
    resolve(model, skip)
    data = {"format": FORMAT, "version": 1, "model_type": type(model).__name__, "signature": signature(model),
            "skip": list(skip), "scores": scores or {}, **meta}
    Path(path).write_text(json.dumps(data, indent=1))


def load_config(path, model) -> list[str]:
    """The paths to skip, after checking the config was made for this architecture."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WeightsFormatError(f"{path}: cannot read a layer-pruning config ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("skip"), list):
        raise WeightsFormatError(f"{path}: not a {FORMAT} config (need 'format': {FORMAT!r} and a 'skip' list)")
    name = type(model).__name__
    if data.get("model_type") != name or data.get("signature") != signature(model):
        raise AdapterMismatchError(f"{path}: made for {data.get('model_type')} with signature "
                                   f"{data.get('signature')}, the model is {name} with signature {signature(model)}")
    resolve(model, data["skip"])
    return list(data["skip"])


def apply_pruning(model, skip: Sequence[str]) -> ModelPatch:
    """Skip the layers at run time (until .remove()); weights stay in place, so removal is exact and undoable."""
    detect_layout(model)
    return ModelPatch(model, {p: identity for p in skip}).install()


def flop_costs(model, probe: Callable[[], object], paths) -> dict[str, float]:
    """FLOPs of each path on the probe call (torch's FlopCounterMode, keyed by module path): the cost that
    matters for speed, where LAPTOP's paper counts parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    resolve(model, paths)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe()
    counts = counter.get_flop_counts()
    prefix = type(model).__name__ + "."
    return {p: float(sum(counts.get(prefix + p, {}).values())) for p in paths}
