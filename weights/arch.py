"""Which base model a LoRA was made for, and which base model a target is.

Architectures: ``sd15``, ``sd2``, ``sdxl``, ``nimblediff-tiny`` (UNets), ``sd3``, ``flux``, ``pixart``
(transformers). When the keys only say "some UNet" or "some MM-DiT" (tiny test models, a LoRA that touches few
layers) detection answers the family, ``unet`` or ``mmdit``, which is compatible with each of its members: a
mismatch is reported only on evidence.

Evidence is read from key names in any layout (diffusers, kohya, LDM/ComfyUI: dots and underscores are unified)
and, where real sizes are known, from shapes: the cross-attention context width is 768 (SD1.x), 1024 (SD2.x),
2048 (SDXL) or 64 (NimbleDiff-Tiny, whose UNet has SD1.x's block names at a fraction of the widths: without the
width a tiny LoRA reads as SD1.5 and fails on its first shape instead of naming the two bases).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..core.adapters.delta import Diff, LoRA
from ..errors import AdapterMismatchError

__all__ = ["ArchGuess", "detect_lora_arch", "detect_model_arch", "compatible", "check_shapes", "FAMILY"]

FAMILY = {"sd15": "unet", "sd2": "unet", "sdxl": "unet", "nimblediff-tiny": "unet", "sd3": "mmdit", "flux": "mmdit",
          "pixart": "dit"}
_CONTEXT_DIM = {64: "nimblediff-tiny", 768: "sd15", 1024: "sd2", 2048: "sdxl"}
_WIDTH_NAMES = {64: "NimbleDiff-Tiny's text width"}

_SECOND_TE = "keys for a second text encoder"
_KV_DOWN = re.compile(r"attn2_(processor_)?to_[kv]_(lora_down|lora_A|lora_linear_layer_down|diff$)")
_UNET = re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_\d")
# (architecture, why, pattern on the key with '.' replaced by '_')
_EVIDENCE = [
    ("flux", "Flux single-stream blocks",
     re.compile(r"single_transformer_blocks_\d|(^|_)(single|double)_blocks_\d", re.M)),
    ("sd3", "SD3 joint blocks", re.compile(r"joint_blocks_\d|context_block_|x_block_")),
    ("pixart", "PixArt adaLN-single / caption projection", re.compile(r"adaln_single|caption_projection")),
    ("pixart", "original PixArt blocks (cross_attn q_linear / kv_linear, t_block)",
     re.compile(r"(^|_)blocks_\d+_cross_attn_(q|kv)_linear|(^|_)t_block_1(_|$)", re.M)),
    ("sdxl", _SECOND_TE,
     re.compile(r"^(lora_te2_|text_encoder_2_|text_encoders_clip_g_)", re.M)),
    ("sdxl", "an add_embedding (SDXL micro-conditioning)", re.compile(r"add_embedding_linear|label_emb_0_")),
    ("sdxl", "transformer depth > 1 inside UNet attention blocks",
     re.compile(r"(attentions_\d+|(input|output)_blocks_\d+_1|middle_block_1)_transformer_blocks_[1-9]")),
    ("sd15", "UNet blocks SDXL does not have (4th level or attention at the first level)",
     re.compile(r"down_blocks_3_|up_blocks_3_|down_blocks_0_attentions_|up_blocks_3_attentions_"
                r"|input_blocks_(1|2)_1_|input_blocks_(9|10|11)_|output_blocks_(9|10|11)_")),
]


@dataclass(frozen=True)
class ArchGuess:
    arch: str          # sd15 / sd2 / sdxl / sd3 / flux / pixart, a family (unet / mmdit / dit), or "unknown"
    reason: str

    def __str__(self) -> str:
        return f"{self.arch} ({self.reason})"


def _context_width(shapes: dict) -> int | None:
    """Input width of a cross-attention key/value projection (attn2.to_k / to_v), from a LoRA down or a Diff."""
    for key, shape in shapes.items():
        if "attn2" in key and _KV_DOWN.search(key.replace(".", "_")) and shape is not None and len(shape) >= 2:
            return int(shape[1])
    return None


def detect_lora_arch(shapes: dict) -> ArchGuess:
    """Guess the base of a LoRA from ``{key: shape}`` (shape may be None when unknown)."""
    keys = list(shapes)
    text = "\n".join(keys).replace(".", "_")  # one string, one search per pattern (keys hold no newlines)
    found: dict[str, str] = {}
    for arch, why, pattern in _EVIDENCE:
        hit = pattern.search(text)
        if hit is not None and arch not in found:
            found[arch] = f"{why}: {keys[text.count(chr(10), 0, hit.start())]}"
    unet = _UNET.search(text) is not None
    width = _context_width(shapes)
    if width in _CONTEXT_DIM and unet:
        why = f" ({_WIDTH_NAMES[width]})" if width in _WIDTH_NAMES else ""
        found.setdefault(_CONTEXT_DIM[width], f"cross-attention context width {width}{why}")
    if "sd2" in found or "nimblediff-tiny" in found:  # both share SD1.x's block layout
        found.pop("sd15", None)
    if ("sd3" in found or "flux" in found) and found.get("sdxl", "").startswith(_SECOND_TE):
        found.pop("sdxl")  # SD3 has two CLIP text encoders too
    if len(found) == 1:
        (arch, reason), = found.items()
        return ArchGuess(arch, reason)
    if len(found) > 1:
        return ArchGuess("unknown", "conflicting evidence: " + "; ".join(f"{a} <- {r}" for a, r in found.items()))
    if unet:
        return ArchGuess("unet", "UNet block names without size or layout evidence")
    if re.search(r"transformer_blocks_\d+_attn_add_[qkv]_proj", text):
        return ArchGuess("mmdit", "joint-attention transformer blocks (SD3 or Flux)")
    if re.search(r"transformer_blocks_\d+_attn2_", text):
        return ArchGuess("pixart", "DiT blocks with cross-attention and no UNet blocks")
    return ArchGuess("unknown", "no architecture-specific key names")


def detect_model_arch(model) -> ArchGuess:
    """Architecture of a target: a diffusers denoiser module, its config, a ComfyUI unet_config, or a dict of
    components ({"unet": ...} / {"transformer": ...})."""
    if isinstance(model, dict) and any(k in model for k in ("unet", "transformer")):
        return detect_model_arch(model.get("unet", model.get("transformer")))
    cls = type(model).__name__
    config = getattr(model, "config", model)
    config = dict(config) if hasattr(config, "keys") else {}
    cls = config.get("_class_name", cls)
    by_class = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "PixArtTransformer2DModel": "pixart"}
    if cls in by_class:
        return ArchGuess(by_class[cls], f"class {cls}")
    for arch, key in (("flux", "axes_dims_rope"), ("sd3", "caption_projection_dim"), ("pixart", "caption_channels")):
        if key in config:  # a config dict without _class_name
            return ArchGuess(arch, f"transformer config with {key}")
    if "down_block_types" in config:  # diffusers UNet2DConditionModel
        if config.get("addition_embed_type") == "text_time":
            return ArchGuess("sdxl", "UNet with text_time micro-conditioning")
        return _by_context_width(config.get("cross_attention_dim"), "UNet")
    if "num_res_blocks" in config:  # ComfyUI unet_config
        if config.get("adm_in_channels"):
            return ArchGuess("sdxl", "ComfyUI unet_config with adm_in_channels")
        return _by_context_width(config.get("context_dim"), "ComfyUI unet_config")
    return ArchGuess("unknown", f"unrecognised target {cls}")


def _by_context_width(width, what: str) -> ArchGuess:
    """A UNet without micro-conditioning: SD2 / NimbleDiff-Tiny by their text width, else SD1.x."""
    arch = _CONTEXT_DIM.get(width) if width != 2048 else None
    if arch is None:  # tiny test models of other widths: SD1.x's layout, no evidence of another base
        return ArchGuess("sd15", f"{what} without micro-conditioning")
    why = f" ({_WIDTH_NAMES[width]})" if width in _WIDTH_NAMES else ""
    return ArchGuess(arch, f"{what} with cross-attention width {width}{why}")


def compatible(lora_arch: str, target_arch: str) -> bool:
    """Only positive evidence of different bases is incompatible; a family is compatible with its members."""
    if "unknown" in (lora_arch, target_arch) or lora_arch == target_arch:
        return True
    return FAMILY.get(lora_arch, lora_arch) == target_arch or FAMILY.get(target_arch, target_arch) == lora_arch


def _rows_and_fan_in(delta) -> tuple[int, int] | None:
    """(out, in*kh*kw) of the weight a LoRA or Diff was made for; None for kinds whose factors do not say."""
    if isinstance(delta, LoRA) and delta.up.ndim >= 2 and delta.down.ndim >= 2:
        kernel = 1 if delta.mid is None or delta.mid.ndim != 4 else delta.mid.shape[2] * delta.mid.shape[3]
        return delta.up.shape[0], delta.down[0].numel() * kernel
    if isinstance(delta, Diff) and delta.weight is not None and delta.weight.ndim >= 2:
        return delta.weight.shape[0], delta.weight[0].numel()
    return None


def check_shapes(source: str, deltas: Mapping, model_shapes: Mapping[str, tuple], lora_arch: ArchGuess,
                 model_arch: ArchGuess) -> None:
    """Shapes as evidence of another base model. One odd module is a broken file (the loader's validation names its
    key); most of the modules a LoRA shares with the model having other widths is another architecture with the
    same module names (NimbleDiff-Tiny and SD1.5, SD1.5 and SD2 without a cross-attention key), so say that."""
    wrong, shared = [], 0
    for key, delta in deltas.items():
        have, want = _rows_and_fan_in(delta), model_shapes.get(key)
        if have is None or not want:
            continue
        shared += 1
        if have != (want[0], math.prod(want[1:])):
            wrong.append((key, have, tuple(want)))
    if not wrong or 2 * len(wrong) <= shared:
        return
    key, have, want = wrong[0]
    lora = str(lora_arch) if lora_arch.arch != model_arch.arch else \
        f"another base model than this one (both have {lora_arch.arch} module names)"
    raise AdapterMismatchError(
        f"{source}: this LoRA is for {lora} but the model is {model_arch}: {len(wrong)} of the {shared} modules they "
        f"share have other widths (e.g. {key}: the LoRA is for a weight of (out, in*kh*kw) = {have}, the model's is "
        f"{want}); load the base model it was trained for")
