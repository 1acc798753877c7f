"""Quantized UNet / DiT nodes: load a .gguf or NimbleDiff quantized file as MODEL, quantize a MODEL in the graph,
and LoRA on quantized layers.

LoRA on a quantized base: NimbleDiff's LoRA nodes patch any MODEL with ModelPatcher.add_patches. The MODEL these
nodes return is a QuantModelPatcher: when ComfyUI applies a patch to a quantized layer (patch_weight_to_device),
a LoRA becomes a low-rank branch of that layer, y += s * up(down(x)) (lora_mode "branch"), or is folded into the
weight and re-quantized, cached per LoRA set (lora_mode "merge", for stacks of many LoRAs); a full difference
(LoHa, LoKr, DoRA) re-quantizes that one layer. The model is never dequantized as a whole: ComfyUI-GGUF
dequantizes and patches every layer on every forward instead. Unpatching restores the layers exactly.

All comfy imports are inside functions: importing nimblediff outside ComfyUI never imports comfy.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import torch

from ..core.quant.modules import LowRank, QuantConv2d, QuantLinear, QuantModule, quantized_modules
from ..errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError
from .widgets import cfg_input, seed_input

GGUF_SCHEMES = ("gguf_Q8_0", "gguf_Q6_K", "gguf_Q5_K", "gguf_Q4_K", "gguf_Q5_0", "gguf_Q4_0")
LORA_MODES = ("branch", "merge")
_FOLDERS = ("diffusion_models", "unet")


# ------------------------------------------------------------------------------------------------ quant layers
class _StateDictWeight:
    """Mixin: state_dict() also lists ``weight`` (dequantized), as a float layer would. ComfyUI's LoRA nodes read a
    weight's shape (and DoRA its values) from state_dict; loading ignores it (the blocks are the weight)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.active_weight().dequantize(torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ComfyQuantLinear(_StateDictWeight, QuantLinear):
    pass


class ComfyQuantConv2d(_StateDictWeight, QuantConv2d):
    pass


LAYER_CLASSES = (ComfyQuantLinear, ComfyQuantConv2d)


# -------------------------------------------------------------------------------------------- ComfyUI patches
def _entry(e) -> tuple[float, object, float]:
    """(strength, patch, strength_model) of a ModelPatcher.patches entry: (strength_patch, patch, strength_model,
    offset, function) in ComfyUI, (strength, patch) in older patchers."""
    strength, patch = float(e[0]), e[1]
    strength_model = float(e[2]) if len(e) > 2 else 1.0
    if (len(e) > 3 and e[3] is not None) or (len(e) > 4 and e[4] is not None):
        raise AdapterMismatchError("a patch with an offset or a function cannot be applied to a quantized layer")
    return strength, patch, strength_model


def layer_patches(key: str, entries, shape: torch.Size) -> tuple[list[LowRank], torch.Tensor | None]:
    """A quantized layer's ComfyUI patches as (low-rank LoRAs, dense difference or None)."""
    out_f, fan_in = shape[0], shape.numel() // shape[0]
    lowrank, dense = [], None
    for e in entries:
        strength, patch, strength_model = _entry(e)
        if strength_model != 1.0:
            raise AdapterMismatchError(f"{key}: strength_model={strength_model} scales the base weight; not supported "
                                       "on a quantized layer")
        kind, values = ("lora", patch.weights) if hasattr(patch, "weights") else patch
        if kind == "lora":
            up, down, alpha = values[0], values[1], values[2]
            extra = [v for v in values[3:5] if v is not None]  # Tucker core / DoRA scale
            if extra or up.shape[0] != out_f or down[0].numel() != fan_in:
                raise AdapterMismatchError(f"{key}: LoRA up {tuple(up.shape)} / down {tuple(down.shape)} "
                                           f"{'with a Tucker core or DoRA scale ' if extra else ''}does not fit the "
                                           f"quantized weight {tuple(shape)}; load it with NimbleDiff's LoRA nodes")
            r = down.shape[0]
            scale = strength * (float(alpha) / r if alpha is not None else 1.0)
            lowrank.append(LowRank(down.float().reshape(r, *shape[1:]), up.float().reshape(out_f, r), scale, key))
        elif kind == "diff":
            d = strength * values[0].float().reshape(shape)
            dense = d if dense is None else dense + d
        else:
            raise AdapterMismatchError(f"{key}: patch kind {kind!r} cannot be applied to a quantized layer "
                                       "(supported: lora, diff)")
    return lowrank, dense


