"""Merging, composing and block-scaling canonical deltas. Pure torch.

    merged, report = merge([a, b], [0.7, 0.5], "ties", density=0.3)                   # {key: Diff}
    merged, report = merge([a, b], [1, 1], "dare_linear", density=0.2, seed=0, rank=32)  # {key: LoRA}
    composed, sources = compose({"content": a, "style": b}, CONTENT_STYLE_UNET)
    scaled = scale_blocks(a, {"input": 0.5, "middle": 1.0, "output": 1.2})

Merges work per layer on the full updates dW_t = s_t B_t A_t ("task tensors"), with one weight w_t per adapter.
The methods follow PEFT's utils/merge_utils.py step for step (same rounding, same random draws, so results agree
bit for bit): TIES = trim to density / elect sign by total mass / disjoint mean (Yadav et al. 2023); DARE = drop
each entry with probability p = 1 - density and rescale the survivors by 1 / density (Yu et al. 2024); DAREx-q =
DARE with the rescale fitted on calibration inputs (Deng et al., ICLR 2025). ``space="factors"`` instead merges the
A and B factors separately with sqrt-split weights, as PEFT's ``add_weighted_adapter`` does for
"linear"/"ties"/"dare_*"/"magnitude_prune" (an approximation of the merged update; only for equal ranks).
With `rank`, each merged update becomes a LoRA as soon as it is merged: a linear merge of LoRAs exactly through its
stacked factors, the others (which change every entry) by a seeded randomized SVD of the dense update, which for
LoRAs is streamed row block by row block from their factors (svd="exact": the full SVD of the dense update).

Blocks: `block_of(key)` names the part of the network a canonical key belongs to (UNet input / middle / output,
DiT double / single, a text encoder); `scale_blocks` (aTLAS-style anisotropic scaling), `compose` (content/style
composition in the spirit of Break-for-Make) and `fit_block_weights` (aTLAS coefficients learned from a loss) use it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ...errors import AdapterMismatchError, InvalidParameterError
from .apply import small_op_threads
from .delta import Delta, Diff, LoRA
from .extract import to_lora
from .rank import (RankReport, check_finite, gaussian_test_matrix, lora_factors, lora_from_svd,
                   randomized_svd, sketch_width, weight_shape)

__all__ = ["MERGE_METHODS", "BLOCK_GROUPS", "CONTENT_STYLE_UNET", "MergeReport", "BlockFit", "merge", "block_of",
           "scale_delta", "scale_blocks", "compose", "fit_block_weights"]


# ------------------------------------------------------------------------------------------ per-tensor operations
@dataclass
class _Ctx:
    density: float
    sign: str
    generator: torch.Generator | None
    calibration: torch.Tensor | None = None   # (N, in*kh*kw) inputs of this layer (DAREx-q)
    rescale: float | None = None              # set by DAREx-q


def _sum(T: list) -> torch.Tensor:
    """T_0 + T_1 + ... in order: the same sums as PEFT's stack(T).sum(0), without the stack's copy and its strided
    reduction (the task tensors of a conv layer hold 15-30 M entries each)."""
    out = T[0]
    for t in T[1:]:
        out = out + t
    return out


_SELECT_SAMPLE = 1 << 16   # entries sampled to bracket the k-th largest |entry| of a large task tensor


def _kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor, exactly, in a few linear passes: a sorted sample brackets it, one pass
    counts the entries above the bracket, and kthvalue runs only on the ~3 % inside it (topk or kthvalue on all
    1280 x 11520 entries of a conv delta take 0.3-1 s)."""
    n, m = a.numel(), _SELECT_SAMPLE
    sample = a[torch.randint(n, (m,), generator=torch.Generator().manual_seed(n))].sort().values  # (m,) ascending
    q, d = 1 - k / n, 4 / math.sqrt(m)          # 4 standard errors of a sample quantile on each side
    lo = sample[int((q - d) * m)] if q - d > 0 else a.new_tensor(-math.inf)
    hi = sample[int((q + d) * m)] if q + d < 1 else a.new_tensor(math.inf)
    above = int(torch.count_nonzero(a > hi))
    if above < k:
        inside = a[(a >= lo) & (a <= hi)]
        if k - above <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - (k - above) + 1).values
    return torch.kthvalue(a, n - k + 1).values  # the bracket missed (probability ~1e-4): the slow exact way


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES 'trim' / magnitude pruning: keep the k = int(density * numel) largest |entries|. Large tensors keep the
    entries >= the k-th largest |entry| (the same set unless magnitudes tie there; float products of factors do
    not), small ones PEFT's exact topk set."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    a = t.abs().flatten()
    if t.numel() > 4 * _SELECT_SAMPLE:  # hardshrink keeps |t| > lambda: one pass, no bool -> float mask
        lam = torch.nextafter(_kth_largest(a, k), torch.tensor(-1.0, dtype=a.dtype))   # |t| > lam <=> |t| >= kth
        return t if lam < 0 else torch.nn.functional.hardshrink(t, float(lam))
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(a, k=k, largest=True).indices] = 1
    return t * mask.view_as(t)


