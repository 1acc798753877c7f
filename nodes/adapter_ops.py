"""LoRA operation nodes: a validated stack, per-block strengths, and resize / prune / merge / extract to a new file.

Patching nodes (Stack, Block Weights) read every LoRA and build every patch before the MODEL/CLIP are cloned, so a bad
slot raises naming it and the graph's inputs stay untouched (they are never mutated; ComfyUI computes the patched
weights lazily from the clone's patches). File nodes write into ComfyUI's ``models/loras`` folder and refuse to
replace an existing file unless their ``overwrite`` input is true, and never write over one of their inputs.

Host-free file helpers (output paths, carried metadata, chunked runs with progress) live in weights/lora_ops.py,
shared with cli.py.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import AdapterMismatchError, InvalidParameterError, NimbleDiffError, WeightsFormatError
from ..weights.lora_ops import (DYNAMIC_METHODS, LAYOUTS, carried_metadata, check_merge_keys, describe_file,
                                extract_chunked, merge_metadata, merge_with_progress, output_path, rank_selection,
                                read_same_base, require_complete, save_deltas)
from .adapters import (CLIP_TIP, LORA_NAME_TIP, MODEL_TIP, STRENGTH, STRENGTH_CLIP_TIP, STRENGTH_MODEL_TIP,
                       comfy_patches, comfy_target, lora_choices, lora_path)
from .widgets import seed_input

log = logging.getLogger("nimblediff")

NONE = "None"
SLOTS = 4
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BUDGETS = ("fraction", "params", "megabytes")


def _comfy_progress(total: int):
    """A progress callback for ComfyUI's bar that also honours the Cancel button; None outside ComfyUI."""
    try:
        import comfy.model_management
        import comfy.utils
    except ImportError:
        return None
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return update


def _target(model, clip, label: str = "model"):
    """nodes/adapters.comfy_target, its error prefixed with the input's name."""
    try:
        return comfy_target(model, clip)
    except AdapterMismatchError as exc:
        raise AdapterMismatchError(f"{label}: {exc}") from exc


def _loras_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def _output(filename: str, overwrite: bool, inputs: Sequence = ()) -> Path:
    return output_path(_loras_folder(), filename, overwrite=overwrite, inputs=inputs)


def _slot(name: str, label: str) -> str | None:
    """The file of a LoRA slot, or None for "None"."""
    if name in (None, "", NONE):
        return None
    try:
        return lora_path(name)
    except Exception as exc:  # folder_paths raises FileNotFoundError / KeyError for names it does not know
        raise WeightsFormatError(f"{label}={name!r}: no such LoRA in models/loras ({exc})") from exc


def lora_patch_set(model, clip, path: str, target, deltas: dict | None = None, label: str = "lora"):
    """Validated ComfyUI patches of one LoRA file (or of `deltas` already read from it): (unet patches, clip patches,
    report). Raises naming `label` and the file when nothing matches; warns with counts on a partial match. This is
    nodes/adapters.load_lora without the patching, so several LoRAs can be validated before any clone."""
    from ..weights.lora_formats import read_lora

    try:
        report = None
        if deltas is None:
            deltas, report = read_lora(path, target)
        unet_patches, clip_patches, unmatched = comfy_patches(deltas, model, clip, target)
    except NimbleDiffError as exc:
        raise type(exc)(f"{label}: {exc}") from exc
    unmatched = (report.unmatched if report is not None else []) + unmatched
    total = len(deltas) + (len(report.unmatched) if report is not None else 0)
    if not unet_patches and not clip_patches and deltas:
        raise AdapterMismatchError(f"{label}: {path}: none of its {total} modules matches the model"
                                   + ("" if clip is not None else " (no CLIP connected)")
                                   + f"; unmatched: {unmatched[:10]}")
    if unmatched:
        log.warning("NimbleDiff: %s: %s: %d of %d modules match nothing and are skipped, e.g. %s", label, path,
                    len(unmatched), total, unmatched[:5])
    return unet_patches, clip_patches, report


