"""The NimbleDiff quantized safetensors format (version 1).

One safetensors file holds a whole quantized model (UNet or transformer):

| entry                                   | content                                                            |
|-----------------------------------------|--------------------------------------------------------------------|
| tensor ``<layer>.qweight.<buffer>``     | a quantized layer's packed integers, scales, zero points, permutation |
| tensor ``<layer>.bias``, ``<layer>.act_quant.scale`` | its float bias, its static activation scales (W8A8)    |
| tensor ``<key>``                        | every other (float) entry of the model's state dict                |
| metadata ``format`` / ``format_version``| ``nimblediff.quant`` / ``1``; a reader refuses other versions       |
| metadata ``layers``                     | JSON {layer: {kind, shape, config, module, act_splits}}             |
| metadata ``model_class``/``model_config``| optional: the diffusers class name and its config JSON             |

Loading is validate-then-commit: every layer is rebuilt and every float key checked against the target model
before anything in the model changes; every tensor in the file must be consumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.quant import WEIGHT_KINDS, ActQuant, quantized_modules, replace
from ..core.quant.modules import QuantModule, wrap
from ..errors import WeightsFormatError
from .safetensors_io import load_with_metadata, save_state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "save_quantized", "load_quantized", "read_quant_metadata"]

FORMAT = "nimblediff.quant"
FORMAT_VERSION = 1


def _layer_entry(m: QuantModule) -> dict:
    e = {"kind": m.qweight.kind, "shape": list(m.shape), "config": m.qweight.config(),
         "module": "conv2d" if len(m.shape) == 4 else "linear"}
    if m.act_quant is not None:
        e["act_splits"] = list(m.act_quant.splits)
        e["act_static"] = m.act_quant.scale is not None
    return e


def save_quantized(model: torch.nn.Module, path, *, model_class: str | None = None, model_config: dict | None = None,
                   extra: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (with QuantLinear / QuantConv2d layers) to ``path``; returns the path."""
    layers = {n: _layer_entry(m) for n, m in quantized_modules(model).items()}
    if not layers:
        raise WeightsFormatError(f"{path}: the model has no quantized layers; quantize it first (quantize_model)")
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers)}
    if model_class:
        meta["model_class"] = model_class
    if model_config is not None:
        meta["model_config"] = json.dumps(model_config, default=str)
    meta.update(extra or {})
    sd = {k: v for k, v in model.state_dict().items() if v is not None}
    return save_state_dict(sd, path, meta, overwrite=overwrite)


def read_quant_metadata(path, metadata: dict[str, str]) -> dict:
    """The parsed ``layers`` table, after checking the format name and version."""
    fmt, ver = metadata.get("format"), metadata.get("format_version")
    if fmt != FORMAT:
        raise WeightsFormatError(f"{path}: not a NimbleDiff quantized file (metadata format={fmt!r}, expected "
                                 f"{FORMAT!r}); GGUF files load through weights.gguf")
    if ver != str(FORMAT_VERSION):
        raise WeightsFormatError(f"{path}: NimbleDiff quantized format version {ver}, but this NimbleDiff reads "
                                 f"version {FORMAT_VERSION}; re-quantize the model with this version or upgrade")
    try:
        layers = json.loads(metadata["layers"])
    except (KeyError, json.JSONDecodeError) as e:
        raise WeightsFormatError(f"{path}: metadata 'layers' missing or not JSON ({e})") from None
    return layers


def _import_kinds() -> None:
    try:  # GGUF block types register themselves on import (their module is optional here)
        from ..core.quant import gguf_weight  # noqa: F401
    except ImportError:
        pass


def load_quantized(model: torch.nn.Module, path, *, device: str = "cpu") -> dict[str, QuantModule]:
    """Install the file's quantized layers and float weights into ``model`` (a float model of the same
    architecture). Returns {layer: new module}. On any error the model is left unchanged."""
    sd, metadata = load_with_metadata(path, device)
    layers = read_quant_metadata(path, metadata)
    _import_kinds()
    modules = dict(model.named_modules())
    new: dict[str, QuantModule] = {}
    for name, e in layers.items():
        new[name] = _build_layer(path, name, e, modules.get(name), sd)
    # float keys: everything of the model outside the quantized layers must come from the file, and nothing else
    expected = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(n + ".") for n in layers)}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsFormatError(f"{path}: does not fit the model: missing {len(missing)} keys {missing[:5]}, "
                                 f"{len(unexpected)} unused entries {unexpected[:5]}")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if sd[k].shape != v.shape]
    if bad:
        raise WeightsFormatError(f"{path}: shape mismatch (key, file, model): {bad[:5]}")
    # commit
    replace(model, new)
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for k, v in sd.items():
            params[k].copy_(v.to(params[k].dtype))
    return new


def _build_layer(path, name: str, e: dict, float_layer, sd: dict) -> QuantModule:
    kind = e.get("kind")
    if float_layer is None or not isinstance(float_layer, (torch.nn.Linear, torch.nn.Conv2d, QuantModule)):
        raise WeightsFormatError(f"{path}: layer {name!r} is not a Linear/Conv2d of the model "
                                 f"(found {type(float_layer).__name__ if float_layer is not None else 'nothing'})")
    if kind not in WEIGHT_KINDS:
        raise WeightsFormatError(f"{path}: layer {name!r} has quantization kind {kind!r}; this NimbleDiff reads "
                                 f"{sorted(WEIGHT_KINDS)}")
    shape = torch.Size(e.get("shape", ()))
    want = float_layer.shape if isinstance(float_layer, QuantModule) else float_layer.weight.shape
    if shape != want:
        raise WeightsFormatError(f"{path}: layer {name!r} has shape {tuple(shape)} but the model expects {tuple(want)}")
    prefix = f"{name}.qweight."
    tensors = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
    qw = WEIGHT_KINDS[kind].from_tensors(shape, e.get("config", {}), tensors)
    if isinstance(float_layer, QuantModule):
        raise WeightsFormatError(f"{path}: layer {name!r} of the model is already quantized; load into a float model")
    bias = sd.pop(f"{name}.bias", None)
    if (bias is None) != (float_layer.bias is None):
        raise WeightsFormatError(f"{path}: layer {name!r}: bias {'missing' if bias is None else 'unexpected'}")
    q = wrap(float_layer, qw)
    if bias is not None:
        with torch.no_grad():
            q.bias.copy_(bias)
    if "act_splits" in e:
        scale = sd.pop(f"{name}.act_quant.scale", None)
        if e.get("act_static") and scale is None:
            raise WeightsFormatError(f"{path}: layer {name!r}: static activation scales missing")
        q.act_quant = ActQuant(scale, tuple(e["act_splits"]), channel_dim=1 if len(shape) == 4 else -1)
    return q
