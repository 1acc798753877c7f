"""The quantized-weight interface every scheme implements (ours in core/quant, GGUF types in gguf_*.py).

A QuantizedWeight is an nn.Module holding its packed tensors as buffers, so ``.to(device)``, ``state_dict()`` and
``deepcopy`` move and copy them like any other module state. It describes one float weight of logical ``shape``
((out, in) for a Linear, (out, in/groups, kh, kw) for a Conv2d); schemes quantize the 2-D view (out, in*kh*kw).

| member              | meaning                                                                        |
|---------------------|--------------------------------------------------------------------------------|
| ``shape``           | logical float shape (torch.Size)                                               |
| ``bits_per_weight`` | stored bits / element count, scales, zero points and permutations included     |
| ``nbytes``          | bytes of every stored tensor                                                   |
| ``dequantize(dt)``  | the float weight in ``shape``                                                  |
| ``linear(x)``       | x @ W^T; the default dequantizes, kernels with an integer matmul override it  |
| ``kind``/``config`` | registry name and JSON-able parameters, for the on-disk format                 |
| ``requantize(W)``   | a new weight of the same scheme and parameters for a float W (merge-then-requantize) |
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

__all__ = ["QuantizedWeight", "WEIGHT_KINDS", "register_kind"]

# kind name -> class; filled by each scheme module at import (explicit calls, one line per class).
WEIGHT_KINDS: dict[str, type] = {}


def register_kind(cls: type) -> type:
    """Class decorator: make ``cls`` loadable from the on-disk format under ``cls.kind``."""
    if cls.kind in WEIGHT_KINDS and WEIGHT_KINDS[cls.kind] is not cls:
        raise ValueError(f"quantized weight kind {cls.kind!r} registered twice ({WEIGHT_KINDS[cls.kind]} and {cls})")
    WEIGHT_KINDS[cls.kind] = cls
    return cls


class QuantizedWeight(torch.nn.Module, abc.ABC):
    """One quantized weight tensor. Subclasses register their packed data with ``register_buffer``."""

    kind: str = "abstract"

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape = torch.Size(shape)

    # ---- required -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, shaped ``self.shape``."""

    @abc.abstractmethod
    def config(self) -> dict:
        """JSON-able parameters that, with the buffers, rebuild this weight (see ``from_tensors``)."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, shape, config: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        """Rebuild from ``config()`` and ``tensors()``; raise WeightsFormatError naming what is wrong."""

    @abc.abstractmethod
    def requantize(self, weight: torch.Tensor) -> "QuantizedWeight":
        """Quantize a float ``weight`` of the same shape with this weight's scheme and parameters."""

    # ---- provided -------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the buffers)."""
        return dict(self.named_buffers(recurse=False))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) @ W^T + bias -> (..., out). Default: dequantize to x's dtype on every call (no full-model
        copy). Kinds with their own kernel fold the bias into their output pass where they can."""
        return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, shape={tuple(self.shape)}, bpw={self.bits_per_weight:.3f}"