def patch_all(model, clip, sets: Sequence[tuple[dict, dict, float, float]]):
    """Clone MODEL and CLIP once and add every (unet patches, clip patches, strength_model, strength_clip) set, in
    order (the same patches as applying the LoRAs one after another). Inputs untouched; unchanged ones returned."""
    new_model, new_clip = model, clip
    if model is not None and any(u and sm != 0 for u, _, sm, _ in sets):
        new_model = model.clone()
        for u, _, sm, _ in sets:
            if u and sm != 0:
                new_model.add_patches(u, sm)
    if clip is not None and any(c and sc != 0 for _, c, _, sc in sets):
        new_clip = clip.clone()
        for _, c, _, sc in sets:
            if c and sc != 0:
                new_clip.add_patches(c, sc)
    return new_model, new_clip


def parse_block_spec(spec: str) -> dict[str, float]:
    """'input.1=0.5, output.0=0; unet.up_blocks.1.attentions.0=1.2' -> {name: weight} (names checked by core)."""
    out = {}
    for entry in [e.strip() for e in spec.replace("\n", ",").replace(";", ",").split(",")]:
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not name.strip() or weight is None or not math.isfinite(weight):
            raise InvalidParameterError(f"blocks: entry {entry!r}; expected name=number, e.g. 'input.1=0.5' or "
                                        "'unet.up_blocks.1.attentions.0=0'")
        out[name.strip()] = weight
    return out


DYNAMIC_TIP = ("rank per layer: none (the fixed rank) or a spectrum threshold with dynamic_param: sv_ratio (keep "
               "sigma >= sigma_max / param), sv_fro / sv_cumulative / energy (keep that share, 0-1)")
DYNAMIC_PARAM_TIP = "the threshold of dynamic_method (ignored with none)"

def _strength(label: str) -> tuple:
    tip = STRENGTH_CLIP_TIP if label.startswith("strength_clip") else STRENGTH_MODEL_TIP
    return (label, ("FLOAT", {**STRENGTH, "tooltip": tip}))


def _block(label: str) -> tuple:
    part = label.replace("unet_", "UNet ").replace("dit_", "DiT ").replace("_", " ")
    return (label, ("FLOAT", {**STRENGTH, "step": 0.05, "tooltip": f"strength multiplier of the {part} blocks "
                              "(times strength_model; 0 leaves them out)"}))


def _file_inputs(default_name: str) -> dict:
    return {
        "filename": ("STRING", {"default": default_name, "tooltip": "file name inside models/loras"}),
        "layout": (list(LAYOUTS), {"default": "kohya", "tooltip": "key layout of the written file: kohya "
                                   "(A1111 / most tools), comfyui (LoraSave), peft (diffusers)"}),
        "dtype": (list(DTYPES), {"default": "fp16", "tooltip": "dtype of the written tensors"}),
        "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing file of that name"}),
    }


