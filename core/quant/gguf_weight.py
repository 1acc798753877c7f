"""GGUFWeight: a QuantizedWeight that keeps a GGUF tensor's raw blocks and dequantizes them on the fly.

The blocks are kept exactly as stored in the file (``stored_shape`` rows of ``row_bytes`` bytes), so a weight read
from a .gguf file writes back byte-identical. ``stored_shape`` may differ from the logical ``shape``: ComfyUI-GGUF
flattens conv kernels whose last axis is not a multiple of 256 into rows of 256 (and records the original shape in
``comfy.gguf.orig_shape.<name>``) so that K-quants can hold them.
"""

from __future__ import annotations

import math

import torch

from ...errors import WeightsFormatError
from .gguf_dequant import BLOCK_SIZES, dequantize, row_bytes
from .gguf_quantize import QUANTIZERS, quantize_rows
from .tensor import QuantizedWeight, register_kind

__all__ = ["GGUFWeight", "REQUANT_TYPE", "gguf_weight_from_float", "stored_shape_for"]

# types we can read but not write: a merge-then-requantize uses the nearest writable type of at least their bits
REQUANT_TYPE = {"Q2_K": "Q4_K", "Q3_K": "Q4_K"}


def stored_shape_for(shape, qtype: str) -> tuple[int, int] | None:
    """Rows x row length a tensor of logical `shape` is stored as in `qtype`: (prod(shape[:-1]), shape[-1]) when the
    last axis is a multiple of the block, else rows of 256 when the element count allows it (ComfyUI-GGUF's
    reshape for conv kernels), else None (the type cannot hold this tensor)."""
    block = BLOCK_SIZES[qtype][0]
    numel = math.prod(shape)
    if len(shape) >= 1 and shape[-1] % block == 0:
        return numel // shape[-1], int(shape[-1])
    if numel % 256 == 0 and 256 % block == 0:
        return numel // 256, 256
    return None


@register_kind
class GGUFWeight(QuantizedWeight):
    """Raw GGML blocks of one weight. ``blocks``: uint8 (rows, row_bytes)."""

    kind = "gguf"

    def __init__(self, shape, qtype: str, blocks: torch.Tensor, stored_shape=None) -> None:
        super().__init__(shape)
        if qtype not in BLOCK_SIZES:
            raise WeightsFormatError(f"GGUF tensor type {qtype!r} is not supported; supported: {sorted(BLOCK_SIZES)}")
        stored = tuple(int(s) for s in (stored_shape or (math.prod(self.shape[:-1]), self.shape[-1])))
        if math.prod(stored) != self.numel:
            raise WeightsFormatError(f"GGUF {qtype} tensor stored as {stored} cannot hold shape {tuple(self.shape)}")
        expected = (stored[0] if len(stored) > 1 else 1) * row_bytes(qtype, stored[-1])
        if blocks.dtype != torch.uint8 or blocks.numel() != expected:
            raise WeightsFormatError(f"GGUF {qtype} tensor of stored shape {stored}: expected {expected} bytes, got "
                                     f"{blocks.numel()} {blocks.dtype} (truncated or mislabelled data)")
        self.qtype = qtype
        self.stored_shape = stored
        self.register_buffer("blocks", blocks.reshape(-1, row_bytes(qtype, stored[-1])))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.qtype, self.stored_shape, dtype).reshape(self.shape)

    def config(self) -> dict:
        return {"qtype": self.qtype, "stored_shape": list(self.stored_shape)}

    @classmethod
    def from_tensors(cls, shape, config: dict, tensors: dict[str, torch.Tensor]) -> "GGUFWeight":
        if "blocks" not in tensors or "qtype" not in config:
            raise WeightsFormatError(f"gguf weight needs config 'qtype' and tensor 'blocks'; got config {config} and "
                                     f"tensors {sorted(tensors)}")
        return cls(shape, config["qtype"], tensors["blocks"], config.get("stored_shape"))

    def requantize(self, weight: torch.Tensor) -> "GGUFWeight":
        return gguf_weight_from_float(weight, REQUANT_TYPE.get(self.qtype, self.qtype))


def gguf_weight_from_float(weight: torch.Tensor, qtype: str) -> GGUFWeight:
    """Quantize a float weight to a GGML type with our block writers."""
    if qtype not in QUANTIZERS:
        raise WeightsFormatError(f"cannot write GGUF type {qtype!r}; writable: {sorted(QUANTIZERS)}")
    stored = stored_shape_for(tuple(weight.shape), qtype)
    if stored is None:
        raise WeightsFormatError(f"a tensor of shape {tuple(weight.shape)} cannot be stored as {qtype}: neither its "
                                 f"last axis nor its size is a multiple of the block ({BLOCK_SIZES[qtype][0]})")
    return GGUFWeight(weight.shape, qtype, quantize_rows(weight.detach().float().reshape(stored), qtype), stored)
