"""LoRAs applied at run time instead of fused: a forward hook adds s * up(down(x)) to a Linear or Conv layer.

Attaching and detaching cost no pass over the weights (the fused path costs one `addmm_` over every patched
weight each way), at the price of two small matmuls per patched layer in every forward. The validation is fuse()'s own
(apply.validate): every key, shape, alpha and factor of every component is checked before the first hook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .apply import ModuleIndex, validate
from .delta import LoRA


def _add(out: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """out + lora; in place when no graph is recorded (sampling), which saves a pass over the layer's output.
    A Linear / Conv2d output is a fresh tensor that its own backward does not keep, but under autograd (PTI tunes
    an embedding through the model) the sum stays out of place."""
    return out.add_(lora) if not torch.is_grad_enabled() else out + lora


def _lora_hook(layer: torch.nn.Module, delta: LoRA, scale: float):
    """out + scale * up(down(x)), the factors shaped once for the layer (validate() checked they fit it) and the
    scale folded into up, so a forward adds two small matmuls and one sum per layer."""
    w = layer.weight
    if isinstance(layer, torch.nn.Linear):
        down, up = delta.down.flatten(1).to(w), (scale * delta.up.flatten(1)).to(w)     # (r, in), (out, r)

        def hook(module, args, out):
            x = args[0]
            return _add(out, F.linear(F.linear(x, down.to(x)), up.to(x)))

        return hook
    down = delta.down.reshape(delta.rank, *w.shape[1:]).to(w)                            # (r, in, kh, kw)
    up = (scale * delta.up.reshape(w.shape[0], delta.rank, 1, 1)).to(w)                 # (out, r, 1, 1)

    def hook(module, args, out):
        x = args[0]
        h = F.conv2d(x, down.to(x), None, module.stride, module.padding, module.dilation)
        return _add(out, F.conv2d(h, up.to(x)))

    return hook


@dataclass
class AttachedAdapters:
    applied: list[str]
    unmatched: list[str] = field(default_factory=list)
    _handles: list = field(default_factory=list, repr=False)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach(modules: Mapping[str, torch.nn.Module] | ModuleIndex, deltas: Mapping[str, object],
           strength: float = 1.0, *, source: str = "adapter", unresolved: Sequence[str] = ()) -> AttachedAdapters:
    """Hook plain LoRA deltas (no Tucker core, no bias) onto their Linear / Conv2d layers; other kinds must be
    fused."""
    return attach_many(modules, [(deltas, strength)], source=source, unresolved=unresolved)


@torch.no_grad()
def attach_many(modules: Mapping[str, torch.nn.Module] | ModuleIndex,
                adapters: Sequence[tuple[Mapping[str, object], float]], *,
                source: str = "adapter", unresolved: Sequence[str] = ()) -> AttachedAdapters:
    """Several (deltas, strength) pairs, validated together by apply.validate (as fuse_many) before the first hook."""
    plan = validate(modules, adapters, source=source, unresolved=unresolved, hooked=True)
    handles = []
    try:
        for p in plan.patches:
            handles.append(p.layer.register_forward_hook(_lora_hook(p.layer, p.delta, p.scale)))
    except BaseException:  # e.g. KeyboardInterrupt: no half-hooked model
        for h in handles:
            h.remove()
        raise
    return AttachedAdapters([p.key for p in plan.patches], plan.unmatched, handles)