# ---------------------------------------------------------------------------------------------------------- nodes
class LoRAStack:
    """Up to four LoRAs (e.g. a distillation LoRA plus style LoRAs) validated together, then applied in one step."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Up to four LoRAs (e.g. an acceleration LoRA plus style LoRAs), each with model and clip "
                   "strengths, read and validated together and applied to one copy of MODEL / CLIP; a bad slot is "
                   "named and nothing is applied.")
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        required = {"model": ("MODEL", {"tooltip": MODEL_TIP})}
        for i in range(1, SLOTS + 1):
            required[f"lora_{i}"] = ([NONE, *lora_choices()], {"default": NONE, "tooltip": (
                f"LoRA slot {i}: a file in models/loras, or None for an empty slot")})
            required.update([_strength(f"strength_model_{i}"), _strength(f"strength_clip_{i}")])
        return {"required": required, "optional": {"clip": ("CLIP", {"tooltip": CLIP_TIP + "; leave unconnected for "
                                                                       "model-only LoRAs"})}}

    def apply(self, model, clip=None, **slots):
        target = _target(model, clip)
        sets, lines = [], []
        for i in range(1, SLOTS + 1):
            label = f"lora_{i}"
            path = _slot(slots.get(label, NONE), label)
            if path is None:
                continue
            sm, sc = float(slots.get(f"strength_model_{i}", 1.0)), float(slots.get(f"strength_clip_{i}", 1.0))
            u, c, report = lora_patch_set(model, clip, path, target, label=f"{label} ({slots[label]})")
            sets.append((u, c, sm, sc))
            lines.append(f"{label}: model x{sm:g} ({len(u)} weights), clip x{sc:g} ({len(c)} weights); "
                         f"{report.summary()}")
        new_model, new_clip = patch_all(model, clip, sets)
        return (new_model, new_clip, "\n".join(lines) or "no LoRA selected")


class LoRABlockWeights:
    """One LoRA with a strength per block: UNet input / middle / output, DiT double / single stream; `blocks` refines
    them ('input.1=0.5, output.0=0', numbered blocks or module-path prefixes). Weight 0 leaves a block out."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("One LoRA with a strength per block group (UNet input / middle / output, DiT double / single "
                   "stream) and optional per-block specs such as 'input.1=0.5'; weight 0 leaves a block out.")
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "apply"
    GROUPS = {"unet_input": "input", "unet_middle": "middle", "unet_output": "output", "dit_double": "double",
              "dit_single": "single"}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": MODEL_TIP}), "clip": ("CLIP", {"tooltip": CLIP_TIP}),
            "lora_name": (lora_choices(), {"tooltip": LORA_NAME_TIP}),
            **dict([_strength("strength_model"), _strength("strength_clip")]),
            **dict(_block(name) for name in cls.GROUPS),
            "blocks": ("STRING", {"default": "", "multiline": True,
                                  "tooltip": "finer weights, e.g. 'input.1=0.5, output.0=0, text_encoder.11=0'"}),
        }}

    def apply(self, model, clip, lora_name, strength_model, strength_clip, unet_input=1.0, unet_middle=1.0,
              unet_output=1.0, dit_double=1.0, dit_single=1.0, blocks=""):
        from ..core.adapters.delta import Diff, LoRA
        from ..core.adapters.merge import block_of, scale_blocks
        from ..weights.lora_formats import read_lora

        path = lora_path(lora_name)
        target = _target(model, clip)
        values = dict(unet_input=unet_input, unet_middle=unet_middle, unet_output=unet_output,
                      dit_double=dit_double, dit_single=dit_single)
        table = {self.GROUPS[k]: float(v) for k, v in values.items()}
        table.update(parse_block_spec(blocks or ""))
        try:
            deltas, report = read_lora(path, target)
            other = next(((k, type(d).__name__) for k, d in deltas.items() if not isinstance(d, (LoRA, Diff))), None)
            if other is not None:  # core.adapters.merge.scale_delta scales LoRA and Diff layers only (so far)
                raise InvalidParameterError(f"{path}: layer {other[0]!r} is a {other[1]}; per-block weights support "
                                            "LoRA and full-difference layers; use NimbleLoRAStack for this file")
            scaled = scale_blocks(deltas, table)
        except NimbleDiffError as exc:
            raise type(exc)(f"lora_name ({lora_name}): {exc}") from exc
        counts = Counter(block_of(k) for k in deltas)
        kept = Counter(block_of(k) for k in scaled)
        summary = "; ".join(f"{g}: {n} layers x{table.get(g, 1.0):g}" + (f", {n - kept[g]} left out" if kept[g] < n
                                                                          else "") for g, n in counts.items())
        if not scaled:
            return (model, clip, f"every block of {lora_name} is at weight 0: nothing applied ({summary})")
        u, c, _ = lora_patch_set(model, clip, path, target, deltas=scaled, label=f"lora_name ({lora_name})")
        new_model, new_clip = patch_all(model, clip, [(u, c, float(strength_model), float(strength_clip))])
        return (new_model, new_clip, f"{report.summary()}\n{summary}")