def _drop_mask(t: torch.Tensor, density: float, generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (one Bernoulli draw per entry). rand < p draws the same
    masks as PEFT's torch.bernoulli(full_like(t, p)) from the same generator, three times faster."""
    return torch.rand(t.shape, dtype=t.dtype, device=t.device, generator=generator) < density


def _drop(t: torch.Tensor, density: float, generator) -> torch.Tensor:
    """DARE 'drop and rescale': survivors are divided by density so the expected update is unchanged."""
    if density >= 1:
        return t
    return torch.where(_drop_mask(t, density, generator), t, 0.0) / density   # = t * mask / density


def _elect(T: list, how: str) -> list:
    """TIES 'elect sign': per entry, the sign of the larger total mass ("total") or count ("frequency"), ties to +;
    per task tensor, True where it agrees (pruned zeros never agree)."""
    signs = [t.sign() for t in T]
    elected = torch.where(_sum(T if how == "total" else signs) >= 0, 1.0, -1.0)
    return [s == elected for s in signs]


def _disjoint_mean(T: list, w: torch.Tensor, agree: list) -> torch.Tensor:
    """TIES 'disjoint merge': the mean of the weighted entries that agree with the elected sign."""
    count = agree[0].to(T[0].dtype)
    for a in agree[1:]:
        count += a
    return _sum([torch.where(a, t * w[i], 0.0) for i, (t, a) in enumerate(zip(T, agree))]) / count.clamp_(min=1.0)


def _linear(T: list, w, c: _Ctx) -> torch.Tensor:
    return _sum([t * w[i] for i, t in enumerate(T)])


def _ties(T: list, w, c: _Ctx) -> torch.Tensor:
    T = [_trim(t, c.density) for t in T]
    return _disjoint_mean(T, w, _elect(T, c.sign))


def _magnitude_prune(T: list, w, c: _Ctx) -> torch.Tensor:
    return _linear([_trim(t, c.density) for t in T], w, c)


def _dare_linear(T: list, w, c: _Ctx) -> torch.Tensor:
    return _linear([_drop(t, c.density, c.generator) for t in T], w, c)


def _dare_ties(T: list, w, c: _Ctx) -> torch.Tensor:
    T = [_drop(t, c.density, c.generator) for t in T]
    return _disjoint_mean(T, w, _elect(T, c.sign))


def _darex_q(T: list, w, c: _Ctx) -> torch.Tensor:
    """DAREx-q: drop as DARE, then rescale by the factor 1/q that minimises the change of the layer's output on the
    calibration inputs X, || (1/q) (sum_t w_t M_t dW_t) X^T - (sum_t w_t dW_t) X^T ||^2 (closed form: a 1-D least
    squares). The paper finds 1/(1-p) far too large at high p; this picks 1/q from the data."""
    kept = _linear([t * _drop_mask(t, c.density, c.generator) if c.density < 1 else t for t in T], w, c)
    full = _linear(T, w, c)
    X = c.calibration.to(kept.dtype)                                       # (N, in*kh*kw)
    Yd, Y = kept.flatten(1) @ X.T, full.flatten(1) @ X.T                   # (out, N)
    denom = float((Yd * Yd).sum())
    c.rescale = float((Yd * Y).sum()) / denom if denom > 0 else 1.0 / c.density
    return kept * c.rescale


_METHODS: dict[str, Callable] = {
    "linear": _linear,
    "ties": _ties,
    "dare_linear": _dare_linear,
    "dare_ties": _dare_ties,
    "darex_q": _darex_q,
    "magnitude_prune": _magnitude_prune,
}
MERGE_METHODS = (*_METHODS, "cat")
"""'cat' sums the updates exactly as one LoRA of the summed rank (PEFT's "cat"); the others are listed above."""
_SPACES = ("delta", "factors")
_SVDS = ("fast", "exact")


# ---------------------------------------------------------------------------------------------------- whole merges
@dataclass
class MergeReport:
    method: str
    sources: dict[str, list[int]] = field(default_factory=dict)   # key -> indices of the adapters that have it
    rescale: dict[str, float] = field(default_factory=dict)       # DAREx-q: fitted rescale 1/q per key
    rank: RankReport | None = None                                # when rank= turned the result into LoRAs


def _ordered_keys(adapters: Sequence[Mapping]) -> list[str]:
    return list(dict.fromkeys(k for a in adapters for k in a))


def _sum_exact(items: list[tuple[Delta, float]]) -> Delta:
    """sum_t w_t dW_t exactly: one LoRA of the summed rank when every item is a LoRA without a bias, else a Diff."""
    if len(items) == 1 and items[0][1] == 1.0:
        return items[0][0]
    shape = weight_shape(items[0][0])
    if all(isinstance(d, LoRA) and getattr(d, "bias", None) is None for d, _ in items):
        ups, downs = [], []
        for d, w in items:
            B, A = lora_factors(d)                                          # (out, r), (r, in*kh*kw)
            ups.append(B * (w * d.scale))
            downs.append(A)
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)                   # (out, R), (R, in*kh*kw)
        R = up.shape[1]
        return LoRA(down.reshape(R, *shape[1:]), up.reshape(shape[0], R, *((1, 1) if len(shape) == 4 else ())))
    weight = sum(w * d.delta_weight(shape) for d, w in items)
    biases = [(d.delta_bias(), w) for d, w in items]
    bias = sum(w * b for b, w in biases if b is not None) if any(b is not None for b, _ in biases) else None
    return Diff(weight, bias)


def _merge_factors(key: str, present: list[tuple[int, Delta]], w: list[float], fn, ctx: _Ctx) -> LoRA:
    """PEFT add_weighted_adapter for equal ranks: A and B merged separately, weights sign(w s) sqrt|w s| on A and
    sqrt|w s| on B (s = alpha / rank)."""
    if not all(isinstance(d, LoRA) and d.mid is None and getattr(d, "bias", None) is None for _, d in present) or \
            len({(d.rank, tuple(d.up.shape), tuple(d.down.shape)) for _, d in present}) != 1:
        found = [(type(d).__name__, tuple(getattr(d, "down", getattr(d, "weight", None)).shape)) for _, d in present]
        raise AdapterMismatchError(f"merge(space='factors'): key {key!r} has {found}; merging A and B separately needs "
                                   "plain LoRAs (no Tucker core, no bias) of one rank and shape at every key; use "
                                   "space='delta'")
    ws = [wt * d.scale for wt, (_, d) in zip(w, present)]
    w_a = torch.tensor([math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws])
    w_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
    A = fn([d.down.float() for _, d in present], w_a, ctx)
    B = fn([d.up.float() for _, d in present], w_b, ctx)
    return LoRA(A, B)


