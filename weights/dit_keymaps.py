"""Module names of the DiT denoisers: diffusers naming <-> the original reference code (PixArt, SD3 MMDiT, Flux BFL).

One row per original module: ``(original, diffusers, ratio, swap)``. ``{i}`` is a block number. Templates match
with ``.`` or ``_`` between words, so one row serves ``double_blocks.0.img_attn.qkv`` (BFL, ComfyUI
``diffusion_model.``) and ``double_blocks_0_img_attn_qkv`` (kohya ``lora_unet_``). The diffusers names of every row
also match themselves, which resolves underscore-joined diffusers names (``lora_transformer_…``, ``lycoris_…``)
without a model.

- Several diffusers modules: the original fuses them (q, k, v into ``qkv``); its output rows are theirs, in order,
  sized by the model's modules when known, else in proportion to ``ratio`` (equal when None): Flux's ``linear1`` is
  q, k, v and the MLP input, 3 x hidden + 4 x hidden rows.
- swap: the original adaLN output is (shift, scale), diffusers' ``AdaLayerNormContinuous`` is (scale, shift):
  "always" swaps the two halves of the rows, "if_2x" only when the layer has twice as many rows as inputs (SD3's last
  joint block, whose context stream is pre-only).

Sources: ComfyUI ``comfy/utils.py`` (``mmdit_to_diffusers``, ``flux_to_diffusers``, ``pixart_to_diffusers``) and
diffusers' conversion scripts; the tests check the result against diffusers' loaders and converters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["DiTEntry", "DIT_MAPS", "dit_route"]

_QKV = ("to_q", "to_k", "to_v")
_ADD = ("add_q_proj", "add_k_proj", "add_v_proj")


@dataclass(frozen=True)
class DiTEntry:
    original: str
    diffusers: tuple[str, ...]
    ratio: tuple[int, ...] | None = None
    swap: str | None = None  # None, "always" or "if_2x"


def _rows(rows) -> tuple[DiTEntry, ...]:
    out = []
    for row in rows:
        original, diffusers, *rest = row
        out.append(DiTEntry(original, (diffusers,) if isinstance(diffusers, str) else tuple(diffusers), *rest))
    return tuple(out)


def _fused(block: str, names) -> tuple[str, ...]:
    return tuple(f"{block}.{n}" for n in names)


_B = "transformer_blocks.{i}"
_S = "single_transformer_blocks.{i}"

PIXART = _rows([
    ("blocks.{i}.attn.qkv", _fused(f"{_B}.attn1", _QKV)),
    ("blocks.{i}.attn.proj", f"{_B}.attn1.to_out.0"),
    ("blocks.{i}.cross_attn.q_linear", f"{_B}.attn2.to_q"),
    ("blocks.{i}.cross_attn.kv_linear", _fused(f"{_B}.attn2", ("to_k", "to_v"))),
    ("blocks.{i}.cross_attn.proj", f"{_B}.attn2.to_out.0"),
    ("blocks.{i}.mlp.fc1", f"{_B}.ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", f"{_B}.ff.net.2"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
])

SD3 = _rows([
    ("joint_blocks.{i}.x_block.attn.qkv", _fused(f"{_B}.attn", _QKV)),
    ("joint_blocks.{i}.x_block.attn.proj", f"{_B}.attn.to_out.0"),
    ("joint_blocks.{i}.x_block.attn2.qkv", _fused(f"{_B}.attn2", _QKV)),  # SD3.5 dual attention
    ("joint_blocks.{i}.x_block.attn2.proj", f"{_B}.attn2.to_out.0"),
    ("joint_blocks.{i}.x_block.mlp.fc1", f"{_B}.ff.net.0.proj"),
    ("joint_blocks.{i}.x_block.mlp.fc2", f"{_B}.ff.net.2"),
    ("joint_blocks.{i}.x_block.adaLN_modulation.1", f"{_B}.norm1.linear"),
    ("joint_blocks.{i}.context_block.attn.qkv", _fused(f"{_B}.attn", _ADD)),
    ("joint_blocks.{i}.context_block.attn.proj", f"{_B}.attn.to_add_out"),
    ("joint_blocks.{i}.context_block.mlp.fc1", f"{_B}.ff_context.net.0.proj"),
    ("joint_blocks.{i}.context_block.mlp.fc2", f"{_B}.ff_context.net.2"),
    ("joint_blocks.{i}.context_block.adaLN_modulation.1", f"{_B}.norm1_context.linear", None, "if_2x"),
    ("context_embedder", "context_embedder"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", None, "always"),
])

FLUX = _rows([
    ("double_blocks.{i}.img_attn.qkv", _fused(f"{_B}.attn", _QKV)),
    ("double_blocks.{i}.img_attn.proj", f"{_B}.attn.to_out.0"),
    ("double_blocks.{i}.img_mlp.0", f"{_B}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.2", f"{_B}.ff.net.2"),
    ("double_blocks.{i}.img_mod.lin", f"{_B}.norm1.linear"),
    ("double_blocks.{i}.txt_attn.qkv", _fused(f"{_B}.attn", _ADD)),
    ("double_blocks.{i}.txt_attn.proj", f"{_B}.attn.to_add_out"),
    ("double_blocks.{i}.txt_mlp.0", f"{_B}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.2", f"{_B}.ff_context.net.2"),
    ("double_blocks.{i}.txt_mod.lin", f"{_B}.norm1_context.linear"),
    ("single_blocks.{i}.linear1", _fused(f"{_S}", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), (1, 1, 1, 4)),
    ("single_blocks.{i}.linear2", f"{_S}.proj_out"),
    ("single_blocks.{i}.modulation.lin", f"{_S}.norm.linear"),
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear", None, "always"),
])

DIT_MAPS = {"pixart": PIXART, "sd3": SD3, "flux": FLUX}


def _pattern(template: str) -> re.Pattern:
    """'double_blocks.{i}.img_attn.qkv' -> a full-match regex, block number captured, '.' and '_' interchangeable."""
    out = []
    for part in re.split(r"(\{i\})", template):
        out.append(r"(\d+)" if part == "{i}" else "".join("[._]" if c in "._" else re.escape(c) for c in part))
    return re.compile("".join(out))


@lru_cache(maxsize=None)
def _compiled(arch: str) -> tuple[list, list]:
    entries = DIT_MAPS[arch]
    original = [(_pattern(e.original), e) for e in entries]
    names = dict.fromkeys(d for e in entries for d in e.diffusers)
    identity = [(_pattern(d), DiTEntry(d, (d,))) for d in names]
    return original, identity


def dit_route(name: str, archs=tuple(DIT_MAPS)) -> tuple[str, DiTEntry, tuple[str, ...]] | None:
    """(arch, entry, diffusers module paths) for a module name in original or diffusers naming, dots or
    underscores; None when no table of `archs` knows it. Diffusers names are tried first."""
    for kind in (1, 0):
        for arch in archs:
            for pattern, entry in _compiled(arch)[kind]:
                m = pattern.fullmatch(name)
                if m is not None:
                    block = m.group(1) if m.groups() else None
                    return arch, entry, tuple(d.replace("{i}", block) if block else d for d in entry.diffusers)
    return None
