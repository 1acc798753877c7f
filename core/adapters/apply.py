"""Fuse canonical deltas into torch modules in place, atomically, and unfuse them again. Pure torch.

    handle = fuse(modules, deltas, strength=0.8)   # modules: {"unet": unet, "text_encoder": te, ...}
    handle.unfuse()

Keys are ``<component>.<module path>`` (see delta.py); text encoders resolve through ``getattr(te, "text_model",
te)`` (transformers 5 flattened CLIPTextModel), then the component itself (``text_projection``).

Validate, then commit (../shared/STYLE.md habit 9): every key is resolved, every shape checked and every factor
checked finite before the first weight changes, so a failed call leaves every module byte-identical. validate() is
that check, and the only one: run-time LoRAs (attach.py) and the ComfyUI loader (check_weights) call it too. The fuse
itself is one ``addmm_`` per LoRA layer on the weight viewed as (out, in*kh*kw): no delta matrix is materialized for
float32/float64 weights, and nothing of the model is copied. Unfusing recomputes the same products and subtracts
them (exact up to float rounding, as PEFT's unmerge); ``exact_unfuse=True`` keeps the original weights of the
touched layers instead and restores them bit for bit.

Other deltas (LoHa, LoKr, Sparse, ...; delta.py) are added as a dense difference, which validation computes once to
check it. DoRA and replacing factored layers depend on the weight they patch (``needs_weight``): their new weight is
computed from the weight as it is at that point (after earlier patches of the same call, as ComfyUI applies patches
in order) and assigned. Their layers always keep the weight they replaced: unfuse puts it back bit for bit when the
layer still holds what the fuse wrote, and otherwise (another adapter changed the layer since) subtracts the same
difference, so adapters fused later survive.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from .delta import Diff, LoRA

__all__ = ["fuse", "fuse_many", "validate", "check_weights", "Plan", "FusedAdapters", "ModuleIndex", "resolve_module"]

_MAX_LISTED = 10


def resolve_module(modules: Mapping[str, torch.nn.Module], key: str) -> torch.nn.Module | None:
    """The module named by a canonical key, or None."""
    return ModuleIndex(modules).get(key)


class ModuleIndex:
    """Canonical key -> module, one named_modules() walk per component (cheaper than get_submodule per key).

    Text encoders answer both ``encoder.layers.0...`` and ``text_model.encoder.layers.0...`` paths."""

    def __init__(self, modules: Mapping[str, torch.nn.Module]):
        self.modules, self.tables = modules, {}

    def table(self, component: str) -> dict[str, torch.nn.Module]:
        table = self.tables.get(component)
        if table is None:
            root = self.modules.get(component)
            table = {} if root is None else dict(root.named_modules())
            if root is not None and isinstance(getattr(root, "text_model", None), torch.nn.Module):
                table.update({n[len("text_model."):]: m for n, m in list(table.items())
                              if n.startswith("text_model.")})
            self.tables[component] = table
        return table

    def get(self, key: str) -> torch.nn.Module | None:
        component, _, path = key.partition(".")
        return self.table(component).get(path)


class small_op_threads:
    """Run small kernels on one thread: with busy cores, waking an OpenMP team costs ~1 ms per tiny op."""

    SMALL = 1 << 18  # elements

    def __init__(self, numel: int):
        self.single = numel < self.SMALL and torch.get_num_threads() > 1

    def __enter__(self):
        if self.single:
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.single:
            torch.set_num_threads(self.n)


@dataclass
class _Patch:
    key: str
    weight: torch.Tensor                  # the module's weight Parameter (patched in place)
    delta: object
    strength: float
    scale: float                          # strength x (LoRA alpha / rank), or strength for other deltas
    bias: torch.Tensor | None = None      # the module's bias when the delta has a bias part
    original: tuple | None = None         # (weight, bias) copies when exact_unfuse, and for needs_weight deltas
    exact: bool = False                   # exact_unfuse: restore `original` unconditionally
    layer: torch.nn.Module | None = None  # hooked mode: the Linear / Conv2d that carries the hook

    @property
    def needs_weight(self) -> bool:
        return bool(getattr(self.delta, "needs_weight", False))


@dataclass
class FusedAdapters:
    """Handle returned by fuse(): which keys were applied, and how to take them out again."""

    applied: list[str]
    unmatched: list[str]
    _patches: list[_Patch] = field(default_factory=list, repr=False)
    fused: bool = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if not self.fused:
            raise InvalidParameterError("unfuse(): these adapters are already unfused")
        for p in reversed(self._patches):
            with small_op_threads(p.weight.numel()):
                if p.exact:
                    p.weight.copy_(p.original[0])
                    if p.bias is not None:
                        p.bias.copy_(p.original[1])
                elif p.needs_weight:
                    _unset(p)
                else:
                    _add(p, -1.0)
        self.fused = False


def fuse(modules: Mapping[str, torch.nn.Module] | ModuleIndex, deltas: Mapping[str, object], strength: float = 1.0, *,
         source: str = "adapter", unresolved: Sequence[str] = (), exact_unfuse: bool = False) -> FusedAdapters:
    """Fuse one adapter. `source` names it in messages (file and layout); `unresolved` are keys its reader could
    not name at all (counted as unmatched)."""
    return fuse_many(modules, [(deltas, strength)], source=source, unresolved=unresolved, exact_unfuse=exact_unfuse)


@torch.no_grad()
def fuse_many(modules: Mapping[str, torch.nn.Module] | ModuleIndex,
              adapters: Sequence[tuple[Mapping[str, object], float]], *,
              source: str = "adapter", unresolved: Sequence[str] = (), exact_unfuse: bool = False) -> FusedAdapters:
    """Fuse several (deltas, strength) pairs at once: all are validated before any weight changes."""
    plan = validate(modules, adapters, source=source, unresolved=unresolved)
    # 3. commit, in order (a weight-dependent delta sees the patches before it)
    done = []
    try:
        for p in plan.patches:
            with small_op_threads(p.weight.numel()):
                if exact_unfuse or p.needs_weight:
                    p.original = (p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone())
                    p.exact = exact_unfuse
                if p.needs_weight:
                    _set(p)
                else:
                    _add(p, 1.0)
            done.append(p)
    except BaseException:  # interrupted or out of memory mid-commit: take back what was fused, never half-patch
        FusedAdapters([], [], done).unfuse()
        raise
    return FusedAdapters([p.key for p in plan.patches], plan.unmatched, plan.patches)


@dataclass
class Plan:
    """A validated load (steps 1 and 2): nothing of the model has changed yet."""

    patches: list[_Patch]
    unmatched: list[str]


@torch.no_grad()
def validate(modules: Mapping[str, torch.nn.Module] | ModuleIndex,
             adapters: Sequence[tuple[Mapping[str, object], float]], *,
             source: str = "adapter", unresolved: Sequence[str] = (), hooked: bool = False) -> Plan:
    """The one check of every load, fused (fuse_many) or hooked (attach.attach_many): every strength, key, shape,
    alpha and factor of every component, and the same partial-match warning. Raises before anything is applied,
    so a failed load leaves the model's outputs as they were. `hooked`: also check each layer can carry a hook."""
    # 1. resolve every key and check every shape and strength
    patches, unmatched = [], list(unresolved)
    index = modules if isinstance(modules, ModuleIndex) else ModuleIndex(modules)
    total = len(unresolved)
    for deltas, strength in adapters:
        _check_strength(source, strength)
        total += len(deltas)
        for key, delta in deltas.items():
            module = index.get(key)
            weight = getattr(module, "weight", None) if module is not None else None
            if not isinstance(weight, torch.Tensor):
                unmatched.append(key)
                continue
            p = _check(source, key, delta, weight, getattr(module, "bias", None), float(strength))
            if hooked:
                p.layer = _hook_layer(source, key, delta, module)
            patches.append(p)
    if not patches:
        raise AdapterMismatchError(
            f"{source}: none of its {total} keys matches a module of the model (components given: "
            f"{sorted(index.modules)}); unmatched: {unmatched[:_MAX_LISTED]}. Is it made for another base model, or "
            "named for a component that was not passed?")
    # 2. every factor finite, and the result provably below the dtype's max (exact check only where the bound fails)
    _check_finite(source, patches)
    if unmatched:  # a partial match is legitimate (e.g. a text-encoder part with no text encoder given): say so
        warnings.warn(f"{source}: {len(unmatched)} of {total} keys match no module and are skipped, e.g. "
                      f"{unmatched[:_MAX_LISTED]}; {len(patches)} applied", stacklevel=4)
    return Plan(patches, unmatched)