def merge(adapters: Sequence[Mapping[str, Delta]], weights: Sequence[float] | None = None, method: str = "linear", *,
          density: float = 1.0, majority_sign: str = "total", seed: int | None = 0,
          generator: torch.Generator | None = None, calibration: Mapping[str, torch.Tensor] | None = None,
          space: str = "delta", rank: int | None = None, svd: str = "fast",
          progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Delta], MergeReport]:
    """Merge adapters layer by layer: {key: Diff} of the merged update (or {key: LoRA} for 'cat', space='factors',
    or when `rank` is given: the best LoRA of rank <= `rank` of the merged update; a layer keeps at most the rank its
    update has and its weight allows).

    weights: one per adapter (default 1.0 each). method: one of MERGE_METHODS. density: the fraction kept by TIES,
    magnitude pruning and DARE (DARE's drop probability p = 1 - density). majority_sign: "total" or "frequency".
    seed / generator: DARE's random masks come from torch.Generator().manual_seed(seed) (or `generator`; seed=None:
    the global RNG), one bernoulli draw per task tensor in key order (space='factors': the A factors, then the B
    factors), so they equal PEFT's under torch.manual_seed(seed).
    calibration: DAREx-q only, {key: X (N, in*kh*kw)} inputs of each layer (conv: unfolded patches).
    An adapter without a key takes no part in that key's merge (as in PEFT). Biases (Diff / ComfyUI diff_b) add
    linearly.
    svd: how a merged update becomes a rank-`rank` LoRA. "fast": a linear merge of LoRAs is exactly one LoRA of the
    summed rank ([w_t s_t B_t] stacked @ [A_t] stacked), reduced by QR of both factors and the SVD of the small core
    (exact); the other methods change every entry, so their dense update is reduced by a seeded randomized SVD
    (rank.randomized_svd: 8 extra directions, 1 power iteration for LoRAs (_NITER), 2 for Diffs;
    report.rank.rel_error is its actual error, <= 1.04x the optimum's in bench/merge_bench.py). For LoRAs, TIES /
    DARE / magnitude pruning stream the dense update block by block from the factors (_merge_streamed): the same
    update as without a rank (same masks and thresholds; products may differ in the last bit), never a new
    full-size tensor. "exact": the full SVD of every dense merged update (slow: ~30 s for one 1280 x 11520 conv on
    2 cores).
    progress: called as progress(done, total) after each key; raise from it to cancel (nothing is returned).
    """
    keys, weights = _check_merge_args(adapters, weights, method, space, density, majority_sign, svd, calibration)
    if generator is None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out, report = {}, MergeReport(method, rank=None if rank is None else RankReport())
    svd_seeds = torch.Generator().manual_seed(seed if seed is not None else 0)  # apart from DARE's masks
    workspace = _Workspace()
    # svd="fast" runs on one thread: merging is memory-bound elementwise work, and on 2 busy cores a second OpenMP
    # thread made TIES 1.7x slower on a 1280 x 23040 conv and 7-10x slower on a 320 x 768 layer (barrier waits);
    # "exact" keeps the threads the old path had (small kernels on one, the rest and the full SVDs on all)
    with small_op_threads(0 if svd == "fast" else small_op_threads.SMALL):
        for i, key in enumerate(keys):
            present = [(t, a[key]) for t, a in enumerate(adapters) if key in a]
            report.sources[key] = [t for t, _ in present]
            ctx = _Ctx(density, majority_sign, generator)
            w = [float(weights[t]) for t, _ in present]
            svd_seed = None if rank is None else int(torch.randint(1 << 62, (), generator=svd_seeds))
            if _streamable(present, method, space, rank, svd):
                _check_shapes(key, present)
                merged = _merge_streamed(key, present, w, method, ctx, rank, svd_seed, workspace, report.rank)
            else:
                merged = _merge_key(key, present, w, method, space, rank, svd, ctx, calibration)
                if rank is not None:  # back to a LoRA under the rank budget, key by key: no dense update is kept
                    merged = _to_rank(key, merged, rank, svd, svd_seed, report.rank)
            if ctx.rescale is not None:
                report.rescale[key] = ctx.rescale
            if merged is not None:
                out[key] = merged
            if progress is not None:
                progress(i + 1, len(keys))
    if report.rank is not None and report.rank.dropped:
        warnings.warn(f"merge: {len(report.rank.dropped)} keys carry a bias difference a LoRA cannot hold; it is "
                      f"dropped, e.g. {list(report.rank.dropped)[:5]}", stacklevel=2)
    return out, report


def _check_merge_args(adapters, weights, method, space, density, majority_sign, svd, calibration):
    """Every argument checked before any work; returns (the keys in merge order, one weight per adapter)."""
    if method not in MERGE_METHODS:
        raise InvalidParameterError(f"merge method={method!r}; valid: {', '.join(MERGE_METHODS)}")
    if space not in _SPACES:
        raise InvalidParameterError(f"merge space={space!r}; valid: {', '.join(_SPACES)}")
    if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or not adapters:
        raise InvalidParameterError(f"merge adapters: {type(adapters).__name__}; expected a non-empty list of "
                                    "{key: delta} dicts")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters) or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in weights):
        raise InvalidParameterError(f"merge weights={weights!r}; expected {len(adapters)} finite numbers, one per "
                                    "adapter")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidParameterError(f"density={density!r}; expected a fraction in (0, 1] (DARE drops 1 - density)")
    if majority_sign not in ("total", "frequency"):
        raise InvalidParameterError(f"majority_sign={majority_sign!r}; valid: total, frequency")
    if svd not in _SVDS:
        raise InvalidParameterError(f"merge svd={svd!r}; valid: {', '.join(_SVDS)}")
    if method == "darex_q":
        if space != "delta":
            raise InvalidParameterError("method='darex_q' fits a rescale of the merged update; use space='delta'")
        if calibration is None:
            raise InvalidParameterError("method='darex_q' needs calibration={key: inputs (N, in*kh*kw)} for every "
                                        "key; without inputs use method='dare_linear'")
    keys = _ordered_keys(adapters)
    for a in adapters:
        for key, d in a.items():
            check_finite(key, d)
    if method == "darex_q":
        missing = [k for k in keys if k not in calibration]
        if missing:
            raise InvalidParameterError(f"darex_q: calibration has no inputs for {len(missing)} keys, e.g. "
                                        f"{missing[:5]}; every merged key needs them")
    return keys, weights


