"""ComfyUI's own weight names for DiT MODELs (Flux, SD3, PixArt) <-> the diffusers module names LoRAs are read into.

ComfyUI keeps a DiT in its original layout (``diffusion_model.double_blocks.0.img_attn.qkv.weight``: q, k and v fused,
adaLN halves in (shift, scale) order), while ``weights.lora_formats.read_lora`` gives deltas on diffusers modules
(``transformer.transformer_blocks.0.attn.to_q``). This module inverts the tables of ``weights/dit_keymaps.py`` against
a MODEL's state dict: each diffusers module becomes a *slot* of one ComfyUI weight (its output rows, and whether its
two halves are swapped), sized from the weight itself, never from a config guess; and ``fuse_slots`` turns the deltas
of one ComfyUI weight back into a single patch for it. Host-free: plain torch, no comfy import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..core.adapters.delta import Diff, LoRA
from ..errors import AdapterMismatchError
from .arch import ArchGuess
from .dit_keymaps import DIT_MAPS
from .lora_formats import Target, kohya_table

__all__ = ["Slot", "ComfyDiTTarget", "comfy_dit_arch", "comfy_dit_slots", "dit_target", "fuse_slots", "fuse_bias",
           "slot_rows"]

PREFIX = "diffusion_model."
# (architecture, a state-dict key only that family's ComfyUI model has): as comfy/model_detection.py tells them apart
_SIGNATURES = (("flux", re.compile(r"^diffusion_model\.double_blocks\.\d+\.img_attn\.qkv\.weight$")),
               ("sd3", re.compile(r"^diffusion_model\.joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$")),
               ("pixart", re.compile(r"^diffusion_model\.blocks\.\d+\.cross_attn\.kv_linear\.weight$")))


@dataclass(frozen=True)
class Slot:
    """Where a diffusers module lives in a ComfyUI model: rows [start, start + length) of `key`'s weight (the whole
    weight when the module is not fused), with its two halves swapped when `swap` (adaLN (shift, scale))."""

    key: str                 # ComfyUI module key, without ".weight"
    start: int
    length: int
    rows: int                # rows of the whole ComfyUI weight
    swap: bool = False


@dataclass
class ComfyDiTTarget(Target):
    """A reader Target for a ComfyUI DiT MODEL, with the slot of every diffusers module it knows."""

    slots: dict[str, Slot] = field(default_factory=dict)       # canonical key (transformer.<module>) -> slot


def comfy_dit_arch(keys: Iterable[str]) -> str | None:
    """flux / sd3 / pixart for a ComfyUI DiT state dict (keys with the diffusion_model. prefix); None otherwise."""
    keys = list(keys)
    for arch, pattern in _SIGNATURES:
        if any(pattern.match(k) for k in keys):
            return arch
    return None


def _template(original: str) -> re.Pattern:
    return re.compile(re.escape(PREFIX + original).replace(re.escape("{i}"), r"(\d+)") + r"\.weight")


def comfy_dit_slots(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Slot]:
    """{diffusers module: Slot} for a ComfyUI state dict's weight shapes ({key: shape}) of a `arch` model.

    A fused weight is split as its diffusers modules are: each attention projection takes `in_features` rows (the
    hidden size: q, k, v are square), and Flux's linear1 leaves the rest to the MLP input (proj_mlp), whatever the
    MLP ratio."""
    slots: dict[str, Slot] = {}
    entries = [(_template(e.original), e) for e in DIT_MAPS[arch]]
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        for pattern, entry in entries:
            m = pattern.fullmatch(key)
            if m is None:
                continue
            block = m.group(1) if m.groups() else None
            names = [d.replace("{i}", block) if block else d for d in entry.diffusers]
            rows, width = shape[0], shape[1]
            sizes = [width] * (len(names) - 1) + [rows - width * (len(names) - 1)]
            if len(names) > 1 and sizes[-1] <= 0:
                raise AdapterMismatchError(f"ComfyUI weight {key} {tuple(shape)} cannot hold {names} (each projection "
                                           f"{width} rows)")
            swap = entry.swap == "always" or (entry.swap == "if_2x" and rows == 2 * width)
            start = 0
            for name, size in zip(names, sizes):
                slots[name] = Slot(key[:-len(".weight")], start, size, rows, swap)
                start += size
            break
    return slots


def dit_target(arch: str, shapes: Mapping[str, tuple[int, ...]], text: Target) -> ComfyDiTTarget:
    """The reader's Target for a ComfyUI DiT: the diffusers names and (sliced) shapes of its slots, plus the text
    encoders' names of `text` (a Target.from_layout(None, text_layers) of the CLIP)."""
    slots = {f"transformer.{name}": s for name, s in comfy_dit_slots(arch, shapes).items()}
    known = set(slots)
    sizes = {}
    for key, s in slots.items():
        shape = shapes[f"{s.key}.weight"]
        sizes[key] = (s.length, *shape[1:])
    kohya = kohya_table([(k.split(".", 1)[1], None) for k in slots], {}, "transformer")
    kohya.update(text.kohya)
    known |= set(text.kohya.values())
    return ComfyDiTTarget(ArchGuess(arch, "ComfyUI model with " + {"flux": "double/single blocks",
                                                                     "sd3": "joint blocks",
                                                                     "pixart": "PixArt blocks"}[arch]),
                          None, kohya, known, "transformer", sizes, slots)


