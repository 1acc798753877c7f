"""Group-wise int4: two codes per byte, one fp16 scale (and one fp16 minimum when asymmetric) per group.

Asymmetric (default): W = q s + m with q in 0..15, s = (max - min) / 15, m = min over the group
(Jacob et al. 2018 affine scheme; group-wise as in GPTQ/AWQ). 4 + 32/g bits: g32 5.0, g64 4.5, g128 4.25.
Symmetric: W = (q - 8) s with q - 8 in [-7, 7] and s = absmax / 7 (zero exact, range symmetric); 4 + 16/g bits.

Double-quantized scales (``scales="q6"``, as in llama.cpp's Q4_K): the group minimum is clamped to <= 0, and the
group's scale s and -min are stored as 6-bit codes of two fp16 per-row super-scales d and dmin, so g32 costs
4 + 12/32 + 32/K bits (4.40 at K = 1280) instead of 5.0.

CPU kernel: ``aten._weight_int4pack_mm_for_cpu`` computes x @ ((q - 8) s + z)^T, so the asymmetric form maps
onto it with z = m + 8 s. Like the int8 kernel it is only fast with bf16 activations (fp32 is ~30x slower here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError, WeightsFormatError
from .packing import grouped, pack4, pack6, unpack4, unpack6, ungrouped
from .tensor import QuantizedWeight, register_kind

__all__ = ["Int4Weight", "quantize_int4"]

GROUPS = (32, 64, 128)


@register_kind
class Int4Weight(QuantizedWeight):
    """packed uint8 (out, Kp/2) codes; scales="fp16": scale fp16 (out, G), minimum fp16 (out, G) or absent
    (symmetric); scales="q6": scale, minimum uint8 6-bit packed (out, 3 ceil(G/4)), super fp16 (out, 2) = (d, dmin)."""

    kind = "int4"

    def __init__(self, shape, packed, scale, minimum=None, super_scale=None, *, group: int, pad: int,
                 fast: bool = True) -> None:
        super().__init__(shape)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.register_buffer("super_scale", super_scale)
        self.group, self.pad, self.fast = group, pad, fast
        self.search = False  # quantized with a per-group range search (requantize repeats it)
        self._kernel = None  # (packed int4pack, scales_and_zeros) built on first fast call; not stored

    @property
    def symmetric(self) -> bool:
        return self.minimum is None

    @property
    def scales(self) -> str:
        return "fp16" if self.super_scale is None else "q6"

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, m), each fp32 (out, G), with W = q s + m for codes q in 0..15."""
        if self.super_scale is not None:
            G = self.packed.shape[1] * 2 // self.group
            d, dmin = self.super_scale.float().unbind(-1)
            s = unpack6(self.scale, G).float() * d[:, None]
            return s, -unpack6(self.minimum, G).float() * dmin[:, None]
        s = self.scale.float()
        return s, (-8 * s if self.symmetric else self.minimum.float())

    def codes(self) -> torch.Tensor:  # (out, G, group) float codes 0..15
        return unpack4(self.packed).float().reshape(self.shape[0], -1, self.group)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, m = self.params()
        return ungrouped(self.codes() * s[..., None] + m[..., None], self.shape, self.pad).to(dtype)

    def _kernel_args(self):
        if self._kernel is None:
            q = unpack4(self.packed).to(torch.int32)  # (out, Kp)
            s, m = self.params()
            z = m + 8 * s  # the kernel computes (q - 8) s + z
            sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # (G, out, 2)
            self._kernel = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz)
        return self._kernel

    def _fast_ok(self, x: torch.Tensor) -> bool:
        return (self.fast and self.pad == 0 and len(self.shape) == 2 and x.device.type == "cpu"
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and self.shape[1] % self.group == 0
                and self.shape[0] % 16 == 0)  # the packer requires N divisible by 16

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self._fast_ok(x):
            return F.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        packed, sz = self._kernel_args()
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # fp32 activations take a ~30x slower path
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, self.group, sz).to(x.dtype)
        y = y if bias is None else y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], -1)

    def _apply(self, fn, recurse=True):
        self._kernel = None  # device/dtype moves invalidate the derived kernel layout
        return super()._apply(fn, recurse)

    def config(self) -> dict:
        return {"group": self.group, "pad": self.pad, "symmetric": self.symmetric, "scales": self.scales,
                "search": self.search}

    @classmethod
    def from_tensors(cls, shape, config, tensors):
        shape = torch.Size(shape)
        group, pad = int(config.get("group", 0)), int(config.get("pad", -1))
        k = shape.numel() // shape[0]
        if group not in GROUPS or pad != (-k) % group:
            raise WeightsFormatError(f"int4 weight {tuple(shape)}: config {config} needs group in {GROUPS} and "
                                     f"pad {(-k) % max(group, 1)}")
        G = (k + pad) // group
        want = {"packed": ((shape[0], (k + pad) // 2), torch.uint8), "scale": ((shape[0], G), torch.float16)}
        if config.get("scales", "fp16") == "q6":
            q6 = ((shape[0], 3 * ((G + 3) // 4)), torch.uint8)
            want.update(scale=q6, minimum=q6, super_scale=((shape[0], 2), torch.float16))
        elif config.get("scales", "fp16") != "fp16":
            raise WeightsFormatError(f"int4 weight {tuple(shape)}: scales must be 'fp16' or 'q6', got {config}")
        elif not config.get("symmetric", False):
            want["minimum"] = ((shape[0], G), torch.float16)
        for n, (shp, dt) in want.items():
            t = tensors.get(n)
            if t is None or tuple(t.shape) != shp or t.dtype != dt:
                got = None if t is None else (tuple(t.shape), str(t.dtype))
                raise WeightsFormatError(f"int4 weight {tuple(shape)}: tensor {n!r} must be {shp} {dt}, got {got}")
        out = cls(shape, tensors["packed"], tensors["scale"], tensors.get("minimum"), tensors.get("super_scale"),
                  group=group, pad=pad)
        out.search = bool(config.get("search", False))
        return out

    def requantize(self, weight: torch.Tensor) -> "Int4Weight":
        return quantize_int4(weight, group=self.group, symmetric=self.symmetric, scales=self.scales,
                             search=self.search)

    def affine_grid(self):
        """(s, m, 0, 15) with s, m (out, K): W = q s + m elementwise; the grid calibration rounds onto."""
        s, m = self.params()
        k = self.shape.numel() // self.shape[0]
        return (s.repeat_interleave(self.group, 1)[:, :k], m.repeat_interleave(self.group, 1)[:, :k], 0, 15)

    def with_codes(self, q: torch.Tensor) -> "Int4Weight":
        """The same scales with new codes q (out, K) in 0..15."""
        q = torch.nn.functional.pad(q.to(torch.uint8), (0, self.pad))
        out = type(self)(self.shape, pack4(q), self.scale, self.minimum, self.super_scale, group=self.group,
                         pad=self.pad, fast=self.fast)
        out.search = self.search
        return out


SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(w: torch.Tensor, *, group: int = 64, symmetric: bool = False, scales: str = "fp16",
                  clip: torch.Tensor | float | None = None, search: bool = False) -> Int4Weight:
    """Round-to-nearest group-wise int4. ``clip`` (scalar, (out,) or (out, G)) shrinks the group range, for
    calibration. ``search``: pick each group's range from SEARCH by its own squared weight error (data-free, in the
    spirit of llama.cpp's make_qkx2_quants search for K-quants)."""
    if search and clip is None:
        g, _ = grouped(w, group)
        errs = torch.stack([(grouped(quantize_int4(w, group=group, symmetric=symmetric, scales=scales, clip=c)
                                     .dequantize(), group)[0] - g).pow(2).sum(-1) for c in SEARCH])  # (C, out, G)
        clip = torch.tensor(SEARCH)[errs.argmin(0)]
        out = quantize_int4(w, group=group, symmetric=symmetric, scales=scales, clip=clip)
        out.search = True
        return out
    if group not in GROUPS:
        raise InvalidParameterError(f"int4 group must be one of {GROUPS}, got {group}")
    if scales not in ("fp16", "q6") or (scales == "q6" and symmetric):
        raise InvalidParameterError(f"int4 scales must be 'fp16' or (asymmetric only) 'q6', got {scales!r}")
    g, pad = grouped(w, group)  # (out, G, group)
    if isinstance(clip, torch.Tensor) and clip.dim() == 1:
        clip = clip[:, None]  # one ratio per output row, for every group of the row
    if scales == "q6":
        return _quantize_q6(w, g, pad, group, clip)
    if symmetric:
        amax = g.abs().amax(-1)
        if clip is not None:
            amax = amax * clip
        s = (amax / 7).clamp_min(1e-8).half()
        q = torch.clamp(torch.round(g / s.float()[..., None]), -7, 7) + 8
        return Int4Weight(w.shape, pack4(q.reshape(w.shape[0], -1)), s, None, group=group, pad=pad)
    lo, hi = g.amin(-1), g.amax(-1)
    if clip is not None:
        mid = (lo + hi) / 2  # shrink the range about its centre
        lo, hi = mid + (lo - mid) * clip, mid + (hi - mid) * clip
    s = ((hi - lo) / 15).clamp_min(1e-8).half()
    m = lo.half()
    q = torch.clamp(torch.round((g - m.float()[..., None]) / s.float()[..., None]), 0, 15)
    return Int4Weight(w.shape, pack4(q.reshape(w.shape[0], -1)), s, m, group=group, pad=pad)


def _quantize_q6(w, g, pad, group, clip) -> Int4Weight:
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (out, G); min <= 0 as in Q4_K
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    s, mneg = (hi - lo) / 15, -lo
    # 1. per-row super-scales, 6-bit codes for each group's scale and -min
    d = (s.amax(1) / 63).clamp_min(1e-10).half()
    dmin = (mneg.amax(1) / 63).clamp_min(1e-10).half()
    sc = torch.clamp(torch.round(s / d.float()[:, None]), 1, 63)
    mc = torch.clamp(torch.round(mneg / dmin.float()[:, None]), 0, 63)
    # 2. codes against the scales actually stored
    s_, m_ = sc * d.float()[:, None], -mc * dmin.float()[:, None]
    q = torch.clamp(torch.round((g - m_[..., None]) / s_[..., None]), 0, 15)
    return Int4Weight(w.shape, pack4(q.reshape(w.shape[0], -1)), pack6(sc), pack6(mc), torch.stack([d, dmin], -1),
                      group=group, pad=pad)
