"""Re-ttention (Chen et al. 2025, "Ultra Sparse Visual Generation via Attention Statistical Reshape"): very sparse
attention for DiTs whose dropped softmax mass is restored from statistics kept from the last dense step.

Pattern (our choice, stated once): queries are cut into blocks of `block` consecutive tokens; every query of a
block attends to the same top ceil(keep * N_k) keys, ranked by the block's summed scores sum_{i in block} q_i . k_j
(block=1 is exact per-query top-k). Kept keys and values are gathered and the block's queries attend to them with
`F.scaled_dot_product_attention`, so the kernel does keep x the dense attention FLOPs. The pattern is chosen at the
dense step that records the statistics and kept until the next one (attention drifts slowly across denoising steps,
the temporal redundancy the paper builds on), so sparse steps pay for no selection. (Re-ttention's own code uses a
local window mask; any pattern works with the reshape below.)

The reshape. For query i with scores s_ij, Z_i = sum_j e^{s_ij}, kept set S, Z^S_i = sum_{j in S} e^{s_ij}:

    dense    o_i  = sum_j e^{s_ij} v_j / Z_i
             o_i  = alpha_i o^S_i + r_i,  alpha_i = Z^S_i / Z_i            (kept share of the softmax mass)
                                          o^S_i  = sum_{j in S} e^{s_ij} v_j / Z^S_i   (plain renormalised top-k)
                                          r_i    = sum_{j not in S} e^{s_ij} v_j / Z_i (the dropped keys' part)

A dense step computes o, records (S, alpha, r) per layer, head and query; a sparse step t computes only o^S_t on the
recorded S and returns alpha_tau o^S_t + r_tau: the sparse softmax rescaled so its mass is the recorded full
distribution's (the paper's denominator ratio, Z_t ~ Z^S_t / alpha_tau) plus the recorded residual (its code's
cached_residual). With statistics of the same step this is the dense output exactly; with keep=1 it is dense SDPA;
with reshape=False it is plain top-k on the recorded pattern.

`Rettention` holds the per-step state: surfaces call it once per model call (`rettention(forward, t, *args,
stream=..., step=...)`, as the caches here), and the model's attention calls `rettention.attend(q, k, v, layer)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError
from .state import StepClock


# ------------------------------------------------------------------------------------------------ pure functions
def kept_count(keep: float, n_keys: int) -> int:
    """Keys each query block keeps: ceil(keep * N_k), at least 1."""
    return max(1, min(n_keys, math.ceil(keep * n_keys - 1e-9)))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, N, ...) -> (B, H, nb, block, ...), zero-padding the last block."""
    n = x.shape[2]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], 2)
    return x.reshape(*x.shape[:2], nb, block, *x.shape[3:])


def _unblock(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, nb, block, ...) -> (B, H, N, ...)."""
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :n]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N_k, D), index (B, H, nb, kk) -> (B, H, nb, kk, D): each query block's kept keys or values, as one
    row gather (index_select on (B H N_k, D) rows; torch.gather would need an index as large as its output)."""
    b, h, n, d = x.shape
    offset = torch.arange(b * h, device=x.device).view(b, h, 1, 1) * n
    return x.reshape(-1, d).index_select(0, (index + offset).reshape(-1)).view(*index.shape, d)


def select_keys(q: torch.Tensor, k: torch.Tensor, keep: float, block: int) -> torch.Tensor:
    """q (B, H, N_q, D), k (B, H, N_k, D) -> index (B, H, nb, kk): per query block, the kk = ceil(keep N_k) keys of
    largest summed score sum_{i in block} q_i . k_j = (sum_i q_i) . k_j (one matmul 1/block the size of Q K^T)."""
    pooled = _blocks(q, block).sum(3) @ k.transpose(-1, -2)          # (B, H, nb, N_k); padded rows add 0
    return pooled.topk(kept_count(keep, k.shape[2]), dim=-1, sorted=False).indices