class LoRAResize:
    """A LoRA file resized layer by layer (kohya resize_lora): a fixed rank, or a spectrum threshold capped by rank."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Writes a resized copy of a LoRA to models/loras: a fixed rank per layer, or a rank chosen per "
                   "layer from its singular values (sv_ratio, sv_fro, sv_cumulative, energy).")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "resize"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (lora_choices(), {"tooltip": LORA_NAME_TIP}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "new rank (the maximum with a method)"}),
            "dynamic_method": (list(DYNAMIC_METHODS), {"default": "none", "tooltip": DYNAMIC_TIP}),
            "dynamic_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01,
                                        "tooltip": "sv_ratio: >= 1; sv_fro / sv_cumulative / energy: in (0, 1]"}),
            **_file_inputs("resized_lora"),
        }}

    def resize(self, lora_name, rank, dynamic_method, dynamic_param, filename, layout, dtype, overwrite):
        from ..core.adapters.rank import resize_lora
        from ..weights.lora_formats import Target, read_lora

        src = lora_path(lora_name)
        out = _output(filename, overwrite, [src])
        deltas, report = read_lora(src)
        require_complete(report)
        small, rank_report = resize_lora(deltas, **rank_selection(rank, dynamic_method, dynamic_param))
        meta = carried_metadata([report.metadata], "resize", dict(source=Path(src).name, rank=rank,
                                                                  dynamic_method=dynamic_method,
                                                                  dynamic_param=dynamic_param))
        path = save_deltas(small, out, layout, dtype=DTYPES[dtype], overwrite=overwrite, metadata=meta,
                           target=Target.for_arch(report.arch))
        return (f"{describe_file(path)}\n{rank_report.summary()}",)


class LoRAPrune:
    """A LoRA file pruned to one global budget: the best rank-1 components across all layers are kept."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Writes a pruned copy of a LoRA to models/loras: the best rank-1 components of all layers under "
                   "one budget (fraction, parameter count or megabytes), so important layers keep more rank.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "prune"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..core.adapters.rank import SCORES

        return {"required": {
            "lora_name": (lora_choices(), {"tooltip": LORA_NAME_TIP}),
            "budget": (list(BUDGETS), {"default": "fraction", "tooltip": (
                "what amount measures: a fraction of the parameters, a number of parameters, or megabytes")}),
            "amount": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1e12, "step": 0.01,
                                 "tooltip": "fraction of the parameters (0-1], a parameter count, or megabytes "
                                            "(10^6 bytes) of factors in the chosen dtype"}),
            "score": (list(SCORES), {"default": "relative", "tooltip": (
                "how rank-1 components are ranked across layers: relative (share of its layer), "
                "energy (squared singular value), sv (singular value)")}),
            "min_rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                 "tooltip": "components every layer keeps whatever the budget"}),
            **_file_inputs("pruned_lora"),
        }}

    def prune(self, lora_name, budget, amount, score, min_rank, filename, layout, dtype, overwrite):
        from ..core.adapters.rank import prune_to_budget
        from ..weights.lora_formats import Target, read_lora

        if budget not in BUDGETS:
            raise InvalidParameterError(f"budget={budget!r}; valid: {', '.join(BUDGETS)}")
        src = lora_path(lora_name)
        out = _output(filename, overwrite, [src])
        kwargs = {"fraction": {"fraction": float(amount)}, "params": {"params": int(amount)},
                  "megabytes": {"max_bytes": int(amount * 1e6)}}[budget]
        deltas, report = read_lora(src)
        require_complete(report)
        small, rank_report = prune_to_budget(deltas, dtype=DTYPES[dtype], score=score, min_rank=min_rank, **kwargs)
        meta = carried_metadata([report.metadata], "prune", dict(source=Path(src).name, budget=budget,
                                                                 amount=amount, score=score, min_rank=min_rank))
        path = save_deltas(small, out, layout, dtype=DTYPES[dtype], overwrite=overwrite, metadata=meta,
                           target=Target.for_arch(report.arch))
        return (f"{describe_file(path)}\n{rank_report.summary()}",)


