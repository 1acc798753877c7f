"""torchao checkpoints (diffusers' `TorchAoConfig` folders) as diffusers denoisers on NimbleDiff's quantized layers
(weights/torchao_io.py; needs torchao installed to unpickle its tensor classes).

    transformer = load_torchao_denoiser("sd3-torchao-int8/transformer")    # the folder save_pretrained wrote
"""

from __future__ import annotations

import torch

from ..errors import InvalidParameterError, WeightsFormatError
from ..weights.gguf_io import install
from ..weights.torchao_io import read_torchao, torchao_files
from .quantized_gguf import empty_denoiser

__all__ = ["load_torchao_denoiser", "load_torchao_into"]


def load_torchao_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a torchao checkpoint into an existing diffusers denoiser (in place, all or nothing); returns it."""
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    install(model, read_torchao(path, shapes), source=str(path))
    return model


def load_torchao_denoiser(path, config=None, *, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers UNet / transformer from a torchao checkpoint folder (config.json beside the .bin files) or a
    .bin / .pt file with `config` (a config dict or the component folder)."""
    _, folder_config = torchao_files(path)
    cfg = folder_config if config is None else config
    if not isinstance(cfg, dict):
        cfg = torchao_files(cfg)[1] if cfg is not None else None
    if not isinstance(cfg, dict) or "_class_name" not in cfg:
        raise InvalidParameterError(f"{path}: no model config; pass config= (a config dict with _class_name or the "
                                    "component folder holding config.json)")
    method = (cfg.get("quantization_config") or {}).get("quant_method", "torchao")
    if method != "torchao":
        raise WeightsFormatError(f"{path}: config says quant_method={method!r}, not 'torchao'")
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model = empty_denoiser(cfg, cfg["_class_name"], torch_dtype)
    return load_torchao_into(model, path).eval()