def sparse_attention(q, k, v, index, block: int, scale: float | None = None) -> torch.Tensor:
    """Plain renormalised sparse attention o^S: each query block attends to its gathered keys.

    q (B, H, N_q, D), k / v (B, H, N_k, D), index (B, H, nb, kk) -> (B, H, N_q, D)."""
    b, h, nb, kk = index.shape
    d = q.shape[-1]
    qb = _blocks(q, block).reshape(b * h, nb, block, d)            # 4-D: SDPA's fused CPU / GPU kernels take it
    kg, vg = (_gather(x, index).view(b * h, nb, kk, x.shape[-1]) for x in (k, v))
    out = F.scaled_dot_product_attention(qb, kg, vg, scale=scale)   # (B H, nb, block, D_v)
    return _unblock(out.view(b, h, nb, block, -1), q.shape[2])


def sdpa_with_lse(q, k, v, scale: float | None = None):
    """(SDPA output, logsumexp of the scaled scores (B, H, N_q)). On CPU, PyTorch's fused flash kernel returns both
    in one pass (the very kernel F.scaled_dot_product_attention runs, so o is bit-identical to it); elsewhere the
    explicit form."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        try:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
            return o, lse
        except (RuntimeError, TypeError):                           # a dtype or layout the kernel refuses
            pass
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lse = torch.logsumexp((q @ k.transpose(-1, -2)).float() * scale, -1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale), lse


def dense_with_statistics(q, k, v, keep: float, block: int, scale: float | None = None):
    """Dense attention that also records what the sparse pattern drops. Returns (o, index, alpha, r): o
    (B, H, N_q, D) the dense output, index (B, H, nb, kk) the pattern, alpha (B, H, N_q) the kept share of the
    softmax mass, exp(log Z^S - log Z), and r = o - alpha o^S (B, H, N_q, D), the dropped keys' part of o.
    Costs dense attention + the pooled scores + attention over the kept keys."""
    n = q.shape[2]
    o, lse = sdpa_with_lse(q, k, v, scale)                          # o, log Z
    index = select_keys(q, k, keep, block)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_kept = (_blocks(q, block) @ _gather(k, index).transpose(-1, -2)).float() * scale   # (B, H, nb, block, kk)
    lse_kept = _unblock(torch.logsumexp(s_kept, -1), n)             # log Z^S
    o_kept = _unblock(torch.softmax(s_kept, -1).to(v.dtype) @ _gather(v, index), n)   # o^S
    alpha = torch.exp(lse_kept - lse.float()).to(q.dtype)
    return o, index, alpha, o - alpha.unsqueeze(-1) * o_kept


def reshape(o_sparse: torch.Tensor, alpha: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Re-ttention's statistical reshape: alpha o^S + r (see the module docstring)."""
    return alpha.unsqueeze(-1) * o_sparse + r


def attention_flops(q: torch.Tensor, n_keys: int) -> int:
    """Multiply-adds x 2 of QK^T and PV for q (..., N_q, D) against n_keys keys (a dense step that records the
    statistics adds the kept keys' attention and the pooled scores: (1 + keep + 1 / (2 block)) x this)."""
    return 4 * q.numel() * n_keys


# ----------------------------------------------------------------------------------------------- per-step state
MODELS = ("SD3Transformer2DModel", "OpenAISignatureMMDITWrapper", "MMDiT")   # diffusers' and ComfyUI's SD3 DiT


def check_model(model) -> str:
    """The model's class name if Re-ttention knows its attention (SD3 joint attention); otherwise raise naming it."""
    if not any(c.__name__ in MODELS for c in type(model).__mro__):
        raise InvalidParameterError(f"model type {type(model).__name__} is not supported by Re-ttention sparse "
                                    f"attention; supported: {', '.join(MODELS)} (SD3 / SD3.5 joint attention)")
    return type(model).__name__


