"""QuantLinear / QuantConv2d: layers over any QuantizedWeight, with LoRA on top, and atomic model swapping.

The forward asks the weight for ``linear(x)`` (weights with an integer kernel override it; the default dequantizes
this one layer on the fly), so no float copy of the model ever exists. LoRA deltas run as an extra low-rank branch
``y += s * up(down(x))`` (Hu et al. 2021), which costs O(r (in + out)) per token instead of a dequantized weight; for
stacks of many LoRAs, ``set_lora(..., merge=True)`` folds them into the weight once and re-quantizes with the same
scheme, cached per (LoRA set, strengths).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ...errors import AdapterMismatchError, InvalidParameterError
from .tensor import QuantizedWeight

__all__ = ["LowRank", "QuantLinear", "QuantConv2d", "QuantModule", "quantize_model", "replace", "quantized_modules",
           "resolve_scheme", "SCHEMES", "wrap", "eligible_layers", "quantize_layer"]

# scheme name -> fn(float weight (out, ...)) -> QuantizedWeight. Filled by core/quant/schemes.py (explicit table).
SCHEMES: dict[str, Callable[[torch.Tensor], QuantizedWeight]] = {}


@dataclass(frozen=True)
class LowRank:
    """One LoRA delta on a quantized layer: W' = W + scale * up @ down.

    Linear: down (r, in), up (out, r). Conv2d: down (r, in, kh, kw) (applied with the layer's stride/padding),
    up (out, r) or (out, r, 1, 1). ``name`` identifies the LoRA for the merge cache (e.g. its file name)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    name: str = ""

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The full fp32 difference scale * up @ down in the weight's shape."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in*kh*kw)
        return (self.scale * d).reshape(shape)

    def key(self) -> tuple:
        # identity + in-place version: a LoRA edited in place must not hit a stale cache entry
        return (self.name, id(self.down), self.down._version, id(self.up), self.up._version, float(self.scale))


class QuantModule(torch.nn.Module):
    """Shared state of QuantLinear / QuantConv2d: the weight, bias, LoRA branch / merged cache, activation quantizer."""

    MERGE_CACHE_SIZE = 2  # merged weights kept per layer: the current LoRA set and the previous one (A/B toggling)

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise InvalidParameterError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
        self.qweight = weight
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora: tuple[LowRank, ...] = ()
        object.__setattr__(self, "_merged", None)  # not a submodule: merged weights stay out of state_dict
        self._merge_cache: collections.OrderedDict = collections.OrderedDict()
        self.act_quant = None  # W8A8: an act.ActQuant (a submodule, so its static scales are saved with the layer)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def active_weight(self) -> QuantizedWeight:
        return self._merged if self._merged is not None else self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with (base, plus LoRA when branched), as a float tensor."""
        w = self.active_weight().dequantize(torch.float32)
        if self._merged is None:
            for d in self.lora:
                w = w + d.dense(w.shape)
        return w.to(dtype)

    # ---- LoRA -----------------------------------------------------------------------------------------------
    def set_lora(self, deltas: list[LowRank] | tuple[LowRank, ...] = (), *, merge: bool = False) -> None:
        """Replace the LoRA set. merge=False: low-rank branch. merge=True: W + sum deltas re-quantized (cached)."""
        deltas = tuple(deltas)
        for d in deltas:
            self._check_delta(d)
        if merge and deltas:
            key = tuple(d.key() for d in deltas)
            merged = self._merge_cache.get(key)
            if merged is None:
                w = self.qweight.dequantize(torch.float32)
                for d in deltas:
                    w = w + d.dense(w.shape).to(w.device)
                if not torch.isfinite(w).all():
                    raise AdapterMismatchError(f"merging LoRA set {[d.name for d in deltas]} gives non-finite weights")
                merged = self.qweight.requantize(w)
                self._merge_cache[key] = merged
                while len(self._merge_cache) > self.MERGE_CACHE_SIZE:
                    self._merge_cache.popitem(last=False)
            self._merge_cache.move_to_end(key)
            object.__setattr__(self, "_merged", merged)
        else:
            object.__setattr__(self, "_merged", None)
        self.lora = deltas

    def clear_lora(self, *, drop_cache: bool = False) -> None:
        object.__setattr__(self, "_merged", None)
        self.lora = ()
        if drop_cache:
            self._merge_cache.clear()

    def _check_delta(self, d: LowRank) -> None:
        out, fan_in = self.shape[0], self.shape.numel() // self.shape[0]
        r = d.down.shape[0]
        ok = (d.up.shape[0] == out and d.up.flatten(1).shape[1] == r and d.down.flatten(1).shape[1] == fan_in
              and (d.down.dim() == len(self.shape)))
        if not ok:
            raise AdapterMismatchError(f"LoRA {d.name!r}: down {tuple(d.down.shape)} / up {tuple(d.up.shape)} do not "
                                       f"fit a quantized layer of weight shape {tuple(self.shape)} (need down (r, "
                                       f"{', '.join(map(str, self.shape[1:]))}) and up ({out}, r))")
        if not (torch.isfinite(d.down).all() and torch.isfinite(d.up).all()):
            raise AdapterMismatchError(f"LoRA {d.name!r} has non-finite factors")

    def _apply(self, fn, recurse=True):
        # merge-cache entries are not registered submodules; move them with the layer
        super()._apply(fn, recurse)
        for k, w in self._merge_cache.items():
            w._apply(fn)
        return self


class QuantLinear(QuantModule):
    """nn.Linear with a quantized weight (out, in)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        if len(weight.shape) != 2:
            raise InvalidParameterError(f"QuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        super().__init__(weight, bias)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w = self.active_weight()
        if self.act_quant is None:
            y = w.linear(x, self.bias)                        # the kernel folds the bias into its output pass
        else:
            y = self.act_quant.linear(x, w)
            y = y if self.bias is None else y + self.bias.to(y.dtype)
        if self._merged is None:
            for d in self.lora:
                y = y + d.scale * F.linear(F.linear(x, d.down.to(x.dtype)), d.up.to(x.dtype).flatten(1))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(QuantModule):
    """nn.Conv2d with a quantized weight (out, in/groups, kh, kw); dequantized per call (no integer conv kernel)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, padding_mode: str = "zeros") -> None:
        if len(weight.shape) != 4:
            raise InvalidParameterError(f"QuantConv2d needs a 4-D weight, got shape {tuple(weight.shape)}")
        if padding_mode != "zeros":
            raise InvalidParameterError(f"QuantConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(weight, bias)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.out_channels = weight.shape[0]
        self.in_channels = weight.shape[1] * groups
        self.kernel_size = tuple(weight.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, H', W')
        xq = self.act_quant(x) if self.act_quant is not None else x
        w = self.active_weight()
        conv = getattr(w, "conv2d", None)  # optional kernel hook on the weight
        if conv is not None:
            y = conv(xq, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = F.conv2d(xq, w.dequantize(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        if self._merged is None:
            for d in self.lora:
                h = F.conv2d(x, d.down.to(x.dtype), None, self.stride, self.padding, self.dilation)
                y = y + d.scale * F.conv2d(h, d.up.to(x.dtype).reshape(d.up.shape[0], -1, 1, 1))
        return y

    def _check_delta(self, d: LowRank) -> None:
        if self.groups != 1:
            raise AdapterMismatchError(f"LoRA {d.name!r}: LoRA on a grouped conv (groups={self.groups}) is not supported")
        super()._check_delta(d)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


# ---- building and swapping -------------------------------------------------------------------------------------

def resolve_scheme(scheme) -> Callable[[torch.Tensor], QuantizedWeight]:
    """A scheme name from SCHEMES, or a callable fn(float weight) -> QuantizedWeight."""
    if callable(scheme):
        return scheme
    from . import schemes  # noqa: F401  (fills SCHEMES)
    if scheme not in SCHEMES:
        raise InvalidParameterError(f"unknown quantization scheme {scheme!r}; valid: {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def quantize_layer(layer: torch.nn.Module, scheme) -> QuantModule:
    """A QuantLinear / QuantConv2d for an nn.Linear / nn.Conv2d (the layer is not modified)."""
    return wrap(layer, resolve_scheme(scheme)(layer.weight.detach()))


def wrap(layer: torch.nn.Module, qw: QuantizedWeight) -> QuantModule:
    """The quantized counterpart of float ``layer`` (Linear or Conv2d) computing with ``qw``, same bias and geometry."""
    if tuple(qw.shape) != tuple(layer.weight.shape):
        raise InvalidParameterError(f"quantized weight shape {tuple(qw.shape)} does not match the layer's weight "
                                    f"{tuple(layer.weight.shape)}")
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, torch.nn.Linear):
        return QuantLinear(qw, bias)
    return QuantConv2d(qw, bias, layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode)


def eligible_layers(model: torch.nn.Module, include=None, exclude=None, min_numel: int = 0) -> dict[str, torch.nn.Module]:
    """{name: layer} of the float Linear / Conv2d layers quantize_model would replace."""
    return {n: m for n, m in model.named_modules()
            if n and _eligible(n, m, include, exclude) and m.weight.numel() >= min_numel}


def _eligible(name: str, m: torch.nn.Module, include, exclude) -> bool:
    if type(m) not in (torch.nn.Linear, torch.nn.Conv2d):  # exact types: LoRA-wrapped or exotic subclasses stay float
        return False
    if include is not None and not any(p in name for p in include):
        return False
    return not (exclude and any(p in name for p in exclude))


def quantize_model(model: torch.nn.Module, scheme="int8", *, per_layer: Mapping[str, object] | None = None,
                   include=None, exclude=None, min_numel: int = 0,
                   progress: Callable[[int, int, str], None] | None = None) -> dict[str, QuantModule]:
    """Swap every nn.Linear / nn.Conv2d of ``model`` (in place) for its quantized layer; return {name: new layer}.

    ``scheme`` applies to every eligible layer; ``per_layer`` {name: scheme or None (keep float)} overrides it
    (a mixed-precision allocation). ``include``/``exclude`` are substrings of module names. All layers are
    quantized and checked first; only then are they swapped, so an error leaves ``model`` untouched."""
    per_layer = dict(per_layer or {})
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(per_layer) - names)
    if unknown:
        raise InvalidParameterError(f"per_layer names modules the model does not have: {unknown[:5]}")
    todo = [(n, m, per_layer.get(n, scheme)) for n, m in eligible_layers(model, include, exclude, min_numel).items()]
    todo = [t for t in todo if t[2] is not None]
    new = {}
    for i, (n, m, s) in enumerate(todo):  # 1. build everything
        if not torch.isfinite(m.weight).all():
            raise InvalidParameterError(f"layer {n!r} has non-finite weights; refusing to quantize")
        new[n] = quantize_layer(m, s).to(m.weight.device)
        if progress is not None:
            progress(i + 1, len(todo), n)
    replace(model, new)  # 2. swap at once
    return new


def replace(model: torch.nn.Module, new: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Set model.<name> = module for every entry, atomically: resolve and check all, then assign.

    Each replacement must compute a map of the same weight shape as the module it replaces. Returns the old
    modules by name (to undo with another ``replace``)."""
    plan = []
    for name, mod in new.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
        except AttributeError as e:
            raise InvalidParameterError(f"replace: model has no module {name!r} ({e})") from None
        if not isinstance(old, torch.nn.Module) or not isinstance(mod, torch.nn.Module):
            raise InvalidParameterError(f"replace: {name!r} is a {type(old).__name__}; replacement must be a module")
        old_shape = _weight_shape(old)
        if old_shape is not None and _weight_shape(mod) is not None and old_shape != _weight_shape(mod):
            raise InvalidParameterError(f"replace: {name!r} has weight shape {tuple(old_shape)} but the replacement "
                                        f"has {tuple(_weight_shape(mod))}")
        plan.append((parent, attr, old, mod, name))
    for parent, attr, _, mod, _ in plan:
        setattr(parent, attr, mod)
    return {name: old for _, _, old, _, name in plan}


def _weight_shape(m: torch.nn.Module):
    if isinstance(m, QuantModule):
        return m.shape
    w = getattr(m, "weight", None)
    return w.shape if isinstance(w, torch.Tensor) else None


def quantized_modules(model: torch.nn.Module) -> dict[str, QuantModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
