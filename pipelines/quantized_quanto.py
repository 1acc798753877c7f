"""optimum-quanto checkpoints (diffusers' `QuantoConfig` folders, or `quanto.quantize` + safetensors files) as
diffusers denoisers on NimbleDiff's quantized layers, without quanto installed (weights/quanto_io.py).

    transformer = load_quanto_denoiser("sd3-quanto-int8/transformer")      # the folder save_pretrained wrote
    pipe = StableDiffusion3Pipeline.from_pretrained(base, transformer=transformer, ...)

int8 layers run NimbleDiff's int8 kernel on the file's own codes and scales; int4 layers its int4 kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidParameterError, WeightsFormatError
from ..weights.gguf_io import install
from ..weights.quanto_io import quanto_files, read_quanto
from .quantized_gguf import empty_denoiser

__all__ = ["load_quanto_denoiser", "load_quanto_into"]


def load_quanto_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a quanto checkpoint into an existing diffusers denoiser (in place, all or nothing); returns it."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    install(model, read_quanto(path, shapes), source=str(path))
    return model


def load_quanto_denoiser(path, config=None, *, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers UNet / transformer from a quanto checkpoint: `path` a component folder (config.json beside the
    safetensors, as diffusers saves a QuantoConfig model) or a safetensors file with `config` (a config dict or a
    component folder). Unquantized tensors are cast to `torch_dtype`."""
    _, folder_config = quanto_files(path)
    cfg = folder_config if config is None else config
    if isinstance(cfg, (str, Path)):
        _, cfg = quanto_files(cfg)
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise InvalidParameterError(f"{path}: no model config; pass config= (a config dict with _class_name or the "
                                    "component folder holding config.json)")
    method = (cfg.get("quantization_config") or {}).get("quant_method", "quanto")
    if method != "quanto":
        raise WeightsFormatError(f"{path}: config says quant_method={method!r}, not 'quanto'")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model = empty_denoiser(cfg, cfg["_class_name"], torch_dtype)
    return load_quanto_into(model, path).eval()
