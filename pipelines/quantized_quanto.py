"""optimum-quanto checkpoints (diffusers' `QuantoConfig` folders, or `quanto.quantize` + safetensors files) as
diffusers denoisers on NimbleDiff's quantized layers, without quanto installed (weights/quanto_io.py).

    transformer = load_quanto_denoiser("sd3-quanto-int8/transformer")      # the folder save_pretrained wrote
    pipe = StableDiffusion3Pipeline.from_pretrained(base, transformer=transformer, ...)

int8 layers run NimbleDiff's int8 kernel on the file's own codes and scales; int4 layers its int4 kernel.
"""

from __future__ import annotations

import torch

from ..weights.quanto_io import quanto_files, read_quanto
from .quantized_gguf import denoiser_from_checkpoint, install_checkpoint

__all__ = ["load_quanto_denoiser", "load_quanto_into"]


def load_quanto_into(model: torch.nn.Module, path) -> torch.nn.Module:
    """Load a quanto checkpoint into an existing diffusers denoiser (in place, all or nothing); returns it."""
    return install_checkpoint(model, path, read_quanto)


def load_quanto_denoiser(path, config=None, *, torch_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers UNet / transformer from a quanto checkpoint: `path` a component folder (config.json beside the
    safetensors, as diffusers saves a QuantoConfig model) or a safetensors file with `config` (a config dict or a
    component folder). Unquantized tensors are cast to `torch_dtype`."""
    return denoiser_from_checkpoint(path, config, torch_dtype, "quanto", quanto_files, read_quanto)
