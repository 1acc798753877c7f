"""LoRAs applied at run time instead of fused: a forward hook adds s * up(down(x)) to a Linear or Conv layer.

Attaching and detaching cost no pass over the weights (the fused path costs one `addmm_` over every patched
weight each way), at the price of two small matmuls per patched layer in every forward. Same validation as fuse():
every key resolves and every factor is checked before the first hook is registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import AdapterMismatchError, InvalidParameterError
from .apply import ModuleIndex
from .delta import LoRA


def _lora_hook(delta: LoRA, scale: float):
    down, up = delta.down, delta.up

    def hook(module, args, out):
        x = args[0]
        if isinstance(module, torch.nn.Linear):
            return out + scale * F.linear(F.linear(x, down.to(x.dtype)), up.flatten(1).to(x.dtype))
        h = F.conv2d(x, down.to(x.dtype), None, module.stride, module.padding, module.dilation)
        return out + scale * F.conv2d(h, up.reshape(up.shape[0], -1, 1, 1).to(x.dtype))

    return hook


@dataclass
class AttachedAdapters:
    applied: list[str]
    _handles: list = field(default_factory=list, repr=False)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach(modules: Mapping[str, torch.nn.Module], deltas: Mapping[str, object], strength: float = 1.0, *,
           source: str = "adapter") -> AttachedAdapters:
    """Hook plain LoRA deltas (no Tucker core) onto their Linear / Conv2d layers; other kinds must be fused."""
    index = modules if isinstance(modules, ModuleIndex) else ModuleIndex(modules)   # one module walk
    plan = []
    for key, delta in deltas.items():
        if not isinstance(delta, LoRA) or delta.mid is not None:
            raise InvalidParameterError(f"{source}: {key} is a {type(delta).__name__}; only plain LoRAs can be "
                                        "attached unfused; use fuse() for it")
        module = index.get(key)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise AdapterMismatchError(f"{source}: {key} names no Linear or Conv2d layer of the model")
        w = module.weight
        if delta.up.shape[0] != w.shape[0] or delta.down.shape[1] != w.shape[1] or (
                w.ndim == 4 and tuple(delta.down.shape[2:]) != tuple(w.shape[2:])):
            raise AdapterMismatchError(f"{source}: {key}: up {tuple(delta.up.shape)} / down {tuple(delta.down.shape)}"
                                       f" do not fit weight {tuple(w.shape)}")
        if not (torch.isfinite(delta.up).all() and torch.isfinite(delta.down).all()):
            raise AdapterMismatchError(f"{source}: {key} contains NaN or inf")
        plan.append((key, module, delta))
    handles = [module.register_forward_hook(_lora_hook(delta, strength * delta.scale))
               for _, module, delta in plan]
    return AttachedAdapters([k for k, _, _ in plan], handles)
