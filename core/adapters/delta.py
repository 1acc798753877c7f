"""The canonical adapter form: {module path in diffusers naming: Delta}.

Every reader in `weights/` produces these; everything in `core/adapters` consumes them. A Delta knows how to
compute its weight difference for a target weight shape; applying and merging live elsewhere.

Module paths are prefixed by the component they belong to, e.g. ``unet.down_blocks.1.attentions.0.proj_in`` or
``text_encoder.encoder.layers.0.self_attn.q_proj`` (text-encoder paths never contain ``text_model.``: transformers 5
flattened CLIPTextModel, so resolution goes through ``getattr(te, "text_model", te)``).

| delta    | W' at strength s                                   | factors                                            |
|----------|----------------------------------------------------|----------------------------------------------------|
| LoRA     | W + s a/r B A                                      | down A, up B, optional Tucker core (LyCORIS LoCon)  |
| Diff     | W + s dW (b + s db)                                | full difference (ComfyUI .diff / .diff_b)           |
| LoHa     | W + s a/r (W1a W1b) * (W2a W2b)                    | two low-rank pairs, optional Tucker cores           |
| LoKr     | W + s c kron(W1, W2)                               | Kronecker factors, each full or low rank            |
| Sparse   | W + s dW, dW zero but at `indices`                 | indices + values (SaRA-style sparse update)         |
| Factored | W + s (U V - W) (replace) or W + s U V (add)       | a layer stored as a product                         |
| DoRA     | W + s (m V / ||V|| - W), V = W + dW of any above   | direction delta + magnitude m                       |
| Rows     | rows `index` of another delta                       | one projection of a fused (q, k, v) module          |

Every delta has ``delta_weight(shape, dtype, device)`` (its difference, own scale included, strength not),
``delta_bias()`` and ``numel()``. DoRA and a replacing Factored depend on the weight they patch
(``needs_weight``): their ``delta_weight`` takes ``weight=``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...errors import AdapterMismatchError, InvalidParameterError

__all__ = ["LoRA", "Diff", "LoHa", "LoKr", "Sparse", "Factored", "DoRA", "Rows", "Delta", "select_rows"]


def _fit(t: torch.Tensor, shape, what: str) -> torch.Tensor:
    """t (natural shape of a product) reshaped to the weight shape, or a mismatch naming both shapes."""
    if t.shape[0] != shape[0] or t.numel() != math.prod(shape):
        raise AdapterMismatchError(f"{what} gives a {tuple(t.shape)} update, which does not fit the module's weight "
                                   f"{tuple(shape)} (the output rows and the element count must agree)")
    return t.reshape(shape)


def _check_size(natural: tuple, shape, what: str) -> None:
    """_fit's check on the product's shape worked out from the factors', before it is computed: a small file of
    mismatched factors (e.g. LoHa (100000, 1) @ (1, 100000)) would otherwise allocate a huge update only to refuse
    it."""
    if natural[0] != shape[0] or math.prod(natural) != math.prod(shape):
        raise AdapterMismatchError(f"{what} gives a {tuple(natural)} update, which does not fit the module's weight "
                                   f"{tuple(shape)} (the output rows and the element count must agree)")


def _tensors(delta) -> int:
    return sum(t.numel() for f in dataclasses.fields(delta) if isinstance(t := getattr(delta, f.name), torch.Tensor))


@dataclass
class LoRA:
    """W' = W + scale * up @ down, scale = alpha / rank (kohya / PEFT convention; alpha None means alpha = rank).

    down: (r, in) for linear, (r, in, kh, kw) for conv.  up: (out, r) or (out, r, 1, 1).
    mid: optional Tucker core (r, r, kh, kw) of LyCORIS LoCon convolutions.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def delta_weight(self, shape: torch.Size, dtype=torch.float32, device=None) -> torch.Tensor:
        """Delta W with the target weight's shape (scale included)."""
        up = self.up.to(device=device, dtype=dtype).flatten(1)            # (out, r)
        if self.mid is None:
            down = self.down.to(device=device, dtype=dtype).flatten(1)    # (r, in*kh*kw)
            delta = up @ down
        else:
            down = self.down.to(device=device, dtype=dtype).flatten(1)    # (r, in)
            mid = self.mid.to(device=device, dtype=dtype)                 # (r, r, kh, kw)
            delta = torch.einsum("or,rskl,si->oikl", up, mid, down)
        return (delta * self.scale).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        bias = getattr(self, "bias", None)  # subclasses with a bias difference (BiasedLoRA)
        return None if bias is None else bias.to(device=device, dtype=dtype)

    def take_rows(self, index: torch.Tensor) -> "LoRA":
        """The LoRA of output rows `index` (exact: only `up`, and a bias, have output rows)."""
        changes = {"up": self.up[index]}
        if getattr(self, "bias", None) is not None:
            changes["bias"] = self.bias[index]
        return dataclasses.replace(self, **changes)

    def numel(self) -> int:
        return sum(t.numel() for t in (self.down, self.up, self.mid) if t is not None)


