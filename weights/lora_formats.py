"""Read a LoRA file in any supported layout into the canonical form ``{component.module: Delta}`` (delta.py).

Layouts, told apart by the keys present (a file may mix them):

- peft:      ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (optional ``.alpha``; alpha may also sit
             in diffusers' ``lora_adapter_metadata``); a bare PEFT state dict (no component) is the denoiser's.
- diffusers: older savers, ``.lora.down/up.weight``, ``.lora_linear_layer.down/up.weight`` and attention-processor
             keys ``attn1.processor.to_q_lora.down.weight``.
- kohya:     ``lora_unet_<module, dots as _>.lora_down/lora_up.weight`` + ``.alpha`` (+ ``.dora_scale``);
             ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` text encoders; UNet names in diffusers or sgm spelling
             (``lora_unet_input_blocks_4_1_proj_in``).
- comfyui:   LoraSave, ``diffusion_model.<LDM module>.lora_up/lora_down.weight``, ``.diff``, ``.diff_b``;
             ``text_encoders.clip_l|clip_g.transformer.text_model.<module>``.

Underscore-joined kohya names are looked up in a table of the target's module names (diffusers and LDM spellings,
from weights/keymaps.py and the model's own module list), never split by guessing. Every key is accounted for: it
becomes part of a delta, is kept aside in the report (DoRA magnitudes), or is listed as unmatched.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.adapters.apply import FusedAdapters, ModuleIndex, fuse
from ..core.adapters.delta import Delta, Diff, LoRA
from ..errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from . import arch as arch_mod
from .keymaps import PrefixMap, UNetLayout, clip_module_names, unet_keymap
from .safetensors_io import load_with_metadata

__all__ = ["BiasedLoRA", "LoRAReport", "Target", "read_lora", "apply_lora", "split_key"]

# trailing key components -> role. PEFT adapter names (".lora_A.<name>.weight") are normalized first.
_ROLES = {
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude", "dora_scale": "magnitude",
    "alpha": "alpha", "diff_b": "diff_b", "diff": "diff",
}
_PEFT_ADAPTER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!weight$)[^.]+\.weight$")
_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_TEXT = ("text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")
_COMFY_CLIP = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass
class BiasedLoRA(LoRA):
    """A LoRA plus a bias difference (ComfyUI LoraSave writes ``.diff_b`` beside ``lora_up/down``)."""

    bias: torch.Tensor | None = None

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)


@dataclass
class LoRAReport:
    source: str
    layout: str                          # "kohya", "peft", "diffusers", "comfyui", or a "+"-joined mix
    arch: arch_mod.ArchGuess             # what the LoRA was made for
    n_keys: int
    counts: dict[str, int] = field(default_factory=dict)      # deltas per component
    unmatched: list[str] = field(default_factory=list)         # source modules with no target module
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA magnitudes (dora_scale), kept aside
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.layout} LoRA for {self.arch}", f"{self.n_keys} keys",
                 ", ".join(f"{c}: {n}" for c, n in sorted(self.counts.items()))]
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} unmatched")
        if self.magnitude:
            parts.append(f"{len(self.magnitude)} DoRA magnitudes not applied")
        return "; ".join(parts)


def split_key(key: str) -> tuple[str, str] | None:
    """'unet.x.lora_A.default.weight' -> ('unet.x', 'down'); None for a key with no LoRA role."""
    if ".lora_A." in key or ".lora_B." in key or ".lora_magnitude_vector." in key:
        key = _PEFT_ADAPTER.sub(r".\1.weight", key)
    parts = key.rsplit(".", 3)
    for n in (3, 2, 1):
        if len(parts) > n:
            tail = ".".join(parts[-n:])
            role = _ROLES.get(tail)
            if role is not None:
                return key[: -len(tail) - 1], role
    if len(parts) == 4 and parts[1].endswith("_lora") and parts[2] in ("down", "up") and parts[3] == "weight":
        suffix = f"_lora.{parts[2]}.weight"  # attention processor LoRA: ...processor.to_q_lora.down.weight
        return key[: -len(suffix)], parts[2]
    return None


def _layout_of(module: str, role_suffix_legacy: bool) -> str:
    if module.startswith(_KOHYA_PREFIXES):
        return "kohya"
    if module.startswith(("diffusion_model.", "text_encoders.")):
        return "comfyui"
    return "diffusers" if role_suffix_legacy else "peft"


# --------------------------------------------------------------------------------------------------- the target
@dataclass
class Target:
    """Names of the model a LoRA is read for: kohya underscore names -> canonical keys, the LDM map, and (when
    built from modules) the set of canonical keys that exist."""

    arch: arch_mod.ArchGuess
    unet_map: PrefixMap | None
    kohya: dict[str, str]
    known: set[str] | None = None
    denoiser: str = "unet"

    @classmethod
    def from_layout(cls, layout: UNetLayout | None, text_layers: dict[str, int] | None = None,
                    arch: arch_mod.ArchGuess | None = None) -> "Target":
        """From a UNet layout and text-encoder depths ({"text_encoder": 12, "text_encoder_2": 32})."""
        unet = unet_keymap(layout).modules if layout is not None else []
        text = {c: clip_module_names(n, projection=c == "text_encoder_2") for c, n in (text_layers or {}).items()}
        return cls(arch or arch_mod.ArchGuess("unknown", "no model given"), unet_keymap(layout) if layout else None,
                   _kohya_table(unet, text))

    @classmethod
    def for_arch(cls, arch: arch_mod.ArchGuess) -> "Target":
        """The real layouts of the known UNet bases (for reading without a model)."""
        if arch.arch == "sdxl":
            return cls.from_layout(UNetLayout.sdxl(), {"text_encoder": 12, "text_encoder_2": 32}, arch)
        if arch.arch == "sd2":
            return cls.from_layout(UNetLayout.sd15(), {"text_encoder": 23}, arch)
        if arch.arch in ("sd15", "unet", "unknown"):
            return cls.from_layout(UNetLayout.sd15(), {"text_encoder": 12}, arch)
        target = cls.from_layout(None, {}, arch)
        target.denoiser = "transformer"
        return target

    @classmethod
    def from_modules(cls, modules) -> "Target":
        """From the components a LoRA will be applied to ({"unet": ..., "text_encoder": ...}, or a ModuleIndex)."""
        index = modules if isinstance(modules, ModuleIndex) else ModuleIndex(modules)
        known: set[str] = set()
        names: dict[str, list[str]] = {}
        for comp in index.modules:
            table = index.table(comp)
            text = comp in _TEXT
            found = [n for n, m in table.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
                     and not (text and n.startswith("text_model."))]
            names[comp] = found
            known.update(f"{comp}.{n}" for n in found)
        denoiser = "transformer" if "transformer" in index.modules else "unet"
        layout, unet = None, []
        den = index.modules.get(denoiser)
        if den is not None and "down_block_types" in (config := dict(getattr(den, "config", {}) or {})):
            try:
                layout = UNetLayout.from_diffusers_config(config)
            except InvalidParameterError:  # a UNet variant without an LDM twin: diffusers names only
                layout = None
        if layout is not None:
            have = set(names[denoiser])
            unet = [(d, l) for d, l in unet_keymap(layout).modules if d in have]
        if den is not None and not unet:
            unet = [(n, None) for n in names[denoiser]]
        table = _kohya_table(unet, {c: names[c] for c in _TEXT if c in names}, denoiser)
        return cls(arch_mod.detect_model_arch(dict(index.modules)), unet_keymap(layout) if layout else None, table,
                   known, denoiser)


def _kohya_table(unet: list[tuple[str, str | None]], text: dict[str, list[str]], denoiser: str = "unet") -> dict:
    table = {}
    prefix = "lora_unet_" if denoiser == "unet" else "lora_transformer_"
    for d, l in unet:
        table[prefix + d.replace(".", "_")] = f"{denoiser}.{d}"
        if l is not None:
            table[prefix + l.replace(".", "_")] = f"{denoiser}.{d}"
    for comp, names in text.items():
        for p in (("lora_te_", "lora_te1_") if comp == "text_encoder" else ("lora_te2_",)):
            for n in names:
                u = n.replace(".", "_")
                table[f"{p}text_model_{u}"] = table[f"{p}{u}"] = f"{comp}.{n}"
    return table


# ----------------------------------------------------------------------------------------------- name resolvers
def _name_diffusers(module: str, target: Target) -> str:
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    comp, rest = next(((c[:-1], module[len(c):]) for c in _COMPONENTS if module.startswith(c)),
                      (target.denoiser, module))  # a bare PEFT state dict is the denoiser's
    if ".processor." in rest:  # attention-processor LoRA (diffusers < 0.21): attn1.processor.to_out -> attn1.to_out.0
        rest = rest.replace(".processor.", ".")
        rest = rest[:-len("to_out")] + "to_out.0" if rest.endswith("to_out") else rest
    if comp in _TEXT and rest.startswith("text_model."):
        rest = rest[len("text_model."):]
    return f"{comp}.{rest}"


def _name_comfyui(module: str, target: Target, has_clip_l: bool) -> str | None:
    if module.startswith("diffusion_model."):
        if target.unet_map is None:
            return None
        name = target.unet_map.to_a(module[len("diffusion_model."):])
        return None if name is None else f"unet.{name}"
    # text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj
    parts = module.split(".", 3)
    if len(parts) < 4 or parts[1] not in _COMFY_CLIP or parts[2] != "transformer":
        return None
    comp = _COMFY_CLIP[parts[1]] if has_clip_l or parts[1] != "clip_g" else "text_encoder"
    rest = parts[3][len("text_model."):] if parts[3].startswith("text_model.") else parts[3]
    return f"{comp}.{rest}"


# ------------------------------------------------------------------------------------------------------ reading
def _load(source) -> tuple[dict, dict, str]:
    if isinstance(source, (str, Path)):
        sd, metadata = load_with_metadata(source)
        return sd, metadata, str(source)
    if isinstance(source, dict):
        return source, {}, "<state dict>"
    raise WeightsFormatError(f"LoRA source of type {type(source).__name__}: expected a file path or a state dict")


def _metadata_alphas(metadata: dict) -> dict[str, tuple[float | None, dict]]:
    """diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig per component): {component: (lora_alpha, pattern)}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise WeightsFormatError(f"lora_adapter_metadata is not valid JSON: {exc}") from exc
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2", "transformer"):
        alpha = config.get(f"{comp}.lora_alpha")
        if alpha is not None or f"{comp}.alpha_pattern" in config:
            out[comp] = (alpha, config.get(f"{comp}.alpha_pattern") or {})
    return out


