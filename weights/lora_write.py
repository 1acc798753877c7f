"""Write canonical deltas ``{component.module: Delta}`` back to a LoRA file in a chosen layout.

    save_lora(deltas, "out.safetensors", layout="kohya", metadata={"ss_output_name": "mine"})
    sd, metadata = lora_state_dict(deltas, layout="comfyui")

| layout  | module name                                                | tensors                                      | alpha |
|---------|------------------------------------------------------------|----------------------------------------------|-------|
| peft    | ``unet.<diffusers module>`` (diffusers save_lora_weights)  | ``.lora_A.weight`` / ``.lora_B.weight``       | ``lora_adapter_metadata`` (r, lora_alpha, rank_pattern, alpha_pattern per component) |
| kohya   | ``lora_unet_<module with _>``, ``lora_te_text_model_…`` (``lora_te1_`` / ``lora_te2_`` with two text encoders), ``lora_transformer_…`` | ``.lora_down.weight`` / ``.lora_up.weight``, ``.lora_mid.weight``, ``.diff``, ``.diff_b`` | ``.alpha`` tensor |
| comfyui | ``diffusion_model.<LDM module>``, ``text_encoders.clip_l.transformer.text_model.…`` (clip_g: text_encoder_2, clip_h for SD2) | as kohya | ``.alpha`` tensor when set |

Every delta is written or the call raises naming the key (no silent skips); weights/lora_formats.read_lora reads
each layout back to the same deltas. Files are written atomically and never replace an existing file unless
``overwrite=True`` (weights/safetensors_io.save_state_dict).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch

from ..core.adapters.delta import Diff, Delta, LoRA
from ..core.adapters.rank import lora_factors, weight_shape
from ..errors import InvalidParameterError, WeightsFormatError
from . import arch as arch_mod
from .keymaps import UNetLayout
from .lora_formats import Target
from .safetensors_io import save_state_dict

__all__ = ["LAYOUTS", "lora_state_dict", "save_lora"]

_TEXT = ("text_encoder", "text_encoder_2")
_SUFFIX = {  # role -> tensor name suffix, per layout (None: the layout cannot hold it)
    "peft": {"down": ".lora_A.weight", "up": ".lora_B.weight", "mid": None, "alpha": None, "diff": None,
             "diff_b": None},
    "kohya": {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "alpha": ".alpha",
              "diff": ".diff", "diff_b": ".diff_b"},
}
_SUFFIX["comfyui"] = _SUFFIX["kohya"]
LAYOUTS = tuple(_SUFFIX)


# ------------------------------------------------------------------------------------------------- module names
def _peft_name(key: str, target: Target, components: set) -> str:
    return key


def _kohya_name(key: str, target: Target, components: set) -> str:
    comp, path = key.split(".", 1)
    if comp in _TEXT:
        prefix = {"text_encoder": "lora_te1_" if "text_encoder_2" in components else "lora_te_",
                  "text_encoder_2": "lora_te2_"}[comp]
        inner = "" if path.startswith("text_projection") else "text_model_"
        return prefix + inner + path.replace(".", "_")
    if comp in ("unet", "transformer"):
        return f"lora_{comp}_" + path.replace(".", "_")
    raise InvalidParameterError(f"kohya layout: key {key!r} has component {comp!r}; kohya names exist for unet, "
                                "transformer, text_encoder and text_encoder_2")


def _comfyui_name(key: str, target: Target, components: set) -> str:
    comp, path = key.split(".", 1)
    if comp in _TEXT:
        clip = "clip_g" if comp == "text_encoder_2" else "clip_h" if target.arch.arch == "sd2" else "clip_l"
        inner = "" if path.startswith("text_projection") else "text_model."
        return f"text_encoders.{clip}.transformer.{inner}{path}"
    ldm = target.unet_map.to_b(path) if comp == "unet" and target.unet_map is not None else None
    if ldm is None:
        raise InvalidParameterError(
            f"comfyui layout: key {key!r} has no ComfyUI (LDM) name for a {target.arch.arch} UNet; the layout covers "
            "UNet modules and CLIP text encoders (pass target= for another UNet layout, or use layout='peft' or "
            "'kohya' for transformers)")
    return f"diffusion_model.{ldm}"


_NAMES = {"peft": _peft_name, "kohya": _kohya_name, "comfyui": _comfyui_name}


# ------------------------------------------------------------------------------------------------------- tensors
def _target(target, deltas: dict) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, UNetLayout):
        return Target.from_layout(target, {"text_encoder": 12, "text_encoder_2": 32})
    if isinstance(target, dict):
        return Target.from_modules(target)
    if target is None:
        return Target.for_arch(arch_mod.detect_lora_arch({k: None for k in deltas}))
    raise InvalidParameterError(f"target of type {type(target).__name__}; expected a Target, a UNetLayout, a dict of "
                                "components or None")


def _plain(delta: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with a Tucker core folded into down: (r, in, kh, kw) and (out, r, 1, 1)."""
    B, A = lora_factors(delta, delta.down.dtype)
    shape = weight_shape(delta)
    return A.reshape(delta.rank, *shape[1:]), B.reshape(shape[0], delta.rank, *((1, 1) if len(shape) == 4 else ()))


