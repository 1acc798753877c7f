"""GGUF files of UNets and DiTs: read, write, convert between key layouts (DiTs: weights/dit_convert.py), install
into a model.

Read and write go through the `gguf` package (GGUFReader / GGUFWriter); the block math is ours
(core/quant/gguf_*.py), so every type here, K-quants included, can be written. Files follow ComfyUI-GGUF's
conventions, so theirs load here and ours load there:

- ``general.architecture``: ``sd1``, ``sdxl``, ``sd3``, ``flux`` (ComfyUI-GGUF's names) or ``pixart`` (ours;
  ComfyUI-GGUF has no PixArt). A file without it (stable-diffusion.cpp) is recognised from its keys.
- tensor names: the model's own keys, without the ``model.diffusion_model.`` prefix, in the original (LDM / BFL /
  MMDiT) layout as ComfyUI-GGUF's converter writes them, or the diffusers layout (diffusers' GGUF loader reads both).
- ``comfy.gguf.orig_shape.<name>``: the logical shape of a tensor stored flattened into rows of 256 (conv kernels).
- 1-D and small tensors (<= 1024 elements) stay F32, as ComfyUI-GGUF's converter keeps them.

A read either returns every tensor or raises WeightsFormatError naming the file and what is wrong (unsupported
architecture or tensor type, truncated data); `install` validates everything before it changes the model.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.quant.gguf_dequant import BLOCK_SIZES, GGML_TYPES
from ..core.quant.gguf_weight import GGUFWeight, gguf_weight_from_float, stored_shape_for
from ..core.quant.tensor import QuantizedWeight
from ..errors import InvalidParameterError, WeightsFormatError
from .dit_convert import convert_dit
from .dit_keymaps import DIT_MAPS

__all__ = ["GGUFFile", "read_gguf", "write_gguf", "to_diffusers", "to_original", "install", "GGUF_ARCHS",
           "detect_layout", "detect_arch"]

# file architecture string -> NimbleDiff architecture (weights/arch.py names)
GGUF_ARCHS = {"sd1": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart"}
FILE_ARCH = {v: k for k, v in GGUF_ARCHS.items()}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_SMALL = 1024  # ComfyUI-GGUF's QUANTIZATION_THRESHOLD: tensors this small stay F32
_ORIG_SHAPE = "comfy.gguf.orig_shape."

# Keys that identify an architecture in files without general.architecture (ComfyUI-GGUF's detection, both layouts)
_DETECT = [
    ("flux", ("double_blocks.0.img_attn.proj.weight",)), ("flux", ("transformer_blocks.0.attn.norm_added_k.weight",
                                                                   "single_transformer_blocks.0.proj_out.weight")),
    ("sd3", ("joint_blocks.0.x_block.attn.qkv.weight",)), ("sd3", ("transformer_blocks.0.attn.add_q_proj.weight",
                                                                  "pos_embed.pos_embed")),
    ("pixart", ("blocks.0.cross_attn.q_linear.weight",)), ("pixart", ("adaln_single.linear.weight",)),
    ("sdxl", ("label_emb.0.0.weight",)), ("sdxl", ("add_embedding.linear_1.weight",)),
    ("sd1", ("input_blocks.3.0.op.weight",)), ("sd1", ("down_blocks.0.downsamplers.0.conv.weight",)),
    # any other LDM UNet without SDXL's label_emb is SD1-type: NimbleDiff-Tiny (one layer per level) has its first
    # downsampler at input_blocks.2, not 3
    ("sd1", ("input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight", "out.2.weight")),
]

@dataclass
class GGUFFile:
    """Every tensor of a GGUF file: plain tensors (F32 / F16 / BF16) or GGUFWeight (block-quantized)."""

    path: str
    arch: str                      # NimbleDiff name: sd15 / sdxl / sd3 / flux / pixart
    file_arch: str | None          # general.architecture as written (None: detected from keys)
    layout: str                    # "original" or "diffusers"
    tensors: dict = field(default_factory=dict)
    qtypes: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.qtypes.items()))
        return f"{Path(self.path).name}: {self.arch} ({self.layout} keys), {len(self.tensors)} tensors: {kinds}"


# ------------------------------------------------------------------------------------------------------- read
def _field_str(reader, name: str) -> str | None:
    f = reader.get_field(name)
    if f is None:
        return None
    return bytes(f.parts[f.data[-1]]).decode("utf-8", errors="replace")


def _field_ints(reader, name: str) -> tuple[int, ...] | None:
    f = reader.get_field(name)
    if f is None:
        return None
    return tuple(int(f.parts[i][0]) for i in f.data)


def detect_arch(keys) -> str | None:
    """The file architecture string (sd1, sdxl, ...) ComfyUI-GGUF would detect from these keys, or None."""
    keys = set(keys)
    for arch, required in _DETECT:
        if all(k in keys for k in required):
            return arch
    return None


def detect_layout(arch: str, keys) -> str:
    """'original' (LDM / BFL / MMDiT / PixArt reference names) or 'diffusers'."""
    text = "\n".join(keys)
    if arch in ("sd15", "sdxl"):
        return "original" if re.search(r"^(input_blocks|middle_block|output_blocks)\.", text, re.M) else "diffusers"
    return "diffusers" if re.search(r"^(transformer_blocks|single_transformer_blocks)\.", text, re.M) else "original"


def _open_reader(path: str):
    import gguf

    p = Path(path)
    if not p.is_file():
        raise WeightsFormatError(f"{path}: no such GGUF file")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise WeightsFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError, UnicodeDecodeError) as exc:
        raise WeightsFormatError(f"{path}: the GGUF header or tensor table cannot be read (truncated or corrupt "
                                 f"file: {type(exc).__name__}: {exc})") from exc
    size = p.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise WeightsFormatError(f"{path}: truncated: tensor {t.name!r} needs bytes up to "
                                     f"{int(t.data_offset) + int(t.n_bytes)} but the file has {size}")
    return reader


def read_gguf(path) -> GGUFFile:
    """Read every tensor of a UNet / DiT GGUF file (copied out of the memory map: the file may change later)."""
    path = str(path)
    reader = _open_reader(path)
    names = [t.name for t in reader.tensors]
    prefix = next((p for p in _PREFIXES if any(n.startswith(p) for n in names)), "")
    file_arch = _field_str(reader, "general.architecture")
    keys = [n[len(prefix):] for n in names if n.startswith(prefix)]
    arch_name = file_arch if file_arch is not None else detect_arch(keys)
    if arch_name not in GGUF_ARCHS:
        why = f"general.architecture={file_arch!r}" if file_arch is not None else "no architecture recognised from keys"
        raise WeightsFormatError(f"{path}: unsupported architecture ({why}); supported: {sorted(GGUF_ARCHS)} "
                                 "(UNets sd1 / sdxl, DiTs sd3 / flux / pixart)")
    arch = GGUF_ARCHS[arch_name]
    out, qtypes = {}, Counter()
    for t in reader.tensors:
        if not t.name.startswith(prefix):
            continue
        key = t.name[len(prefix):]
        qtype = t.tensor_type.name if hasattr(t.tensor_type, "name") else str(t.tensor_type)
        if qtype not in BLOCK_SIZES:
            raise WeightsFormatError(f"{path}: tensor {t.name!r} has type {qtype}, which NimbleDiff cannot read; "
                                     f"supported: {sorted(BLOCK_SIZES, key=GGML_TYPES.get)}")
        stored = tuple(int(v) for v in reversed([int(s) for s in t.shape]))   # GGUF lists the fastest axis first
        shape = _field_ints(reader, _ORIG_SHAPE + t.name) or stored
        out[key] = _tensor(path, t, qtype, stored, shape)
        qtypes[qtype] += 1
    if not out:
        raise WeightsFormatError(f"{path}: no tensors")
    return GGUFFile(path, arch, file_arch, detect_layout(arch, out), out, qtypes)


def _tensor(path: str, t, qtype: str, stored: tuple, shape: tuple):
    raw = np.array(t.data, copy=True)  # detach from the memory map
    if qtype in ("F32", "F16"):
        if raw.size != math.prod(shape):
            raise WeightsFormatError(f"{path}: tensor {t.name!r} has {raw.size} values for shape {shape}")
        return torch.from_numpy(raw).reshape(shape)
    data = torch.from_numpy(raw.view(np.uint8).reshape(-1))
    if qtype == "BF16":
        if data.numel() != 2 * math.prod(shape):
            raise WeightsFormatError(f"{path}: tensor {t.name!r} has {data.numel()} bytes for BF16 shape {shape}")
        return data.view(torch.bfloat16).reshape(shape)
    try:
        return GGUFWeight(shape, qtype, data, stored)
    except WeightsFormatError as exc:
        raise WeightsFormatError(f"{path}: tensor {t.name!r}: {exc}") from exc


# ----------------------------------------------------------------------------------------------- key layouts
def to_diffusers(f: GGUFFile, model=None) -> dict:
    """The file's tensors in diffusers naming. A UNet in original layout needs the target `model` (or its config)
    for the block layout; a DiT uses the model's shapes, when given, to split fused tensors."""
    if f.layout == "diffusers":
        return dict(f.tensors)
    if f.arch in ("sd15", "sdxl"):
        from .keymaps import UNetLayout, unet_ldm_to_diffusers

        if model is None:
            raise InvalidParameterError(f"{f.path}: an original-layout UNet GGUF needs the diffusers UNet (or its "
                                        "config) to map its blocks; pass model=")
        config = getattr(model, "config", model)
        return unet_ldm_to_diffusers(f.tensors, UNetLayout.from_diffusers_config(config), prefix="")
    sizes = None
    if isinstance(model, torch.nn.Module):
        sizes = {k: int(v.shape[0]) for k, v in model.state_dict().items() if v.ndim >= 1}
    return convert_dit(f.tensors, f.arch, "diffusers", sizes)


