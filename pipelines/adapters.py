"""Diffusers surface of the LoRA operations: stack LoRAs (with per-block weights) in one validated fuse, extract a LoRA
from two pipelines, and hand canonical deltas to PEFT and back so diffusers' own adapter API keeps working.

    handle = stack_loras(pipe, ["flash.safetensors", "style.safetensors"], [1.0, 0.6],
                         blocks=[None, {"input": 0.0, "output": 1.2}])      # fused in place, nothing copied
    handle.unfuse()
    deltas, report = extract_from_pipelines(base_pipe, tuned_pipe, rank=32)
    save_lora(deltas, "mine.safetensors", layout="kohya")                  # nimblediff.weights.lora_write
    to_peft(pipe, deltas, "mine"); pipe.set_adapters(["mine"], [0.8])      # unfused PEFT adapter, diffusers API
    deltas = from_peft(pipe, "mine")                                       # back, e.g. to prune / resize / merge

Resizing, pruning and merging work on deltas (core/adapters rank.py and merge.py), whatever surface they came from.
`LoRAOpsMixin` gives a DiffusionPipeline subclass the same as methods; `unload_loras()` unfuses what it stacked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ..core.adapters.apply import FusedAdapters, ModuleIndex, fuse_many
from ..core.adapters.delta import LoRA
from ..core.adapters.extract import extract_lora
from ..core.adapters.merge import scale_blocks
from ..core.adapters.rank import RankReport, weight_shape
from ..errors import AdapterMismatchError, InvalidParameterError
from ..weights.arch import check_shapes
from ..weights.lora_formats import Target, read_lora
from ..weights.lora_write import lora_state_dict

__all__ = ["pipeline_modules", "read_for", "stack_loras", "extract_from_pipelines", "peft_state_dict", "to_peft",
           "from_peft", "LoRAOpsMixin"]

_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_DENOISERS = ("unet", "transformer")


def pipeline_modules(pipe) -> dict[str, torch.nn.Module]:
    """{component name: module} of a pipeline (or a dict of modules), as canonical keys name them."""
    if isinstance(pipe, Mapping):
        return dict(pipe)
    found = {c: m for c in _COMPONENTS if isinstance(m := getattr(pipe, c, None), torch.nn.Module)}
    if not any(c in found for c in _DENOISERS):
        raise InvalidParameterError(f"{type(pipe).__name__} has no unet or transformer; pass a diffusers pipeline or "
                                    "a dict {'unet': ..., 'text_encoder': ...}")
    return found


def _is_deltas(source) -> bool:
    return isinstance(source, Mapping) and bool(source) and not any(isinstance(v, torch.Tensor)
                                                                    for v in source.values())


def read_for(source, target: Target):
    """read_lora for the modules `target` was built from (Target.from_modules), with the widths of the modules the
    LoRA shares with them as evidence of another base model (weights.arch.check_shapes): a LoRA for another
    architecture with the same module names is named as such, not by its first odd shape."""
    deltas, report = read_lora(source, target)
    check_shapes(report.source, deltas, target.shapes, report.arch, target.arch)
    return deltas, report


def _read(target: Target, source, i: int):
    """(deltas, name, unresolved keys) of a path, a state dict, or canonical deltas."""
    if _is_deltas(source):
        return dict(source), f"loras[{i}] (deltas)", []
    deltas, report = read_for(source, target)
    return deltas, f"loras[{i}] {report.source} ({report.layout} layout)", report.unmatched


def stack_loras(pipe, loras: Sequence, weights: Sequence[float] | None = None, *,
                text_encoder_weights: Sequence[float] | None = None,
                blocks: Sequence[Mapping[str, float] | None] | None = None,
                exact_unfuse: bool = False) -> FusedAdapters:
    """Fuse several LoRAs (paths, state dicts of any layout, or canonical deltas) into the pipeline's modules in one
    step: every file is read and every key, shape and value checked before the first weight changes.

    weights: denoiser strength per LoRA (default 1); text_encoder_weights: per LoRA (default: its weight);
    blocks: per LoRA None or {block: weight} for core.adapters.merge.scale_blocks ("input" / "middle" / "output",
    "double" / "single", numbered blocks "output.0", module prefixes). Returns the handle; handle.unfuse() restores.
    """
    n = len(loras)
    if isinstance(loras, (str, Mapping)) or n == 0:
        raise InvalidParameterError(f"loras={loras!r}; expected a non-empty list of paths, state dicts or deltas")
    for name, values in (("weights", weights), ("text_encoder_weights", text_encoder_weights), ("blocks", blocks)):
        if values is not None and len(values) != n:
            raise InvalidParameterError(f"{name} has {len(values)} entries for {n} LoRAs; give one per LoRA")
    weights = list(weights) if weights is not None else [1.0] * n
    te_weights = list(text_encoder_weights) if text_encoder_weights is not None else weights
    index = ModuleIndex(pipeline_modules(pipe))
    target = Target.from_modules(index)
    pairs, names, unresolved = [], [], []
    for i, source in enumerate(loras):
        deltas, name, unmatched = _read(target, source, i)
        if blocks is not None and blocks[i]:
            deltas = scale_blocks(deltas, blocks[i])
        den = {k: d for k, d in deltas.items() if k.split(".", 1)[0] in _DENOISERS}
        text = {k: d for k, d in deltas.items() if k not in den}
        pairs += [(den, weights[i]), (text, te_weights[i])]
        names.append(name)
        unresolved += unmatched
    return fuse_many(index, pairs, source=" + ".join(names), unresolved=unresolved, exact_unfuse=exact_unfuse)


def extract_from_pipelines(base, tuned, *, components: Sequence[str] | None = None, **options
                           ) -> tuple[dict, RankReport]:
    """A LoRA = tuned minus base, per Linear / Conv2d of each component (default: the denoiser); options as
    core.adapters.extract.extract_lora (rank, sv_fro, ..., clamp_quantile, min_diff, dtype)."""
    b, t = pipeline_modules(base), pipeline_modules(tuned)
    names = list(components) if components is not None else [c for c in _DENOISERS if c in b][:1]
    missing = [c for c in names if c not in b or c not in t]
    if missing:
        raise InvalidParameterError(f"components {missing} are not in both pipelines (base has {sorted(b)}, tuned "
                                    f"has {sorted(t)})")
    deltas, total = {}, RankReport()
    for c in names:
        part, report = extract_lora(getattr(b[c], "text_model", b[c]), getattr(t[c], "text_model", t[c]),
                                    component=c, **options)
        deltas.update(part)
        total.ranks.update(report.ranks)
        total.rel_error.update(report.rel_error)
        total.params_before += report.params_before
        total.params += report.params
        total.dropped.update(report.dropped)
    return deltas, total


# ------------------------------------------------------------------------------------------------------------ PEFT
def peft_state_dict(deltas: Mapping, pipe=None) -> dict[str, torch.Tensor]:
    """Canonical LoRAs as a diffusers/PEFT state dict (``unet.<module>.lora_A.weight``) with each alpha / rank folded
    into lora_B, so PEFT's default lora_alpha = r reproduces every layer's scale exactly (no metadata needed).
    With `pipe`, text-encoder paths get ``text_model.`` back where the encoder still has it (transformers < 5)."""
    folded = {}
    for key, d in deltas.items():
        if not isinstance(d, LoRA) or getattr(d, "bias", None) is not None:
            raise InvalidParameterError(f"key {key!r}: a {type(d).__name__} is not a plain LoRA; PEFT adapters hold "
                                        "low-rank factors only (core.adapters.extract.to_lora turns it into one)")
        folded[key] = d if d.scale == 1.0 else dataclasses.replace(d, up=(d.up.float() * d.scale).to(d.up.dtype),
                                                                   alpha=None)
    sd, _ = lora_state_dict(folded, "peft")
    nested = {c for c, m in (pipeline_modules(pipe) if pipe is not None else {}).items()
              if isinstance(getattr(m, "text_model", None), torch.nn.Module)}

    def name(k: str) -> str:
        comp, path = k.split(".", 1)
        return f"{comp}.text_model.{path}" if comp in nested and not path.startswith("text_projection") else k

    return {name(k): v for k, v in sd.items()}


def to_peft(pipe, deltas, adapter_name: str, **load_kwargs) -> list[str]:
    """Load canonical deltas (or any LoRA file / state dict we read) into the pipeline as an unfused PEFT adapter
    through diffusers' load_lora_weights, so set_adapters / fuse_lora / delete_adapters work on it. Every key is
    checked against the modules first (a bad key raises naming it, nothing loaded). Returns the adapted keys."""
    mods = pipeline_modules(pipe)
    index = ModuleIndex(mods)
    if not _is_deltas(deltas):
        deltas, report = read_for(deltas, Target.from_modules(index))
        if report.unmatched:
            raise AdapterMismatchError(f"{report.source}: {len(report.unmatched)} keys match no module of the "
                                       f"pipeline, e.g. {report.unmatched[:5]}")
    for key, d in deltas.items():
        module = index.get(key)
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise AdapterMismatchError(f"key {key!r}: no such module in the pipeline (components {sorted(mods)})")
        if isinstance(d, LoRA) and tuple(weight_shape(d)) != tuple(w.shape):
            raise AdapterMismatchError(f"key {key!r}: LoRA for a weight {tuple(weight_shape(d))}, the module's "
                                       f"weight is {tuple(w.shape)}")
    sd = peft_state_dict(deltas, pipe)
    pipe.load_lora_weights(sd, adapter_name=adapter_name, **load_kwargs)
    loaded = from_peft(pipe, adapter_name)
    missing = [k for k in deltas if k not in loaded]
    if missing:
        raise AdapterMismatchError(f"to_peft: diffusers did not adapt {len(missing)} of {len(deltas)} keys, e.g. "
                                   f"{missing[:5]}; the pipeline class may not load LoRAs into that component")
    return list(deltas)


def from_peft(pipe, adapter_name: str) -> dict[str, LoRA]:
    """Canonical LoRAs of a PEFT adapter living in the pipeline's modules (loaded by diffusers or to_peft), at
    strength 1 (the adapter's lora_alpha, not the weight set_adapters gave it)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp, root in pipeline_modules(pipe).items():
        config = getattr(root, "peft_config", {}).get(adapter_name)
        for name, m in root.named_modules():
            if not isinstance(m, LoraLayer) or adapter_name not in m.lora_A:
                continue
            if m.use_dora.get(adapter_name) or (getattr(m, "lora_bias", {}) or {}).get(adapter_name):
                raise InvalidParameterError(f"{comp}.{name}: adapter {adapter_name!r} uses DoRA or a LoRA bias, which "
                                            "from_peft does not convert yet")
            r = m.r[adapter_name]
            rslora = bool(getattr(config, "use_rslora", False))
            scale = m.lora_alpha[adapter_name] / (r ** 0.5 if rslora else r)
            path = name[len("text_model."):] if name.startswith("text_model.") else name
            out[f"{comp}.{path}"] = LoRA(m.lora_A[adapter_name].weight.detach().clone(),
                                         m.lora_B[adapter_name].weight.detach().clone(), alpha=scale * r)
    if not out:
        raise InvalidParameterError(f"no PEFT adapter named {adapter_name!r} in the pipeline's modules")
    return out


# ----------------------------------------------------------------------------------------------------------- mixin
class LoRAOpsMixin:
    """LoRA loading and operations as pipeline methods, one implementation for every NimbleDiff pipeline class.

    Each load (load_lora, load_acceleration_lora, stack_loras) adds its undo (unfuse or detach) to `_adapters`, which
    unload_loras() calls newest first. `family` names the recipe base the pipeline runs (sd3, flux, ...; None: any
    UNet recipe); `default_recipe` is the acceleration recipe used when a call names none."""

    family: str | None = None
    default_recipe: str | None = None

    # diffusers' DiffusionPipeline.__setattr__ registers config entries: keep LoRA state in the instance dict
    @property
    def recipe(self):
        return self.__dict__.get("_recipe")

    @recipe.setter
    def recipe(self, value) -> None:
        self.__dict__["_recipe"] = value

    def _push_undo(self, undo) -> None:
        self.__dict__.setdefault("_adapters", []).append(undo)

    def load_lora(self, lora, weight: float = 1.0, text_encoder_weight: float | None = None, fuse: bool = True):
        """Fuse (or, fuse=False, attach as forward hooks: instant to add and remove, a few percent slower per
        forward) a LoRA file or state dict of any layout we read, on the denoiser and text encoders; stack by calling
        again. Returns a load report. Every key of every component is validated before the first change, so a LoRA
        for another model raises naming both and leaves the pipeline's outputs as they were."""
        from ..core.adapters.attach import attach_many

        modules = pipeline_modules(self)
        deltas, report = read_for(lora, Target.from_modules(modules))
        te_weight = weight if text_encoder_weight is None else text_encoder_weight
        den = {k: d for k, d in deltas.items() if k.split(".", 1)[0] in _DENOISERS}
        text = {k: d for k, d in deltas.items() if k not in den}
        pairs = [(den, weight), (text, te_weight)]
        source = f"{report.source} ({report.layout} layout)"
        if fuse:
            undo = fuse_many(modules, pairs, source=source, unresolved=report.unmatched).unfuse
        else:
            undo = attach_many(modules, pairs, source=source, unresolved=report.unmatched).detach
        self._push_undo(undo)
        return report

    def load_acceleration_lora(self, lora, recipe: str | None = None, strength: float = 1.0):
        """Load a distillation LoRA (Flash, LCM-LoRA, TCD, ...) and adopt its recipe: sampler, schedule, steps and
        CFG become the defaults of every call. Returns the recipe."""
        from ..core.recipes import RECIPES

        recipe = recipe or self.default_recipe
        if recipe not in RECIPES:
            raise InvalidParameterError(f"recipe={recipe!r} is unknown; valid: {', '.join(RECIPES)}")
        r = RECIPES[recipe]
        if self.family is not None and r.base != self.family:
            fits = [n for n, x in RECIPES.items() if x.base == self.family]
            raise InvalidParameterError(f"recipe {recipe!r} is for {r.base} models but {type(self).__name__} runs "
                                        f"{self.family}; recipes for {self.family}: {', '.join(fits) or 'none yet'}")
        self.load_lora(lora, weight=strength)
        self.recipe = r
        return r

    def stack_loras(self, loras, weights=None, **kwargs) -> FusedAdapters:
        handle = stack_loras(self, loras, weights, **kwargs)
        self._push_undo(handle.unfuse)
        return handle

    def unload_loras(self) -> None:
        """Undo every LoRA loaded with load_lora / load_acceleration_lora / stack_loras, newest first, and forget
        the acceleration recipe."""
        undos = self.__dict__.get("_adapters", [])
        while undos:
            undos.pop()()
        self.recipe = None

    def to_peft(self, deltas, adapter_name: str, **load_kwargs) -> list[str]:
        return to_peft(self, deltas, adapter_name, **load_kwargs)

    def lora_from_peft(self, adapter_name: str) -> dict[str, LoRA]:
        return from_peft(self, adapter_name)

    def extract_lora_from(self, base, **options) -> tuple[dict, RankReport]:
        """The LoRA that turns `base` (a pipeline with the same components) into this pipeline."""
        return extract_from_pipelines(base, self, **options)