def attach(layer: QuantModule, key: str, entries, merge: bool) -> None:
    """Apply ComfyUI patches to one quantized layer; the base weight is kept for detach()."""
    lowrank, dense = layer_patches(key, entries, layer.shape)
    base = getattr(layer, "_comfy_base", None) or layer.qweight
    if dense is not None:   # a full difference: this layer only, dequantized, patched and re-quantized
        w = base.dequantize(torch.float32) + dense.to(base.device)
        if not torch.isfinite(w).all():
            raise AdapterMismatchError(f"{key}: the patched weight is not finite")
        object.__setattr__(layer, "_comfy_base", base)
        layer.qweight = base.requantize(w)
    layer.set_lora(lowrank, merge=merge)


def detach(layer: QuantModule) -> None:
    base = getattr(layer, "_comfy_base", None)
    if base is not None:
        layer.qweight = base
        object.__setattr__(layer, "_comfy_base", None)
    layer.clear_lora()


def _layer_of(model: torch.nn.Module, key: str) -> QuantModule | None:
    name, _, leaf = key.rpartition(".")
    if leaf != "weight":
        return None
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, QuantModule) else None


@functools.cache
def _patcher_class():
    import comfy.model_patcher

    class QuantModelPatcher(comfy.model_patcher.ModelPatcher):
        """ModelPatcher whose patches on quantized layers become LoRA branches (or merged re-quantized weights)."""

        lora_mode = "branch"

        def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
            layer = _layer_of(self.model, key)
            if layer is None:
                return super().patch_weight_to_device(key, device_to, inplace_update)
            if key in self.patches:
                attach(layer, key, self.patches[key], merge=self.lora_mode == "merge")

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for layer in quantized_modules(self.model).values():
                    detach(layer)
            return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

        def load(self, *args, force_patch_weights=False, **kwargs):
            # quantized layers are patched in place of a weight copy: always take the patching path
            return super().load(*args, force_patch_weights=True, **kwargs)

        def clone(self, *args, **kwargs):
            n = super().clone(*args, **kwargs)
            n.__class__ = QuantModelPatcher
            n.lora_mode = self.lora_mode
            return n

    return QuantModelPatcher


def quant_patcher(patcher, lora_mode: str = "branch"):
    """A QuantModelPatcher sharing `patcher`'s model."""
    if lora_mode not in LORA_MODES:
        raise InvalidParameterError(f"lora_mode={lora_mode!r}; valid: {list(LORA_MODES)}")
    cls = _patcher_class()
    n = patcher.clone()
    n.__class__ = cls
    n.lora_mode = lora_mode
    return n


# ---------------------------------------------------------------------------------------------------- files
def _roots() -> list[str]:
    try:
        import folder_paths
    except ImportError:  # outside ComfyUI (workflow validation, docs)
        return []
    roots = []
    for kind in _FOLDERS:
        try:
            roots += [p for p in folder_paths.get_folder_paths(kind) if os.path.isdir(p)]
        except KeyError:  # a ComfyUI without this folder kind
            continue
    return list(dict.fromkeys(roots))


def list_quantized() -> list[str]:
    names = set()
    for root in _roots():
        for path, _, files in os.walk(root, followlinks=True):
            names.update(Path(os.path.relpath(os.path.join(path, f), root)).as_posix() for f in files
                         if f.lower().endswith((".gguf", ".safetensors")))
    return sorted(names)


def resolve(name: str) -> Path:
    from ..weights.paths import inside

    for root in _roots():
        path = inside(root, name, "unet_name")
        if path.is_file():
            return path
    raise WeightsFormatError(f"unet_name={name!r}: not found in {_roots()}; choose a file listed in the dropdown "
                             "(.gguf or NimbleDiff quantized .safetensors under models/diffusion_models)")


