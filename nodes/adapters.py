"""LoRA nodes: read any layout with nimblediff.weights, hand ComfyUI one patch per weight.

UNet MODELs are named through their LDM key map; DiT MODELs (Flux, SD3, PixArt) through weights/comfy_keys.py: the
deltas, read onto diffusers modules, are fused back into one patch per ComfyUI weight (qkv, linear1, adaLN rows).

The model is cloned and patched with ModelPatcher.add_patches (ComfyUI computes the patched weights lazily, and
unpatching is ComfyUI's). Every patch is validated first (names, shapes, finite values), so a bad file raises with a
clear message and leaves the graph's model untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.adapters.delta import Diff, LoRA
from ..core.recipes import RECIPES
from ..errors import AdapterMismatchError, WeightsFormatError
from .sampling import make_sampler, make_sigmas_for_model

log = logging.getLogger("nimblediff")

_TINY = Path(__file__).parents[1] / "weights" / "tiny"
EMBEDDED_LORAS = {"nimblediff-tiny-flash (embedded)": _TINY / "nimblediff-tiny-flash-lora.safetensors",
                  "nimblediff-tiny-dit-flash (embedded)": _TINY / "nimblediff-tiny-dit-flash-lora.safetensors"}
_TEXT_PREFIX = {"text_encoder": "clip_l.", "text_encoder_2": "clip_g."}

# ComfyUI's own LoraLoader allows strengths in [-100, 100]: a workflow made with it must load here too
STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
MODEL_TIP = "the diffusion model to patch (a patched copy is returned; this one is not changed)"
CLIP_TIP = "the text encoder to patch (a patched copy is returned; this one is not changed)"
LORA_NAME_TIP = ("a LoRA file in models/loras (any layout: PEFT/diffusers, kohya, ComfyUI, LyCORIS), or the "
                 "embedded NimbleDiff-Tiny / NimbleDiff-Tiny-DiT Flash LoRAs")
STRENGTH_MODEL_TIP = "how strongly the LoRA changes the diffusion model (1 = as trained, 0 = off, negative inverts)"
STRENGTH_CLIP_TIP = "how strongly the LoRA changes the text encoder (1 = as trained, 0 = off)"


def lora_choices() -> list[str]:
    embedded = [name for name, path in EMBEDDED_LORAS.items() if path.is_file()]
    try:
        import folder_paths
    except ImportError:          # outside ComfyUI (schema validation, docs)
        return embedded
    return embedded + folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    """The file of a lora_name from a workflow: the embedded LoRA, or a file in models/loras (never outside it)."""
    if isinstance(name, str) and name in EMBEDDED_LORAS:
        return str(EMBEDDED_LORAS[name])
    import folder_paths

    from ..weights.paths import inside

    inside("models/loras", name, "lora_name")  # refuse '..', absolute and drive names before ComfyUI joins them
    try:
        return folder_paths.get_full_path_or_raise("loras", name)
    except (FileNotFoundError, KeyError, ValueError) as exc:  # ComfyUI: FileNotFoundError for an unknown name
        raise WeightsFormatError(f"lora_name={name!r}: no such LoRA in models/loras ({exc}); choose a file listed "
                                 "in the dropdown") from exc


def _text_layers(clip) -> dict:
    """{text_encoder: n layers, text_encoder_2: n layers} of a ComfyUI CLIP (clip_l / clip_g)."""
    text_layers = {}
    if clip is not None:
        keys = clip.patcher.model.state_dict().keys()
        for comp, prefix in _TEXT_PREFIX.items():
            layers = {k.split("encoder.layers.")[1].split(".")[0] for k in keys
                      if k.startswith(prefix) and "encoder.layers." in k}
            if layers:
                text_layers[comp] = len(layers)
    return text_layers


def comfy_target(model, clip):
    """The reader's Target for a ComfyUI MODEL and CLIP: a UNet by its unet_config, a DiT (Flux, SD3, PixArt) by its
    own weight names (weights/comfy_keys.py), the CLIP by its layer counts."""
    from ..weights.arch import detect_model_arch
    from ..weights.comfy_keys import comfy_dit_arch, dit_target
    from ..weights.keymaps import UNetLayout
    from ..weights.lora_formats import Target

    text_layers = _text_layers(clip)
    if model is None:
        return Target.from_layout(None, text_layers, None)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    dit = comfy_dit_arch(shapes)
    if dit is not None:
        return dit_target(dit, shapes, Target.from_layout(None, text_layers))
    config = model.model.model_config.unet_config
    try:
        layout = UNetLayout.from_comfy_config(config)
    except (KeyError, TypeError) as exc:
        raise AdapterMismatchError(
            f"its ComfyUI unet_config (keys {sorted(config)[:8]}) has no UNet layout (missing {exc}) and its weights "
            "are not a DiT NimbleDiff knows (Flux double_blocks, SD3 joint_blocks, PixArt blocks); NimbleDiff's LoRA "
            "nodes support SD1.x / SD2.x / SDXL UNets and Flux, SD3 and PixArt DiTs") from exc
    return Target.from_layout(layout, text_layers, detect_model_arch(config))


def _host_key(key: str, target, clip_keys: dict) -> str | None:
    """ComfyUI state-dict key of a canonical module key's weight."""
    comp, _, path = key.partition(".")
    if comp == "unet":
        ldm = target.unet_map.to_b(path) if target.unet_map is not None else None
        return None if ldm is None else f"diffusion_model.{ldm}"
    prefix = _TEXT_PREFIX.get(comp)
    return clip_keys.get((prefix, path)) if prefix else None


