"""Low-rank LoRAs from full differences: extraction from a fine-tune minus its base, and any Diff to a LoRA. Pure torch.

    deltas, report = extract_lora(base_unet, tuned_unet, component="unet", rank=32)
    deltas, report = extract_lora(base_sd, tuned_sd, component="unet", sv_fro=0.95, rank=128, clamp_quantile=0.99)
    loras, report = to_lora(merged_diffs, rank=16)

Per Linear / Conv2d weight, dW = W_tuned - W_base is flattened to (out, in*kh*kw) and truncated by its SVD
(Eckart-Young: the best rank-k approximation in Frobenius norm), as kohya's extract_lora_from_models.py:
up = U_k diag(S_k), down = Vh_k, then optionally both clamped to the `clamp_quantile` of their joint value
distribution (kohya clamps at 0.99, which cuts rare outliers that blow up in fp16; the default here is exact).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from ...errors import AdapterMismatchError, InvalidParameterError
from .apply import small_op_threads
from .delta import Delta, Diff, LoRA
from .rank import RankReport, _check_selector, _layer_limit, _rel_error, check_finite, lora_from_svd, lora_svd, \
    select_rank, weight_shape

__all__ = ["extract_lora", "to_lora", "weights_of"]


def weights_of(source) -> dict[str, torch.Tensor]:
    """{module path: weight} of the Linear and Conv2d layers of a module, or of the 2-D / 4-D ``*.weight`` entries of
    a state dict."""
    if isinstance(source, torch.nn.Module):
        return {name: m.weight.detach() for name, m in source.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(m.weight, torch.Tensor)}
    if isinstance(source, Mapping):
        return {k[: -len(".weight")]: v for k, v in source.items()
                if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.ndim in (2, 4)}
    raise InvalidParameterError(f"weights source of type {type(source).__name__}; expected a torch.nn.Module or a "
                                "state dict {name: tensor}")


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation) without its input-size limit."""
    s = x.flatten().sort().values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _clamp(lora: LoRA, q: float) -> LoRA:
    """kohya's outlier clamp: both factors to +-quantile(q) of their joint (signed) values."""
    h = _quantile(torch.cat([lora.up.flatten().float(), lora.down.flatten().float()]), q)
    lora.up, lora.down = lora.up.clamp(-h, h), lora.down.clamp(-h, h)
    return lora


def to_lora(deltas: Mapping[str, Delta], *, rank: int | None = None, sv_ratio: float | None = None,
            sv_fro: float | None = None, energy: float | None = None, sv_cumulative: float | None = None,
            clamp_quantile: float | None = None, dtype: torch.dtype | None = None
            ) -> tuple[dict[str, LoRA], RankReport]:
    """Every delta as a low-rank LoRA: Diffs by the SVD of their weight, LoRAs by the thin SVD of their factors.
    Rank selection as rank.select_rank (`rank` alone is a fixed rank, with a threshold it is the maximum).
    A Diff's bias has no place in a LoRA: it is dropped with a warning (listed in report.dropped)."""
    _check_selector(rank, dict(sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative))
    if clamp_quantile is not None and not (isinstance(clamp_quantile, (int, float)) and 0 < clamp_quantile <= 1):
        raise InvalidParameterError(f"clamp_quantile={clamp_quantile!r}; expected a fraction in (0, 1] or None")
    out, report = {}, RankReport()
    for key, delta in deltas.items():
        check_finite(key, delta)
        if getattr(delta, "weight", 1) is None:  # a bias-only Diff
            report.dropped[key] = "bias difference only"
            continue
        shape = weight_shape(delta)
        _layer_limit(key, shape, rank)
        if isinstance(delta, LoRA):  # thin SVD of the factors; a bias (ComfyUI diff_b) stays with the LoRA
            U, S, Vh = lora_svd(delta)
            like, scale = delta, delta.scale
            report.params_before += delta.numel()
        else:
            w = delta.weight
            dW = w.flatten(1).to(torch.float64 if w.dtype == torch.float64 else torch.float32)  # (out, in*kh*kw)
            with small_op_threads(dW.numel()):
                U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            like, scale = None, 1.0
            report.params_before += dW.numel()
            if getattr(delta, "bias", None) is not None:
                report.dropped[key] = "bias difference"
        k = select_rank(S, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative)
        lora = lora_from_svd(U, S, Vh, k, shape, scale=scale, dtype=dtype or _dtype_of(delta), like=like)
        out[key] = _clamp(lora, clamp_quantile) if clamp_quantile is not None and clamp_quantile < 1 else lora
        report.ranks[key], report.rel_error[key] = k, _rel_error(S, k)
        report.params += lora.numel()
    if report.dropped:
        warnings.warn(f"to_lora: {len(report.dropped)} keys carry a bias difference a LoRA cannot hold; it is "
                      f"dropped, e.g. {list(report.dropped)[:5]}", stacklevel=2)
    return out, report


def _dtype_of(delta: Delta) -> torch.dtype:
    t = delta.up if isinstance(delta, LoRA) else delta.weight
    return t.dtype if t.is_floating_point() else torch.float32


def extract_lora(base, tuned, *, component: str, rank: int | None = None, sv_ratio: float | None = None,
                 sv_fro: float | None = None, energy: float | None = None, sv_cumulative: float | None = None,
                 clamp_quantile: float | None = None, min_diff: float = 0.0, dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, LoRA], RankReport]:
    """A LoRA from a fine-tune minus its base, per Linear / Conv2d weight (modules or state dicts, see weights_of).

    component: the canonical key prefix ("unet", "transformer", "text_encoder", ...). Layers whose largest
    |W_tuned - W_base| is <= min_diff are skipped (listed in report.dropped). The differences are taken in float32
    (float64 if the weights are). Rank selection and clamp_quantile as to_lora; dtype: of the LoRA factors.
    """
    if not isinstance(component, str) or not component or "." in component:
        raise InvalidParameterError(f"component={component!r}; expected a component name such as 'unet', "
                                    "'transformer' or 'text_encoder'")
    if not (isinstance(min_diff, (int, float)) and min_diff >= 0):
        raise InvalidParameterError(f"min_diff={min_diff!r}; expected a number >= 0")
    _check_selector(rank, dict(sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative))
    W0, W1 = weights_of(base), weights_of(tuned)
    missing = [k for k in W0 if k not in W1]
    wrong = [(k, tuple(W0[k].shape), tuple(W1[k].shape)) for k in W0 if k in W1 and W0[k].shape != W1[k].shape]
    if missing or wrong or not W0:
        raise AdapterMismatchError(
            f"extract_lora: base and fine-tune do not match: {len(W0)} base layers, missing in the fine-tune "
            f"{missing[:10]}, shapes differing {wrong[:10]}; pass the same architecture twice")
    diffs, skipped = {}, {}
    for name, w0 in W0.items():
        dt = torch.float64 if w0.dtype == torch.float64 else torch.float32
        dW = W1[name].to(dt) - w0.to(dt)
        if float(dW.abs().max()) <= min_diff:
            skipped[f"{component}.{name}"] = f"max |difference| <= min_diff={min_diff}"
            continue
        diffs[f"{component}.{name}"] = Diff(dW)
    deltas, report = to_lora(diffs, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy,
                             sv_cumulative=sv_cumulative, clamp_quantile=clamp_quantile, dtype=dtype)
    report.dropped.update(skipped)
    return deltas, report