def _rows_swapped(t: torch.Tensor, swap: bool) -> torch.Tensor:
    """diffusers (scale, shift) rows back to the original (shift, scale) order (the swap is its own inverse)."""
    if not swap:
        return t
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]])


def slot_rows(weight: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A diffusers module's weight out of the ComfyUI weight it lives in (its rows, in diffusers order)."""
    return _rows_swapped(weight[slot.start:slot.start + slot.length], slot.swap)


def _plain(delta) -> bool:
    return type(delta) is LoRA and delta.mid is None


def fuse_slots(pieces: list[tuple[Slot, object]], weight: torch.Tensor):
    """One ComfyUI patch for a ComfyUI weight from the deltas of its slots: ("lora", (up, down, alpha)) when all are
    plain LoRAs (their shared down kept as is, else stacked: block-diagonal up), else ("diff", (dense,)); None when
    nothing is left. The deltas are on diffusers rows; the patch is on the ComfyUI weight's rows."""
    if len(pieces) == 1 and pieces[0][0].length == pieces[0][0].rows and not pieces[0][0].swap \
            and _plain(pieces[0][1]):
        d = pieces[0][1]
        return "lora", (d.up, d.down, d.alpha)
    if all(_plain(d) for _, d in pieces):
        shared = all(d.down.shape == pieces[0][1].down.shape and torch.equal(d.down, pieces[0][1].down)
                     for _, d in pieces)
        downs = [pieces[0][1].down] if shared else [d.down for _, d in pieces]
        rank = sum(x.shape[0] for x in downs)
        up = torch.zeros(weight.shape[0], rank, dtype=torch.float32)
        col = 0
        for slot, d in pieces:
            r = d.down.shape[0]
            block = _rows_swapped(d.up.float().flatten(1) * d.scale, slot.swap)
            up[slot.start:slot.start + slot.length, col:col + r] = block
            if not shared:
                col += r
        return "lora", (up, torch.cat([x.float() for x in downs]), None)
    dense = torch.zeros(weight.shape, dtype=torch.float32)
    for slot, d in pieces:
        part = slot_rows(weight, slot).float()              # the delta sees the weight in diffusers row order
        if isinstance(d, Diff):
            dw = None if d.weight is None else d.weight.float().reshape(part.shape)
        elif getattr(d, "needs_weight", False):
            dw = d.delta_weight(part.shape, weight=part)
        else:
            dw = d.delta_weight(part.shape)
        if dw is not None:
            dense[slot.start:slot.start + slot.length] = _rows_swapped(dw.float().reshape(part.shape), slot.swap)
    return ("diff", (dense,)) if dense.any() else None


def fuse_bias(pieces: list[tuple[Slot, torch.Tensor]], rows: int) -> torch.Tensor:
    """A bias difference on a ComfyUI weight's rows from the bias differences of its slots."""
    out = torch.zeros(rows, dtype=torch.float32)
    for slot, b in pieces:
        out[slot.start:slot.start + slot.length] = _rows_swapped(b.float().reshape(-1), slot.swap)
    return out