def _check_shapes(key, present) -> None:
    shapes = {tuple(weight_shape(d)) for _, d in present}
    if len(shapes) != 1:
        raise AdapterMismatchError(f"merge: key {key!r} has updates of different shapes {sorted(shapes)} in adapters "
                                   f"{[t for t, _ in present]}; they are not for the same model")


def _merge_key(key, present, w, method, space, rank, svd, ctx, calibration) -> Delta:
    """One key's merged update from the adapters that have it: [(adapter index, delta)] with weights w."""
    _check_shapes(key, present)
    plain = all(isinstance(d, LoRA) and getattr(d, "bias", None) is None for _, d in present)
    if method == "cat" or (method == "linear" and space == "delta" and rank is not None and svd == "fast" and plain):
        return _sum_exact([(d, wt) for (_, d), wt in zip(present, w)])  # [w_t s_t B_t] @ [A_t]: exact, no dense dW
    fn = _METHODS.get(method)
    if space == "factors":
        with small_op_threads(sum(d.numel() for _, d in present)):
            return _merge_factors(key, present, w, fn, ctx)
    return _merge_dense(key, present, w, fn, ctx, calibration if method == "darex_q" else None)


def _merge_dense(key, present, w, fn, ctx, calibration) -> Diff:
    shape = weight_shape(present[0][1])
    if calibration is not None:
        X = calibration[key]
        if X.ndim != 2 or X.shape[1] != math.prod(shape[1:]):
            raise InvalidParameterError(f"darex_q: calibration[{key!r}] has shape {tuple(X.shape)}; expected "
                                        f"(N, {math.prod(shape[1:])}) inputs of a layer with weight {shape}")
        ctx.calibration = X
    with small_op_threads(math.prod(shape) * len(present)):
        dense = fn([d.delta_weight(shape) for _, d in present], torch.tensor(w), ctx)
    biases = [(d.delta_bias(), wt) for (_, d), wt in zip(present, w)]
    bias = sum(wt * b for b, wt in biases if b is not None) if any(b is not None for b, _ in biases) else None
    return Diff(dense, bias)


# ------------------------------------------------------------------------------- streamed merges into a LoRA
# TIES / DARE / magnitude pruning change every entry of the merged update, so a LoRA merge under a rank budget needs
# the dense update of each layer. It is formed here row block by row block: the task tensors of a block are
# recomputed from the factors (r multiply-adds per entry) and sparsified, elected and merged while they sit in the
# L2 cache, with elementwise float ops only (comparisons into bool tensors and torch.where cost 5-50x a float op on
# CPU), and the block of the merged update goes into a buffer reused from layer to layer (a fresh 50 MB tensor per
# layer costs ~2 ns per entry in page faults) and into the sketch Y = M Omega of the randomized SVD. The dense
# update and its DARE masks are the dense path's (same generator draws, same float operations); only the product
# B A, taken per block, may differ from the whole product in the last bit.
_BLOCK = 1 << 16   # entries per row block: its task tensors and temporaries (~8 x 256 KB) stay in the 2 MB L2 cache
_NITER = 1         # power iterations: error <= 1.04x the optimum on SD1.5 shapes (bench/merge_bench.py)
_STREAMED = {      # method -> (how each task tensor is sparsified, how the sparsified tensors are merged)
    "ties": ("trim", "elect"), "magnitude_prune": ("trim", "sum"),
    "dare_linear": ("drop", "sum"), "dare_ties": ("drop", "elect"),
}


_ONE = torch.ones(())


