"""CLEAR adapter files: a LoRA on a DiT's attention projections in diffusers' layout (transformer.<module>.lora_A/B
.weight, fp16), with the local window it was distilled for in the safetensors metadata (`radius`, `grid`,
`patch_size`; written by tiny/clear.py). Read here once for both surfaces."""

from __future__ import annotations

import os

from ..errors import InvalidParameterError, WeightsFormatError

FORMAT = "nimblediff-clear-lora"


def read_clear_adapter(path) -> tuple[dict, dict]:
    """(state dict, metadata) of a CLEAR LoRA file. Raises naming the file when it is missing, not safetensors, or
    holds anything but transformer LoRA factors."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidParameterError(f"adapter={path!r}: no such file (a CLEAR LoRA .safetensors, e.g. "
                                    "nimblediff.TINY_DIT_CLEAR_LORA)")
    try:
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                                # not a safetensors file
        raise WeightsFormatError(f"adapter {path!r} cannot be read as safetensors: {e}") from e
    bad = [k for k in state if not (k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k))]
    if not state or bad:
        raise WeightsFormatError(f"adapter {path!r} is not a diffusers transformer LoRA (keys transformer.<module>"
                                 f".lora_A/B.weight); first other keys: {bad[:3] if bad else 'none at all'}")
    if "radius" in meta:
        try:
            float(meta["radius"])
        except ValueError:
            raise WeightsFormatError(f"adapter {path!r}: metadata radius={meta['radius']!r} is not a number") from None
    return state, meta