class LoRAMerge:
    """Up to four LoRA files merged into a new file: linear, TIES, DARE, magnitude pruning or 'cat'; rank > 0 turns
    the merged update back into a LoRA of at most that rank (SVD), rank 0 keeps the full differences."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Merges up to four LoRA files into a new file in models/loras: linear, TIES, DARE, magnitude "
                   "pruning or concatenation; rank > 0 turns the merge back into a LoRA of at most that rank.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "merge"
    OUTPUT_NODE = True
    METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")  # darex_q needs inputs

    @classmethod
    def INPUT_TYPES(cls):
        required = {}
        for i in range(1, SLOTS + 1):
            required[f"lora_{i}"] = ([NONE, *lora_choices()], {"default": NONE, "tooltip": (
                f"LoRA {i} to merge: a file in models/loras, or None")})
            required[f"weight_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": f"weight of LoRA {i} in the merge"})
        required.update({
            "method": (list(cls.METHODS), {"default": "linear", "tooltip": (
                "linear: weighted sum; ties / dare_*: resolve sign conflicts / drop and rescale "
                "(density); magnitude_prune: keep the largest; cat: concatenate the factors")}),
            "density": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "fraction kept by ties / dare / magnitude_prune"}),
            "seed": seed_input("seed of DARE's drop masks and of the randomized SVD"),
            "rank": ("INT", {"default": 32, "min": 0, "max": 1024, "tooltip": "0: save full differences"}),
            **_file_inputs("merged_lora"),
        })
        return {"required": required}

    def merge(self, method, density, seed, rank, filename, layout, dtype, overwrite, **slots):
        from ..weights.lora_formats import Target

        if method not in self.METHODS:
            raise InvalidParameterError(f"method={method!r}; valid: {', '.join(self.METHODS)}")
        if rank == 0 and layout == "peft" and method != "cat":
            raise InvalidParameterError("rank=0 keeps full differences, which the peft layout cannot hold; choose "
                                        "layout kohya or comfyui, or a rank > 0")
        chosen = [(f"lora_{i}", _slot(slots.get(f"lora_{i}", NONE), f"lora_{i}"), float(slots.get(f"weight_{i}", 1.0)))
                  for i in range(1, SLOTS + 1)]
        chosen = [(label, p, w) for label, p, w in chosen if p is not None]
        if not chosen:
            raise InvalidParameterError("lora_1..lora_4 are all None; choose at least one LoRA to merge")
        out = _output(filename, overwrite, [p for _, p, _ in chosen])
        adapters, reports = read_same_base([p for _, p, _ in chosen])
        for r in reports:
            require_complete(r)
        check_merge_keys(adapters, reports)
        weights = [w for *_, w in chosen]
        total = len(dict.fromkeys(k for a in adapters for k in a))
        merged, report = merge_with_progress(adapters, weights, method, density=density, seed=seed,
                                       rank=rank or None, progress=_comfy_progress(total))
        meta = merge_metadata(reports, " + ".join(f"{w:g} x {Path(p).name}" for _, p, w in chosen), merged,
                              method=method, density=density, seed=seed, rank=rank or None)
        path = save_deltas(merged, out, layout, dtype=DTYPES[dtype], overwrite=overwrite, metadata=meta,
                           target=Target.for_arch(reports[0].arch))
        lines = [describe_file(path), f"{method} of {len(chosen)} LoRAs, {len(merged)} layers"]
        if report.rank is not None:
            lines.append(report.rank.summary())
        return ("\n".join(lines),)


class LoRAExtract:
    """A LoRA file from a fine-tuned MODEL minus its base MODEL (both with their patches applied), SVD per layer."""

    CATEGORY = "NimbleDiff/adapters"
    DESCRIPTION = ("Writes a LoRA to models/loras that turns base_model into tuned_model: the difference of each "
                   "layer, reduced by SVD to a fixed rank or a spectrum threshold.")
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    FUNCTION = "extract"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tuned_model": ("MODEL", {"tooltip": "the fine-tuned model (its patches applied)"}),
            "base_model": ("MODEL", {"tooltip": "the model it was fine-tuned from"}),
            "rank": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "rank (the maximum with a method)"}),
            "dynamic_method": (list(DYNAMIC_METHODS), {"default": "none", "tooltip": DYNAMIC_TIP}),
            "dynamic_param": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.01,
                                         "tooltip": DYNAMIC_PARAM_TIP}),
            "clamp_quantile": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 1.0, "step": 0.001,
                                         "tooltip": "1 = exact; kohya clamps outliers at 0.99"}),
            "min_diff": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001,
                                   "tooltip": "skip layers whose largest |difference| is at most this"}),
            **_file_inputs("extracted_lora"),
        }}

    def extract(self, tuned_model, base_model, rank, dynamic_method, dynamic_param, clamp_quantile, min_diff,
                filename, layout, dtype, overwrite):
        out = _output(filename, overwrite)
        target = _target(base_model, None, "base_model")
        tuned = _denoiser_weights(tuned_model, target, "tuned_model", copy=True)  # copied: a clone shares weights
        base = _denoiser_weights(base_model, target, "base_model", copy=False)
        deltas, report = extract_chunked(
            base, tuned, component=target.denoiser, progress=_comfy_progress(len(base)),
            clamp_quantile=None if clamp_quantile >= 1 else clamp_quantile, min_diff=min_diff, dtype=torch.float32,
            **rank_selection(rank, dynamic_method, dynamic_param))
        if not deltas:
            raise InvalidParameterError(f"tuned_model and base_model do not differ in any of their {len(base)} layers "
                                        f"(by more than min_diff={min_diff}); nothing to extract")
        meta = carried_metadata([], "extract", dict(rank=rank, dynamic_method=dynamic_method,
                                                    dynamic_param=dynamic_param, clamp_quantile=clamp_quantile,
                                                    min_diff=min_diff))
        path = save_deltas(deltas, out, layout, dtype=DTYPES[dtype], overwrite=overwrite, metadata=meta,
                           target=target)
        return (f"{describe_file(path)}\n{report.summary()}",)


def _denoiser_weights(model, target, label: str, copy: bool) -> dict[str, torch.Tensor]:
    """{diffusers module.weight: tensor} of a MODEL's UNet or DiT with its patches applied, as ComfyUI's LoraSave reads
    it. A DiT's fused ComfyUI weights (qkv, Flux's linear1, adaLN in (shift, scale) order) are cut into the diffusers
    modules (weights/comfy_keys.py), so the extracted LoRA has diffusers names like any other DiT LoRA."""
    import comfy.model_management

    slots = getattr(target, "slots", None)
    if target.unet_map is None and slots is None:
        raise InvalidParameterError(f"{label}: neither a UNet with an LDM layout nor a DiT NimbleDiff knows; LoRA "
                                    "extraction in ComfyUI supports SD1.x / SD2.x / SDXL UNets and Flux / SD3 / "
                                    "PixArt; use `nimblediff lora extract` on diffusers folders for other models")
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    prefix = "diffusion_model."
    state = model.model_state_dict(filter_prefix=prefix)
    if slots is not None:
        from ..weights.comfy_keys import slot_rows

        return {f"{key.split('.', 1)[1]}.weight": slot_rows(state[f"{s.key}.weight"], s).detach().to("cpu", copy=copy)
                for key, s in slots.items() if f"{s.key}.weight" in state}
    out, unnamed = {}, []
    for key, value in state.items():
        if not key.endswith(".weight") or not isinstance(value, torch.Tensor) or value.ndim not in (2, 4):
            continue
        name = target.unet_map.to_a(key[len(prefix):-len(".weight")])
        if name is None:
            unnamed.append(key)
            continue
        out[f"{name}.weight"] = value.detach().to("cpu", copy=copy)
    if unnamed:
        log.warning("NimbleDiff: %s: %d weights have no diffusers name and are not extracted, e.g. %s", label,
                    len(unnamed), unnamed[:5])
    return out


NODES = {
    "NimbleLoRAStack": (LoRAStack, "NimbleDiff LoRA Stack"),
    "NimbleLoRABlockWeights": (LoRABlockWeights, "NimbleDiff LoRA Block Weights"),
    "NimbleLoRAResize": (LoRAResize, "NimbleDiff LoRA Resize (save)"),
    "NimbleLoRAPrune": (LoRAPrune, "NimbleDiff LoRA Prune to Budget (save)"),
    "NimbleLoRAMerge": (LoRAMerge, "NimbleDiff LoRA Merge (save)"),
    "NimbleLoRAExtract": (LoRAExtract, "NimbleDiff LoRA Extract from Models (save)"),
}