def _entries(key: str, delta: Delta, layout: str) -> dict[str, torch.Tensor]:
    """{role: tensor} of one delta in a layout; raises for parts the layout cannot hold."""
    suffix = _SUFFIX[layout]
    parts: dict[str, torch.Tensor] = {}
    bias = getattr(delta, "bias", None)
    if isinstance(delta, LoRA):
        down, up, mid = delta.down, delta.up, delta.mid
        if mid is not None and suffix["mid"] is None:  # exact: the core folds into a (r, in, kh, kw) down
            down, up, mid = *_plain(delta), None
        parts.update(down=down, up=up)
        if mid is not None:
            parts["mid"] = mid
        if suffix["alpha"] is not None and (layout == "kohya" or delta.alpha is not None):
            parts["alpha"] = torch.tensor(float(delta.rank if delta.alpha is None else delta.alpha))
    elif isinstance(delta, Diff):
        if delta.weight is not None:
            parts["diff"] = delta.weight
    else:   # LoHa, LoKr, DoRA, sparse, factored: never drop a layer silently
        raise InvalidParameterError(
            f"key {key!r} holds a {type(delta).__name__} adapter, which save_lora writes only as LoRA or full "
            "difference; convert it first with core.adapters.extract.to_lora (or write Diffs)")
    if bias is not None:
        parts["diff_b"] = bias
    cannot = [role for role in parts if suffix[role] is None]
    if cannot:
        what = {"diff": "a full difference (Diff)", "diff_b": "a bias difference"}[cannot[0]]
        raise InvalidParameterError(
            f"{layout} layout: key {key!r} holds {what}, which diffusers / PEFT LoRA files cannot carry; use "
            "layout='kohya' or 'comfyui' (ComfyUI reads .diff / .diff_b), or turn it into a LoRA with "
            "core.adapters.extract.to_lora")
    return parts


def _peft_metadata(deltas: dict) -> dict[str, str]:
    """diffusers' lora_adapter_metadata: a PEFT LoraConfig per component, the common r / alpha plus patterns."""
    config: dict = {}
    by_comp: dict[str, dict[str, tuple[int, float]]] = {}
    for key, delta in deltas.items():
        if isinstance(delta, LoRA):
            comp, path = key.split(".", 1)
            alpha = float(delta.rank if delta.alpha is None else delta.alpha)
            by_comp.setdefault(comp, {})[path] = (delta.rank, alpha)
    for comp, layers in by_comp.items():
        r = Counter(r for r, _ in layers.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in layers.values()).most_common(1)[0][0]
        config.update({
            f"{comp}.r": r, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(layers),
            f"{comp}.rank_pattern": {p: rp for p, (rp, _) in layers.items() if rp != r},
            f"{comp}.alpha_pattern": {p: ap for p, (_, ap) in layers.items() if ap != alpha},
        })
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def _kohya_metadata(deltas: dict) -> dict[str, str]:
    loras = [d for d in deltas.values() if isinstance(d, LoRA)]
    ranks = {d.rank for d in loras}
    alphas = {float(d.rank if d.alpha is None else d.alpha) for d in loras}
    return {"ss_network_module": "networks.lora",
            "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"}


