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
- DiTs (PixArt, SD3, Flux): diffusers names (``transformer.transformer_blocks.0.attn.to_q``) or the original ones
             (``double_blocks.0.img_attn.qkv``, ``joint_blocks.0.x_block.attn.qkv``, ``blocks.0.attn.qkv``) under any
             of the prefixes above (``lora_unet_``, ``diffusion_model.``, bare, ``transformer.``) or OneTrainer's
             ``lora_transformer_`` / SimpleTuner's ``lycoris_``; weights/dit_keymaps.py holds the tables. A delta on a
             fused original module is split by output rows into the diffusers projections.

What a module holds is told by its tensor names, whatever the layout (a file may mix kinds per module):

| tensors                                                          | delta (core/adapters/delta.py)              |
|------------------------------------------------------------------|---------------------------------------------|
| ``lora_down/lora_up`` (``lora_A/lora_B``, ...), ``lora_mid``     | LoRA (LyCORIS LoCon: Tucker core)           |
| ``hada_w1_a/_b``, ``hada_w2_a/_b``, ``hada_t1/_t2``              | LoHa                                        |
| ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b``, ``lokr_t2`` | LoKr                           |
| ``diff``, ``diff_b``                                             | Diff (beside a LoRA: its bias)              |
| ``sparse_indices`` + ``sparse_values``                           | Sparse (our convention, see below)          |
| ``factor_u`` + ``factor_v`` (+ ``factor_add``)                   | Factored (our convention, see below)        |
| + ``dora_scale`` (kohya/LyCORIS) or ``lora_magnitude_vector`` (PEFT) | DoRA around the delta                   |

``alpha`` scales LoRA / LoHa (alpha / rank) and factorised LoKr. Conventions of ours, for formats with no common
layout: ``<module>.sparse_indices`` (int, (nnz,) flat row-major positions in the weight or (ndim, nnz)
coordinates) and ``<module>.sparse_values`` ((nnz,)), added to the weight; ``<module>.factor_u`` (out, r) and
``<module>.factor_v`` (r, in[, kh, kw]) replace the weight by U V, or add U V when ``<module>.factor_add`` is a
nonzero scalar. A ``dora_scale`` of shape (out, 1, ...) normalises per output channel, (1, in, ...) per input
channel (LyCORIS ``wd_on_out``), decided against the weight's shape as ComfyUI does.

Underscore-joined kohya names are looked up in a table of the target's module names (diffusers and LDM spellings,
from weights/keymaps.py and the model's own module list), never split by guessing. Every key is accounted for: it
becomes part of a delta, or is listed as unmatched; a module whose tensors mix kinds, or lack a part, is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.adapters.apply import FusedAdapters, ModuleIndex, fuse
from ..core.adapters.delta import Delta, Diff, DoRA, Factored, LoHa, LoKr, LoRA, Sparse, select_rows
from ..errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from . import arch as arch_mod
from .dit_keymaps import DIT_MAPS, dit_route
from .keymaps import PrefixMap, UNetLayout, clip_module_names, unet_keymap
from .safetensors_io import load_with_metadata

__all__ = ["BiasedLoRA", "LoRAReport", "Target", "read_lora", "apply_lora", "split_key", "kohya_table"]

