"""Image composition (PrimeComposer, Wang et al. 2024, "Faster Progressively Combined Diffusion for Image
Composition with Attention Steering"): an object is placed into a region of a background and only the region is
generated. Three parts, each optional:

(a) per-step latent blend: outside the region the latent is the background re-noised to the step's sigma
    (`sample_inpaint`, reused as is: the result equals the background exactly there);
(b) self-attention injection (the paper's Correlation Diffuser): at each step the reference, i.e. the collage
    (object pasted on the background), re-noised with the background's noise, is denoised once in "record" mode,
    keeping every self-attention layer's keys and values; in the composite's pass, queries inside the region
    attend to the reference's object keys (inside the region) and to the composite's own background keys
    (outside it), so "the synthesised subject attends to both the reference object and the background";
    `injection` blends that with plain attention, and it runs for the first `injection_end` of the steps;
(c) region-constrained cross-attention: the object's prompt tokens (a span of the context, e.g. the object prompt
    concatenated after the scene prompt) are forbidden (-inf logit) to queries outside the region.

Mask convention as in inpainting: region 1 = the object / generate, 0 = keep the background. Token-level masks are
the region area-averaged to each attention level and read as inside when >= 0.5 (keys, cross-attention) or as a
soft weight (self-attention queries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import InvalidParameterError, SamplingError
from ..sampling.driver import as_floats
from ..sampling.ode import sample_euler
from .attention_patch import AttentionCall, AttentionPatch, attention, mask_tokens
from .inpaint import box_mask, box_span, check_mask, sample_inpaint

MODES = ("plain", "record", "inject")


def _size(t) -> str:
    return f"{t.shape[-1]}x{t.shape[-2]}"


def place(background: torch.Tensor, obj: torch.Tensor, obj_mask: torch.Tensor, box=None):
    """Paste an object into a background latent -> (collage (B, C, H, W), region (1|B, 1, H, W)).

    background, obj: latents (B, C, H, W) and (B|1, C, h, w); obj_mask: (h, w), (B, h, w) or (B, 1, h, w) in [0, 1]
    at the object latent's size. box None: the object is already where it goes (same size as the background) and
    the region is its mask. obj_mask None: the object is what `box` holds in the object image (same fractions).
    box (x, y, width, height) as fractions of the background: the mask's bounding box
    (mask > 0.5) is cut from the object and its mask, resized into the box (bilinear) and pasted there.
    """
    if background.ndim != 4 or obj.ndim != 4 or obj.shape[1] != background.shape[1]:
        raise InvalidParameterError(f"object latent {tuple(obj.shape)} and background latent "
                                    f"{tuple(background.shape)} must both be (B, C, H, W) with the same C")
    if obj_mask is None:                        # the object is what the box holds in the object image
        if box is None:
            raise InvalidParameterError("give an object mask, or a box that says where the object is")
        obj_mask = _box_cells(obj.shape[-2], obj.shape[-1], box).to(obj)
    m = torch.as_tensor(obj_mask).to(obj)
    m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
    if m.ndim != 4 or tuple(m.shape[-2:]) != tuple(obj.shape[-2:]):
        raise InvalidParameterError(f"object mask is {_size(m)} but the object latent is {_size(obj)}; give a mask "
                                    "of the object's size")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise InvalidParameterError("object mask values must lie in [0, 1] (1 = object)")
    inside = (m > 0.5).any(dim=(0, 1))                                          # (h, w)
    if not inside.any():
        raise InvalidParameterError("object mask is empty (nothing > 0.5): mark the object's pixels with 1")
    if box is None:
        if tuple(obj.shape[-2:]) != tuple(background.shape[-2:]):
            raise InvalidParameterError(f"object latent is {_size(obj)} but the background latent is "
                                        f"{_size(background)}; give a box to place it, or an object of the "
                                        "background's size")
        region = m
    else:
        H, W = background.shape[-2:]
        y0, y1, x0, x1 = _box_span(H, W, box)
        rows, cols = inside.any(1).nonzero(), inside.any(0).nonzero()
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        size = (y1 - y0, x1 - x0)
        crop = F.interpolate(obj[..., r0:r1, c0:c1], size=size, mode="bilinear", align_corners=False)
        crop_m = F.interpolate(m[..., r0:r1, c0:c1], size=size, mode="bilinear", align_corners=False).clamp(0, 1)
        obj = background.new_zeros(max(len(obj), len(background)), *background.shape[1:])
        obj[..., y0:y1, x0:x1] = crop
        region = background.new_zeros(len(m), 1, H, W)
        region[..., y0:y1, x0:x1] = crop_m
    if bool((region >= 1).all()):
        raise InvalidParameterError("the object's region covers the whole background: nothing of the background "
                                    "is kept; use a smaller box or mask")
    if not (region > 0).any():
        raise InvalidParameterError("the object's region is empty at the latent's resolution; use a larger box")
    collage = region * obj + (1 - region) * background
    return collage, region


def _box_span(height: int, width: int, box) -> tuple[int, int, int, int]:
    """inpaint.box_span, refusing a box that covers no latent cell."""
    y0, y1, x0, x1 = box_span(height, width, box)
    if not (x0 < x1 and y0 < y1):
        raise InvalidParameterError(f"box {tuple(box)} covers no latent cell of a {width}x{height} latent; x, y, "
                                    "width, height are fractions of the image in [0, 1]")
    return y0, y1, x0, x1


def _box_cells(height: int, width: int, box) -> torch.Tensor:
    _box_span(height, width, box)
    return box_mask(height, width, box)


class CompositionPatch(AttentionPatch):
    """The attention side of PrimeComposer: self-attention injection (b) and region-constrained cross-attention (c).

    region: latent mask (1|B, 1, H, W); object_tokens: (start, end) of the object's tokens in the context, or None;
    injection: weight of the injected self-attention inside the region (0 = off). `mode` is set by the sampler:
    "record" keeps each self-attention layer's k, v; "inject" uses them; "plain" does neither.
    """

    def __init__(self, region: torch.Tensor, object_tokens: tuple[int, int] | None = None, injection: float = 1.0):
        if not 0.0 <= injection <= 1.0:
            raise InvalidParameterError(f"injection={injection}: need 0 <= injection <= 1 (0 = off)")
        if object_tokens is not None:
            start, end = (int(t) for t in object_tokens)
            if not 0 <= start < end:
                raise InvalidParameterError(f"object_tokens={object_tokens}: need 0 <= start < end")
            object_tokens = (start, end)
        self.region, self.object_tokens, self.injection = region, object_tokens, float(injection)
        self.kinds = tuple(k for k, on in (("self", injection > 0), ("cross", object_tokens is not None)) if on)
        self.mode = "plain"
        self.bank: dict = {}

    # (c) -----------------------------------------------------------------------------------------------------
    def cross_bias(self, n_tokens: int, n_context: int) -> torch.Tensor | None:
        """(1|B, 1, N, T) additive bias: -inf where an object token meets a query outside the region."""
        if self.object_tokens is None or n_context < self.object_tokens[1]:
            return None                         # a context without the object span (e.g. a shorter negative)
        start, end = self.object_tokens
        if start == 0 and end >= n_context:
            raise InvalidParameterError(f"object_tokens {self.object_tokens} cover the whole context of "
                                        f"{n_context} tokens; the scene prompt needs tokens of its own")
        outside = mask_tokens(self.region, n_tokens) < 0.5                          # (1|B, N)
        bias = torch.zeros(outside.shape[0], 1, n_tokens, n_context, device=outside.device)
        bias[..., start:end] = torch.where(outside, float("-inf"), 0.0)[:, None, :, None]
        return bias

    # (b) -----------------------------------------------------------------------------------------------------
    def inject(self, q, k, v, k_ref, v_ref, heads: int) -> torch.Tensor:
        """Queries in the region attend to [reference keys inside the region, own keys outside it]; the result is
        blended into plain attention by region share * injection."""
        n = q.shape[1]
        r = mask_tokens(self.region, n)                                             # (1|B, N) soft
        inside = r >= 0.5
        if len(k_ref) != len(k):
            raise SamplingError(f"the reference pass recorded a batch of {len(k_ref)} but the composite has "
                                f"{len(k)} at this layer")
        allowed = torch.cat([inside, ~inside], dim=1)                               # keys [ref (N), own (N)]
        bias = torch.where(allowed, 0.0, float("-inf"))[:, None, None, :]           # (1|B, 1, 1, 2N)
        injected = attention(q, torch.cat([k_ref, k], 1), torch.cat([v_ref, v], 1), heads, bias)
        plain = attention(q, k, v, heads)
        w = (self.injection * r)[..., None].to(q.dtype)                             # (1|B, N, 1)
        return plain + w * (injected - plain)

    def __call__(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        if call.kind == "cross":
            return attention(q, k, v, call.heads, self.cross_bias(q.shape[1], k.shape[1]))
        if self.mode == "record":
            self.bank[(call.layer, call.tag)] = (k, v)
        elif self.mode == "inject" and self.injection > 0:
            if (call.layer, call.tag) not in self.bank:
                raise SamplingError(f"self-attention layer {call.layer!r} (batch {call.tag!r}) ran in the "
                                    "composite pass but not in the reference pass; the two passes must batch alike")
            return self.inject(q, k, v, *self.bank[(call.layer, call.tag)], call.heads)
        return attention(q, k, v, call.heads)


def sample_compose(x, sigmas, *, param, noise, background, reference, region, patch: CompositionPatch | None = None,
                   injection_end: float = 1.0, method=sample_euler, **options):
    """PrimeComposer sampling around any ask/tell `method`: the inpaint blend of the background outside `region`
    (a), and while step < injection_end * steps with patch.injection > 0, a reference pass before each ask
    (the collage `reference` re-noised with the background's noise, recorded by `patch`) whose keys/values the
    composite pass then receives (b). Cross-attention masking (c) lives in `patch` and needs no extra pass.

    With patch None (or injection 0) this is exactly `sample_inpaint(known=background, mask=region)`.
    """
    if not 0.0 <= injection_end <= 1.0:
        raise InvalidParameterError(f"injection_end={injection_end}: need 0 <= injection_end <= 1 (fraction of steps)")
    region = check_mask(region, background, "region")
    if reference.shape[-2:] != background.shape[-2:]:
        raise InvalidParameterError(f"reference latent is {_size(reference)} but the background is "
                                    f"{_size(background)}")
    sigmas = as_floats(sigmas)
    n_steps = len(sigmas) - 1
    drawn = []

    def noise_kept(s, s_next):                  # sample_inpaint's first draw is the background's noise
        drawn.append(noise(s, s_next))
        return drawn[-1]

    steps = sample_inpaint(x, sigmas, param=param, noise=noise_kept, known=background, mask=region, method=method,
                           **options)
    x_ask, sigma = next(steps)
    n_bg = drawn[0]
    try:
        while True:
            step = max(i for i in range(n_steps) if sigmas[i] >= sigma)
            if patch is not None and patch.injection > 0 and step < injection_end * n_steps:
                patch.mode = "record"
                patch.bank.clear()
                yield param.noise_scaling(sigma, n_bg, reference), sigma           # reference pass; x0 unused
                patch.mode = "inject"
            elif patch is not None:
                patch.mode = "plain"
            denoised = yield x_ask, sigma
            x_ask, sigma = steps.send(denoised)
    except StopIteration as done:
        return done.value
    finally:
        if patch is not None:
            patch.mode = "plain"
            patch.bank.clear()


__all__ = ["CompositionPatch", "place", "sample_compose"]