def _uniform_alpha(deltas: dict) -> dict:
    """One alpha for every LoRA (the most common one), each up factor rescaled so alpha / rank * up is unchanged."""
    alphas = {k: float(d.rank if d.alpha is None else d.alpha) for k, d in deltas.items() if isinstance(d, LoRA)}
    if not alphas:
        return deltas
    common = Counter(alphas.values()).most_common(1)[0][0]
    return {k: d if k not in alphas or alphas[k] == common else
            dataclasses.replace(d, up=d.up * (alphas[k] / common), alpha=common) for k, d in deltas.items()}


def lora_state_dict(deltas: dict[str, Delta], layout: str = "peft", *, target=None, dtype: torch.dtype | None = None,
                    uniform_alpha: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of the deltas in a layout. target: the model's names (as read_lora; needed by 'comfyui'
    for the UNet's LDM names, default: the real layout of the base detected from the keys). dtype: cast the
    tensors (alpha stays float32).

    uniform_alpha (kohya / comfyui): write one alpha for every module, folding each module's own alpha / rank into
    its up factor (the same updates up to rounding). diffusers 0.42's kohya loader applies the file's most common
    alpha to some modules whose alpha differs (attention out / attn2 projections, text-encoder layers), which
    mis-scales dynamic-rank LoRAs, kohya's own resize_lora output included; one alpha avoids that."""
    if layout not in _SUFFIX:
        raise InvalidParameterError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    if not deltas:
        raise InvalidParameterError("lora_state_dict: deltas is empty; nothing to write")
    bad = [k for k in deltas if not isinstance(k, str) or "." not in k]
    if bad:
        raise InvalidParameterError(f"keys {bad[:5]} are not canonical '<component>.<module path>' keys (e.g. "
                                    "'unet.down_blocks.0.attentions.0.proj_in')")
    tgt = _target(target, deltas) if layout == "comfyui" else None
    if uniform_alpha and layout != "peft":
        deltas = _uniform_alpha(deltas)
    components = {k.split(".", 1)[0] for k in deltas}
    sd: dict[str, torch.Tensor] = {}
    for key, delta in deltas.items():
        name = _NAMES[layout](key, tgt, components)
        for role, tensor in _entries(key, delta, layout).items():
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidParameterError(f"key {key!r}: its {role} tensor contains NaN or inf; refusing to write it")
            if dtype is not None and role != "alpha" and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            full = name + _SUFFIX[layout][role]
            if full in sd:
                raise InvalidParameterError(f"{layout} layout: two keys map to tensor {full!r} (the second is {key!r})")
            sd[full] = tensor.detach().contiguous().clone()
    metadata = _peft_metadata(deltas) if layout == "peft" else _kohya_metadata(deltas) if layout == "kohya" else {}
    return sd, metadata


def save_lora(deltas: dict[str, Delta], path, layout: str = "peft", *, metadata: dict[str, str] | None = None,
              overwrite: bool = False, target=None, dtype: torch.dtype | None = None, uniform_alpha: bool = False
              ) -> Path:
    """Write deltas as a safetensors LoRA file in `layout` (see the module table). metadata: extra str -> str
    entries; the layout's own entries (lora_adapter_metadata, ss_network_dim / ss_network_alpha) replace any of the
    same name, since they must describe the tensors written. Refuses to replace an existing file unless
    overwrite=True. target, dtype, uniform_alpha: see lora_state_dict."""
    path = Path(path)
    if path.exists() and not overwrite:  # before any work; save_state_dict checks again at the write
        raise WeightsFormatError(f"{path}: exists; pass overwrite=True or choose another name")
    sd, own = lora_state_dict(deltas, layout, target=target, dtype=dtype, uniform_alpha=uniform_alpha)
    return save_state_dict(sd, path, {**(metadata or {}), **own}, overwrite=overwrite)