def _pattern_alpha(path: str, alpha: float | None, pattern: dict) -> float | None:
    for pat, value in pattern.items():  # PEFT matches a pattern against the end of the module path
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return alpha


def read_lora(source, target: Target | UNetLayout | dict | None = None) -> tuple[dict[str, Delta], LoRAReport]:
    """Read a LoRA (path or state dict) into canonical deltas and a report.

    target: the model it is meant for (a dict of components, a UNetLayout, or a Target); None reads it for the
    real layout of the detected base. With a target of another base (``Target.arch``, from the modules or given to
    ``Target.from_layout(..., arch=detect_model_arch(unet_config))``) it raises AdapterMismatchError.
    """
    sd, metadata, name = _load(source)
    # 1. every key -> (module, role); keys without a LoRA role are listed, and none at all means unknown layout
    groups: dict[str, dict[str, torch.Tensor]] = {}
    layouts: dict[str, str] = {}
    stray = []
    for key, value in sd.items():
        split = split_key(key)
        if split is None:
            stray.append(key)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = value
        legacy = not key.endswith((".lora_A.weight", ".lora_B.weight")) and ".lora_A." not in key \
            and ".lora_B." not in key
        layouts.setdefault(module, _layout_of(module, legacy))
    if not groups:
        hint = " (this looks like a model checkpoint, not a LoRA)" if any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "down_blocks.")) for k in sd) else ""
        raise WeightsFormatError(
            f"{name}: unknown LoRA layout{hint}; first keys: {list(sd)[:10]}. Known layouts: PEFT/diffusers "
            "(…lora_A.weight/lora_B.weight, …lora.down.weight), kohya (lora_unet_…lora_down.weight, …alpha) and "
            "ComfyUI LoraSave (diffusion_model.…lora_up.weight, …diff)")
    # 2. architecture, and the names of the target
    guess = arch_mod.detect_lora_arch({k: tuple(v.shape) for k, v in sd.items()})
    if isinstance(target, (dict, ModuleIndex)):
        target = Target.from_modules(target)
    elif isinstance(target, UNetLayout):
        target = Target.from_layout(target, {"text_encoder": 12, "text_encoder_2": 32})
    elif target is None:
        target = Target.for_arch(guess)
    if not arch_mod.compatible(guess.arch, target.arch.arch):  # only positive evidence on both sides counts
        raise AdapterMismatchError(
            f"{name}: this LoRA is for {guess} but the model is {target.arch}; load the base model it was "
            "trained for")
    # 3. name every group, then build its delta
    has_clip_l = any(m.startswith("text_encoders.clip_l.") for m in groups)
    alphas = _metadata_alphas(metadata)
    deltas: dict[str, Delta] = {}
    report = LoRAReport(name, "+".join(sorted(set(layouts.values()))), guess, len(sd), metadata=metadata)
    report.unmatched.extend(stray)
    origin: dict[str, str] = {}
    for module, parts in groups.items():
        layout = layouts[module]
        if layout == "kohya":
            key = target.kohya.get(module)
        elif layout == "comfyui":
            key = _name_comfyui(module, target, has_clip_l)
        else:
            key = _name_diffusers(module, target)
        if key is None or (target.known is not None and key not in target.known):
            report.unmatched.append(module)
            continue
        if key in origin:
            raise WeightsFormatError(f"{name}: {origin[key]!r} and {module!r} both name module {key!r}")
        origin[key] = module
        delta = _make_delta(name, module, parts, key, alphas)
        if "magnitude" in parts:
            report.magnitude[key] = parts["magnitude"]
        if delta is not None:
            deltas[key] = delta
            comp = key.split(".", 1)[0]
            report.counts[comp] = report.counts.get(comp, 0) + 1
    if report.magnitude:
        warnings.warn(f"{name}: {len(report.magnitude)} DoRA magnitude vectors (dora_scale) are not applied yet: the "
                      "LoRA is applied without weight decomposition; they are kept in report.magnitude", stacklevel=2)
    return deltas, report


