"""EIM: Encode, Identify, Manipulate. Mask-free semantic editing in the joint text-image space of an MM-DiT
(Shuai et al. 2024, "Latent Space Disentanglement in Diffusion Transformers Enables Precise Zero-shot Semantic
Editing").

1. Encode: invert the image latent x0 along the flow ODE under the source prompt's embedding c_s (inversion.py).
   The pair (x_T, c_s) is the image's joint embedding, and regenerating it reproduces the image.
2. Identify: take the editing direction from a pair of prompts in every text stream the DiT reads (token
   embeddings, pooled vector): delta = c_t - c_s. In an MM-DiT the text tokens go through the same attention as
   the image tokens, so moving c moves the joint embedding. The paper refines delta with Hessian Score
   Distillation Sampling; hsds.refine_direction is our reading of it (an option, off by default: score
   distillation towards the target's prediction on the noised source latent plus a finite-difference Hessian
   penalty on the change that is even in delta; its docstring says where it departs from the paper).
3. Manipulate: regenerate x_T under c_s + lambda * delta. lambda = 0 gives the reconstruction, lambda = 1 the target
   prompt, and lambda > 1 extrapolates along the direction. `window` limits the edit to the first sampling steps
   (layout and colour are settled early), so the last steps keep the source's details.

The denoiser convention is PTI's: model(x, sigma, c) -> x0, with c one tensor or a tuple of tensors (for SD3:
(prompt_embeds (B, L, D), pooled (B, P))) and guidance inside the callable.
"""

from __future__ import annotations

import math

import torch

from ...errors import InvalidParameterError
from ..sampling.driver import as_floats, run
from .inversion import invert
from .pti import _like, _streams, run_per_step

# architectures whose text tokens share attention with the image tokens (the joint space EIM edits)
JOINT_ARCHITECTURES = ("sd3", "flux", "mmdit")


def check_joint_model(architecture: str, operator: str = "DiT semantic editing (EIM)") -> None:
    """EIM edits the joint text-image embedding of an MM-DiT; a UNet's cross-attention has no joint space."""
    if str(architecture).lower() not in JOINT_ARCHITECTURES:
        raise InvalidParameterError(
            f"{operator} needs an MM-DiT (SD3 / Flux type: text and image tokens in one attention); got a "
            f"{architecture} model. For a UNet, edit with inversion + prompt swap or Prompt Tuning Inversion")


def direction(source, target):
    """delta = target - source, stream by stream (token embeddings, pooled vector)."""
    s, t = _streams(source), _streams(target)
    if len(s) != len(t):
        raise InvalidParameterError(f"source embedding has {len(s)} streams, target {len(t)}: encode both prompts "
                                    "with the same text encoders")
    for i, (a, b) in enumerate(zip(s, t)):
        if a.shape[1:] != b.shape[1:] or (len(a) != len(b) and 1 not in (len(a), len(b))):
            raise InvalidParameterError(f"source and target embeddings differ in shape in stream {i}: "
                                        f"{tuple(a.shape)} vs {tuple(b.shape)}; encode both prompts with the same "
                                        "sequence length")
    return _like(source, tuple(b.to(a.dtype) - a for a, b in zip(s, t)))


def manipulate(source, delta, strength: float):
    """c_s + strength * delta per stream; strength 0 returns the source embedding itself."""
    if not math.isfinite(strength):
        raise InvalidParameterError(f"strength={strength}: need a finite number (0 = reconstruction, 1 = target "
                                    "prompt)")
    if strength == 0:
        return source
    return _like(source, tuple(a + strength * d for a, d in zip(_streams(source), _streams(delta))))


def edit_conds(source, delta, strength: float, steps: int, window: float = 1.0) -> list:
    """Per-step conditioning: the edited embedding for the first round(window * steps) steps, the source after."""
    if not 0.0 <= window <= 1.0:
        raise InvalidParameterError(f"window={window}: need 0 <= window <= 1 (share of the steps that see the edit)")
    edited = manipulate(source, delta, strength)
    k = round(window * steps)
    return [edited] * k + [source] * (steps - k)


def edit(model, x0, sigmas, source, target, strength: float, *, param, fixed_point: int = 0, window: float = 1.0,
         delta=None, invert_model=None, callback=None):
    """EIM edit of the latent x0 (B, C, H, W): invert under `source`, regenerate under source + strength * delta.

    sigmas: the sampling schedule (decreasing to 0; truncate it for a partial inversion); delta defaults to
    direction(source, target); invert_model: the denoiser for the inversion when it differs from the regenerating
    one (unguided inversion, guided regeneration); callback: k-diffusion's dict after every model call of both
    phases. Returns (edited latent, inverted noise x_T).
    """
    if param.kind != "flow":
        raise InvalidParameterError(f"EIM follows a rectified-flow ODE (SD3 / Flux); got a model of kind "
                                    f"{param.kind!r}")
    delta = direction(source, target) if delta is None else delta
    with torch.no_grad():
        inverse = model if invert_model is None else invert_model
        trajectory = run(invert, lambda x, s, **_: inverse(x, s, source), x0, sigmas, param=param,
                         fixed_point=fixed_point, callback=callback)
        conds = edit_conds(source, delta, strength, len(as_floats(sigmas)) - 1, window)
        regenerate = model
        if callback is not None:              # the regeneration reports on, numbered after the inversion's calls
            i = len(trajectory[1:]) * (fixed_point + 1)

            def regenerate(x, sigma, c):
                nonlocal i
                denoised = model(x, sigma, c)
                callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
                i += 1
                return denoised
        out = run_per_step(regenerate, trajectory[-1], sigmas, conds, param=param)
    return out, trajectory[-1]


__all__ = ["JOINT_ARCHITECTURES", "check_joint_model", "direction", "manipulate", "edit_conds", "edit"]