def _clip_index(clip) -> dict:
    """(clip_l./clip_g., module path without text_model.) -> ComfyUI key prefix."""
    index = {}
    if clip is None:
        return index
    for k in clip.patcher.model.state_dict():
        if not k.endswith(".weight"):
            continue
        module = k[: -len(".weight")]
        for prefix in _TEXT_PREFIX.values():
            if module.startswith(prefix):
                path = module.split("text_model.", 1)[1] if "text_model." in module else module.split(".", 2)[-1]
                index[(prefix, path)] = module
    return index


def _patch(delta, weight: torch.Tensor, key: str):
    """ComfyUI's patch for one weight (a LoRAAdapter where ComfyUI has them, the legacy tuple otherwise)."""
    if isinstance(delta, LoRA):
        # Tucker LoCon: down is (r, in, 1, 1) and the kernel lives in mid; plain: down covers in * kh * kw
        fits_in = (delta.down.shape[1] == weight.shape[1]) if delta.mid is not None \
            else delta.down[0].numel() == weight[0].numel()
        if delta.up.shape[0] != weight.shape[0] or not fits_in:
            raise AdapterMismatchError(f"LoRA module {key}: up {tuple(delta.up.shape)} / down "
                                       f"{tuple(delta.down.shape)} do not fit weight {tuple(weight.shape)}")
        return _adapter((delta.up, delta.down, delta.alpha, delta.mid, None, None))
    if isinstance(delta, Diff):
        if delta.weight is None:
            return None
        if delta.weight.numel() != weight.numel():
            raise AdapterMismatchError(f"diff for {key}: {tuple(delta.weight.shape)} vs weight {tuple(weight.shape)}")
        return ("diff", (delta.weight.reshape(weight.shape),))
    # LoHa, LoKr, sparse, factored, DoRA: one dense difference, computed now from the model's weight where the
    # result depends on it (DoRA renormalises W + dW), so ComfyUI's strength blends W and the adapted weight.
    if getattr(delta, "needs_weight", False):
        dense = delta.delta_weight(weight.shape, weight=weight.float())
    else:
        dense = delta.delta_weight(weight.shape)
    if dense is None:
        return None
    if dense.shape != weight.shape or not torch.isfinite(dense).all():
        raise AdapterMismatchError(f"adapter module {key}: its difference {tuple(dense.shape)} does not fit weight "
                                   f"{tuple(weight.shape)} or is not finite")
    return ("diff", (dense,))


def _adapter(values: tuple):
    """ComfyUI's LoRA patch: a LoRAAdapter where ComfyUI has them, the legacy ("lora", values) tuple otherwise."""
    try:
        from comfy.weight_adapter import LoRAAdapter

        return LoRAAdapter(set(), values)
    except ImportError:
        return ("lora", values)


def _dit_patches(deltas: dict, target, unet_sd: dict) -> dict:
    """{ComfyUI weight key: patch} of DiT deltas: the deltas of each ComfyUI weight (q, k, v of one qkv, ...) fused
    into one patch on its rows (weights/comfy_keys.fuse_slots)."""
    from ..weights.comfy_keys import fuse_bias, fuse_slots

    by_weight: dict[str, list] = {}
    for key, delta in deltas.items():
        slot = target.slots[key]
        by_weight.setdefault(slot.key, []).append((slot, delta))
    out = {}
    for host, pieces in by_weight.items():
        weight = unet_sd[f"{host}.weight"]
        patch = fuse_slots(pieces, weight)
        if patch is not None:
            kind, values = patch
            out[f"{host}.weight"] = _adapter((*values, None, None, None)) if kind == "lora" else patch
        biases = [(s, b) for s, d in pieces if (b := d.delta_bias()) is not None]
        if biases and f"{host}.bias" in unet_sd:
            out[f"{host}.bias"] = ("diff", (fuse_bias(biases, weight.shape[0]),))
    return out