def _make_delta(name: str, module: str, parts: dict, key: str, alphas: dict) -> Delta | None:
    down, up = parts.get("down"), parts.get("up")
    if (down is None) != (up is None):
        missing = "up (lora_up / lora_B)" if up is None else "down (lora_down / lora_A)"
        raise WeightsFormatError(f"{name}: module {module!r} has a LoRA half but no {missing} weight")
    bias = parts.get("diff_b")
    if down is not None:
        alpha = parts.get("alpha")
        if alpha is not None:
            alpha = float(alpha.reshape(-1)[0].item()) if alpha.numel() else None
        else:
            comp, path = key.split(".", 1)
            if comp in alphas:
                alpha = _pattern_alpha(path, *alphas[comp])
        mid = parts.get("mid")
        if bias is not None:
            return BiasedLoRA(down, up, alpha, mid, bias)
        return LoRA(down, up, alpha, mid)
    if "diff" in parts or bias is not None:
        return Diff(parts.get("diff"), bias)
    return None  # alpha or a magnitude alone: nothing to add


def apply_lora(modules: dict, source, strength: float = 1.0, *, exact_unfuse: bool = False
               ) -> tuple[FusedAdapters, LoRAReport]:
    """Read `source` for these components and fuse it in place (validated first; see core/adapters/apply.py)."""
    index = ModuleIndex(modules)
    deltas, report = read_lora(source, Target.from_modules(index))
    handle = fuse(index, deltas, strength, source=f"{report.source} ({report.layout} layout, for {report.arch.arch})",
                  unresolved=report.unmatched, exact_unfuse=exact_unfuse)
    return handle, report
