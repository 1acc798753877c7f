"""Sizes refused before memory is allocated: a workflow or command line asking for an absurd resolution or batch
gets a clear error instead of an out-of-memory crash (or the OS killing the server)."""

from __future__ import annotations

import math

from ..errors import InvalidParameterError

__all__ = ["MAX_SIDE", "MAX_BATCH", "MAX_LATENT_ELEMENTS", "check_latent_size"]

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
