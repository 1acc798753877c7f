"""torchao-quantized checkpoints on disk (what diffusers' `TorchAoConfig` models save: pickled state dicts of
torchao tensor subclasses, `save_pretrained(..., safe_serialization=False)`), into NimbleDiff's quantized weights.

Reading needs torchao installed: its tensor classes are what the pickle holds, and importing torchao is what lets
`torch.load(weights_only=True)` accept them (NimbleDiff never unpickles with weights_only=False). torchao's int8
weight-only tensors (`Int8Tensor`, per-row: qdata int8 (out, in), scale and zero point (out, 1)) become `Int8Weight`
with the same codes, scales and zero points; every other torchao type is dequantized to float at load, with a
warning naming it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import torch

from ..core.quant.int8 import Int8Weight
from ..errors import WeightsFormatError
from .safetensors_io import component_files, load_state_dict

__all__ = ["read_torchao", "torchao_files"]

_PICKLES = (".bin", ".pt", ".pth", ".ckpt")


def torchao_files(path) -> tuple[list[Path], dict | None]:
    """The pickle files of a torchao checkpoint (a file, or a diffusers component folder) and its config."""
    return component_files(path, _PICKLES, "diffusers saves a TorchAoConfig model as diffusion_pytorch_model*.bin "
                           "beside config.json")


def _import_torchao(path):
    try:
        import torchao  # noqa: F401  (registers its tensor classes as safe for weights_only loading)
    except ImportError as exc:
        raise WeightsFormatError(f"{path}: a torchao-quantized checkpoint; reading it needs torchao installed "
                                 "(pip install --no-deps torchao), whose tensor classes the file holds") from exc


def _int8(key, t, shape):
    """torchao Int8Tensor, weight-only per row -> Int8Weight (same codes, scales and zero points), else None."""
    qdata, scale, zero = getattr(t, "qdata", None), getattr(t, "scale", None), getattr(t, "zero_point", None)
    acts = [getattr(t, n, None) for n in ("act_quant_scale", "act_quant_zero_point", "act_pre_scale",
                                          "act_quant_kwargs")]
    rows = shape[0]
    if (qdata is None or qdata.dtype != torch.int8 or tuple(qdata.shape) != tuple(shape) or scale is None
            or scale.numel() != rows or (zero is not None and zero.numel() != rows) or any(a is not None for a in acts)):
        return None
    zero = None if zero is None or not zero.any() else zero.reshape(rows).float().contiguous()   # W = s (q - z)
    return Int8Weight(torch.Size(shape), qdata.reshape(rows, -1).contiguous(), scale.reshape(rows).float().contiguous(),
                      zero)


def read_torchao(path, shapes: dict[str, torch.Size]) -> dict[str, object]:
    """{parameter key: tensor or QuantizedWeight} for `weights.gguf_io.install`."""
    files, _ = torchao_files(path)
    _import_torchao(path)
    sd = {}
    for f in files:
        sd.update(load_state_dict(f))
    out, dequantized = {}, Counter()
    for key, t in sd.items():
        if type(t) in (torch.Tensor, torch.nn.Parameter):     # plain tensors (biases, norms, embeddings)
            out[key] = t
            continue
        if key not in shapes:
            raise WeightsFormatError(f"{path}: {key}: the model has no such parameter")
        weight = _int8(key, t, torch.Size(shapes[key]))
        if weight is None:
            dequantize = getattr(t, "dequantize", None)
            if dequantize is None:
                raise WeightsFormatError(f"{path}: {key}: a {type(t).__name__} that cannot be dequantized")
            weight = dequantize().float()
            dequantized[type(t).__name__] += 1
        out[key] = weight
    if not any(isinstance(v, Int8Weight) for v in out.values()) and not dequantized:
        raise WeightsFormatError(f"{path}: no torchao-quantized tensor in the file; this is a plain checkpoint")
    if dequantized:
        warnings.warn(f"{path}: dequantized to float at load: " + ", ".join(f"{n} x{c}" for n, c in dequantized.items())
                      + " (NimbleDiff keeps torchao's int8 weight-only layers quantized)", stacklevel=2)
    return out