class _Workspace:
    """Named flat float32 buffers, grown on demand and reused from layer to layer."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel)
        return buf[:numel]


def _streamable(present, method: str, space: str, rank, svd: str) -> bool:
    return (rank is not None and svd == "fast" and space == "delta" and method in _STREAMED
            and all(isinstance(d, LoRA) and getattr(d, "bias", None) is None for _, d in present))


def _product(B: torch.Tensor, A: torch.Tensor, s: float, out: torch.Tensor) -> torch.Tensor:
    """out = (B @ A) * s, as LoRA.delta_weight computes it (for a row block of B)."""
    return torch.mm(B, A, out=out).mul_(s)


def _kth_largest_abs(B, A, s: float, k: int, blocks, ws: _Workspace, bracket: tuple | None = None) -> float:
    """The k-th largest |entry| of (B @ A) * s without keeping the product: a sample of entries taken from the
    factors brackets it, one blocked pass counts the entries above the bracket and collects the few inside it, and
    kthvalue runs on those (as _kth_largest, which needs the whole tensor)."""
    m, n = B.shape[0], A.shape[1]
    N = m * n
    if N <= _SELECT_SAMPLE:   # small: all of it, block by block as the merge will compute it
        a = ws.get("small", N).view(m, n)
        for i0, i1 in blocks:
            _product(B[i0:i1], A, s, a[i0:i1])
        return float(torch.kthvalue(a.view(-1).abs_(), N - k + 1).values)
    # 1. bracket (lo, hi): quantiles of a sample of entries, _Z standard errors on each side (or given, by tests)
    lo, hi = bracket or _sampled_bracket(B, A, s, k, ws)
    # 2. one pass: count above hi, collect [lo, hi]
    above, inside = 0, []
    for i0, i1 in blocks:
        x = _product(B[i0:i1], A, s, ws.get("block", (i1 - i0) * n).view(i1 - i0, n)).abs_()
        c, x = _split(x.view(-1), lo, hi, ws)
        above += c
        inside.append(x)
    inside = torch.cat(inside)
    if above < k <= above + inside.numel():
        return float(torch.kthvalue(inside, inside.numel() - (k - above) + 1).values)
    full = torch.cat([_product(B[i0:i1], A, s, torch.empty(i1 - i0, n)).abs_().view(-1) for i0, i1 in blocks])
    return float(torch.kthvalue(full, N - k + 1).values)   # the bracket missed (_Z standard errors: rare)


_Z = 4.0               # standard errors of a sampled quantile spared on each side of a bracket (a miss costs time only)
_SAMPLE_BLOCKS = 16    # the streamed threshold's sample: 1 / 16 of the product's entries, in 16 blocks


def _sampled_bracket(B, A, s: float, k: int, ws: _Workspace) -> tuple[float, float]:
    """(lo, hi) around the k-th largest |entry| of (B @ A) * s: quantiles of a sample Z of its entries, found in
    turn in a bracket from a random sub-sample of Z. Z is the diagonal blocks of the product with its rows and
    columns randomly permuted (a Latin design): every row and every column enters in equal measure, so row and
    column effects (zero rows, uneven norms) cancel, and 1/16 of the entries cost 1/16 of the product instead of r
    gathered multiply-adds per entry (single entries at random: ~100 ns each)."""
    m, n = B.shape[0], A.shape[1]
    N, G = m * n, min(_SAMPLE_BLOCKS, m, n)   # (every block holds a row and a column)
    g = torch.Generator().manual_seed(N)
    Bp, Ap = B.index_select(0, torch.randperm(m, generator=g)), A.index_select(1, torch.randperm(n, generator=g))
    Z = torch.cat([torch.mm(Bp[m * b // G:m * (b + 1) // G], Ap[:, n * b // G:n * (b + 1) // G]).view(-1)
                   for b in range(G)]).mul_(s).abs_()                               # (S,) ~ N / G entries
    S = Z.numel()
    js = _bracket_positions(S, 1 - k / N)
    known = [j for j in js if j is not None]
    if not known:
        return -math.inf, math.inf
    # Z's order statistics at js, exactly: a sub-sample brackets them, one pass splits Z
    # (S' = (2.5 S)^(2/3) balances kthvalue on S' entries against kthvalue on the ~_Z S / sqrt(S') inside)
    sub = Z[torch.randint(S, (min(S, max(1024, int((2.5 * S) ** (2 / 3)))),), generator=g)]
    p_lo, p_hi = _bracket_positions(sub.numel(), known[0] / S, known[-1] / S)
    lo = float(torch.kthvalue(sub, p_lo).values) if p_lo is not None else -math.inf
    hi = float(torch.kthvalue(sub, p_hi).values) if p_hi is not None else math.inf
    above, inside = _split(Z, lo, hi, ws)
    below = S - above - inside.numel()
    values = [float(torch.kthvalue(inside, j - below).values) if below < j <= below + inside.numel()
              else float(torch.kthvalue(Z, j).values) for j in known]                 # (else: the sub-sample missed)
    lo = values[0] if js[0] is not None else -math.inf
    return lo, values[-1] if js[1] is not None else math.inf


def _bracket_positions(S: int, q_lo: float, q_hi: float | None = None) -> tuple[int | None, int | None]:
    """1-based ascending positions, in a random sample of S entries, of values below the population's q_lo quantile
    and above its q_hi quantile (default q_lo) with _Z standard errors to spare (the 1 / S keeps a spare of a few
    entries at the extremes); None where the spare reaches past an end of the sample."""
    q_hi = q_lo if q_hi is None else q_hi
    d_lo = _Z * math.sqrt((q_lo * (1 - q_lo) + 1 / S) / S)
    d_hi = _Z * math.sqrt((q_hi * (1 - q_hi) + 1 / S) / S)
    return (int((q_lo - d_lo) * S) + 1 if q_lo - d_lo > 0 else None,
            int((q_hi + d_hi) * S) + 1 if q_hi + d_hi < 1 else None)


def _split(x: torch.Tensor, lo: float, hi: float, ws: _Workspace) -> tuple[int, torch.Tensor]:
    """(the number of entries > hi, the entries in [lo, hi]) of a flat tensor, with float compares (a compare into a
    bool tensor costs 7x one into float)."""
    gt = torch.gt(x, hi, out=ws.get("gt", x.numel()))                                # 1.0 / 0.0
    mid = torch.ge(x, lo, out=ws.get("in", x.numel())).sub_(gt)                      # 1.0 inside [lo, hi]
    return int(gt.sum()), _masked(x, mid.bool())


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[mask] for a sparse mask, in two steps: the 8-entry words of the mask that hold a True (one nonzero over an
    int64 view, 1/8 of the entries), then the entries inside those words. nonzero is the cost of x[mask] (~2 ns per
    entry on one thread); this halves it at the ~3 % density of a bracket."""
    if mask.numel() % 8:
        return x[mask]
    words = mask.view(torch.int64).nonzero().squeeze(1)                            # (w,)
    return x.view(-1, 8).index_select(0, words)[mask.view(-1, 8).index_select(0, words)]


