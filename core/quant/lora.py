"""LoRA files on a quantized model: canonical deltas ({module path: core.adapters.LoRA}) -> LowRank branches.

Each LoRA becomes a low-rank branch on its QuantLinear / QuantConv2d (nothing is dequantized), or, with
merge=True, is folded into the weight and re-quantized (cached per LoRA set and strength; see modules.py).
Validate-then-commit: every key must name a quantized layer and every delta must fit before any layer changes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import AdapterMismatchError
from ..adapters.delta import LoRA
from .modules import LowRank, QuantModule

__all__ = ["attach_loras", "detach_loras"]


def attach_loras(model: torch.nn.Module, deltas: Mapping[str, object], strength: float = 1.0, *, name: str = "",
                 prefix: str = "", merge: bool = False) -> list[str]:
    """Add every LoRA of ``deltas`` (keys: module paths, ``prefix`` stripped, e.g. "unet.") to ``model``'s quantized
    layers at ``strength``; stacks on LoRAs already attached. Returns the layer names patched."""
    modules = dict(model.named_modules())
    plan = []
    for key, d in deltas.items():
        path = key[len(prefix):] if prefix and key.startswith(prefix) else key
        layer = modules.get(path)
        if not isinstance(layer, QuantModule):
            raise AdapterMismatchError(f"LoRA {name!r}: key {key!r} is not a quantized layer of the model "
                                       f"(found {type(layer).__name__ if layer is not None else 'nothing'})")
        if type(d) is not LoRA or d.mid is not None:
            raise AdapterMismatchError(f"LoRA {name!r}: {key!r} is a {type(d).__name__}"
                                       f"{' with a Tucker core' if type(d) is LoRA else ''}; quantized layers take "
                                       "plain LoRA factors (merge such adapters into the float model first)")
        low = LowRank(d.down, d.up, float(strength) * d.scale, name)
        layer._check_delta(low)
        plan.append((layer, low, path))
    for layer, low, _ in plan:  # everything fits: commit
        layer.set_lora(layer.lora + (low,), merge=merge)
    return [p for _, _, p in plan]


def detach_loras(model: torch.nn.Module, *, drop_cache: bool = False) -> int:
    """Remove every LoRA from the model's quantized layers; returns how many layers had one."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantModule) and m.lora:
            m.clear_lora(drop_cache=drop_cache)
            n += 1
    return n