def read_quantized(path) -> tuple[str, dict]:
    """(architecture, {original-layout key: tensor or QuantizedWeight}) of a .gguf or NimbleDiff quantized file."""
    from ..weights.gguf_io import read_gguf, to_original

    path = Path(path)
    if path.suffix.lower() == ".gguf":
        f = read_gguf(path)
        if f.layout == "original":
            return f.arch, f.tensors
        if f.arch in ("sd15", "sdxl"):
            raise WeightsFormatError(f"{path}: a UNet GGUF with diffusers key names; ComfyUI needs the original (LDM) "
                                     "names, as ComfyUI-GGUF's converter writes them")
        return f.arch, to_original(f.tensors, f.arch)
    return _read_nimblediff(path)


def _read_nimblediff(path: Path) -> tuple[str, dict]:
    from ..core.quant import WEIGHT_KINDS
    from ..core.quant import gguf_weight  # noqa: F401  (registers the GGUF kind)
    from ..weights.arch import detect_lora_arch
    from ..weights.quant_format import read_quant_metadata
    from ..weights.safetensors_io import load_with_metadata

    sd, metadata = load_with_metadata(path)
    layers = read_quant_metadata(path, metadata)
    out = dict(sd)
    for name, e in layers.items():
        if "act_splits" in e:
            raise WeightsFormatError(f"{path}: layer {name!r} quantizes activations (W8A8); the ComfyUI loader runs "
                                     "weight-only files")
        if e.get("kind") not in WEIGHT_KINDS:
            raise WeightsFormatError(f"{path}: layer {name!r} has kind {e.get('kind')!r}; known: {sorted(WEIGHT_KINDS)}")
        prefix = f"{name}.qweight."
        tensors = {k[len(prefix):]: out.pop(k) for k in [k for k in out if k.startswith(prefix)]}
        out[f"{name}.weight"] = WEIGHT_KINDS[e["kind"]].from_tensors(torch.Size(e["shape"]), e.get("config", {}),
                                                                     tensors)
    arch = metadata.get("comfy_arch") or detect_lora_arch({k: None for k in out}).arch
    return arch, out


def build_model(path, lora_mode: str = "branch"):
    """MODEL from a quantized file: ComfyUI builds the model from the file's shapes, then the quantized layers
    replace its Linear / Conv2d layers (all checked before anything is installed)."""
    import comfy.sd

    from ..weights.gguf_io import install

    arch, tensors = read_quantized(path)
    # shapes only: ComfyUI detects the architecture and builds it; the values come from `tensors` below
    shapes = {k: torch.zeros((), dtype=torch.float16).expand(tuple(v.shape)) for k, v in tensors.items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(shapes)
    if patcher is None:
        raise WeightsFormatError(f"{path}: ComfyUI does not recognise this {arch} model from its keys")
    install(patcher.model.diffusion_model, tensors, source=str(path), layer_classes=LAYER_CLASSES)
    return quant_patcher(patcher, lora_mode)


# ------------------------------------------------------------------------------------------------- quantizing
def _scheme(scheme: str):
    """fn(float weight) -> QuantizedWeight, and the GGUF type (None for NimbleDiff schemes)."""
    from ..core.quant.modules import resolve_scheme

    if scheme.startswith("gguf_"):
        from ..core.quant.gguf_weight import gguf_weight_from_float

        qtype = scheme[len("gguf_"):]
        return functools.partial(gguf_weight_from_float, qtype=qtype), qtype
    return resolve_scheme(scheme), None


def _gguf_unfit(model: torch.nn.Module, qtype: str) -> dict:
    """Layers a GGUF type cannot hold (rows not a multiple of its block): they stay float, as in ComfyUI-GGUF."""
    from ..core.quant.gguf_weight import stored_shape_for

    return {n: None for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and stored_shape_for(tuple(m.weight.shape), qtype)
            is None}


def _float_tensors(model: torch.nn.Module) -> dict:
    """Parameters and buffers outside the quantized weights (state_dict() would dequantize every layer)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v.detach() for k, v in named if ".qweight." not in k}


def _plain_layers(module: torch.nn.Module) -> None:
    """ComfyUI builds its models from comfy.ops subclasses of nn.Linear / nn.Conv2d (weight casting, low-VRAM
    offload), and core.quant replaces exact nn.Linear / nn.Conv2d only (a LoRA-wrapped or exotic subclass must stay
    float), so in a real ComfyUI nothing was quantized. On the copy being quantized, comfy's own op layers become the
    plain class they extend: the same parameters, and the quantized layer replaces each of them anyway."""
    for m in module.modules():
        for plain in (torch.nn.Linear, torch.nn.Conv2d):
            if type(m) is not plain and isinstance(m, plain) and type(m).__module__ == "comfy.ops":
                m.__class__ = plain


def model_arch(diffusion_model: torch.nn.Module) -> str:
    """sd15 / sdxl / sd3 / flux / pixart from a ComfyUI diffusion model's (original-layout) names."""
    from ..weights.gguf_io import GGUF_ARCHS, detect_arch

    keys = set(_float_tensors(diffusion_model)) | {f"{n}.weight" for n in quantized_modules(diffusion_model)}
    found = detect_arch(keys)
    if found is None:
        raise InvalidParameterError("this MODEL is not a UNet or DiT NimbleDiff can save quantized (SD1.x, SDXL, "
                                    "SD3, Flux, PixArt)")
    return GGUF_ARCHS[found]


def _calibration_run(patcher, positive, negative, latent, steps: int, cfg: float, seed: int):
    import comfy.sample

    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed)
    return lambda: comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", positive, negative, samples,
                                       seed=seed, disable_pbar=True)


