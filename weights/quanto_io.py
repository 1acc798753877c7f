"""optimum-quanto checkpoints on disk (what diffusers' `QuantoConfig` and `quanto.quantize` + `save_file` write),
read without quanto installed, into NimbleDiff's quantized weights.

Layout (optimum-quanto 0.2, `WeightQBytesTensor` / `WeightQBitsTensor` state dicts):

- int8 / float8: ``<layer>.weight._data`` (the codes, the weight's shape), ``<layer>.weight._scale`` (one per output
  channel, shape (out, 1, ...)); W = scale * data.
- int4 / int2: ``<layer>.weight._data._data`` (uint8), ``._scale`` and ``._shift`` (float, one per group). The weight,
  flattened, is cut into groups of ``group_size`` along the input dimension (a row at a time when the row is
  shorter): grouped (n_groups, group_size); W = scale * q - shift. The codes are packed along the first dimension:
  with R = ceil(n_groups * bits / 8), value row i + j R sits in bits [j * bits, (j + 1) * bits) of packed row i.
- ``<layer>.input_scale`` / ``output_scale``: activation scales, 1 when only weights were quantized (diffusers'
  QuantoConfig); others are dropped with a warning, since NimbleDiff runs these layers weight-only.

int8 becomes `Int8Weight` (bit-exact: same codes, same per-channel fp32 scale); int4 becomes `Int4Weight` (same codes;
scales and -shift stored in fp16, as NimbleDiff's int4 keeps them); float8 and int2 are dequantized to float at load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.quant.int4 import GROUPS, Int4Weight
from ..core.quant.int8 import Int8Weight
from ..core.quant.packing import pack4
from ..errors import WeightsFormatError
from .safetensors_io import component_files, load_state_dict

__all__ = ["read_quanto", "is_quanto", "quanto_files"]

_SUFFIXES = ("._data._data", "._data", "._scale", "._shift")


def is_quanto(keys) -> bool:
    return any(k.endswith((".weight._data", ".weight._data._data")) for k in keys)


def quanto_files(path) -> tuple[list[Path], dict | None]:
    """The safetensors files of a quanto checkpoint (a file, or a diffusers component folder) and its config."""
    return component_files(path, (".safetensors",), "a quanto checkpoint saved by diffusers has "
                           "diffusion_pytorch_model*.safetensors beside config.json")


def _unpack(packed: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    """quanto's PackedTensor codes: uint8 (R, C) -> (rows, C), value row i + j R in bit field j of packed row i."""
    per = 8 // bits
    fields = [(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return torch.cat(fields, dim=0)[:rows]


def _int8(key, data, scale, shape):
    rows = shape[0]
    if scale.numel() != rows:
        raise WeightsFormatError(f"{key}: int8 scale has {scale.numel()} values for {rows} output channels")
    return Int8Weight(torch.Size(shape), data.reshape(rows, -1).contiguous(), scale.reshape(rows).float().contiguous())


def _qbits(key, packed, scale, shift, shape, path):
    """(n_groups, group) codes -> Int4Weight when the grouping maps onto NimbleDiff's, else a float tensor."""
    numel, out = shape.numel(), shape[0]
    k = numel // out
    group = packed.shape[-1]
    if numel % group or scale.numel() != numel // group or shift.numel() != scale.numel():
        raise WeightsFormatError(f"{path}: {key}: packed {tuple(packed.shape)}, scale {tuple(scale.shape)}, shift "
                                 f"{tuple(shift.shape)} do not fit a weight of shape {tuple(shape)}")
    n_groups = numel // group
    bits = {(n_groups + 1) // 2: 4, (n_groups + 3) // 4: 2}.get(packed.shape[0])
    if bits is None:
        raise WeightsFormatError(f"{path}: {key}: {packed.shape[0]} packed rows fit neither int4 nor int2 codes of "
                                 f"{n_groups} groups")
    q = _unpack(packed, n_groups, bits).reshape(out, k)          # groups run along the flattened row
    s = scale.float().reshape(out, -1)                            # (out, groups per row)
    m = -shift.float().reshape(out, -1)
    if bits == 2 or (k % group and group != k):
        return (q.float().reshape(n_groups, group) * scale.float().reshape(-1, 1)
                - shift.float().reshape(-1, 1)).reshape(shape)
    ours = group if group in GROUPS else 32 if group % 32 == 0 or group == k else None
    if ours is None:
        return (q.float().reshape(n_groups, group) * s.reshape(-1, 1) + m.reshape(-1, 1)).reshape(shape)
    pad = (-k) % ours
    reps = -(-k // ours) if group == k else group // ours         # a row-wide group spans all of ours
    s, m = s.repeat_interleave(reps, dim=1)[:, : (k + pad) // ours], m.repeat_interleave(reps, dim=1)[:, : (k + pad) // ours]
    q = torch.nn.functional.pad(q, (0, pad))
    return Int4Weight(torch.Size(shape), pack4(q), s.half().contiguous(), m.half().contiguous(), group=ours, pad=pad)


def read_quanto(path, shapes: dict[str, torch.Size]) -> dict[str, object]:
    """{parameter key: tensor or QuantizedWeight} for `weights.gguf_io.install`. `shapes`: the target model's
    parameter shapes by key (a quanto file does not store the logical shape of packed weights)."""
    files, _ = quanto_files(path)
    sd = {}
    for f in files:
        sd.update(load_state_dict(f))
    if not is_quanto(sd):
        raise WeightsFormatError(f"{path}: no quanto-quantized weight (keys ending .weight._data); this is a plain "
                                 "checkpoint")
    out, dropped = {}, []
    bases = {k.rsplit(suffix, 1)[0] for k in sd for suffix in _SUFFIXES if k.endswith(".weight" + suffix)}
    for base in sorted(bases):          # base = "<layer>.weight"
        if base not in shapes:
            raise WeightsFormatError(f"{path}: {base}: the model has no such parameter")
        shape = torch.Size(shapes[base])
        scale = sd.pop(base + "._scale", None)
        if scale is None:
            raise WeightsFormatError(f"{path}: {base}: quantized data without {base}._scale")
        if base + "._data._data" in sd:
            shift = sd.pop(base + "._shift", None)
            if shift is None:
                raise WeightsFormatError(f"{path}: {base}: packed codes without {base}._shift")
            out[base] = _qbits(base, sd.pop(base + "._data._data"), scale, shift, shape, path)
            continue
        data = sd.pop(base + "._data")
        if tuple(data.shape) != tuple(shape):
            raise WeightsFormatError(f"{path}: {base}: codes of shape {tuple(data.shape)}, model {tuple(shape)}")
        if data.dtype == torch.int8:
            out[base] = _int8(base, data, scale, shape)
        elif data.dtype.is_floating_point:          # float8 codes: dequantized (no float8 kernel on CPU)
            out[base] = scale.float() * data.float()
        else:
            raise WeightsFormatError(f"{path}: {base}: quanto codes of dtype {data.dtype} (int8, float8, packed "
                                     "int4 / int2 are supported)")
    for key in [k for k in sd if k.endswith((".input_scale", ".output_scale"))]:
        value = sd.pop(key)
        if value.numel() != 1 or float(value) != 1.0:
            dropped.append(key)
    if dropped:
        warnings.warn(f"{path}: {len(dropped)} activation scales (e.g. {dropped[0]}) dropped: NimbleDiff runs "
                      "quanto layers weight-only", stacklevel=2)
    out.update(sd)
    return out