def to_original(sd: dict, arch: str, unet_config=None) -> dict:
    """Diffusers-named tensors -> the original layout (what ComfyUI-GGUF's converter writes)."""
    if arch in ("sd15", "sdxl"):
        from .keymaps import UNetLayout, unet_diffusers_to_ldm

        if unet_config is None:
            raise InvalidParameterError("an SD UNet needs its diffusers config (unet_config=) to name LDM blocks")
        return unet_diffusers_to_ldm(sd, UNetLayout.from_diffusers_config(unet_config), prefix="")
    if arch not in DIT_MAPS:
        raise InvalidParameterError(f"arch={arch!r}; supported: {sorted(FILE_ARCH)}")
    return convert_dit(sd, arch, "original", None)


# ------------------------------------------------------------------------------------------------------ write
def _choose(key: str, t: torch.Tensor, qtype: str, keep_f32, flatten: bool) -> tuple[str, object]:
    """(stored type, value) for one tensor under ComfyUI-GGUF's rules: 1-D and small tensors F32, the rest `qtype`
    where its blocks fit (with `flatten`, conv kernels as rows of 256), else F16."""
    if isinstance(t, GGUFWeight):
        return t.qtype, t
    t = t.detach().float() if not isinstance(t, QuantizedWeight) else t.dequantize()
    if t.ndim <= 1 or t.numel() <= _SMALL or any(s in key for s in keep_f32) or qtype == "F32":
        return "F32", t
    stored = stored_shape_for(tuple(t.shape), qtype)
    if stored is None or (not flatten and stored[-1] != t.shape[-1]):
        return "F16", t
    return qtype, gguf_weight_from_float(t, qtype)


