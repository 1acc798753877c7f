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

ComfyUI's UNet names (``input_blocks.<n>`` / ``middle_block`` / ``output_blocks.<n>``) number blocks by the UNet's
config (levels, layers per block, attention placement), so the comfyui layout needs the UNet the LoRA is for:
``target=`` a model folder, a UNetLayout (``UNetLayout.from_diffusers_config(unet.config)``) or the model's
components; without one, the preset of the base detected from the keys (SD1.5 / SDXL numbering). Weights that are
not modules of that UNet, or whose widths disagree with its config, are refused instead of written under a wrong
block number. save_lora reads every file back before it is put in place and refuses one whose deltas differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch

from ..core.adapters.delta import Diff, Delta, LoRA
from ..core.adapters.rank import lora_factors, weight_shape
from ..errors import InvalidParameterError, WeightsFormatError
from . import arch as arch_mod
from .keymaps import UNetLayout, read_unet_config, unet_fit_problems
from .lora_formats import Target, kohya_table, read_lora
from .safetensors_io import save_state_dict

__all__ = ["LAYOUTS", "lora_state_dict", "save_lora", "model_target", "check_unet_fit"]

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


# ------------------------------------------------------------------------------------------------ the target UNet
def model_target(path) -> Target:
    """The names of a diffusers UNet model from its config alone: a model folder (``unet/config.json``, and
    ``text_encoder*/config.json`` for the text depths), a UNet folder or its config.json."""
    config = read_unet_config(path)
    layers = {"text_encoder": 12, "text_encoder_2": 32}
    for comp in layers:
        te = Path(path) / comp / "config.json"
        if Path(path).is_dir() and te.is_file():
            layers[comp] = max(layers[comp], int(json.loads(te.read_text()).get("num_hidden_layers", 0)))
    return Target.from_layout(UNetLayout.from_diffusers_config(config), layers, arch_mod.detect_model_arch(config))


def _target(target, deltas: dict) -> tuple[Target, str]:
    """(Target, how its UNet widths are known): "absolute" from a config, "shapes" from the modules themselves,
    "none" for a preset or a Target of unknown origin (names are checked, sizes are not)."""
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], Target):
        return target  # already resolved
    if isinstance(target, Target):
        return target, "shapes" if target.known is not None else "none"
    if isinstance(target, UNetLayout):
        return Target.from_layout(target, {"text_encoder": 12, "text_encoder_2": 32}), "absolute"
    if isinstance(target, (str, Path)):
        return model_target(target), "absolute"
    if isinstance(target, dict):
        return Target.from_modules(target), "shapes"
    if target is None:
        return Target.for_arch(arch_mod.detect_lora_arch({k: None for k in deltas})), "none"
    raise InvalidParameterError(f"target of type {type(target).__name__}; expected a model folder, a Target, a "
                                "UNetLayout, a dict of components or None")


def _shape(delta) -> tuple[int, ...] | None:
    try:
        return tuple(weight_shape(delta))
    except (InvalidParameterError, AttributeError):
        return None


def check_unet_fit(deltas: dict[str, Delta], target=None, *, widths: str | None = None, layout: str = "comfyui"
                   ) -> None:
    """Raise unless every UNet delta is a module of the target's UNet (see the module docstring) with a fitting
    width. widths: None = as known for the target ("absolute" for a config, exact shapes for modules, names only
    for a preset); "relative" = one width per level of the preset, for a LoRA of unknown size (the CLI's check
    when no model is given)."""
    tgt, known = _target(target, deltas)
    shapes = {k.split(".", 1)[1]: _shape(d) for k, d in deltas.items() if k.startswith("unet.")}
    if not shapes or tgt.unet_map is None or tgt.unet_map.layout is None:
        return
    mode = widths or known
    problems = unet_fit_problems(tgt.unet_map.layout, shapes, widths="none" if mode == "shapes" else mode)
    if mode == "shapes":
        for name, shape in shapes.items():
            have = tgt.shapes.get(f"unet.{name}")
            if have is None and tgt.known is not None:
                problems.append(f"{name!r} is not a module of this model")
            elif have is not None and shape is not None and (shape[0] != have[0] or
                                                             torch.Size(shape).numel() != torch.Size(have).numel()):
                problems.append(f"{name!r} has weight shape {shape}, the model's is {tuple(have)}")
    if problems:
        layout_of = tgt.unet_map.layout
        which = (f"the {tgt.arch.arch} preset numbering (guessed from the keys: {tgt.arch.reason})" if known == "none"
                 else f"the UNet with {len(layout_of.num_res_blocks)} levels of {list(layout_of.num_res_blocks)} "
                      f"layers and widths {layout_of.channels}")
        raise InvalidParameterError(
            f"{layout} layout: {len(problems)} UNet weights do not fit {which}, e.g. {'; '.join(problems[:2])}. "
            "ComfyUI's input_blocks / middle_block / output_blocks numbering depends on the UNet's config, so the "
            "file would not load back; pass the model the LoRA is for (CLI: --model <diffusers folder>; Python: "
            "target=<model folder>, UNetLayout.from_diffusers_config(unet.config) or the model's components), or "
            "write layout='peft' or 'kohya', whose names do not depend on it")