class Rettention:
    """Re-ttention's per-step state. rettention(forward, t, *args, stream=..., step=..., **kwargs) runs one model
    call at step `step` (or the step StepClock reads from t); inside it every attention call goes through
    `attend(q, k, v, layer)`.

    keep in (0, 1]: share of keys each query block attends to on sparse steps (1 = dense SDPA, nothing recorded).
    warmup >= 1: first steps dense (they record the pattern and statistics). refresh >= 0: after the warm-up, one
    step in every `refresh` is dense again and re-records (0 = never). reshape: restore the dropped mass from the
    statistics (False = plain renormalised top-k on the recorded pattern, the ablation). block >= 1: queries that
    share one key set. Only a dense step followed by a sparse one records (about (1 + keep) x the FLOPs); the other
    dense steps are plain SDPA. Counters: flops (attention FLOPs computed, statistics included) and dense_flops
    (what dense attention would have cost); dense_calls / sparse_calls count attention calls."""

    def __init__(self, keep: float, warmup: int = 3, refresh: int = 5, *, reshape: bool = True, block: int = 16,
                 clock: StepClock | None = None):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep) \
                or not 0 < keep <= 1:
            raise InvalidParameterError(f"keep={keep!r}: need a number in (0, 1] (share of keys each query keeps "
                                        "on sparse steps; 1 = dense attention, 0.03 = the paper's 3.1%)")
        for name, value, low in (("warmup", warmup, 1), ("refresh", refresh, 0), ("block", block, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParameterError(f"{name}={value!r}: need an integer >= {low}" + {
                    "warmup": " (first steps computed densely; they record the statistics sparse steps reuse)",
                    "refresh": " (one dense step in every `refresh` after the warm-up; 0 = never)",
                    "block": " (queries sharing one set of kept keys; 1 = per-query top-k)"}[name])
        if not isinstance(reshape, bool):
            raise InvalidParameterError(f"reshape={reshape!r}: need True or False")
        self.keep, self.warmup, self.refresh, self.use_reshape, self.block = float(keep), warmup, refresh, reshape, \
            block
        self.clock = clock or StepClock()
        self.stats: dict = {}
        self._run = None
        self.step, self.stream, self._calls = 0, None, 0
        self.flops = self.dense_flops = 0
        self.dense_calls = self.sparse_calls = 0

    def is_dense(self, step: int) -> bool:
        if step < self.warmup:
            return True
        return bool(self.refresh) and (step - self.warmup + 1) % self.refresh == 0

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        self.step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:                              # a new image: old statistics are stale
            self.stats.clear()
            self._run = self.clock.run
        self.stream, self._calls = stream, 0
        return forward(*args, **kwargs)

    def next_layer(self) -> int:
        """A key for an attention call that has no name of its own: its order within the model call."""
        self._calls += 1
        return self._calls - 1

    def attend(self, q, k, v, layer, scale: float | None = None, dense=None) -> torch.Tensor:
        """q (B, H, N_q, D), k / v (B, H, N_k, D) -> (B, H, N_q, D). `dense()` (default SDPA) gives the exact dense
        output where nothing needs recording (keep=1)."""
        cost = attention_flops(q, k.shape[2])
        self.dense_flops += cost
        if self.keep >= 1:
            self.flops += cost
            self.dense_calls += 1
            return dense() if dense is not None else F.scaled_dot_product_attention(q, k, v, scale=scale)
        key = (self.stream, layer, tuple(q.shape), k.shape[2])
        rec = self.stats.get(key)
        if rec is not None and not self.is_dense(self.step):
            index = rec[0]
            o = sparse_attention(q, k, v, index, self.block, scale)
            self.flops += attention_flops(q, index.shape[-1])
            self.sparse_calls += 1
            return reshape(o, rec[1], rec[2]) if self.use_reshape else o
        self.dense_calls += 1
        if self.is_dense(self.step + 1):          # the next step is dense too and records anew: plain dense
            self.flops += cost
            return dense() if dense is not None else F.scaled_dot_product_attention(q, k, v, scale=scale)
        o, index, alpha, r = dense_with_statistics(q, k, v, self.keep, self.block, scale)
        self.stats[key] = (index, alpha, r) if self.use_reshape else (index,)
        self.flops += cost + attention_flops(q, index.shape[-1]) + cost // (2 * self.block)  # + kept, + pooled
        return o

    @property
    def flops_kept(self) -> float:
        """Attention FLOPs computed / dense attention FLOPs, over every call so far."""
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def reset(self) -> None:
        self.clock.reset()
        self.stats.clear()