def comfy_patches(deltas: dict, model, clip, target, *, source: str = "LoRA", lora_arch=None,
                  strengths: tuple[float, float] = (1.0, 1.0)) -> tuple[dict, dict, list[str]]:
    """Validate all deltas and build ({unet key: patch}, {clip key: patch}, unmatched). Validation is the core's
    (core.adapters.apply.check_weights: alpha, shapes, finite factors at the given (model, clip) strengths), and
    with `lora_arch` the widths are weighed as evidence of another base (weights.arch.check_shapes). A DiT's deltas
    are on diffusers modules; each is checked against its rows of the ComfyUI weight it lives in."""
    from ..core.adapters.apply import check_weights
    from ..weights.arch import check_shapes

    unet_sd = model.model.state_dict() if model is not None else {}
    clip_sd = clip.patcher.model.state_dict() if clip is not None else {}
    clip_keys = _clip_index(clip)
    slots = getattr(target, "slots", None)
    hosts, unmatched, dit = {}, [], {}
    for key in deltas:
        if slots is not None and key.startswith("transformer."):
            slot = slots.get(key)
            if slot is None or f"{slot.key}.weight" not in unet_sd:
                unmatched.append(key)
                continue
            w, b = unet_sd[f"{slot.key}.weight"], unet_sd.get(f"{slot.key}.bias")
            rows = slice(slot.start, slot.start + slot.length)
            hosts[key] = (w[rows], None if b is None else b[rows], strengths[0])
            dit[key] = deltas[key]
            continue
        host = _host_key(key, target, clip_keys)
        sd = unet_sd if key.startswith("unet.") else clip_sd
        if host is None or f"{host}.weight" not in sd:
            unmatched.append(key)
        else:
            hosts[key] = (sd[f"{host}.weight"], sd.get(f"{host}.bias"),
                          strengths[0] if key.startswith("unet.") else strengths[1])
    if lora_arch is not None:
        check_shapes(source, deltas, {k: tuple(w.shape) for k, (w, _, _) in hosts.items()}, lora_arch, target.arch)
    check_weights(source, [(k, deltas[k], w, b, s) for k, (w, b, s) in hosts.items()])
    unet_patches = _dit_patches(dit, target, unet_sd) if dit else {}
    clip_patches = {}
    for key, (weight, bias, _) in hosts.items():
        if key in dit:
            continue
        delta, out = deltas[key], unet_patches if key.startswith("unet.") else clip_patches
        host = _host_key(key, target, clip_keys)
        patch = _patch(delta, weight, key)
        if patch is not None:
            out[f"{host}.weight"] = patch
        delta_bias = delta.delta_bias()
        if delta_bias is not None and bias is not None:
            out[f"{host}.bias"] = ("diff", (delta_bias,))
    return unet_patches, clip_patches, unmatched


def load_lora(model, clip, path: str, strength_model: float, strength_clip: float):
    """Clone and patch MODEL and CLIP with a LoRA file of any layout; returns (model, clip, report)."""
    from ..weights.lora_formats import read_lora

    from ..weights.arch import compatible

    target = comfy_target(model, clip)
    deltas, report = read_lora(path, target)
    if not compatible(report.arch.arch, target.arch.arch):
        raise AdapterMismatchError(f"{path}: this LoRA is for {report.arch} but the model is {target.arch}; "
                                   "load the base model it was trained for")
    unet_patches, clip_patches, unmatched = comfy_patches(deltas, model, clip, target, source=path,
                                                          lora_arch=report.arch,
                                                          strengths=(strength_model, strength_clip))
    unmatched = report.unmatched + unmatched
    total = len(deltas) + len(report.unmatched)
    if not unet_patches and not clip_patches:
        raise AdapterMismatchError(f"{path}: none of its {total} modules matches the model ({report.layout} layout, "
                                   f"made for {report.arch}); unmatched: {unmatched[:10]}")
    if unmatched:
        log.warning("NimbleDiff: %s: %d of %d modules match nothing and are skipped, e.g. %s", path,
                    len(unmatched), total, unmatched[:5])
    new_model, new_clip = model, clip
    if model is not None and unet_patches and strength_model != 0:
        new_model = model.clone()
        new_model.add_patches(unet_patches, strength_model)
    if clip is not None and clip_patches and strength_clip != 0:
        new_clip = clip.clone()
        new_clip.add_patches(clip_patches, strength_clip)
    return new_model, new_clip, report