def check_weights(source: str, items: Sequence[tuple]) -> None:
    """validate() for a host that patches weights itself (ComfyUI's ModelPatcher): items are (key, delta, weight,
    bias or None, strength) with the host's own tensors. Raises as validate() does; changes nothing."""
    patches = []
    for key, delta, weight, bias, strength in items:
        _check_strength(source, strength)
        patches.append(_check(source, key, delta, weight, bias, float(strength)))
    _check_finite(source, patches)


def _check_strength(source: str, strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise InvalidParameterError(f"{source}: strength={strength!r}; expected a finite number")


def _hook_layer(source: str, key: str, delta, module: torch.nn.Module) -> torch.nn.Module:
    """The layer a run-time LoRA hooks: a PEFT-wrapped layer's base layer (the weight fuse() would patch), which
    must be a Linear or an ungrouped, zero-padded Conv2d (the hook recomputes the conv with the LoRA's factors)."""
    if not isinstance(delta, LoRA) or delta.mid is not None or getattr(delta, "bias", None) is not None:
        kind = type(delta).__name__ + (" with a Tucker core" if getattr(delta, "mid", None) is not None else "") + (
            " with a bias difference" if getattr(delta, "bias", None) is not None else "")
        raise InvalidParameterError(f"{source}: key {key!r} is a {kind}; only plain LoRAs (down, up, alpha) can be "
                                    "attached unfused; load it fused (fuse=True / fuse())")
    layer = module.get_base_layer() if callable(getattr(module, "get_base_layer", None)) else module
    if isinstance(layer, torch.nn.Linear) or (isinstance(layer, torch.nn.Conv2d) and layer.groups == 1
                                              and layer.padding_mode == "zeros"):
        return layer
    raise AdapterMismatchError(f"{source}: key {key!r} names a {type(layer).__name__}; a LoRA can be attached unfused "
                               "to a Linear or an ungrouped zero-padded Conv2d only; load it fused (fuse=True)")


def _factors(delta, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor of a delta, nested deltas (DoRA, Rows) included, as (name, tensor)."""
    out = []
    for f in dataclasses.fields(delta):
        value = getattr(delta, f.name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out.append((prefix + f.name, value))
        elif dataclasses.is_dataclass(value):
            out.extend(_factors(value, f"{prefix}{f.name}."))
    return out


def _check(source: str, key: str, delta, weight: torch.Tensor, bias: torch.Tensor | None, strength: float) -> _Patch:
    """Step 1 for one key: kind, alpha, factor shapes and the bias part against the target weight and bias."""
    where = f"{source}: key {key!r}"
    _check_alpha(where, getattr(delta, "alpha", None))
    if isinstance(delta, LoRA):
        if delta.up.ndim not in (2, 4) or delta.down.ndim not in (2, 4) or delta.rank == 0:
            raise AdapterMismatchError(f"{where}: LoRA up {tuple(delta.up.shape)} / down {tuple(delta.down.shape)}; "
                                       "valid: 2-D (linear) or 4-D (conv) factors of rank >= 1")
        up, down, mid = delta.up.flatten(1), delta.down.flatten(1), delta.mid
        fan_in = weight[0].numel()
        if mid is None:
            fits = up.shape[1] == down.shape[0] and down.shape[1] == fan_in
        else:  # Tucker core (r, r, kh, kw) between up (out, r) and down (r, in)
            fits = (mid.ndim == 4 and up.shape[1] == mid.shape[0] and mid.shape[1] == down.shape[0]
                    and down.shape[1] * mid.shape[2] * mid.shape[3] == fan_in)
        if not all(t.is_floating_point() for t in (delta.up, delta.down) + ((mid,) if mid is not None else ())):
            raise WeightsFormatError(f"{where}: LoRA factors of dtype {delta.up.dtype} / {delta.down.dtype}; valid: "
                                     "floating-point up and down (a quantized LoRA must be dequantized first)")
        if up.shape[0] != weight.shape[0] or not fits:
            shapes = f"up {tuple(delta.up.shape)} / down {tuple(delta.down.shape)}" + (
                "" if mid is None else f" / mid {tuple(mid.shape)}")
            raise AdapterMismatchError(
                f"{where}: LoRA {shapes} does not fit the module's weight {tuple(weight.shape)}; valid: "
                f"up (out={weight.shape[0]}, r), down (r, in*kh*kw={fan_in})")
        scale = strength * delta.scale
    elif not hasattr(delta, "delta_weight"):
        raise AdapterMismatchError(f"{where}: a {type(delta).__name__} is not an adapter delta (see "
                                   "core/adapters/delta.py for the canonical forms)")
    else:  # other deltas are shape-checked when validation computes them (_check_finite)
        dw = delta.weight if isinstance(delta, Diff) else None
        if dw is not None and dw.numel() != weight.numel():
            raise AdapterMismatchError(f"{where}: difference {tuple(dw.shape)} does not fit the module's weight "
                                       f"{tuple(weight.shape)}")
        scale = strength
    db = getattr(delta, "bias", None)
    if not isinstance(db, torch.Tensor):
        bias = None
    else:
        if not isinstance(bias, torch.Tensor) or bias.numel() != db.numel():
            have = "no bias" if not isinstance(bias, torch.Tensor) else f"bias {tuple(bias.shape)}"
            raise AdapterMismatchError(f"{where}: bias difference {tuple(db.shape)} does not fit the module ({have})")
    return _Patch(key, weight, delta, strength, scale, bias)


def _check_alpha(where: str, alpha) -> None:
    """A NaN / inf alpha scales every output to NaN; a string or tensor of several values is no alpha at all."""
    if alpha is None:
        return
    try:
        value = float(alpha)
    except (TypeError, ValueError, RuntimeError):
        raise WeightsFormatError(f"{where}: alpha={alpha!r} is not a number; valid: a finite number or None "
                                 "(alpha = rank)") from None
    if not math.isfinite(value):
        raise WeightsFormatError(f"{where}: alpha={alpha!r} is not finite; valid: a finite number or None "
                                 "(alpha = rank)")


def _check_finite(source: str, patches: list[_Patch]) -> None:
    """One batched max|t| over every factor (NaN and inf propagate), then per patch a bound on |W + s dW|:
    |dW_ij| <= r max|up| max|down| for a LoRA; the dense result is checked where the bound is too loose or missing
    (LoHa, LoKr, ...: which also checks their factor shapes), and layers with a weight-dependent delta (DoRA) are
    simulated in order, as the commit will patch them."""
    tensors, owners = [], []
    for i, p in enumerate(patches):
        for name, t in _factors(p.delta):
            if t.numel():  # an empty factor has no max (torch raises); it adds nothing
                tensors.append(t)
                owners.append((i, name))
        if p.weight.dtype == torch.float16:
            tensors.append(p.weight.detach())
            owners.append((i, "model weight"))
    with small_op_threads(sum(t.numel() for t in tensors)):
        maxes = torch.stack([m.float().cpu() for m in torch._foreach_norm(tensors, math.inf)]).tolist() \
            if tensors else []
    per_patch: list[dict] = [dict.fromkeys((n for n, _ in _factors(p.delta)), 0.0) for p in patches]
    for j, ((i, name), m) in enumerate(zip(owners, maxes)):
        if not math.isfinite(m) and name != "model weight":
            t = tensors[j]
            raise WeightsFormatError(f"{source}: key {patches[i].key!r}: its {name} tensor {tuple(t.shape)} contains "
                                     "NaN or inf; the adapter file is corrupt (every value must be finite)")
        per_patch[i][name] = m
    dependent = {id(p.weight) for p in patches if p.needs_weight}
    for p, m in zip(patches, per_patch):
        if id(p.weight) in dependent:
            continue
        if isinstance(p.delta, LoRA) and p.delta.mid is None:
            bound = abs(p.scale) * p.delta.rank * m["up"] * m["down"]
        elif isinstance(p.delta, Diff):
            bound = abs(p.scale) * m.get("weight", 0.0)
        else:
            bound = math.inf
        if m.get("model weight", 0.0) + bound < torch.finfo(p.weight.dtype).max / 2:
            continue
        _check_result(source, p, p.weight.float() + p.strength * _dense(source, p))  # dW includes alpha / rank
    for group in _by_weight(p for p in patches if id(p.weight) in dependent):
        current = group[0].weight.float()
        for p in group:
            dw = _dense(source, p, current)
            if dw is not None:
                current = current + p.strength * dw
                _check_result(source, p, current)


def _by_weight(patches) -> list[list[_Patch]]:
    groups: dict[int, list[_Patch]] = {}
    for p in patches:
        groups.setdefault(id(p.weight), []).append(p)
    return list(groups.values())


def _check_result(source: str, p: _Patch, new: torch.Tensor) -> None:
    limit = torch.finfo(p.weight.dtype).max
    if not torch.isfinite(new).all() or new.abs().max() > limit:
        raise WeightsFormatError(f"{source}: key {p.key!r}: the patched weight would overflow {p.weight.dtype} "
                                 f"(|value| > {limit:.3g}) or is not finite; lower the strength or check the file")


def _dense(source: str | None, p: _Patch, weight: torch.Tensor | None = None) -> torch.Tensor | None:
    """dW of a patch in float32 (its own scale included, strength not). `weight`: the float32 weight a
    weight-dependent delta patches. In validation (`source` given) a delta whose factors do not fit raises
    AdapterMismatchError naming the key."""
    kwargs = {"weight": weight} if p.needs_weight else {}
    try:
        return p.delta.delta_weight(p.weight.shape, dtype=torch.float32, device=p.weight.device, **kwargs)
    except (AdapterMismatchError, RuntimeError, IndexError) as exc:
        if source is None:
            raise
        raise AdapterMismatchError(f"{source}: key {p.key!r}: {type(p.delta).__name__} does not fit the module's "
                                   f"weight {tuple(p.weight.shape)}: {exc}") from exc


def _add(p: _Patch, sign: float) -> None:
    """W += sign * scale * dW in place (bias likewise)."""
    w, d, s = p.weight.data, p.delta, sign * p.scale
    if isinstance(d, LoRA) and d.mid is None and w.dtype in (torch.float32, torch.float64) and w.is_contiguous():
        up = d.up.to(device=w.device, dtype=w.dtype).flatten(1)        # (out, r)
        down = d.down.to(device=w.device, dtype=w.dtype).flatten(1)    # (r, in*kh*kw)
        w.view(w.shape[0], -1).addmm_(up, down, alpha=s)
    else:  # delta_weight() includes a LoRA's alpha / rank: scale by the strength only
        dw = _dense(None, p)
        if dw is not None and w.dtype in (torch.float32, torch.float64):
            w.add_(dw.to(w.dtype), alpha=sign * p.strength)
        elif dw is not None:  # low precision: add in float32, round once
            w.copy_(w.float().add_(dw, alpha=sign * p.strength))
    _add_bias(p, sign)


def _add_bias(p: _Patch, sign: float) -> None:
    if p.bias is not None:  # a bias difference is scaled by the strength only
        db = p.delta.delta_bias(dtype=torch.float32, device=p.bias.device).reshape(p.bias.shape)
        p.bias.data.copy_(p.bias.data.float().add_(db, alpha=sign * p.strength))


def _written(p: _Patch) -> torch.Tensor:
    """What _set writes for a weight-dependent delta, recomputed from the weight it replaced (deterministic)."""
    before = p.original[0].float()
    return (before + p.strength * _dense(None, p, before)).to(p.weight.dtype)


def _set(p: _Patch) -> None:
    """W = W + s (W_new(W) - W) for a weight-dependent delta (DoRA, replacing Factored), rounded once."""
    p.weight.data.copy_(_written(p))
    _add_bias(p, 1.0)


def _unset(p: _Patch) -> None:
    """Back to the weight before _set: bit for bit if the layer still holds what _set wrote, else subtract the same
    difference (another adapter changed the layer since; its change stays)."""
    written = _written(p)
    if torch.equal(p.weight.data, written):
        p.weight.data.copy_(p.original[0])
    else:
        p.weight.data.copy_(p.weight.data.float() - (written.float() - p.original[0].float()))
    _add_bias(p, -1.0)