def _elect_block(X: list, w: list, how: str, out: torch.Tensor, tmp: list) -> torch.Tensor:
    """TIES 'elect sign' + 'disjoint merge' of one block, with float ops only. S = sum of X_t (or of sign X_t);
    sigma = copysign(1, S); X_t agrees where X_t sigma > 0, so X_t [agrees] = sigma relu(X_t sigma) and the count of
    agreeing tensors is sum_t sign(relu(X_t sigma)). The result sigma (sum_t w_t relu(X_t sigma)) / max(count, 1)
    equals PEFT's sum_t (w_t X_t)[agrees] / max(count, 1) to the bit: multiplying by +-1 and rounding commute.
    (PEFT elects +1 where S = 0; copysign gives -1 only at S = -0.0, where every X_t is +-0 and the result is 0
    either way.) Overwrites X."""
    S, sig, cnt, t = tmp
    if how == "total":
        torch.add(X[0], X[1], out=S) if len(X) > 1 else S.copy_(X[0])
        for x in X[2:]:
            S.add_(x)
    else:
        torch.sign(X[0], out=S)
        for x in X[1:]:
            S.add_(torch.sign(x, out=t))
    torch.copysign(_ONE, S, out=sig)                         # (rows, n) the elected sign
    for x in X:
        x.mul_(sig).relu_()                                  # |X_t| where it agrees, else 0
    torch.sign(X[0], out=cnt)
    for x in X[1:]:
        cnt.add_(torch.sign(x, out=t))
    torch.mul(X[0], w[0], out=out)
    for x, wt in zip(X[1:], w[1:]):
        out.add_(torch.mul(x, wt, out=t))
    return out.mul_(sig).div_(cnt.clamp_min_(1.0))


