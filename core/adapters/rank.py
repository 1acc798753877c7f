"""The rank of LoRA deltas: thin SVD of a LoRA product, per-layer resizing, and pruning to a global budget. Pure torch.

    small, report = resize_lora(deltas, sv_fro=0.9)         # per layer, like kohya's resize_lora.py
    pruned, report = prune_to_budget(deltas, fraction=0.5)  # best rank-1 components across all layers
    print(report.summary())

A LoRA update dW = s * B @ A (s = alpha / r) is split into rank-1 components s * sigma_i * u_i v_i^T by a thin SVD
of the product: QR of B and A^T, then the SVD of the small (r, r) core, so no (out, in) matrix is ever formed.
By Eckart-Young, keeping the k largest components is the best rank-k approximation, and its relative Frobenius
error is sqrt(sum_{i>=k} sigma_i^2) / sqrt(sum_i sigma_i^2), read off the singular values.

Pruning follows dynamic-rank "DoRA" (Mao et al. 2024, "Enhancing Parameter-Efficient Fine-Tuning with Dynamic
Rank Distribution"; not weight-decomposed DoRA): every layer's update is split into single-rank components, each is
scored, and the best are kept globally under a parameter budget, so ranks move to the layers that need them. The
paper scores components during training; after training the singular values are the natural score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ...errors import InvalidParameterError
from .apply import small_op_threads  # small kernels on one thread: with busy cores an OpenMP wake-up costs ~30 ms per op
from .delta import Delta, LoRA

__all__ = ["RankReport", "weight_shape", "lora_factors", "lora_svd", "randomized_svd", "gaussian_test_matrix",
           "sketch_width", "select_rank", "lora_from_svd", "check_finite", "resize_lora", "prune_to_budget", "SCORES"]

SCORES = ("relative", "energy", "sv")
"""Importance of a rank-1 component, per parameter it costs: its share of its layer's ||dW||_F^2 ("relative", which
minimises the layers' relative errors), its absolute sigma^2 ("energy", the total squared error), or sigma ("sv")."""


@dataclass
class RankReport:
    """What a rank operation did, per LoRA key."""

    ranks: dict[str, int] = field(default_factory=dict)         # new rank (0 = the key was dropped)
    rel_error: dict[str, float] = field(default_factory=dict)   # ||dW - dW_k||_F / ||dW||_F
    params_before: int = 0                                      # elements of the LoRA factors before / after
    params: int = 0
    passed: list[str] = field(default_factory=list)             # non-LoRA keys returned unchanged
    dropped: dict[str, str] = field(default_factory=dict)       # key -> what was left out of the result, and why

    def add(self, other: "RankReport | None") -> "RankReport":
        """Take in the report of a disjoint set of keys (None: nothing); returns self."""
        if other is not None:
            self.ranks.update(other.ranks)
            self.rel_error.update(other.rel_error)
            self.params_before += other.params_before
            self.params += other.params
            self.passed.extend(other.passed)
            self.dropped.update(other.dropped)
        return self

    @property
    def total_rel_error(self) -> float:
        return sum(self.rel_error.values())

    def nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes of the LoRA factors when stored as `dtype` (alpha scalars and file header not counted)."""
        return self.params * _itemsize(dtype)

    def summary(self) -> str:
        ranks = sorted(self.ranks.values())
        spread = f"ranks {ranks[0]}..{ranks[-1]}" if ranks else "no LoRA keys"
        worst = max(self.rel_error.values(), default=0.0)
        return (f"{len(self.ranks)} LoRA layers, {spread}, {self.params_before} -> {self.params} parameters; "
                f"relative Frobenius error total {self.total_rel_error:.4g}, worst {worst:.4g}"
                + (f"; {len(self.passed)} other keys unchanged" if self.passed else "")
                + (f"; {len(self.dropped)} left out" if self.dropped else ""))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ building blocks
def weight_shape(delta: Delta) -> torch.Size:
    """Shape of the weight a delta patches: (out, in) or (out, in, kh, kw)."""
    if isinstance(delta, LoRA):
        if delta.mid is None:
            return torch.Size((delta.up.shape[0], *delta.down.shape[1:]))
        return torch.Size((delta.up.shape[0], delta.down.shape[1], *delta.mid.shape[2:]))
    weight = getattr(delta, "weight", None)
    if weight is None:
        raise InvalidParameterError(f"a {type(delta).__name__} with no weight part has no weight shape; expected a "
                                    "LoRA or a Diff with a weight")
    return weight.shape


def check_finite(key: str, delta: Delta) -> None:
    """Raise if any tensor of the delta (or its alpha) holds NaN or inf."""
    for name in ("down", "up", "mid", "weight", "bias"):
        t = getattr(delta, name, None)
        if not isinstance(t, torch.Tensor):
            continue
        with small_op_threads(t.numel()):
            finite = bool(torch.isfinite(t).all())
        if not finite:
            raise InvalidParameterError(f"deltas[{key!r}]: its {name} tensor {tuple(t.shape)} contains NaN or inf; "
                                        "every value must be finite")
    alpha = getattr(delta, "alpha", None)
    if alpha is not None and not math.isfinite(float(alpha)):
        raise InvalidParameterError(f"deltas[{key!r}]: alpha={alpha}; expected a finite number")


def lora_factors(lora: LoRA, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in*kh*kw)) with dW = scale * B @ A; a LoCon Tucker core is folded into A."""
    up = lora.up.to(dtype).flatten(1)                                           # (out, r)
    down = lora.down.to(dtype)
    if lora.mid is None:
        return up, down.flatten(1)                                              # (r, in*kh*kw)
    mid = lora.mid.to(dtype)                                                    # (r, s, kh, kw)
    return up, torch.einsum("rskl,si->rikl", mid, down.flatten(1)).flatten(1)  # (r, in*kh*kw)


