"""Key maps between diffusers naming and the original LDM / single-file naming (UNet, VAE, CLIP text encoder).

One table per model serves every direction and every user: single-file conversion (parameter keys), LoRA readers
(module names: ComfyUI ``diffusion_model.input_blocks.4.1.proj_in``, kohya ``lora_unet_input_blocks_4_1_proj_in``)
and the test factories. A table is a list of module-prefix pairs ``(diffusers, ldm)`` built from a structural
description of the UNet (`UNetLayout`); a name converts through its longest listed prefix, the rest of the name is
carried over unchanged (inside a transformer block both namings agree).

UNet layout (LDM): ``input_blocks.0`` is conv_in; level x holds ``num_res_blocks[x]`` entries ``[resnet, attention?]``
then a downsampler (all but the last level); ``middle_block`` is ``[resnet, attention, resnet]``; ``output_blocks``
mirror the levels deepest first with one more resnet each, the upsampler sitting after the last entry of a level.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import InvalidParameterError, WeightsFormatError

__all__ = [
    "UNetLayout", "PrefixMap", "unet_keymap", "unet_module_names", "clip_module_names", "read_unet_config",
    "unet_fit_problems",
    "unet_diffusers_to_ldm", "unet_ldm_to_diffusers", "vae_keymap", "vae_diffusers_to_ldm", "vae_ldm_to_diffusers",
    "clip_diffusers_to_ldm", "clip_ldm_to_diffusers", "convert_state_dict",
]

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# modules inside one diffusers BasicTransformerBlock (same names in LDM): used to enumerate modules only
_TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class UNetLayout:
    """What the key map needs to know about a UNet. Depth lists use LDM order (index = block number).

    channels:                 output channels per level (None where unknown: then every resnet may have a shortcut)
    num_res_blocks:           resnets per down level
    transformer_depth:        per input resnet (len = sum(num_res_blocks)); 0 = no attention after it
    transformer_depth_output: per output block (len = sum(num_res_blocks) + levels), output_blocks.0 first
    transformer_depth_middle: transformer blocks in the middle attention (>= 1); None = no middle block
    label_emb:                diffusers name of the module behind LDM ``label_emb.0`` (``add_embedding`` for SDXL)
    """

    channels: tuple[int, ...] | None
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int | None
    label_emb: str | None = None

    def __post_init__(self):
        n, levels = sum(self.num_res_blocks), len(self.num_res_blocks)
        if len(self.transformer_depth) != n or len(self.transformer_depth_output) != n + levels:
            raise InvalidParameterError(
                f"UNetLayout: transformer_depth has {len(self.transformer_depth)} entries and transformer_depth_output "
                f"{len(self.transformer_depth_output)}; with num_res_blocks={self.num_res_blocks} they must have "
                f"{n} and {n + levels}")

    @classmethod
    def from_diffusers_config(cls, config) -> "UNetLayout":
        """From a diffusers UNet2DConditionModel config (dict or FrozenDict)."""
        c = dict(config)
        levels = len(c["down_block_types"])
        lpb = _per_level(c.get("layers_per_block", 2), levels)
        tlpb = _per_level(c.get("transformer_layers_per_block", 1), levels)
        rtlpb = c.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
        depth = [_per_layer(tlpb[x], i) if "CrossAttn" in t else 0
                 for x, t in enumerate(c["down_block_types"]) for i in range(lpb[x])]
        rlpb = list(reversed(lpb))
        depth_out = [_per_layer(rtlpb[x], i) if "CrossAttn" in t else 0
                     for x, t in enumerate(c["up_block_types"]) for i in range(rlpb[x] + 1)]
        mid_type = c.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_type == "UNetMidBlock2DCrossAttn":
            mid = _per_layer(tlpb[-1], 0)
        elif mid_type is None:
            mid = None
        else:
            raise InvalidParameterError(f"UNet mid_block_type={mid_type!r} has no LDM key map; supported: "
                                        "'UNetMidBlock2DCrossAttn' or None")
        label = ("add_embedding" if c.get("addition_embed_type") == "text_time"
                 else "class_embedding" if c.get("class_embed_type") in ("projection", "timestep") else None)
        return cls(tuple(c["block_out_channels"]), tuple(lpb), tuple(depth), tuple(depth_out), mid, label)

    @classmethod
    def from_comfy_config(cls, config: dict) -> "UNetLayout":
        """From ComfyUI's ``unet_config`` (model_detection). Its transformer_depth_output is popped from the end,
        so it lists output blocks shallowest first; middle depths -1 / -2 (resnet only / none) have no diffusers
        counterpart."""
        mult = tuple(config["channel_mult"])
        nrb = config["num_res_blocks"]
        nrb = tuple(nrb) if isinstance(nrb, (list, tuple)) else (nrb,) * len(mult)
        mid = config.get("transformer_depth_middle", None)
        if mid is not None and mid < 1:
            raise InvalidParameterError(f"ComfyUI unet_config transformer_depth_middle={mid}: a middle block without "
                                        "attention has no diffusers counterpart; supported: >= 1")
        mc = config.get("model_channels")
        return cls(tuple(mc * m for m in mult) if mc else None, nrb, tuple(config["transformer_depth"]),
                   tuple(reversed(config["transformer_depth_output"])), mid,
                   "add_embedding" if config.get("adm_in_channels") else None)

    @classmethod
    def sd15(cls) -> "UNetLayout":
        return cls((320, 640, 1280, 1280), (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), (0, 0, 0) + (1,) * 9, 1)

    @classmethod
    def nimblediff_tiny(cls) -> "UNetLayout":
        """The shipped NimbleDiff-Tiny UNet (3 levels of 1 layer), from its own config."""
        return _shipped_tiny_layout()

    @classmethod
    def sdxl(cls) -> "UNetLayout":
        return cls((320, 640, 1280), (2, 2, 2), (0, 0, 2, 2, 10, 10), (10,) * 3 + (2,) * 3 + (0,) * 3, 10,
                   "add_embedding")


@lru_cache(maxsize=1)
def _shipped_tiny_layout() -> UNetLayout:
    return UNetLayout.from_diffusers_config(read_unet_config(Path(__file__).parent / "tiny" / "nimblediff-tiny"))


def _per_level(v, levels: int) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v] * levels


def _per_layer(v, i: int) -> int:
    return v[i] if isinstance(v, (list, tuple)) else v


class PrefixMap:
    """Module-prefix pairs (a, b). `to_b(name)` converts through the longest listed prefix of `name` (at a dot
    boundary) and keeps the rest; `to_a` the other way. `modules` lists every known full module pair."""

    def __init__(self, pairs: list[tuple[str, str]], modules: list[tuple[str, str]], layout=None):
        self.layout = layout  # the UNetLayout the table was built from (None for other tables)
        self.a_to_b = dict(pairs)
        self.b_to_a = {b: a for a, b in pairs}
        if len(self.a_to_b) != len(pairs) or len(self.b_to_a) != len(pairs):
            raise RuntimeError("key map table has duplicate prefixes")  # a bug in a table, not user input
        self.modules = modules

    @staticmethod
    def _convert(name: str, table: dict) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in table:
                return table[prefix] + name[len(prefix):]
        return None

    def to_b(self, name: str) -> str | None:
        return self._convert(name, self.a_to_b)

    def to_a(self, name: str) -> str | None:
        return self._convert(name, self.b_to_a)


@lru_cache(maxsize=32)
def unet_keymap(layout: UNetLayout) -> PrefixMap:
    """diffusers (a) <-> LDM (b) for a UNet2DConditionModel with this layout."""
    pairs: list[tuple[str, str]] = list(_UNET_TOP.items())
    modules: list[tuple[str, str]] = list(_UNET_TOP.items())
    ch = layout.channels
    levels = len(layout.num_res_blocks)

    def resnet(d: str, l: str, shortcut: bool):
        for sub, ldm_sub in _UNET_RESNET.items():
            pairs.append((f"{d}.{sub}", f"{l}.{ldm_sub}"))
            if sub != "conv_shortcut" or shortcut:
                modules.append((f"{d}.{sub}", f"{l}.{ldm_sub}"))

    def attention(d: str, l: str, depth: int):
        pairs.append((d, l))
        subs = ["norm", "proj_in", "proj_out"] + [f"transformer_blocks.{t}.{m}" for t in range(depth)
                                                  for m in _TRANSFORMER_BLOCK]
        modules.extend((f"{d}.{s}", f"{l}.{s}") for s in subs)

    def single(d: str, l: str):
        pairs.append((d, l))
        modules.append((d, l))

    if layout.label_emb:
        single(f"{layout.label_emb}.linear_1", "label_emb.0.0")
        single(f"{layout.label_emb}.linear_2", "label_emb.0.2")
    n, k = 1, 0  # next input block; index into transformer_depth
    for x in range(levels):
        for i in range(layout.num_res_blocks[x]):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0",
                   ch is None or (i == 0 and x > 0 and ch[x - 1] != ch[x]))
            if layout.transformer_depth[k]:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", layout.transformer_depth[k])
            n, k = n + 1, k + 1
        if x < levels - 1:
            single(f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
            n += 1
    if layout.transformer_depth_middle is not None:
        resnet("mid_block.resnets.0", "middle_block.0", False)
        attention("mid_block.attentions.0", "middle_block.1", layout.transformer_depth_middle)
        resnet("mid_block.resnets.1", "middle_block.2", False)
    n = 0
    for x in range(levels):
        for i in range(layout.num_res_blocks[levels - 1 - x] + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0", True)  # skip concat: in != out always
            depth = layout.transformer_depth_output[n]
            if depth:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            n += 1
        if x < levels - 1:
            single(f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n - 1}.{2 if depth else 1}.conv")
    return PrefixMap(pairs, modules, layout)


def read_unet_config(path) -> dict:
    """The UNet config of a diffusers model folder (``unet/config.json``), a UNet folder or its ``config.json``."""
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "unet" / "config.json", path / "config.json"]
    for file in candidates:
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise WeightsFormatError(f"{file}: not a readable JSON model config ({exc})") from exc
            unet = isinstance(config, dict) and "UNet" in config.get("_class_name", "UNet")
            if unet and "down_block_types" in config:
                return config
            raise WeightsFormatError(f"{file}: not a diffusers UNet2DConditionModel config (no down_block_types; "
                                     f"class {config.get('_class_name') if isinstance(config, dict) else None!r})")
    raise WeightsFormatError(f"{path}: no UNet config found; expected a diffusers model folder with "
                             "unet/config.json, a UNet folder with config.json, or the config.json itself")


_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")


def _level(layout: UNetLayout, name: str) -> int | None:
    """Level (0 = outermost) of the block a diffusers module sits in; None outside the blocks."""
    m = _LEVEL.match(name)
    if m is None:
        return None
    levels = len(layout.num_res_blocks)
    if m.group(1) is None:
        return levels - 1
    x = int(m.group(2))
    return x if m.group(1) == "down_blocks" else levels - 1 - x


def unet_fit_problems(layout: UNetLayout, shapes: dict, *, widths: str = "absolute") -> list[str]:
    """Why weights ``{diffusers module: weight shape or None}`` are not those of a UNet with this layout (empty
    when they fit): a name the UNet does not have, or a block width that disagrees.

    The width of a block-level module is its output rows (input columns for ``ff.net.0.proj``, whose rows are the
    GEGLU's 8x); inside UNet2DConditionModel every other weight of level x has ``channels[x]`` rows.
    widths: "absolute" compares with ``layout.channels``; "relative" only requires one width per level (for a
    layout whose sizes are a guess, e.g. the SD1.5 preset for a LoRA of unknown size: down_blocks.1 and
    up_blocks.<levels-2> must then agree); "none" checks names only."""
    if widths not in ("absolute", "relative", "none"):
        raise InvalidParameterError(f"widths={widths!r}; valid: 'absolute', 'relative', 'none'")
    names = {d for d, _ in unet_keymap(layout).modules}
    missing, problems = [], []
    seen: dict[int, tuple[int, str]] = {}
    for name, shape in shapes.items():
        if name not in names:
            missing.append(f"{name!r} is not a module of this UNet")
            continue
        level = _level(layout, name)
        if level is None or widths == "none" or shape is None or len(shape) < 1:
            continue
        width = int(shape[1] if name.endswith("ff.net.0.proj") and len(shape) > 1 else shape[0])
        if widths == "absolute":
            if layout.channels is not None and width != layout.channels[level]:
                problems.append(f"{name!r} has weight shape {tuple(shape)}, but level {level} of this UNet has "
                                f"{layout.channels[level]} channels")
        elif level in seen and seen[level][0] != width:
            problems.append(f"{name!r} is {width} channels wide but {seen[level][1]!r}, at the same level {level} of "
                            f"this layout, is {seen[level][0]}")
        else:
            seen.setdefault(level, (width, name))
    return missing + problems


def unet_module_names(layout: UNetLayout) -> list[tuple[str, str]]:
    """Every weight-bearing module of the UNet as (diffusers name, LDM name)."""
    return unet_keymap(layout).modules


def clip_module_names(num_layers: int, projection: bool = False) -> list[str]:
    """Linear modules of a CLIP text transformer in flattened (no ``text_model.``) transformers naming."""
    subs = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    names = [f"encoder.layers.{i}.{s}" for i in range(num_layers) for s in subs]
    return names + (["text_projection"] if projection else [])


# ------------------------------------------------------------------------------------------------- state dicts
def convert_state_dict(sd: dict, convert, what: str, src_prefix: str = "", dst_prefix: str = "",
                       reshape=None) -> dict:
    """Rename every key of `sd` (module part through `convert`, parameter leaf kept). Raises with the leftovers.

    convert: module name -> new module name or None. reshape: optional (new key, tensor) -> tensor.
    """
    out, leftovers = {}, []
    for key, value in sd.items():
        if not key.startswith(src_prefix):
            leftovers.append(key)
            continue
        module, _, leaf = key[len(src_prefix):].rpartition(".")
        new = convert(module) if module else None
        if new is None:
            leftovers.append(key)
            continue
        new_key = f"{dst_prefix}{new}.{leaf}"
        out[new_key] = reshape(new_key, value) if reshape else value
    if leftovers:
        raise WeightsFormatError(f"{what}: {len(leftovers)} keys have no mapping, e.g. {leftovers[:10]}; "
                                 f"expected keys under {src_prefix!r} that the {what} key map knows")
    return out


def unet_diffusers_to_ldm(sd: dict, layout: UNetLayout, prefix: str = "model.diffusion_model.") -> dict:
    return convert_state_dict(sd, unet_keymap(layout).to_b, "UNet (diffusers -> LDM)", "", prefix)


def unet_ldm_to_diffusers(sd: dict, layout: UNetLayout, prefix: str = "model.diffusion_model.") -> dict:
    return convert_state_dict(sd, unet_keymap(layout).to_a, "UNet (LDM -> diffusers)", prefix, "")


# ---------------------------------------------------------------------------------------------------------- VAE
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@lru_cache(maxsize=32)
def vae_keymap(levels: int, layers_per_block: int) -> PrefixMap:
    """diffusers AutoencoderKL (a) <-> LDM first_stage_model (b). Decoder levels are numbered in reverse in LDM."""
    pairs = [(m, m) for m in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_norm_out", f"{part}.norm_out"),
                  (f"{part}.conv_out", f"{part}.conv_out")]
        blocks = [(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}") for j in range(2)]
        for x in range(levels):
            if part == "encoder":
                d, l, n = f"encoder.down_blocks.{x}", f"encoder.down.{x}", layers_per_block
                pairs.append((f"{d}.downsamplers.0.conv", f"{l}.downsample.conv"))
            else:
                d, l, n = f"decoder.up_blocks.{x}", f"decoder.up.{levels - 1 - x}", layers_per_block + 1
                pairs.append((f"{d}.upsamplers.0.conv", f"{l}.upsample.conv"))
            blocks += [(f"{d}.resnets.{j}", f"{l}.block.{j}") for j in range(n)]
        pairs += [(f"{d}.{s}", f"{l}.{t}") for d, l in blocks for s, t in _VAE_RESNET.items()]
        pairs += [(f"{part}.mid_block.attentions.0.{s}", f"{part}.mid.attn_1.{t}") for s, t in _VAE_ATTN.items()]
    return PrefixMap(pairs, [])


def _vae_map(config) -> PrefixMap:
    c = dict(config)
    return vae_keymap(len(c["block_out_channels"]), c.get("layers_per_block", 1))


def _is_vae_attn_linear(key: str) -> bool:
    return ".mid.attn_1." in key and key.endswith(".weight") and not key.endswith("norm.weight")


def vae_diffusers_to_ldm(sd: dict, config, prefix: str = "first_stage_model.") -> dict:
    """Mid-attention q/k/v/proj_out are 1x1 convolutions in LDM: (out, in) -> (out, in, 1, 1)."""
    reshape = lambda k, v: v[:, :, None, None] if _is_vae_attn_linear(k) and v.ndim == 2 else v  # noqa: E731
    return convert_state_dict(sd, _vae_map(config).to_b, "VAE (diffusers -> LDM)", "", prefix, reshape)


def vae_ldm_to_diffusers(sd: dict, config, prefix: str = "first_stage_model.") -> dict:
    reshape = lambda k, v: v.flatten(1) if ".mid_block.attentions.0.to_" in k and v.ndim == 4 else v  # noqa: E731
    return convert_state_dict(sd, _vae_map(config).to_a, "VAE (LDM -> diffusers)", prefix, "", reshape)


# --------------------------------------------------------------------------------------------------------- CLIP
def clip_diffusers_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers CLIPTextModel (flattened in transformers 5, or with ``text_model.``) -> ``<prefix>text_model.*``.
    ``text_projection`` (CLIPTextModelWithProjection) stays beside ``text_model``."""
    def convert(module: str) -> str:
        if module == "text_projection":
            return module
        return module if module.startswith("text_model.") else f"text_model.{module}"
    return convert_state_dict(sd, convert, "CLIP text encoder (transformers -> LDM)", "", prefix)


def clip_ldm_to_diffusers(sd: dict, prefix: str = "cond_stage_model.transformer.", flattened: bool = True) -> dict:
    """``<prefix>text_model.*`` -> transformers keys; flattened=True drops ``text_model.`` (transformers 5
    CLIPTextModel), False keeps it (CLIPTextModelWithProjection)."""
    def convert(module: str) -> str | None:
        if module == "text_projection" or not flattened:
            return module
        return module[len("text_model."):] if module.startswith("text_model.") else None
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    return convert_state_dict(sd, convert, "CLIP text encoder (LDM -> transformers)", prefix, "")