# trailing key components -> role. PEFT adapter names (".lora_A.<name>.weight") are normalized first.
_ROLES = {
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude", "dora_scale": "dora_scale",
    "alpha": "alpha", "diff_b": "diff_b", "diff": "diff", "wd_for_diff": "wd_for_diff",
    **{n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
                      "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "sparse_indices", "sparse_values",
                      "factor_u", "factor_v", "factor_add")},
}
# what a module holds, told by its tensors: kind -> its roles (alpha, diff_b and the DoRA magnitudes go beside)
_KINDS = {
    "lora": ("down", "up", "mid"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "diff": ("diff",),
    "sparse": ("sparse_indices", "sparse_values"),
    "factored": ("factor_u", "factor_v", "factor_add"),
}
_REQUIRED = {  # kind -> groups of roles of which one must be complete
    "lora": (("down", "up"),), "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),), "diff": (("diff",),),
    "sparse": (("sparse_indices", "sparse_values"),), "factored": (("factor_u", "factor_v"),),
    "lokr": (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")),  # and the same for w2: checked in _make_delta
}
_PEFT_ADAPTER = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.(?!weight$)[^.]+\.weight$")
_COMPONENTS = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_TEXT = ("text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "lycoris_")
_DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
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
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA magnitude per key (applied; listed so
    # tools that cannot write DoRA, e.g. nodes/adapter_ops.require_complete, can refuse to drop them)
    metadata: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)        # deltas per kind: LoRA, LoHa, LoKr, DoRA, Diff, ...
    split: dict[str, list[str]] = field(default_factory=dict)  # fused source module -> the modules it was split into

    def summary(self) -> str:
        parts = [f"{self.source}: {self.layout} LoRA for {self.arch}", f"{self.n_keys} keys",
                 ", ".join(f"{c}: {n}" for c, n in sorted(self.counts.items()))]
        if set(self.kinds) - {"LoRA", "BiasedLoRA"}:
            parts.append(", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items())))
        if self.split:
            parts.append(f"{len(self.split)} fused modules split")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} unmatched")
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
    built from modules) the set of canonical keys that exist and their weight shapes (which size the split of a
    fused DiT module)."""

    arch: arch_mod.ArchGuess
    unet_map: PrefixMap | None
    kohya: dict[str, str]
    known: set[str] | None = None
    denoiser: str = "unet"
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def from_layout(cls, layout: UNetLayout | None, text_layers: dict[str, int] | None = None,
                    arch: arch_mod.ArchGuess | None = None) -> "Target":
        """From a UNet layout and text-encoder depths ({"text_encoder": 12, "text_encoder_2": 32})."""
        unet = unet_keymap(layout).modules if layout is not None else []
        text = {c: clip_module_names(n, projection=c == "text_encoder_2") for c, n in (text_layers or {}).items()}
        return cls(arch or arch_mod.ArchGuess("unknown", "no model given"), unet_keymap(layout) if layout else None,
                   kohya_table(unet, text))

    @classmethod
    def for_arch(cls, arch: arch_mod.ArchGuess) -> "Target":
        """The real layouts of the known UNet bases (for reading without a model)."""
        if arch.arch == "sdxl":
            return cls.from_layout(UNetLayout.sdxl(), {"text_encoder": 12, "text_encoder_2": 32}, arch)
        if arch.arch == "sd2":
            return cls.from_layout(UNetLayout.sd15(), {"text_encoder": 23}, arch)
        if arch.arch == "nimblediff-tiny":  # its own block numbering (3 levels of 1 layer), from the shipped config
            return cls.from_layout(UNetLayout.nimblediff_tiny(), {"text_encoder": 12}, arch)
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
        shapes: dict[str, tuple[int, ...]] = {}
        for comp in index.modules:
            table = index.table(comp)
            text = comp in _TEXT
            found = [n for n, m in table.items() if isinstance(getattr(m, "weight", None), torch.Tensor)
                     and not (text and n.startswith("text_model."))]
            names[comp] = found
            known.update(f"{comp}.{n}" for n in found)
            shapes.update((f"{comp}.{n}", tuple(table[n].weight.shape)) for n in found)
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
        table = kohya_table(unet, {c: names[c] for c in _TEXT if c in names}, denoiser)
        return cls(arch_mod.detect_model_arch(dict(index.modules)), unet_keymap(layout) if layout else None, table,
                   known, denoiser, shapes)


def kohya_table(unet: list[tuple[str, str | None]], text: dict[str, list[str]], denoiser: str = "unet") -> dict:
    """{kohya / LyCORIS module name: canonical target} for the given modules: `unet` is (diffusers path, LDM path or
    None) pairs of the denoiser, `text` {component: module paths}. The reader, the writer and the ComfyUI key map
    all name kohya modules through this one table."""
    table = {}
    prefix = "lora_unet_" if denoiser == "unet" else "lora_transformer_"
    for d, l in unet:
        u = d.replace(".", "_")
        table[prefix + u] = table["lycoris_" + u] = f"{denoiser}.{d}"  # lycoris_: SimpleTuner's LyCORIS names
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
    if rest.startswith("base_model.model."):  # PixArt's old PEFT script: unet.base_model.model.<transformer module>
        rest = rest[len("base_model.model."):]
    if comp == "unet" and target.denoiser == "transformer":
        comp = "transformer"
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
    stray, peft_style = [], set()
    for key, value in sd.items():
        split = split_key(key)
        if split is None:
            stray.append(key)
            continue
        module, role = split
        groups.setdefault(module, {})[role] = value
        if ".lora_A." in key or ".lora_B." in key or ".lora_magnitude_vector" in key:
            peft_style.add(module)
    layouts = {m: _layout_of(m, m not in peft_style) for m in groups}
    if not groups:
        hint = " (this looks like a model checkpoint, not a LoRA)" if any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "down_blocks.")) for k in sd) else ""
        raise WeightsFormatError(
            f"{name}: unknown LoRA layout{hint}; first keys: {list(sd)[:10]}. Known layouts: PEFT/diffusers "
            "(…lora_A.weight/lora_B.weight, …lora.down.weight), kohya (lora_unet_…lora_down.weight, …alpha), "
            "LyCORIS (…hada_w1_a, …lokr_w1, …dora_scale) and ComfyUI LoraSave (diffusion_model.…lora_up.weight, …diff)")
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
    # 3. name every group, build its delta, split it where one original module is several diffusers ones
    has_clip_l = any(m.startswith("text_encoders.clip_l.") for m in groups)
    alphas = _metadata_alphas(metadata)
    archs = next(((a,) for a in (target.arch.arch, guess.arch) if a in DIT_MAPS), tuple(DIT_MAPS))
    deltas: dict[str, Delta] = {}
    report = LoRAReport(name, "+".join(sorted(set(layouts.values()))), guess, len(sd), metadata=metadata)
    report.unmatched.extend(stray)
    origin: dict[str, str] = {}
    for module, parts in groups.items():
        route = _route(module, layouts[module], target, has_clip_l, archs)
        if route is None or (target.known is not None and not set(route[0]) & target.known):
            report.unmatched.append(module)
            continue
        keys, entry = route
        delta = _make_delta(name, module, parts, keys[0], alphas)
        if delta is None:
            continue
        pieces = _split(name, module, delta, keys, entry, target)
        if len(pieces) > 1:
            report.split[module] = list(pieces)
        for key, piece in pieces.items():
            if target.known is not None and key not in target.known:
                report.unmatched.append(f"{module} -> {key}")
                continue
            if key in origin:
                raise WeightsFormatError(f"{name}: {origin[key]!r} and {module!r} both name module {key!r}")
            origin[key] = module
            deltas[key] = piece
            if isinstance(piece, DoRA):
                report.magnitude[key] = piece.magnitude
            comp = key.split(".", 1)[0]
            report.counts[comp] = report.counts.get(comp, 0) + 1
            kind = type(piece).__name__
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
    return deltas, report


def _route(module: str, layout: str, target: Target, has_clip_l: bool, archs) -> tuple[tuple, object] | None:
    """(canonical keys, DiT table entry or None) of a source module; None when nothing names it."""
    if layout == "kohya":
        key = target.kohya.get(module)
        if key is not None:
            return (key,), None
        prefix = next((p for p in _DENOISER_PREFIXES if module.startswith(p)), None)
        return _dit(module[len(prefix):], target, archs) if prefix and target.denoiser == "transformer" else None
    if layout == "comfyui":
        if module.startswith("diffusion_model.") and target.denoiser == "transformer":
            return _dit(module[len("diffusion_model."):], target, archs)
        key = _name_comfyui(module, target, has_clip_l)
        return None if key is None else ((key,), None)
    key = _name_diffusers(module, target)
    comp, path = key.split(".", 1)
    if comp == "transformer" and (target.known is None or key not in target.known):
        return _dit(path, target, archs) or ((key,), None)  # an original DiT name, or a diffusers one as it is
    return (key,), None


def _dit(name: str, target: Target, archs) -> tuple[tuple, object] | None:
    """Route through the DiT tables (weights/dit_keymaps.py); with a model, the first table whose modules exist."""
    for arch in archs:
        found = dit_route(name, (arch,))
        if found is not None:
            keys = tuple(f"transformer.{d}" for d in found[2])
            if target.known is None or set(keys) <= target.known:
                return keys, found[1]
    return None


def _rows_of(delta) -> int | None:
    return getattr(delta, "out_features", None)


def _in_of(delta) -> int | None:
    """Input width of a linear delta where its factors say it (None for LoKr, Sparse)."""
    inner = getattr(delta, "delta", delta)  # DoRA / Rows: the wrapped delta's input side
    for name in ("down", "weight", "w1b", "v"):
        t = getattr(inner, name, None)
        if isinstance(t, torch.Tensor) and t.ndim >= 2:
            return t.shape[1]
    return None


def _split(name: str, module: str, delta, keys: tuple, entry, target: Target) -> dict[str, object]:
    """{key: delta} for one source module: itself, its output rows split among fused projections, or its rows
    swapped (adaLN (shift, scale) -> (scale, shift))."""
    swap = entry.swap if entry is not None else None
    if len(keys) == 1 and swap is None:
        return {keys[0]: delta}
    rows = _rows_of(delta)
    if len(keys) > 1:
        if all(k in target.shapes for k in keys):  # the model's own sizes
            sizes = [target.shapes[k][0] for k in keys]
        elif rows is not None:
            ratio = entry.ratio or (1,) * len(keys)
            unit, rest = divmod(rows, sum(ratio))
            if rest:
                raise AdapterMismatchError(f"{name}: module {module!r} has {rows} output rows, which do not split "
                                           f"into {keys} in the ratio {ratio}")
            sizes = [unit * r for r in ratio]
        else:
            raise WeightsFormatError(f"{name}: module {module!r} fuses {keys}; a {type(delta).__name__} does not say "
                                     "how many rows it has: pass the model (read_lora(..., target=modules))")
        if rows is not None and rows != sum(sizes):
            raise AdapterMismatchError(f"{name}: module {module!r} has {rows} output rows; the model's {keys} have "
                                       f"{sizes} (sum {sum(sizes)}): is it made for another model size?")
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        return {k: select_rows(delta, torch.arange(a, a + n), sum(sizes)) for k, a, n in zip(keys, starts, sizes)}
    key = keys[0]
    shape = target.shapes.get(key) or (rows, _in_of(delta))
    if shape[0] is None or (swap == "if_2x" and shape[1] is None):
        raise WeightsFormatError(f"{name}: module {module!r}: its adaLN rows are reordered for diffusers, which needs "
                                 f"the layer's size; a {type(delta).__name__} does not say it: pass the model")
    if swap == "if_2x" and shape[0] != 2 * shape[1]:
        return {key: delta}
    h = shape[0] // 2
    return {key: select_rows(delta, torch.cat([torch.arange(h, 2 * h), torch.arange(0, h)]), shape[0])}


def _alpha_of(parts: dict, key: str, alphas: dict) -> float | None:
    alpha = parts.get("alpha")
    if alpha is not None:
        return float(alpha.reshape(-1)[0].item()) if alpha.numel() else None
    comp, path = key.split(".", 1)
    return _pattern_alpha(path, *alphas[comp]) if comp in alphas else None


def _make_delta(name: str, module: str, parts: dict, key: str, alphas: dict):
    """The delta of one module's tensors (see the table in the module docstring), DoRA-wrapped when a magnitude is
    present; None for an alpha alone."""
    kinds = [k for k, roles in _KINDS.items() if any(r in parts for r in roles)]
    if len(kinds) > 1:
        raise WeightsFormatError(f"{name}: module {module!r} mixes {' and '.join(kinds)} tensors "
                                 f"({sorted(parts)}); one module holds one adapter kind")
    if "wd_for_diff" in parts:
        raise WeightsFormatError(f"{name}: module {module!r} is a LyCORIS DoRA that decomposes the difference "
                                 "(wd_for_diff), which is not supported yet; only DoRA on the merged weight is")
    bias = parts.get("diff_b")
    if not kinds:
        if bias is not None:
            return Diff(None, bias)
        if "magnitude" in parts or "dora_scale" in parts:
            raise WeightsFormatError(f"{name}: module {module!r} has a DoRA magnitude but no LoRA to go with it")
        return None  # an alpha alone: nothing to add
    kind = kinds[0]
    if not any(all(r in parts for r in group) for group in _REQUIRED[kind]):
        missing = [r for r in _REQUIRED[kind][0] if r not in parts]
        what = {"down": "down (lora_down / lora_A)", "up": "up (lora_up / lora_B)"}
        raise WeightsFormatError(f"{name}: module {module!r} has {kind} tensors {sorted(p for p in parts)} but no "
                                 f"{', '.join(what.get(m, m) for m in missing)} weight")
    if bias is not None and kind not in ("lora", "diff"):
        raise WeightsFormatError(f"{name}: module {module!r}: a bias difference (diff_b) beside a {kind} is not "
                                 "supported; ComfyUI writes it beside LoRAs only")
    alpha = _alpha_of(parts, key, alphas)
    p = parts.get
    if kind == "lora":
        delta = BiasedLoRA(p("down"), p("up"), alpha, p("mid"), bias) if bias is not None \
            else LoRA(p("down"), p("up"), alpha, p("mid"))
    elif kind == "loha":
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise WeightsFormatError(f"{name}: module {module!r} has one of hada_t1 / hada_t2; Tucker LoHa needs both")
        delta = LoHa(p("hada_w1_a"), p("hada_w1_b"), p("hada_w2_a"), p("hada_w2_b"), alpha, p("hada_t1"), p("hada_t2"))
    elif kind == "lokr":
        if "lokr_w2" not in parts and not ("lokr_w2_a" in parts and "lokr_w2_b" in parts):
            raise WeightsFormatError(f"{name}: module {module!r} has no lokr_w2 (nor lokr_w2_a + lokr_w2_b)")
        delta = LoKr(p("lokr_w1"), p("lokr_w2"), alpha, p("lokr_w1_a"), p("lokr_w1_b"), p("lokr_w2_a"),
                     p("lokr_w2_b"), p("lokr_t2"))
    elif kind == "diff":
        delta = Diff(p("diff"), bias)
    elif kind == "sparse":
        delta = Sparse(p("sparse_indices"), p("sparse_values"))
    else:
        add = p("factor_add")
        delta = Factored(p("factor_u"), p("factor_v"), replace=add is None or not bool(add.reshape(-1)[0]))
    if "magnitude" in parts:  # PEFT: one magnitude per output channel, (out,) or (1, out, 1, 1) for convolutions
        return DoRA(delta, parts["magnitude"].reshape(-1), True)
    if "dora_scale" in parts:  # kohya / LyCORIS: (out, 1, ...) or (1, in, ...): decided against the weight's shape
        return DoRA(delta, parts["dora_scale"], None)
    return delta


def apply_lora(modules: dict, source, strength: float = 1.0, *, exact_unfuse: bool = False
               ) -> tuple[FusedAdapters, LoRAReport]:
    """Read `source` for these components and fuse it in place (validated first; see core/adapters/apply.py)."""
    index = ModuleIndex(modules)
    deltas, report = read_lora(source, Target.from_modules(index))
    handle = fuse(index, deltas, strength, source=f"{report.source} ({report.layout} layout, for {report.arch.arch})",
                  unresolved=report.unmatched, exact_unfuse=exact_unfuse)
    return handle, report