class LoRALoader:
    """Any LoRA layout (PEFT/diffusers, kohya, ComfyUI LoraSave, LyCORIS LoCon), auto-detected."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Applies a LoRA in any layout (PEFT/diffusers, kohya, ComfyUI LoraSave, LyCORIS LoCon / LoHa / "
                   "LoKr, DoRA), detected from its keys, to a copy of MODEL and CLIP; the report says what "
                   "matched. A file for another base model is refused and the inputs stay untouched.")
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": MODEL_TIP}), "clip": ("CLIP", {"tooltip": CLIP_TIP}),
            "lora_name": (lora_choices(), {"tooltip": LORA_NAME_TIP}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": STRENGTH_MODEL_TIP}),
            "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": STRENGTH_CLIP_TIP}),
        }}

    def load(self, model, clip, lora_name, strength_model, strength_clip):
        model, clip, report = load_lora(model, clip, lora_path(lora_name), strength_model, strength_clip)
        return (model, clip, report.summary())


_DITS = ("sd3", "flux", "pixart")


def check_recipe_family(recipe, model) -> None:
    """A DiT recipe on another model, or a UNet recipe on a DiT, samples with the wrong sampler / schedule / CFG: refuse
    it naming both (UNet recipes among UNets are left to the LoRA's own architecture check)."""
    if model is None:
        return
    arch = comfy_target(model, None).arch.arch
    if (recipe.base in _DITS or arch in _DITS) and recipe.base != arch:
        fits = [n for n, x in RECIPES.items() if x.base == arch]
        raise AdapterMismatchError(f"recipe {recipe.name!r} is for {recipe.base} models but the model is {arch}; "
                                   f"recipes for {arch}: {', '.join(fits) or 'none yet'}")


class AccelerationLoRA:
    """A distillation LoRA (Flash Diffusion, LCM-LoRA, TCD, DMD2, Lightning, Hyper-SD) with its recipe: the patched
    model plus the recipe's SAMPLER, SIGMAS and CFG for SamplerCustom. Warns when the graph contradicts it."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Loads a distillation LoRA (Flash, LCM-LoRA, TCD, DMD2, Lightning, Hyper-SD) with its recipe "
                   "and outputs the patched MODEL / CLIP with the recipe's SAMPLER, SIGMAS and CFG for "
                   "SamplerCustom; warns when the graph contradicts the recipe.")
    RETURN_TYPES = ("MODEL", "CLIP", "SAMPLER", "SIGMAS", "FLOAT", "STRING")
    RETURN_NAMES = ("model", "clip", "sampler", "sigmas", "cfg", "recipe")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": MODEL_TIP}), "clip": ("CLIP", {"tooltip": CLIP_TIP}),
            "lora_name": (lora_choices(), {"tooltip": LORA_NAME_TIP}),
            "recipe": (list(RECIPES), {"default": "flash-sd15", "tooltip": (
                "the distillation recipe the LoRA was trained with: it sets the sampler, schedule, steps and "
                "CFG")}),
            "strength_model": ("FLOAT", {**STRENGTH, "tooltip": STRENGTH_MODEL_TIP}),
            "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": STRENGTH_CLIP_TIP}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip": (
                "sampling steps of the SIGMAS output (a warning when outside the recipe's range)")}),
        }}

    def load(self, model, clip, lora_name, recipe, strength_model, strength_clip, steps):
        r = RECIPES[recipe]
        check_recipe_family(r, model)
        model, clip, report = load_lora(model, clip, lora_path(lora_name), strength_model, strength_clip)
        sampler = make_sampler(r.sampler, recipe=r, **r.options)
        sigmas = make_sigmas_for_model(model, r.schedule, steps)
        return (model, clip, sampler, sigmas, r.cfg, f"{r.describe()}\n{report.summary()}")


NODES = {
    "NimbleLoRALoader": (LoRALoader, "NimbleDiff LoRA Loader (any format)"),
    "NimbleAccelerationLoRA": (AccelerationLoRA, "NimbleDiff Acceleration LoRA (Flash / LCM / TCD)"),
}