def quantize(model, scheme: str, filename: str, calibrate: bool, positive=None, negative=None, latent=None,
             steps: int = 8, cfg: float = 5.0, seed: int = 0, overwrite: bool = False, progress=None):
    """(quantized MODEL, path, report) for a float MODEL. The input model is not changed (a copy is quantized)."""
    import comfy.model_patcher
    import folder_paths

    from ..core.quant.calibrate import calibrate_model
    from ..core.quant.modules import quantize_model
    from ..weights.gguf_io import write_gguf
    from ..weights.lora_ops import checked_output
    from ..weights.paths import inside
    from ..weights.quant_format import save_quantized

    fn, qtype = _scheme(scheme)
    if calibrate and qtype is not None:
        raise InvalidParameterError(f"scheme={scheme!r} with calibrate=true: GGUF types are written with ggml's own "
                                    "rounding; choose a NimbleDiff scheme (int8, int4_g64, ...) to calibrate")
    if calibrate and (positive is None or negative is None or latent is None):
        raise InvalidParameterError("calibrate=true needs positive, negative and latent_image: calibration samples "
                                    "the model on its own trajectory for these prompts; connect them or set "
                                    "calibrate=false")
    suffix = ".gguf" if qtype else ".safetensors"
    path = inside(folder_paths.get_output_directory(), filename if filename.endswith(suffix) else filename + suffix,
                  "filename")
    path = checked_output(path, overwrite=overwrite, hint="set overwrite to true")
    arch = model_arch(model.model.diffusion_model)
    base = copy.deepcopy(model.model)   # the graph's model stays float
    dm = base.diffusion_model
    _plain_layers(dm)
    per_layer = _gguf_unfit(dm, qtype) if qtype else None
    if calibrate:
        copy_patcher = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device,
                                                        offload_device=model.offload_device)
        run = _calibration_run(copy_patcher, positive, negative, latent, steps, cfg, seed)
        report = calibrate_model(dm, fn, run, per_layer=per_layer, progress=progress)
    else:
        report = {n: {"bits_per_weight": m.qweight.bits_per_weight}
                  for n, m in quantize_model(dm, fn, per_layer=per_layer, progress=progress).items()}
    for m in quantized_modules(dm).values():   # the LoRA nodes read weight shapes from state_dict (see above)
        m.__class__ = ComfyQuantLinear if isinstance(m, QuantLinear) else ComfyQuantConv2d
    if qtype:
        tensors = _float_tensors(dm)
        tensors.update({f"{n}.weight": m.qweight for n, m in quantized_modules(dm).items()})
        write_gguf(path, tensors, arch, qtype)
    else:
        save_quantized(dm, path, extra={"comfy_arch": arch}, overwrite=overwrite)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)
    return quant_patcher(patcher), path, report