# ------------------------------------------------------------------------------------------------------- tensors


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
    tgt = None
    if layout == "comfyui":
        tgt = _target(target, deltas)
        check_unet_fit(deltas, tgt)
        tgt = tgt[0]
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
    if path.exists() and not overwrite:  # before any work; checked again when the file is put in place
        raise WeightsFormatError(f"{path}: exists; pass overwrite=True or choose another name")
    if layout == "comfyui":
        target = _target(target, deltas)  # resolved once for the write and the read-back
    sd, own = lora_state_dict(deltas, layout, target=target, dtype=dtype, uniform_alpha=uniform_alpha)
    # written beside the output, read back and compared, and only then renamed into place
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check.safetensors", dir=str(path.parent))
    os.close(fd)
    try:
        save_state_dict(sd, tmp, {**(metadata or {}), **own}, overwrite=True)
        _verify(tmp, path, deltas, layout, target, dtype)
        if path.exists() and not overwrite:
            raise WeightsFormatError(f"{path}: exists; pass overwrite=True or choose another name")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read_back_target(deltas: dict, layout: str, target) -> Target:
    """The names the written file must resolve to: exactly the keys of `deltas` (kohya names are looked up in a
    table of those keys; comfyui UNet names through the same UNet map)."""
    comps: dict[str, list[str]] = {}
    for key in deltas:
        comp, path = key.split(".", 1)
        comps.setdefault(comp, []).append(path)
    denoiser = "transformer" if "transformer" in comps else "unet"
    table = kohya_table([(p, None) for p in comps.get(denoiser, [])],
                         {c: comps[c] for c in _TEXT if c in comps}, denoiser)
    unet_map = _target(target, deltas)[0].unet_map if layout == "comfyui" else None
    return Target(arch_mod.ArchGuess("unknown", "read back after writing"), unet_map, table, set(deltas), denoiser)


def _verify(tmp, path: Path, deltas: dict, layout: str, target, dtype) -> None:
    """Read the written file back and compare every delta's weight (and bias) difference with what was asked."""
    back, report = read_lora(tmp, _read_back_target(deltas, layout, target))
    lost = sorted(set(deltas) - set(back))
    if lost or report.unmatched:
        raise WeightsFormatError(f"{path}: refusing to write a {layout} file that does not load back: "
                                 f"{len(lost)} modules are lost, e.g. {lost[:3] or report.unmatched[:3]}")
    low = dtype is not None and dtype != torch.float32 or any(
        t.dtype in (torch.float16, torch.bfloat16) for d in deltas.values() for t in vars(d).values()
        if isinstance(t, torch.Tensor))
    tol = 2e-2 if low else 1e-4  # a half-precision write rounds each factor
    for key, want in deltas.items():
        got = back[key]
        pairs = [(got.delta_bias(), want.delta_bias())]
        shape = _shape(want)
        if shape is not None:
            pairs.append((got.delta_weight(torch.Size(shape)), want.delta_weight(torch.Size(shape))))
        for a, b in pairs:
            if (a is None) != (b is None) or a is not None and (
                    a.shape != b.shape or float((a - b).norm()) > tol * max(float(b.norm()), 1e-12)):
                raise WeightsFormatError(f"{path}: refusing to write a {layout} file that does not load back: "
                                         f"module {key!r} reads back as a different {type(got).__name__}")