def write_gguf(path, tensors: dict, arch: str, qtype: str = "Q8_0", *, keep_f32=(), flatten: bool = True,
               progress=None) -> Counter:
    """Write a UNet / DiT state dict (any layout; values float tensors or QuantizedWeight) as GGUF.

    arch: NimbleDiff name (sd15 / sdxl / sd3 / flux / pixart). qtype: any writable type (F16, BF16, Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K). flatten: store conv kernels as rows of 256 so they can be quantized
    (ComfyUI-GGUF's convention; diffusers' GGUF loader cannot read such tensors, so flatten=False keeps them F16).
    Written to a temporary file and moved into place: an existing file is replaced only by a complete one.
    Returns the count of each stored type."""
    import gguf

    from ..core.quant.gguf_quantize import QUANTIZERS

    if arch not in FILE_ARCH:
        raise InvalidParameterError(f"arch={arch!r}; supported: {sorted(FILE_ARCH)}")
    if qtype not in QUANTIZERS:
        raise InvalidParameterError(f"qtype={qtype!r}; writable: {sorted(QUANTIZERS, key=GGML_TYPES.get)}")
    long = [k for k in tensors if len(k) > 127]
    if long:
        raise InvalidParameterError(f"GGUF tensor names are limited to 127 characters: {long[:3]}")
    writer = gguf.GGUFWriter(path=None, arch=FILE_ARCH[arch])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts = Counter()
    for n, (key, t) in enumerate(tensors.items()):
        kind, value = _choose(key, t, qtype, keep_f32, flatten)
        if kind == "F32":
            writer.add_tensor(key, value.float().contiguous().numpy())
        elif kind == "F16":
            writer.add_tensor(key, value.half().contiguous().numpy())
        else:
            raw = value.blocks.numpy()
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
            if tuple(value.stored_shape) != tuple(value.shape):
                writer.add_array(_ORIG_SHAPE + key, [int(s) for s in value.shape])
        counts[kind] += 1
        if progress is not None:
            progress(n + 1, len(tensors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)   # mkstemp makes the file private; a model file gets the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return counts


# ---------------------------------------------------------------------------------------------------- install
def install(model: torch.nn.Module, tensors: dict, source: str = "GGUF", layer_classes=None) -> dict:
    """Load a {parameter key: tensor or QuantizedWeight} state dict into `model`: Linear / Conv2d layers whose weight
    is quantized become QuantLinear / QuantConv2d (dequantized per forward, never as a whole model), the rest is
    copied. Every key must be used and every parameter given; all checks run before the model changes.
    layer_classes: (Linear class, Conv2d class) to build instead of QuantLinear / QuantConv2d (subclasses).
    Returns {module name: new quantized layer}."""
    from ..core.quant.modules import QuantConv2d, QuantLinear, replace

    QuantLinear, QuantConv2d = layer_classes or (QuantLinear, QuantConv2d)  # noqa: N806

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    modules = dict(model.named_modules())
    plain, layers, problems = {}, {}, []
    for key, value in tensors.items():
        name, _, leaf = key.rpartition(".")
        module = modules.get(name)
        if isinstance(value, QuantizedWeight) and leaf == "weight" and isinstance(module, (torch.nn.Linear,
                                                                                           torch.nn.Conv2d)):
            if tuple(value.shape) != tuple(module.weight.shape):
                problems.append(f"{key}: file shape {tuple(value.shape)}, model {tuple(module.weight.shape)}")
            layers[name] = value
            continue
        if key not in params:
            problems.append(f"{key}: the model has no such parameter")
            continue
        t = value.dequantize() if isinstance(value, QuantizedWeight) else value
        if tuple(t.shape) != tuple(params[key].shape):
            problems.append(f"{key}: file shape {tuple(t.shape)}, model {tuple(params[key].shape)}")
        elif t.is_floating_point() and not torch.isfinite(t.float()).all():
            problems.append(f"{key}: not finite")
        plain[key] = t
    given = set(plain) | {f"{n}.weight" for n in layers}
    missing = [k for k in dict(model.named_parameters()) if k not in given]
    if missing:
        problems.append(f"{len(missing)} model parameters are not in the file, e.g. {missing[:5]}")
    if problems:
        raise WeightsFormatError(f"{source}: does not fit {type(model).__name__} ({len(problems)} problems): "
                                 + "; ".join(problems[:6]))
    new = {}
    for name, qw in layers.items():
        m = modules[name]
        bias = plain.pop(f"{name}.bias", None)
        if isinstance(m, torch.nn.Linear):
            new[name] = QuantLinear(qw, bias)
        else:
            new[name] = QuantConv2d(qw, bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    # all validated and built: now change the model (replace() checks names and shapes before it swaps)
    replace(model, new)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for key, t in plain.items():
            name, _, leaf = key.rpartition(".")
            module = modules[name]
            current = getattr(module, leaf)
            if current.is_meta:  # built without storage (init_empty_weights): take the file's tensor as is
                value = t.to(current.dtype).clone()
                if isinstance(current, torch.nn.Parameter):
                    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
                else:
                    module._buffers[leaf] = value
            else:
                current.copy_(t.to(current.dtype))
    return new