def lora_svd(lora: LoRA, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the unscaled product B @ A = U diag(S) Vh without forming it: U (out, k), S (k,), Vh (k, in*kh*kw),
    k = min(out, in*kh*kw, r). Multiply S by `lora.scale` for the update's own singular values."""
    with small_op_threads(lora.numel()):
        B, A = lora_factors(lora, dtype)
        Qb, Rb = torch.linalg.qr(B)                       # (out, m1), (m1, r)
        Qa, Ra = torch.linalg.qr(A.T)                     # (in, m2), (m2, r)
        Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (m1, m2)
        return Qb @ Uc, S, Vhc @ Qa.T


def gaussian_test_matrix(n: int, q: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (n, q) Gaussian test matrix Omega of randomized_svd, from its own seeded generator (the global RNG is not
    touched). A caller that forms the sketch M @ Omega itself (block by block while it writes M) draws it here."""
    return torch.randn(n, q, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sketch_width(m: int, n: int, k: int, oversample: int = 8) -> int:
    """q = k + oversample directions, at most min(m, n)."""
    return min(k + oversample, m, n)


def randomized_svd(M: torch.Tensor, k: int, *, oversample: int = 8, niter: int = 2, seed: int = 0,
                   sketch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k leading singular triplets of a dense (m, n) matrix, U (m, k), S (k,), Vh (k, n), by randomized range
    finding (Halko, Martinsson & Tropp 2011, Alg. 4.4): q = sketch_width(m, n, k, oversample) Gaussian directions
    Omega = gaussian_test_matrix(n, q, seed), Y = M Omega, `niter` re-orthonormalised power iterations, then the SVD
    of the small (q, n) matrix Q^T M. `sketch`: Y already formed by the caller with that Omega.
    Costs 2 niter + 2 products of M with thin (n, q) / (m, q) blocks (2 niter + 1 with `sketch`) instead of a full
    SVD's O(m n min(m, n)); the products Q^T M are taken as (q, m) @ (m, n), twice as fast on CPU as M^T Q.
    ||M - U diag(S) Vh||_F^2 = ||M||_F^2 - ||S||^2 exactly (U diag(S) Vh is a projection of M)."""
    m, n = M.shape
    q = sketch_width(m, n, k, oversample)
    Y = M @ gaussian_test_matrix(n, q, seed, M.dtype) if sketch is None else sketch     # (m, q)
    Q = torch.linalg.qr(Y).Q                                                            # (m, q)
    for _ in range(niter):
        Q = torch.linalg.qr((Q.T @ M).T).Q                                              # (n, q): row space
        Q = torch.linalg.qr(M @ Q).Q                                                    # (m, q)
    # the SVD of the short, wide Q^T M = R^T P^T through the QR of its transpose: the SVD of a (q, n) matrix costs
    # 3x the QR of its (n, q) transpose plus the SVD of the (q, q) core
    P, R = torch.linalg.qr((Q.T @ M).T)                                                 # (n, q), (q, q)
    Uc, S, Wh = torch.linalg.svd(R.T)                                                   # (q, q), (q,), (q, q)
    return (Q @ Uc)[:, :k], S[:k], Wh[:k] @ P.T


def _check_selector(rank, thresholds: dict) -> None:
    given = {k: v for k, v in thresholds.items() if v is not None}
    if len(given) > 1:
        raise InvalidParameterError(f"rank selection: {given} given; pass at most one of sv_ratio, sv_fro, energy, "
                                    "sv_cumulative (optionally with rank as the maximum)")
    if rank is None and not given:
        raise InvalidParameterError("rank selection: nothing given; pass rank=<int> and/or one of sv_ratio (>= 1), "
                                    "sv_fro, energy, sv_cumulative (in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidParameterError(f"rank={rank!r}; expected an integer >= 1")
    for name, value in given.items():
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        if name == "sv_ratio" and not (ok and value >= 1):
            raise InvalidParameterError(f"sv_ratio={value!r}; expected a number >= 1 (largest / smallest kept "
                                        "singular value)")
        if name != "sv_ratio" and not (ok and 0 < value <= 1):
            raise InvalidParameterError(f"{name}={value!r}; expected a fraction in (0, 1]")


def select_rank(S: torch.Tensor, *, rank: int | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None, energy: float | None = None, sv_cumulative: float | None = None) -> int:
    """How many of the descending singular values S to keep: the smallest k meeting the threshold, capped at `rank`.

    sv_ratio:      keep sigma_i >= sigma_0 / sv_ratio
    sv_fro:        ||S[:k]|| >= sv_fro * ||S||          (share of the Frobenius norm)
    energy:        ||S[:k]||^2 >= energy * ||S||^2      (share of the squared norm; energy = sv_fro^2)
    sv_cumulative: sum S[:k] >= sv_cumulative * sum S
    Same criteria as kohya's resize_lora.py; older versions of it keep one component more than the minimum. A zero
    update keeps rank 1 (as kohya).
    """
    _check_selector(rank, dict(sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative))
    S = S.double()
    n = S.numel()
    if n == 0 or float(S[0]) <= 0:
        return 1
    if sv_ratio is not None:
        k = int((S >= S[0] / sv_ratio).sum())
    elif sv_fro is not None or energy is not None:
        share = energy if energy is not None else sv_fro ** 2
        cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        k = int(torch.searchsorted(cum, torch.tensor([share], dtype=cum.dtype))) + 1
    elif sv_cumulative is not None:
        cum = torch.cumsum(S, 0) / S.sum()
        k = int(torch.searchsorted(cum, torch.tensor([sv_cumulative], dtype=cum.dtype))) + 1
    else:
        k = n
    return max(1, min(k, n, rank if rank is not None else n))


def _rel_error(S: torch.Tensor, k: int) -> float:
    total = float((S.double() ** 2).sum())
    return 0.0 if total == 0 else math.sqrt(float((S[k:].double() ** 2).sum()) / total)


def lora_from_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, shape: torch.Size, *,
                  scale: float = 1.0, dtype: torch.dtype | None = None, like: LoRA | None = None) -> LoRA:
    """The rank-k LoRA up = U_k diag(S_k), down = Vh_k (kohya's and PEFT's convention), alpha = scale * k so that
    alpha / rank keeps `scale` (None when scale is 1). `like`: a LoRA whose class and extra fields are kept."""
    dtype = dtype or U.dtype
    conv = len(shape) == 4
    with small_op_threads(k * (U.shape[0] + Vh.shape[1])):
        up = (U[:, :k] * S[:k]).to(dtype).reshape(shape[0], k, *((1, 1) if conv else ()))  # (out, k[, 1, 1])
        down = Vh[:k].to(dtype).reshape(k, *shape[1:]).clone()                             # (k, in[, kh, kw])
    alpha = None if scale == 1.0 else scale * k
    if like is not None:
        return dataclasses.replace(like, down=down, up=up, alpha=alpha, mid=None)
    return LoRA(down, up, alpha)


def _layer_limit(key: str, shape: torch.Size, rank: int | None) -> None:
    limit = min(shape[0], math.prod(shape[1:]))
    if rank is not None and rank > limit:
        raise InvalidParameterError(f"rank={rank} is larger than layer {key!r} allows: its weight {tuple(shape)} "
                                    f"has rank at most {limit}; pass rank <= {limit} or a threshold (sv_fro, ...)")


# ------------------------------------------------------------------------------------------------------ operations
def _lora_spectra(deltas: Mapping[str, Delta], out: dict, report: "RankReport"):
    """(key, delta, weight shape, thin SVD) of each finite LoRA layer; other kinds pass straight into `out`."""
    for key, delta in deltas.items():
        if not isinstance(delta, LoRA):
            out[key] = delta
            report.passed.append(key)
            continue
        check_finite(key, delta)
        yield key, delta, weight_shape(delta), lora_svd(delta)


def resize_lora(deltas: Mapping[str, Delta], *, rank: int | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None, energy: float | None = None, sv_cumulative: float | None = None,
                dtype: torch.dtype | None = None) -> tuple[dict[str, Delta], RankReport]:
    """Resize every LoRA layer on its own (kohya resize_lora.py): a fixed rank, or a threshold on its spectrum
    (see select_rank) with `rank` as the maximum. alpha / rank is kept. Layers already at their new rank are
    returned as they were; other keys pass through. dtype: of the new factors (default: the LoRA's own)."""
    _check_selector(rank, dict(sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative))
    out, report = {}, RankReport()
    for key, delta, shape, (U, S, Vh) in _lora_spectra(deltas, out, report):
        _layer_limit(key, shape, rank)
        k = select_rank(S, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, energy=energy, sv_cumulative=sv_cumulative)
        report.params_before += delta.numel()
        if k == delta.rank and delta.mid is None and (dtype is None or dtype == delta.up.dtype):
            out[key] = delta
        else:
            out[key] = lora_from_svd(U, S, Vh, k, shape, scale=delta.scale, dtype=dtype or delta.up.dtype, like=delta)
        report.ranks[key], report.rel_error[key] = k, _rel_error(S, k)
        report.params += out[key].numel()
    return out, report


def prune_to_budget(deltas: Mapping[str, Delta], *, params: int | None = None, fraction: float | None = None,
                    max_bytes: int | None = None, dtype: torch.dtype = torch.float16, score: str = "relative",
                    min_rank: int = 0) -> tuple[dict[str, Delta], RankReport]:
    """Keep the best rank-1 components of all LoRA layers together under one budget (dynamic-rank DoRA).

    Budget, exactly one of: params (elements of the LoRA factors), fraction (of the LoRA's current elements), or
    max_bytes (factor bytes when stored as `dtype`). A rank-1 component of a layer costs out + in*kh*kw elements.
    score: see SCORES. min_rank: components every layer keeps whatever its score; a layer left with rank 0 is
    dropped from the result (its rank is reported as 0). Non-LoRA keys pass through and are not counted.
    """
    budgets = {k: v for k, v in dict(params=params, fraction=fraction, max_bytes=max_bytes).items() if v is not None}
    if len(budgets) != 1:
        raise InvalidParameterError(f"prune_to_budget: budget {budgets or 'none'} given; pass exactly one of "
                                    "params=<int>, fraction=<0..1>, max_bytes=<int> (with dtype)")
    if score not in SCORES:
        raise InvalidParameterError(f"score={score!r}; valid: {', '.join(SCORES)}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise InvalidParameterError(f"min_rank={min_rank!r}; expected an integer >= 0")
    (name, value), = budgets.items()
    if name == "fraction" and not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise InvalidParameterError(f"fraction={value!r}; expected a number in (0, 1]")
    if name != "fraction" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidParameterError(f"{name}={value!r}; expected an integer >= 0")
    # 1. the spectrum of every LoRA layer
    layers, out, report = [], {}, RankReport()
    for key, delta, shape, (U, S, Vh) in _lora_spectra(deltas, out, report):
        layers.append((key, delta, shape, U, S, Vh, shape[0] + math.prod(shape[1:])))
        report.params_before += delta.numel()
    # 2. the budget in elements
    budget = {"fraction": lambda: int(value * report.params_before), "params": lambda: value,
              "max_bytes": lambda: value // _itemsize(dtype)}[name]()
    keep = [min(min_rank, S.numel()) for *_, S, _, _ in layers]
    fixed = sum(k * cost for k, (*_, cost) in zip(keep, layers))
    if fixed > budget:
        raise InvalidParameterError(f"prune_to_budget: min_rank={min_rank} alone needs {fixed} parameters but the "
                                    f"budget is {budget}; lower min_rank or raise the budget")
    # 3. score every remaining component per parameter; within a layer the scores never increase, so taking the
    #    global best first always extends a layer's prefix (the greedy solution of this knapsack)
    candidates = []
    for i, (key, delta, _, _, S, _, cost) in enumerate(layers):
        s = S.double() * abs(delta.scale)
        value = {"relative": s ** 2 / max(float((s ** 2).sum()), 1e-300), "energy": s ** 2, "sv": s}[score] / cost
        candidates += [(-float(v), i, j) for j, v in enumerate(value.tolist()) if j >= keep[i]]
    budget -= fixed
    for _, i, j in sorted(candidates):
        cost = layers[i][-1]
        if j == keep[i] and cost <= budget:
            keep[i] += 1
            budget -= cost
    # 4. rebuild, in the caller's key order
    for k, (key, delta, shape, U, S, Vh, _) in zip(keep, layers):
        report.ranks[key], report.rel_error[key] = k, _rel_error(S, k)
        if k == 0:
            report.dropped[key] = "no component within the budget"
            continue
        if k == delta.rank and delta.mid is None:
            out[key] = delta
        else:
            out[key] = lora_from_svd(U, S, Vh, k, shape, scale=delta.scale, dtype=delta.up.dtype, like=delta)
        report.params += out[key].numel()
    return {key: out[key] for key in deltas if key in out}, report
