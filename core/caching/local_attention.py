"""CLEAR (Liu et al. 2024, "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up"): local-window
attention for DiTs with joint text + image attention.

Pattern (the paper's, on an H x W grid of image tokens, row-major, with N_t text tokens):

    text query               -> every key (text and image): text tokens keep full attention
    image query at (y, x)    -> every text key, and the image keys (y', x') with (y - y')^2 + (x - x')^2 <= r^2

The window is CLEAR's circular one (Euclidean distance in token units, i.e. latent patches), so it is a disc of
about pi r^2 keys; r >= sqrt((H - 1)^2 + (W - 1)^2), the grid diagonal, keeps every pair (full attention), r = 0 only
the query's own token. Tokens are ordered [text, image] (ComfyUI's MMDiT joins them so; diffusers' joint processor
is swapped to that order, see pipelines/caching.py) or [image, text] with text_first=False.

Only the attention pattern changes; CLEAR recovers the full model's behaviour by fine-tuning the attention layers
on the full model's own samples (tiny/clear.py). Here the windowed attention is SDPA with a boolean mask, which
computes all pairs on CPU: `kept_share` (allowed pairs / all pairs) is the attention FLOPs a local-attention kernel
(NATTEN, FlexAttention block masks) would keep, not what this reference kernel saves.

`LocalAttention` is the per-call state the surfaces install (the same slot as core Rettention: surfaces call
`local(forward, t, *args)` once per model call, which reads the latent's grid; the attention calls go to
`local.attend(q, k, v, layer)`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError
from .sparse_attention import attention_flops


def check_radius(radius) -> float:
    """The window radius as a float; raises for anything but a finite number >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise InvalidParameterError(f"radius={radius!r}: need a finite number >= 0 (window radius in image tokens, "
                                    "Euclidean; 0 = own token only, >= the grid diagonal = full attention)")
    return float(radius)


def check_grid(grid) -> tuple[int, int]:
    """(H, W) image tokens; raises unless two integers >= 1."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or any(
            isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise InvalidParameterError(f"grid={grid!r}: need (H, W), two integers >= 1 (image tokens per column and "
                                    "row: latent size / patch size)")
    return int(grid[0]), int(grid[1])


def diagonal(grid) -> float:
    """The largest token distance on the grid: a radius at least this keeps every pair."""
    h, w = check_grid(grid)
    return math.hypot(h - 1, w - 1)


def covers(grid, radius) -> bool:
    """True when the window holds the whole grid (the pattern is full attention)."""
    return check_radius(radius) >= diagonal(grid)


@lru_cache(maxsize=64)
def _mask(h: int, w: int, radius: float, n_text: int, text_first: bool) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)                                             # (H W,) row-major
    image = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2 <= radius ** 2   # (HW, HW) query x key
    n = n_text + h * w
    mask = torch.ones(n, n, dtype=torch.bool)
    img = slice(n_text, n) if text_first else slice(0, h * w)
    mask[img, img] = image                                    # image -> image: the window; every other pair kept
    return mask


def window_mask(grid, radius, n_text: int = 0, *, text_first: bool = True, device=None) -> torch.Tensor:
    """(N, N) boolean mask, True where query (row) may attend to key (column); N = n_text + H W."""
    h, w = check_grid(grid)
    if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 0:
        raise InvalidParameterError(f"n_text={n_text!r}: need an integer >= 0 (text tokens in the joint sequence)")
    mask = _mask(h, w, check_radius(radius), n_text, bool(text_first))
    return mask if device is None else mask.to(device)


def kept_share(grid, radius, n_text: int = 0) -> float:
    """Allowed pairs / all pairs: the attention FLOPs a local-window kernel keeps."""
    return float(window_mask(grid, radius, n_text).float().mean())


def split_tokens(n_tokens: int, grid) -> int:
    """Text tokens in a joint sequence of n_tokens over an H x W image grid; raises when the image cannot fit."""
    h, w = check_grid(grid)
    if n_tokens < h * w:
        raise InvalidParameterError(f"attention over {n_tokens} tokens cannot hold a {h}x{w} image grid "
                                    f"({h * w} tokens): the grid does not match this model call")
    return n_tokens - h * w


def local_attention(q, k, v, grid, radius, *, text_first: bool = True, scale: float | None = None) -> torch.Tensor:
    """CLEAR attention. q, k, v (B, H, N, D) with N = N_t + H_g W_g joint tokens -> (B, H, N, D). A window covering
    the grid is plain SDPA (bit for bit)."""
    if k.shape[2] != q.shape[2]:
        raise InvalidParameterError(f"local attention is self-attention over one joint sequence: {q.shape[2]} queries "
                                    f"vs {k.shape[2]} keys")
    n_text = split_tokens(q.shape[2], grid)
    if covers(grid, radius):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    mask = window_mask(grid, radius, n_text, text_first=text_first, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class LocalAttention:
    """CLEAR's windowed attention as the per-call state the surfaces install. local(forward, t, *args, **kwargs)
    runs one model call: it reads the image grid from the latent (args[0] or hidden_states / x, (B, C, H, W)) and
    `patch_size`, then the model's joint attention calls `attend(q, k, v, layer)`. Counters: flops (attention FLOPs a
    local-window kernel computes: allowed pairs) and dense_flops (all pairs); calls counts attention calls."""

    def __init__(self, radius, patch_size: int = 2):
        self.radius = check_radius(radius)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise InvalidParameterError(f"patch_size={patch_size!r}: need an integer >= 1 (the DiT's patch size)")
        self.patch_size = patch_size
        self.grid = None
        self.flops = self.dense_flops = 0
        self.calls = 0
        self._calls = 0

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        latent = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if latent is None or latent.dim() != 4:
            raise InvalidParameterError("CLEAR local attention needs the model's latent (B, C, H, W) as its first "
                                        "argument (hidden_states) to know the image grid")
        p = self.patch_size
        self.grid = (-(-latent.shape[-2] // p), -(-latent.shape[-1] // p))   # the DiT pads to whole patches
        self._calls = 0
        return forward(*args, **kwargs)

    @property
    def keep(self) -> float:
        """1.0 when the window covers the current grid (attention is full: surfaces keep their own dense call and
        token order), else the image-to-image share a window keeps (< 1)."""
        if self.grid is None or covers(self.grid, self.radius):
            return 1.0
        return kept_share(self.grid, self.radius)

    def next_layer(self) -> int:
        self._calls += 1
        return self._calls - 1

    def attend(self, q, k, v, layer=None, scale: float | None = None, dense=None) -> torch.Tensor:
        """q, k, v (B, H, N, D), [text, image] order when the window is local -> (B, H, N, D). `dense()` (default
        SDPA) serves a window covering the grid, so a full window is the surface's own call bit for bit."""
        if self.grid is None:
            raise InvalidParameterError("LocalAttention.attend called outside a model call: call the state with the "
                                        "model's forward first (it reads the image grid from the latent)")
        n_text = split_tokens(q.shape[2], self.grid)
        cost = attention_flops(q, k.shape[2])
        self.dense_flops += cost
        self.calls += 1
        if covers(self.grid, self.radius):
            self.flops += cost
            return dense() if dense is not None else F.scaled_dot_product_attention(q, k, v, scale=scale)
        self.flops += round(cost * kept_share(self.grid, self.radius, n_text))
        return local_attention(q, k, v, self.grid, self.radius, scale=scale)

    @property
    def flops_kept(self) -> float:
        """Attention FLOPs of the allowed pairs / all pairs, over every call so far."""
        return self.flops / self.dense_flops if self.dense_flops else 1.0

    def reset(self) -> None:
        self._calls = 0
