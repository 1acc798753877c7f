"""GGUF UNets and transformers in diffusers: build the denoiser from its config and load a .gguf into it.

Quantized Linear / Conv2d weights stay as their GGUF blocks (`QuantLinear` / `QuantConv2d` over `GGUFWeight`) and
are dequantized one layer at a time in the forward, as diffusers' own GGUF loading does. The file may use diffusers
or original key names (ComfyUI-GGUF / llama.cpp files are original); K-quants and ComfyUI-GGUF's flattened conv
kernels load too. The model is built without weights (accelerate's init_empty_weights), so no float copy of the
quantized layers is ever made.

    unet = load_gguf_denoiser("sd15-Q4_K.gguf", "path/to/sd15-diffusers-folder")
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=unet)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidParameterError, WeightsFormatError
from ..weights.gguf_io import install, read_gguf, to_diffusers

__all__ = ["load_gguf_denoiser", "load_gguf_into", "empty_denoiser", "denoiser_from_checkpoint", "install_checkpoint",
           "DENOISER_CLASSES"]

# architecture -> (diffusers class name, pipeline sub-folder)
DENOISER_CLASSES = {"sd15": ("UNet2DConditionModel", "unet"), "sdxl": ("UNet2DConditionModel", "unet"),
                    "sd3": ("SD3Transformer2DModel", "transformer"), "flux": ("FluxTransformer2DModel", "transformer"),
                    "pixart": ("PixArtTransformer2DModel", "transformer")}


def load_gguf_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a GGUF file into an existing diffusers denoiser (in place, all or nothing); returns the model."""
    f = read_gguf(path)
    install(model, to_diffusers(f, model), source=str(path))
    return model


def _config(config, subfolder: str) -> dict:
    if isinstance(config, dict):
        return dict(config)
    folder = Path(config)
    for candidate in (folder / subfolder / "config.json", folder / "config.json", folder):
        if candidate.is_file():
            import json

            return json.loads(candidate.read_text(encoding="utf-8"))
    raise WeightsFormatError(f"{config}: no {subfolder}/config.json or config.json; pass the diffusers pipeline "
                             f"folder, the {subfolder} folder, or its config dict")


def empty_denoiser(cfg: dict, cls_name: str, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The diffusers class `cls_name` built from `cfg` with parameters on the meta device (buffers such as position
    tables computed as usual), for `install` to fill: no float copy of quantized layers is ever made."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, str(cls_name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise InvalidParameterError(f"_class_name {cls_name!r} is not a diffusers model class (e.g. "
                                    "UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)")
    with init_empty_weights():
        model = cls.from_config(cfg)
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
    return model


def install_checkpoint(model: torch.nn.Module, path, read) -> torch.nn.Module:
    """Fill an existing diffusers denoiser (in place, all or nothing) from the checkpoint at `path`, read by
    `read(path, shapes)` (weights.quanto_io.read_quanto, weights.torchao_io.read_torchao: the model's parameter
    shapes in, its state dict with quantized tensors out); returns the model."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    install(model, read(path, shapes), source=str(path))
    return model


def denoiser_from_checkpoint(path, config, torch_dtype, method: str, files, read) -> torch.nn.Module:
    """A diffusers denoiser built empty from a config and filled by install_checkpoint(model, path, read): the
    config is the checkpoint folder's own (files(path) -> (files, config)) unless `config` (a dict or a component
    folder) is given; a config naming another quantization method than `method` is refused."""
    _, cfg = files(path)
    if config is not None:
        cfg = config if isinstance(config, dict) else files(config)[1]
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise InvalidParameterError(f"{path}: no model config; pass config= (a config dict with _class_name or the "
                                    "component folder holding config.json)")
    found = (cfg.get("quantization_config") or {}).get("quant_method", method)
    if found != method:
        raise WeightsFormatError(f"{path}: config says quant_method={found!r}, not {method!r}")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model = empty_denoiser(cfg, cfg["_class_name"], torch_dtype)
    return install_checkpoint(model, path, read).eval()


def load_gguf_denoiser(path, config, *, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers UNet / transformer built from `config` (a pipeline folder, a component folder or a config dict)
    with the weights of the GGUF file at `path`. Unquantized tensors are cast to `torch_dtype`."""
    f = read_gguf(path)
    cls_name, subfolder = DENOISER_CLASSES[f.arch]
    cfg = _config(config, subfolder)
    named = cfg.get("_class_name", cls_name)
    if named not in (cls_name, "Transformer2DModel"):
        raise InvalidParameterError(f"{path} holds a {f.arch} denoiser ({cls_name}) but the config is for {named}")
    model = empty_denoiser(cfg, cls_name, torch_dtype)
    install(model, to_diffusers(f, model), source=str(path))
    return model.eval()
