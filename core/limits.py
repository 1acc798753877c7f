"""Sizes refused before memory is allocated: a workflow or command line asking for an absurd resolution or batch
gets a clear error instead of an out-of-memory crash (or the OS killing the server)."""

from __future__ import annotations

import math

from ..errors import InvalidParameterError

__all__ = ["MAX_SIDE", "MAX_BATCH", "MAX_LATENT_ELEMENTS", "check_latent_size", "prompt_batch", "image_size"]

MAX_SIDE = 16384                 # pixels per side: ComfyUI's MAX_RESOLUTION
MAX_BATCH = 4096                 # images per batch
MAX_LATENT_ELEMENTS = 2 ** 30    # 4 GiB of float32 latents in one tensor: more is a mistake, not a render


def check_latent_size(batch: int, channels: int, height: int, width: int, ratio: int = 8, what: str = "") -> None:
    """Refuse a batch of (batch, channels, height / ratio, width / ratio) latents beyond the limits above. height and
    width are image pixels; `what` prefixes the message (e.g. the node or command)."""
    where = f"{what}: " if what else ""
    for name, value, limit in (("width", width, MAX_SIDE), ("height", height, MAX_SIDE), ("batch", batch, MAX_BATCH)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise InvalidParameterError(f"{where}{name}={value!r}; valid: an integer from 1 to {limit}")
    elements = batch * channels * math.ceil(height / ratio) * math.ceil(width / ratio)
    if elements > MAX_LATENT_ELEMENTS:
        raise InvalidParameterError(
            f"{where}batch {batch} of {width}x{height} images needs {elements:,} latent values "
            f"({elements * 4 / 2**30:.0f} GiB in float32), over the limit of {MAX_LATENT_ELEMENTS:,}; lower the "
            "batch or the resolution")


def prompt_batch(prompt, num_images_per_prompt, prompt_embeds=None, what: str = "") -> int:
    """The batch a text-to-image call makes: prompts (a string is one; else the list's or the embeddings' length)
    times num_images_per_prompt, which must be an integer >= 1."""
    where = f"{what}: " if what else ""
    n = num_images_per_prompt
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidParameterError(f"{where}num_images_per_prompt={n!r}; valid: an integer from 1 to {MAX_BATCH}")
    if prompt is None and prompt_embeds is not None:
        prompts = len(prompt_embeds)
    else:
        prompts = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
    return prompts * n


def image_size(image) -> tuple[int, int, int] | None:
    """(batch, height, width) of an image input as diffusers' image processor takes it (a PIL image, a numpy array
    (H, W, C) / (B, H, W, C), a tensor (C, H, W) / (B, C, H, W), or a list of them), read from its header before any
    pixel is converted; None when the form is not one of these (the processor then reports it)."""
    if isinstance(image, (list, tuple)):
        sizes = [image_size(im) for im in image]
        if not sizes or any(s is None for s in sizes):
            return None
        return sum(s[0] for s in sizes), max(s[1] for s in sizes), max(s[2] for s in sizes)
    shape = getattr(image, "shape", None)
    if shape is not None:                                  # numpy (channels last) or torch (channels first)
        shape = tuple(int(d) for d in shape)
        channels_last = not hasattr(image, "dim")
        if len(shape) == 2:
            return 1, shape[0], shape[1]
        if len(shape) == 3:
            return (1, shape[0], shape[1]) if channels_last else (1, shape[1], shape[2])
        if len(shape) == 4:
            return (shape[0], shape[1], shape[2]) if channels_last else (shape[0], shape[2], shape[3])
        return None
    size = getattr(image, "size", None)                    # PIL: (width, height)
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return 1, size[1], size[0]
    return None
