"""DiT state dicts between the original layout (BFL Flux, SD3 MMDiT, PixArt: what ComfyUI and GGUF files use) and
diffusers naming, for plain tensors and GGUF block-quantized weights alike.

Module names come from the table in dit_keymaps; this module moves the tensors: fused original tensors (qkv,
linear1) are split by rows and concatenated back, adaLN (shift, scale) halves are swapped, and GGUF weights whose
blocks lie inside rows are sliced without dequantizing. Used by the GGUF reader/writer (gguf_io) and by the ComfyUI
DiT folder loader (nodes/dit_loaders), which turns a diffusers folder into ComfyUI's own model classes.
"""

from __future__ import annotations

import re

import torch

from ..core.quant.gguf_weight import GGUFWeight
from ..core.quant.tensor import QuantizedWeight
from ..errors import WeightsFormatError
from .dit_keymaps import DIT_MAPS

__all__ = ["convert_dit"]

# DiT parameters outside the linear-module table of dit_keymaps (norm scales, learned tables): original, diffusers
_DIT_EXTRA = {
    "flux": [("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
             ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
             ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
             ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
             ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
             ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight")],
    "sd3": [("pos_embed", "pos_embed.pos_embed"),
            ("joint_blocks.{i}.x_block.attn.ln_q.weight", "transformer_blocks.{i}.attn.norm_q.weight"),
            ("joint_blocks.{i}.x_block.attn.ln_k.weight", "transformer_blocks.{i}.attn.norm_k.weight"),
            ("joint_blocks.{i}.context_block.attn.ln_q.weight", "transformer_blocks.{i}.attn.norm_added_q.weight"),
            ("joint_blocks.{i}.context_block.attn.ln_k.weight", "transformer_blocks.{i}.attn.norm_added_k.weight"),
            ("joint_blocks.{i}.x_block.attn2.ln_q.weight", "transformer_blocks.{i}.attn2.norm_q.weight"),
            ("joint_blocks.{i}.x_block.attn2.ln_k.weight", "transformer_blocks.{i}.attn2.norm_k.weight")],
    "pixart": [("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
               ("final_layer.scale_shift_table", "scale_shift_table")],
}
# original-layout buffers diffusers recomputes (fixed sin-cos tables, the unconditional caption)
_DIT_DROP = {"pixart": ("pos_embed", "y_embedder.y_embedding")}


def _dit_rows(arch: str):
    """(original template, (diffusers templates), ratio, swap) for every parameter leaf of the arch's table."""
    for e in DIT_MAPS[arch]:
        for leaf in ("weight", "bias"):
            yield f"{e.original}.{leaf}", tuple(f"{d}.{leaf}" for d in e.diffusers), e.ratio, e.swap
    for orig, diff in _DIT_EXTRA[arch]:
        yield orig, (diff,), None, None


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)"))


def _rows_of(v) -> int:
    return int(v.shape[0])


def _native_rows(v) -> bool:
    """A GGUFWeight stored one weight row per block row (not flattened into rows of 256)."""
    return isinstance(v, GGUFWeight) and len(v.shape) >= 1 and v.stored_shape[0] == (v.shape[0] if len(v.shape) > 1
                                                                                      else 1)


def _take_rows(v, start: int, stop: int):
    """Rows [start, stop) of a weight or bias. A GGUFWeight with one block row per weight row stays quantized (its
    blocks lie inside rows, so slicing bytes is exact); otherwise the slice is the exact float values."""
    if isinstance(v, GGUFWeight) and len(v.shape) > 1 and _native_rows(v):
        return GGUFWeight((stop - start, *v.shape[1:]), v.qtype, v.blocks[start:stop].clone(),
                          (stop - start, v.stored_shape[1]))
    if isinstance(v, QuantizedWeight):
        v = v.dequantize()
    return v[start:stop]


def _cat_rows(parts: list):
    if all(isinstance(p, GGUFWeight) and len(p.shape) > 1 and _native_rows(p) for p in parts) and \
            len({(p.qtype, p.stored_shape[1]) for p in parts}) == 1:
        rows = sum(p.shape[0] for p in parts)
        return GGUFWeight((rows, *parts[0].shape[1:]), parts[0].qtype, torch.cat([p.blocks for p in parts]),
                          (rows, parts[0].stored_shape[1]))
    return torch.cat([p.dequantize() if isinstance(p, QuantizedWeight) else p for p in parts])


def _swap_halves(v, swap: bool):
    """(shift, scale) <-> (scale, shift): the two halves of an adaLN output's rows."""
    if not swap:
        return v
    half = _rows_of(v) // 2
    return _cat_rows([_take_rows(v, half, 2 * half), _take_rows(v, 0, half)])


def _do_swap(swap: str | None, weight) -> bool:
    """'always', or 'if_2x': only when the layer has twice as many rows as inputs (decided on the weight)."""
    return swap == "always" or (swap == "if_2x" and _is_2x(weight))


def convert_dit(sd: dict, arch: str, to: str, sizes: dict | None) -> dict:
    """Original <-> diffusers for a DiT state dict. Fused original tensors (qkv, linear1) are split by rows: sizes
    from `sizes` ({diffusers key: rows}) when given, else by the table's ratio."""
    rows = [(_template_regex(o), o, d, r, s) for o, d, r, s in _dit_rows(arch)]
    drop = _DIT_DROP.get(arch, ())
    out, left = {}, dict(sd)
    if to == "diffusers":
        for key in list(left):
            if key in drop:
                left.pop(key)
                continue
            for regex, _, dtemps, ratio, swap in rows:
                m = regex.fullmatch(key)
                if m is None:
                    continue
                i = m.group(1) if m.groups() else None
                names = [d.replace("{i}", i) if i is not None else d for d in dtemps]
                v = left.pop(key)
                v = _swap_halves(v, _do_swap(swap, sd.get(key.rpartition(".")[0] + ".weight")))
                out.update(_split(v, names, ratio, sizes))
                break
    else:
        by_first = {}
        for regex, otemp, dtemps, ratio, swap in rows:
            by_first[dtemps[0]] = (_template_regex(dtemps[0]), otemp, dtemps, swap)
        for key in list(left):
            if key not in left:
                continue
            for dregex, otemp, dtemps, swap in by_first.values():
                m = dregex.fullmatch(key)
                if m is None:
                    continue
                i = m.group(1) if m.groups() else None
                names = [d.replace("{i}", i) if i is not None else d for d in dtemps]
                if any(n not in left for n in names):
                    continue
                v = _cat_rows([left.pop(n) for n in names]) if len(names) > 1 else left.pop(names[0])
                okey = otemp.replace("{i}", i) if i is not None else otemp
                out[okey] = _swap_halves(v, _do_swap(swap, sd.get(names[0].rpartition(".")[0] + ".weight")))
                break
    if left:
        direction = "original -> diffusers" if to == "diffusers" else "diffusers -> original"
        raise WeightsFormatError(f"{arch} state dict ({direction}): {len(left)} keys have no mapping, e.g. "
                                 f"{sorted(left)[:8]}")
    return out


def _is_2x(w) -> bool:
    return w is not None and len(w.shape) == 2 and w.shape[0] == 2 * w.shape[1]


def _split(v, names: list[str], ratio, sizes: dict | None) -> dict:
    if len(names) == 1:
        return {names[0]: v}
    total = _rows_of(v)
    if sizes and all(n in sizes for n in names):
        counts = [sizes[n] for n in names]
    else:
        ratio = ratio or (1,) * len(names)
        unit, rem = divmod(total, sum(ratio))
        counts = [unit * r for r in ratio]
        if rem:
            raise WeightsFormatError(f"cannot split {total} rows into {names} in ratio {ratio}")
    if sum(counts) != total:
        raise WeightsFormatError(f"fused tensor of {total} rows does not split into {dict(zip(names, counts))}")
    out, start = {}, 0
    for n, c in zip(names, counts):
        out[n] = _take_rows(v, start, start + c)
        start += c
    return out