def _sum_block(X: list, w: list, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum_t w_t X_t in adapter order (PEFT's weighted stack summed over dim 0)."""
    torch.mul(X[0], w[0], out=out)
    for x, wt in zip(X[1:], w[1:]):
        out.add_(torch.mul(x, wt, out=t))
    return out


def _merge_streamed(key: str, present, w: list[float], method: str, ctx: _Ctx, rank: int, seed: int,
                    ws: _Workspace, into: RankReport) -> LoRA:
    """TIES / DARE / magnitude pruning of plain LoRAs straight into a LoRA of rank <= `rank` (see the section
    comment): the dense merged update equals _merge_dense's, its rank reduction is rank.randomized_svd with the
    sketch formed on the way (or the full SVD where 2 (rank + 8) >= min(out, in))."""
    shape = weight_shape(present[0][1])
    m, n = shape[0], math.prod(shape[1:])
    rank = min(rank, m, n)
    factors = [lora_factors(d) for _, d in present]                          # [(B (m, r), A (r, n))]
    B, A = [f[0].contiguous() for f in factors], [f[1].contiguous() for f in factors]
    # scales and weights as 0-dim float32 tensors: the same products as with Python floats, without the ~1.5 us
    # of wrapping a Python scalar on each call (a dozen calls per block)
    s = [torch.tensor(float(d.scale)) for _, d in present]
    w = [torch.tensor(float(wt)) for wt in w]
    T, p = len(present), ctx.density
    select, combine = _STREAMED[method]
    rows = max(1, _BLOCK // n)
    blocks = [(i, min(i + rows, m)) for i in range(0, m, rows)]
    h = min(rows, m) * n                                                     # entries of the largest block
    # 1. TIES / magnitude pruning: the threshold of each task tensor (|entries| > lam are the top k)
    lam = [-math.inf] * T
    if select == "trim" and p < 1:
        k = int(p * m * n)
        for t in range(T):
            tau = torch.tensor(_kth_largest_abs(B[t], A[t], s[t], k, blocks, ws)) if k else None
            # the next float32 below tau: hardshrink compares in float32, so |x| > lam <=> |x| >= tau
            lam[t] = math.inf if k == 0 else float(torch.nextafter(tau, torch.tensor(-math.inf)))
    # 2. DARE: masks drawn task tensor by task tensor, as the dense path and PEFT draw them; all but the last tensor
    #    are kept (dropped and rescaled) in buffers, the last is drawn block by block in step 3
    drop = select == "drop" and p < 1
    kept = [ws.get(f"task{t}", m * n).view(m, n) for t in range(T - 1)] if drop else []
    rnd = ws.get("rand", h)

    def task(t, i0, i1, out):
        x = _product(B[t][i0:i1], A[t], s[t], out)
        if drop:
            x.mul_(torch.rand(x.shape, generator=ctx.generator, out=rnd[:x.numel()].view_as(x)).lt_(p)).div_(p)
        elif lam[t] > -math.inf:
            torch.ops.aten.hardshrink.out(x, lam[t], out=x)               # keeps |x| > lam
        return x

    for t, buf in enumerate(kept):
        for i0, i1 in blocks:
            task(t, i0, i1, buf[i0:i1])
    # 3. block by block: the last (or every) task tensor, the merge, the sketch Y = M Omega
    M = ws.get("merged", m * n).view(m, n)
    q = sketch_width(m, n, rank)
    exact = 2 * (rank + 8) >= min(m, n)
    omega = None if exact else gaussian_test_matrix(n, q, seed)               # (n, q)
    Y = None if exact else torch.empty(m, q)
    total = 0.0
    tmp = [ws.get(f"tmp{i}", h) for i in range(4)]
    fresh = [ws.get(f"x{t}", h) for t in range(T)]
    for i0, i1 in blocks:
        view = lambda b: b[:(i1 - i0) * n].view(i1 - i0, n)  # noqa: E731
        X = [kept[t][i0:i1] if t < len(kept) else task(t, i0, i1, view(fresh[t])) for t in range(T)]
        out = M[i0:i1]
        if combine == "elect":
            _elect_block(X, w, ctx.sign, out, [view(b) for b in tmp])
        else:
            _sum_block(X, w, out, view(tmp[0]))
        total += float(torch.dot(out.view(-1), out.view(-1)))
        if Y is not None:
            torch.mm(out, omega, out=Y[i0:i1])
    # 4. the rank reduction
    if exact:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora, part = to_lora({key: Diff(M.view(shape))}, rank=rank, dtype=torch.float32)
        into.add(part)
        return lora[key]
    U, S, Vh = randomized_svd(M, rank, niter=_NITER, sketch=Y)
    into.ranks[key] = rank
    into.rel_error[key] = 0.0 if total == 0 else math.sqrt(max(total - float(S.double().square().sum()), 0) / total)
    into.params_before += m * n
    lora = lora_from_svd(U, S, Vh, rank, shape, dtype=torch.float32)
    into.params += lora.numel()
    return lora


def _to_rank(key: str, delta: Delta, rank: int, svd: str, seed: int, into: RankReport) -> LoRA | None:
    """The best LoRA of rank <= `rank` of one merged update (see merge's `svd`), its figures added to `into`. A
    layer whose weight allows less (SD's conv_out: 4 outputs) keeps the rank it allows."""
    shape = weight_shape(delta)
    rank = min(rank, shape[0], math.prod(shape[1:]))
    if isinstance(delta, LoRA) or svd == "exact" or 2 * (rank + 8) >= min(shape[0], math.prod(shape[1:])):
        with warnings.catch_warnings():                                    # (bias warnings: once, by merge)
            warnings.simplefilter("ignore")
            lora, part = to_lora({key: delta}, rank=rank)
        into.add(part)
        return lora.get(key)
    M = delta.weight.flatten(1).float()                                    # (out, in*kh*kw)
    U, S, Vh = randomized_svd(M, rank, seed=seed)
    lora = lora_from_svd(U, S, Vh, rank, shape, dtype=delta.weight.dtype)
    total = float(torch.linalg.vector_norm(M).double() ** 2)
    into.ranks[key] = rank
    into.rel_error[key] = 0.0 if total == 0 else math.sqrt(max(total - float(S.double().square().sum()), 0) / total)
    into.params_before += M.numel()
    into.params += lora.numel()
    if delta.bias is not None:
        into.dropped[key] = "bias difference"
    return lora


# -------------------------------------------------------------------------------------------------------- blocks
BLOCK_GROUPS = ("input", "middle", "output", "double", "single", "text_encoder", "text_encoder_2", "other")
_BLOCKS = (  # (pattern matched at the start of a canonical key, group); a captured number makes "<group>.<n>"
    (r"unet\.down_blocks\.(\d+)\.", "input"),
    (r"unet\.conv_in$", "input"),
    (r"unet\.mid_block\.", "middle"),
    (r"unet\.up_blocks\.(\d+)\.", "output"),
    (r"unet\.conv_(?:norm_)?out$", "output"),
    (r"transformer\.transformer_blocks\.(\d+)\.", "double"),       # Flux double-stream; SD3 joint / PixArt blocks
    (r"transformer\.single_transformer_blocks\.(\d+)\.", "single"),
    (r"text_encoder\.encoder\.layers\.(\d+)\.", "text_encoder"),
    (r"text_encoder\.", "text_encoder"),
    (r"text_encoder_2\.encoder\.layers\.(\d+)\.", "text_encoder_2"),
    (r"text_encoder_2\.", "text_encoder_2"),
)
_BLOCK_RES = [(re.compile(p), g) for p, g in _BLOCKS]
_FINE = re.compile(rf"({'|'.join(BLOCK_GROUPS)})(\.\d+)?$")


def block_of(key: str, fine: bool = False) -> str:
    """The block a canonical key belongs to: one of BLOCK_GROUPS, or with fine=True the numbered block
    ("input.1" = unet.down_blocks.1, "output.0", "double.3", "single.12", "text_encoder.5" = encoder layer 5).
    unet conv_in counts as input and conv_out as output; embeddings and final projections are "other"."""
    for pattern, group in _BLOCK_RES:
        m = pattern.match(key)
        if m:
            return f"{group}.{m.group(1)}" if fine and m.groups() else group
    return "other"


_MISSING = object()


def _lookup(key: str, table: Mapping, default=_MISSING):
    """table's entry for a key: its longest module-path prefix listed, else its numbered block, else its group."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in table:
            return table[prefix]
    for name in (block_of(key, fine=True), block_of(key)):
        if name in table:
            return table[name]
    return default


def _check_names(what: str, names, deltas_list: Sequence[Mapping]) -> None:
    components = {k.split(".", 1)[0] for d in deltas_list for k in d} | {"unet", "transformer"}
    bad = [n for n in names if not (isinstance(n, str) and (_FINE.match(n) or n.split(".", 1)[0] in components))]
    if bad:
        raise InvalidParameterError(f"{what}: unknown block names {bad}; valid: {', '.join(BLOCK_GROUPS)}, numbered "
                                    "blocks such as 'input.1' / 'double.3', or module-path prefixes such as "
                                    "'unet.up_blocks.0.attentions.1'")


def scale_delta(delta: Delta, c: float) -> Delta:
    """c * delta, of the same class (a LoRA scales its up factor; a bias difference scales too)."""
    changes = {"up": delta.up * c} if isinstance(delta, LoRA) else {"weight": None if delta.weight is None
                                                                    else delta.weight * c}
    if getattr(delta, "bias", None) is not None:
        changes["bias"] = delta.bias * c
    return dataclasses.replace(delta, **changes)


def scale_blocks(deltas: Mapping[str, Delta], weights: Mapping[str, float], *, default: float = 1.0
                 ) -> dict[str, Delta]:
    """Anisotropic scaling (aTLAS, Zhang et al. 2024): each key times the weight of its block, e.g.
    {"input": 0.5, "middle": 1, "output": 1.2}; a key takes the entry of its longest listed module-path prefix,
    else of its numbered block ("output.0"), else of its group, else `default`. Weight 0 leaves the key out."""
    _check_names("scale_blocks", list(weights), [deltas])
    bad = {k: v for k, v in {**weights, "default": default}.items()
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise InvalidParameterError(f"scale_blocks: weights {bad}; expected finite numbers")
    out = {}
    for key, delta in deltas.items():
        c = float(_lookup(key, weights, default))
        if c != 0:
            out[key] = delta if c == 1 else scale_delta(delta, c)
    return out


CONTENT_STYLE_UNET = {"input": "content", "middle": "content", "output": "style",
                      "text_encoder": ("content", "style"), "text_encoder_2": ("content", "style"),
                      "other": ("content", "style")}
"""UNet content from the input and middle blocks, style from the output blocks; text encoders and the rest summed."""


def _sources(value, names) -> list[tuple[str, float]] | None:
    if value is None:
        return []
    if isinstance(value, str):
        pairs = [(value, 1.0)]
    elif isinstance(value, Mapping):
        pairs = [(n, w) for n, w in value.items()]
    elif isinstance(value, Sequence):
        pairs = [(n, 1.0) for n in value]
    else:
        return None
    ok = all(n in names and isinstance(w, (int, float)) and math.isfinite(w) for n, w in pairs)
    return pairs if ok else None


def compose(adapters: Mapping[str, Mapping[str, Delta]], assign: Mapping[str, object], *, default=_MISSING
            ) -> tuple[dict[str, Delta], dict[str, list[str]]]:
    """Compose adapters block by block (content/style in the spirit of Break-for-Make; B-LoRA-style splits with
    module-path prefixes). adapters: {name: deltas}; assign: {block or module prefix: source}, looked up as in
    scale_blocks, where a source is an adapter name, a list of names (their updates summed exactly, one LoRA of the
    summed rank), {name: weight}, or None (left out). `default` serves keys no entry covers; without it such keys
    raise. Returns (deltas, {key: names used})."""
    names = list(adapters)
    _check_names("compose", list(assign), list(adapters.values()))
    bad = {b: v for b, v in [*assign.items(), *([("default", default)] if default is not _MISSING else [])]
           if _sources(v, names) is None}
    if bad:
        raise InvalidParameterError(f"compose: assignments {bad}; a source is one of the adapter names {names}, a "
                                    "list of them, {name: weight}, or None")
    out, used, unassigned = {}, {}, []
    for key in _ordered_keys(list(adapters.values())):
        value = _lookup(key, assign, default)
        if value is _MISSING:
            unassigned.append(key)
            continue
        items = [(adapters[n][key], float(w)) for n, w in _sources(value, names) if key in adapters[n]]
        used[key] = [n for n, _ in _sources(value, names) if key in adapters[n]]
        for d, _ in items:
            check_finite(key, d)
        if items:
            out[key] = _sum_exact(items)
    if unassigned:
        blocks = sorted({block_of(k) for k in unassigned})
        raise InvalidParameterError(f"compose: no assignment covers blocks {blocks} ({len(unassigned)} keys, e.g. "
                                    f"{unassigned[:3]}); add them to assign or pass default=<source>")
    return out, used


@dataclass
class BlockFit:
    coefficients: list[dict[str, float]]   # per adapter: block -> coefficient (feed to scale_blocks)
    losses: list[float]                    # loss at each step, before its update


def fit_block_weights(adapters: Sequence[Mapping[str, Delta]], loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                      *, group: Callable[[str], str] = block_of, init: float = 1.0, steps: int = 100,
                      lr: float = 0.05, optimizer: Callable | None = None) -> BlockFit:
    """Learn aTLAS coefficients (Zhang et al. 2024): the merged update of each key is sum_t lambda_{t, group(key)} dW_t
    and only the lambdas are trained, to minimise `loss(merged)`, a user closure that receives {key: dense merged
    dW} (differentiable in the lambdas) and returns a scalar, e.g. the distance of the patched layers' outputs
    (torch.func.functional_call with W + dW) to a few reference outputs.
    group: key -> block name (block_of, lambda k: block_of(k, fine=True), or lambda k: k for per-layer).
    optimizer: params -> torch optimizer (default Adam(lr)); LBFGS works too (a closure is passed to step)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidParameterError(f"steps={steps!r}; expected an integer >= 1")
    # 1. the dense updates, fixed
    dense: list[dict[str, torch.Tensor]] = []
    for a in adapters:
        for key, d in a.items():
            check_finite(key, d)
        dense.append({key: d.delta_weight(weight_shape(d)) for key, d in a.items()})
    # 2. one coefficient per (adapter, block)
    lam = [{b: torch.tensor(float(init), requires_grad=True) for b in dict.fromkeys(group(k) for k in a)}
           for a in dense]
    params = [p for per in lam for p in per.values()]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)

    def merged() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for a, per in zip(dense, lam):
            for key, dW in a.items():
                term = per[group(key)] * dW
                out[key] = term if key not in out else out[key] + term
        return out

    def closure():
        opt.zero_grad()
        value = loss(merged())
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
            raise InvalidParameterError(f"fit_block_weights: loss returned {type(value).__name__}; it must return a "
                                        "scalar tensor computed from the merged deltas it receives")
        if not torch.isfinite(value):
            raise InvalidParameterError(f"fit_block_weights: loss is {float(value)}; lower lr or check the closure")
        value.backward()
        return value

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return BlockFit([{b: float(p.detach()) for b, p in per.items()} for per in lam], losses)
