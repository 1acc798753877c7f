"""torchao checkpoints (diffusers' `TorchAoConfig` folders) as diffusers denoisers on NimbleDiff's quantized layers
(weights/torchao_io.py; needs torchao installed to unpickle its tensor classes).

    transformer = load_torchao_denoiser("sd3-torchao-int8/transformer")    # the folder save_pretrained wrote
"""

from __future__ import annotations

import torch

from ..weights.torchao_io import read_torchao, torchao_files
from .quantized_gguf import denoiser_from_checkpoint, install_checkpoint

__all__ = ["load_torchao_denoiser", "load_torchao_into"]


def load_torchao_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a torchao checkpoint into an existing diffusers denoiser (in place, all or nothing); returns it."""
    return install_checkpoint(model, path, read_torchao)


def load_torchao_denoiser(path, config=None, *, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers UNet / transformer from a torchao checkpoint folder (config.json beside the .bin files) or a
    .bin / .pt file with `config` (a config dict or the component folder)."""
    return denoiser_from_checkpoint(path, config, torch_dtype, "torchao", torchao_files, read_torchao)