@dataclass
class Diff:
    """A full difference: W' = W + weight (and b' = b + bias). ComfyUI's `.diff` / `.diff_b`."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int | None:
        return None if self.weight is None else self.weight.shape[0]

    def delta_weight(self, shape: torch.Size, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.to(device=device, dtype=dtype).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(device=device, dtype=dtype)

    def take_rows(self, index: torch.Tensor) -> "Diff":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Diff(pick(self.weight), pick(self.bias))

    def numel(self) -> int:
        return sum(t.numel() for t in (self.weight, self.bias) if t is not None)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """CP/Tucker product of LyCORIS: core t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a).contiguous()


@dataclass
class LoHa:
    """LyCORIS LoHa (Hyeon-Woo et al. 2022, "FedPara", low-rank Hadamard product):
    dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = rank of w1b (alpha None: no scaling).

    Plain: w1a, w2a (out, r); w1b, w2b (r, in*kh*kw).  Tucker (LyCORIS ``use_tucker`` convolutions): t1, t2
    (r, r, kh, kw) with w1a, w2a (r, out) and w1b, w2b (r, in), each half being einsum(t, a, b) as in LyCORIS.
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        return self.w1a.shape[0 if self.t1 is None else 1]

    def delta_weight(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        _check_size((self.w1a.shape[0], math.prod(self.w1b.shape[1:])) if self.t1 is None else
                    (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:]), shape, "LoHa")
        w1a, w1b, w2a, w2b = (t.to(device=device, dtype=dtype) for t in (self.w1a, self.w1b, self.w2a, self.w2b))
        if self.t1 is None:
            h1, h2 = w1a.flatten(1) @ w1b.flatten(1), w2a.flatten(1) @ w2b.flatten(1)      # (out, in*kh*kw) each
        else:
            h1 = _tucker(self.t1.to(device=device, dtype=dtype), w1a, w1b.flatten(1))     # (out, in, kh, kw)
            h2 = _tucker(self.t2.to(device=device, dtype=dtype), w2a, w2b.flatten(1))
        return _fit(h1 * h2 * self.scale, shape, "LoHa")

    def delta_bias(self, dtype=torch.float32, device=None) -> None:
        return None

    def take_rows(self, index: torch.Tensor) -> "LoHa":
        """Rows of a Hadamard product are products of rows: only the output factors are sliced."""
        if self.t1 is None:
            return dataclasses.replace(self, w1a=self.w1a[index], w2a=self.w2a[index])
        return dataclasses.replace(self, w1a=self.w1a[:, index], w2a=self.w2a[:, index])

    def numel(self) -> int:
        return _tensors(self)


@dataclass
class LoKr:
    """LyCORIS LoKr (Edalati et al. 2022, "KronA"; Yeh et al. 2024, LyCORIS): dW = kron(W1, W2) * c.

    W1 = w1 or w1a @ w1b: (out1, in1).  W2 = w2 (out2, in2[, kh, kw]), w2a @ w2b (out2, in2*kh*kw), or with the
    Tucker core t2 (r, r, kh, kw): einsum(t2, w2a (r, out2), w2b (r, in2)).  c = alpha / r only when a factor is
    low rank (r = the rank of w2b, else of w1b), as LyCORIS, ComfyUI and diffusers' ``_bake_lokr_alpha_``: two full
    factors ignore alpha.
    """

    w1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    alpha: float | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        low = self.w2b if self.w2 is None else self.w1b if self.w1 is None else None
        return None if low is None else low.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None or self.rank is None else float(self.alpha) / self.rank

    @property
    def out_features(self) -> int:
        o1 = (self.w1 if self.w1 is not None else self.w1a).shape[0]
        o2 = self.w2.shape[0] if self.w2 is not None else self.w2a.shape[0 if self.t2 is None else 1]
        return o1 * o2

    def delta_weight(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        s1 = tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], math.prod(self.w1b.shape[1:]))
        s2 = tuple(self.w2.shape) if self.w2 is not None else \
            (self.w2a.shape[0], math.prod(self.w2b.shape[1:])) if self.t2 is None else \
            (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        s1 = s1 + (1,) * (len(s2) - len(s1))                                                # as w1[:, :, None, None]
        _check_size(tuple(a * b for a, b in zip(s1, s2)) if len(s1) == len(s2) else (s1[0] * s2[0], math.prod(s1)
                    * math.prod(s2)), shape, "LoKr")
        w1 = f(self.w1) if self.w1 is not None else f(self.w1a) @ f(self.w1b)               # (out1, in1)
        if self.w2 is not None:
            w2 = f(self.w2)
        elif self.t2 is None:
            w2 = f(self.w2a) @ f(self.w2b).flatten(1)                                       # (out2, in2*kh*kw)
        else:
            w2 = _tucker(f(self.t2), f(self.w2a), f(self.w2b).flatten(1))                   # (out2, in2, kh, kw)
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return _fit(torch.kron(w1, w2) * self.scale, shape, "LoKr")

    def delta_bias(self, dtype=torch.float32, device=None) -> None:
        return None

    def numel(self) -> int:
        return _tensors(self)


@dataclass
class Sparse:
    """A sparse difference (SaRA, Hu et al. 2024: fine-tune only the smallest weights): dW is zero except
    dW.flatten()[indices] = values.

    indices: integer (nnz,) flat row-major positions in the weight, or (ndim, nnz) coordinates as in
    ``torch.sparse_coo_tensor``; repeated positions add up.  values: (nnz,).
    """

    indices: torch.Tensor
    values: torch.Tensor

    out_features = None  # flat indices do not say how many rows the weight has

    def flat_indices(self, shape) -> torch.Tensor:
        idx = self.indices
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise AdapterMismatchError(f"sparse indices have dtype {idx.dtype}; expected an integer tensor")
        if idx.ndim == 2 and idx.shape[0] == len(shape):  # coordinates -> flat row-major positions
            strides = torch.tensor([math.prod(shape[d + 1:]) for d in range(len(shape))], dtype=torch.int64)
            bad = ((idx < 0) | (idx >= torch.tensor(shape)[:, None])).any()
            if bool(bad):
                raise AdapterMismatchError(f"sparse coordinates fall outside the weight {tuple(shape)}")
            idx = (idx.long() * strides[:, None]).sum(0)
        elif idx.ndim != 1:
            raise AdapterMismatchError(f"sparse indices of shape {tuple(idx.shape)}; expected (nnz,) flat positions "
                                       f"or ({len(shape)}, nnz) coordinates for the weight {tuple(shape)}")
        if idx.numel() != self.values.numel():
            raise AdapterMismatchError(f"{idx.numel()} sparse indices but {self.values.numel()} values")
        n = math.prod(shape)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise AdapterMismatchError(f"sparse indices span [{int(idx.min())}, {int(idx.max())}], outside the "
                                       f"{n} elements of the weight {tuple(shape)}")
        return idx.long()

    def delta_weight(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        idx = self.flat_indices(shape).to(device)
        flat = torch.zeros(math.prod(shape), dtype=dtype, device=device)
        return flat.index_add_(0, idx, self.values.reshape(-1).to(device=device, dtype=dtype)).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> None:
        return None

    def numel(self) -> int:
        return _tensors(self)


@dataclass
class Factored:
    """A layer stored as a product W = U V: replace=True sets the weight to U V (a layer swapped for a factored
    one), replace=False adds U V (an unscaled LoRA).  u: (out, r); v: (r, in) or (r, in, kh, kw)."""

    u: torch.Tensor
    v: torch.Tensor
    replace: bool = True

    @property
    def needs_weight(self) -> bool:
        return self.replace

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    def delta_weight(self, shape, dtype=torch.float32, device=None, weight: torch.Tensor | None = None):
        _check_size((self.u.shape[0], math.prod(self.v.shape[1:])), shape, "Factored U V")
        uv = _fit(self.u.to(device=device, dtype=dtype).flatten(1) @ self.v.to(device=device, dtype=dtype).flatten(1),
                  shape, "Factored U V")
        if not self.replace:
            return uv
        if weight is None:
            raise InvalidParameterError("Factored(replace=True).delta_weight: the difference U V - W needs the "
                                        "weight it replaces; pass weight=")
        return uv - weight.to(device=device, dtype=dtype).reshape(shape)

    def delta_bias(self, dtype=torch.float32, device=None) -> None:
        return None

    def take_rows(self, index: torch.Tensor) -> "Factored":
        return dataclasses.replace(self, u=self.u[index])

    def numel(self) -> int:
        return _tensors(self)


@dataclass
class DoRA:
    """Weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", eq. 5): W_dora = m * V / ||V||, V = W + dW,
    the norm taken per output channel (PEFT's ``lora_magnitude_vector``; LyCORIS ``wd_on_out``) or per input channel
    (LyCORIS ``dora_scale`` of shape (1, in, ...)).  At strength s, W' = W + s (W_dora - W): ComfyUI's
    ``weight_decompose`` blend, so s = 1 is the trained result and s = 0 the base model.

    delta: the direction update dW (LoRA, LoHa, LoKr, ...; its alpha / rank included).  magnitude: m, as stored.
    wd_on_out: True per output channel, False per input channel, None to dispatch on the magnitude's shape against
    the weight (m with as many rows as the weight: per output channel, as ComfyUI decides).
    """

    delta: object
    magnitude: torch.Tensor
    wd_on_out: bool | None = None

    needs_weight = True

    @property
    def out_features(self) -> int | None:
        return getattr(self.delta, "out_features", None)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.delta, "bias", None)

    def on_output(self, shape) -> bool:
        """Whether m scales output channels (True) or input channels (False) of a weight of this shape."""
        m, out, fan_in = self.magnitude, shape[0], shape[1]
        on_out = self.wd_on_out
        if on_out is None:
            on_out = m.ndim >= 1 and m.shape[0] == out and m.numel() == out
        fits = m.numel() == out if on_out else m.numel() == fan_in and (m.ndim < 2 or m.shape[1] == fan_in)
        if not fits:
            raise AdapterMismatchError(
                f"DoRA magnitude {tuple(m.shape)} fits neither axis of the weight {tuple(shape)}; expected (out,) / "
                f"(out, 1, ...) = {out} per output channel or (1, in, ...) = {fan_in} per input channel")
        return on_out

    def delta_weight(self, shape, dtype=torch.float32, device=None, weight: torch.Tensor | None = None):
        if weight is None:
            raise InvalidParameterError("DoRA.delta_weight: the decomposed update depends on the weight it patches; "
                                        "pass weight=")
        on_out = self.on_output(shape)
        W = weight.to(device=device, dtype=torch.float32).reshape(shape)
        V = W + self.delta.delta_weight(shape, dtype=torch.float32, device=device)   # (out, in[, kh, kw])
        axis = 0 if on_out else 1
        dims = tuple(d for d in range(V.ndim) if d != axis)
        norm = torch.linalg.vector_norm(V, dim=dims, keepdim=True)                   # (out, 1, ..) or (1, in, ..)
        m = self.magnitude.to(device=device, dtype=torch.float32).reshape(norm.shape)
        # a zero row/column of V has no direction: it stays zero (instead of 0/0)
        return (m / norm.clamp_min(torch.finfo(torch.float32).tiny) * V - W).to(dtype)

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        return self.delta.delta_bias(dtype=dtype, device=device)

    def take_rows(self, index: torch.Tensor, rows: int) -> "DoRA":
        """Output rows of a DoRA normalised per output channel (each row's norm is its own)."""
        m = self.magnitude
        if not (self.wd_on_out or (self.wd_on_out is None and m.shape[0] == rows and m.numel() == rows)):
            raise AdapterMismatchError(
                f"a DoRA normalised per input channel (magnitude {tuple(m.shape)}) on a fused module of {rows} rows "
                "cannot be split into its projections: each column norm spans all of them")
        return DoRA(select_rows(self.delta, index, rows), m.reshape(-1)[index], True)

    def numel(self) -> int:
        return self.delta.numel() + self.magnitude.numel()


@dataclass
class Rows:
    """Rows `index` of a delta made for a fused module with `rows` output rows: one projection of an original
    fused qkv (or a row permutation). Used where a delta cannot be sliced in its factors (LoKr, Sparse)."""

    delta: object
    index: torch.Tensor
    rows: int

    @property
    def out_features(self) -> int:
        return self.index.numel()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.delta_bias()

    def delta_weight(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        full = self.delta.delta_weight(torch.Size((self.rows, *shape[1:])), dtype=dtype, device=device)
        return full[self.index.to(full.device)]

    def delta_bias(self, dtype=torch.float32, device=None) -> torch.Tensor | None:
        b = self.delta.delta_bias(dtype=dtype, device=device)
        return None if b is None else b[self.index.to(b.device)]

    def numel(self) -> int:
        return self.delta.numel()


def select_rows(delta, index: torch.Tensor, rows: int):
    """Output rows `index` of `delta` (made for a module with `rows` output rows): sliced in its factors where that
    is exact (LoRA, LoHa, Diff, Factored, DoRA per output channel), else wrapped in Rows."""
    if isinstance(delta, DoRA):
        return delta.take_rows(index, rows)
    take = getattr(delta, "take_rows", None)
    if take is not None:
        return take(index)
    if getattr(delta, "needs_weight", False):  # Rows cannot hand a weight slice through
        raise AdapterMismatchError(f"a {type(delta).__name__} that depends on the weight cannot be split by rows")
    return Rows(delta, index, rows)


Delta = LoRA | Diff | LoHa | LoKr | Sparse | Factored | DoRA | Rows