# ------------------------------------------------------------------------------------------------------ nodes
class NimbleQuantizedModelLoader:
    """Loads a quantized UNet / DiT (.gguf from ComfyUI-GGUF or llama.cpp, or a NimbleDiff quantized file)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (list_quantized(), {"tooltip": "a .gguf or NimbleDiff quantized .safetensors file under "
                                                        "models/diffusion_models"}),
            "lora_mode": (list(LORA_MODES), {"tooltip": "how LoRAs patch the quantized layers: branch = a low-rank "
                                                        "branch per layer (exact, cheap for one or two LoRAs); "
                                                        "merge = folded in and re-quantized once per LoRA set"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "NimbleDiff/quantization"
    DESCRIPTION = ("Quantized UNet / DiT loader: weights stay quantized and are dequantized one layer at a time; "
                   "LoRA nodes work on it without dequantizing the model.")

    def load(self, unet_name, lora_mode="branch"):
        return (build_model(resolve(unet_name), lora_mode),)


class NimbleQuantizeModel:
    """Quantizes a MODEL (optionally calibrated on its own sampling trajectory) and saves it to the output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..core.quant import schemes  # noqa: F401  (fills SCHEMES)
        from ..core.quant.modules import SCHEMES

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model to quantize (it is copied; this one is not changed)"}),
                "scheme": (sorted(SCHEMES) + list(GGUF_SCHEMES), {"default": "int8", "tooltip": (
                    "weight format: NimbleDiff schemes (int8, int4, nf4, ...) or GGUF types (saved as .gguf)")}),
                "filename": ("STRING", {"default": "quantized/model",
                                        "tooltip": "file name inside ComfyUI's output folder"}),
                "calibrate": ("BOOLEAN", {"default": True, "tooltip": "Q-Diffusion-style calibration on the "
                                                                      "model's own sampling trajectory"}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 100,
                                  "tooltip": "sampling steps of the calibration trajectory"}),
                "cfg": cfg_input(5.0, "guidance of the calibration trajectory"),
                "seed": seed_input("noise seed of the calibration trajectory", maximum=0xFFFFFFFF),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing file of that name"}),
            },
            "optional": {"positive": ("CONDITIONING", {"tooltip": "calibration prompt"}),
                         "negative": ("CONDITIONING", {"tooltip": "calibration negative prompt"}),
                         "latent_image": ("LATENT", {"tooltip": "calibration latent size"})},
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "quantize"
    CATEGORY = "NimbleDiff/quantization"
    DESCRIPTION = "Quantizes the model (a copy), saves it under output/, and returns the quantized MODEL."

    def quantize(self, model, scheme, filename, calibrate, steps, cfg, seed, overwrite, positive=None, negative=None,
                 latent_image=None):
        import comfy.utils

        bar = None

        def progress(i, total, name):
            nonlocal bar
            bar = bar or comfy.utils.ProgressBar(total)
            bar.update_absolute(i, total)

        qmodel, path, report = quantize(model, scheme, filename, calibrate, positive, negative, latent_image, steps,
                                        cfg, seed, overwrite, progress)
        layers = {k: v for k, v in report.items() if not k.startswith("_")}
        bpw = sum(v.get("bits_per_weight", 0) for v in layers.values()) / max(1, len(layers))
        return (qmodel, json.dumps({"file": str(path), "layers": len(layers), "mean_bits_per_weight": bpw}))


NODES = {
    "NimbleQuantizedModelLoader": (NimbleQuantizedModelLoader, "NimbleDiff Quantized Model Loader (GGUF / NimbleDiff)"),
    "NimbleQuantizeModel": (NimbleQuantizeModel, "NimbleDiff Quantize Model"),
}
