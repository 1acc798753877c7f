"""Loading a pipeline folder: the folder check, and one dtype policy (every component computes in the denoiser's
dtype).

diffusers loads its models in float32 unless told otherwise, while transformers 5 loads a text encoder in the dtype
its config names ("auto"). A folder saved in fp16 therefore comes back with an fp16 text encoder beside an fp32 UNet
and fails at the first matmul. The denoiser's dtype is the one the user chose (``dtype=`` / ``torch_dtype=``), so the
other components follow it, and the cast is logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers.utils import logging

from ..errors import WeightsFormatError

logger = logging.get_logger(__name__)

_FOLLOWERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "image_encoder")


def agree_dtypes(pipe) -> list[str]:
    """Cast floating components whose dtype differs from the denoiser's to it; returns the names it cast."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        return []
    dtype, cast = denoiser.dtype, []
    for name in _FOLLOWERS:
        module = getattr(pipe, name, None)
        if module is not None and getattr(module, "dtype", dtype) != dtype and module.dtype.is_floating_point:
            cast.append(f"{name} {str(module.dtype).removeprefix('torch.')}")
            module.to(dtype)
    if cast:
        logger.warning(f"cast {', '.join(cast)} to the denoiser's {str(dtype).removeprefix('torch.')} so the "
                       "components agree; pass dtype=... to from_pretrained to choose one dtype for all")
    return cast


def check_pipeline_folder(path, *, local_only: bool = False, name: str | None = None) -> None:
    """A path that names a local folder (or looks like one) must be a diffusers pipeline folder.

    Hub ids (``owner/name``) pass through untouched, for diffusers to resolve, unless `local_only` (the offline CLI).
    `name` (e.g. "--model") is how the caller's user gave the path."""
    if not isinstance(path, (str, os.PathLike)):
        return
    p = Path(path)
    label = f"{name} {path}" if name else str(path)
    looks_local = local_only or p.is_absolute() or str(path).startswith((".", "~")) or len(p.parts) > 2 or p.exists()
    if not looks_local:
        return
    if not p.is_dir():
        raise WeightsFormatError(f"{label}: no such folder; give a diffusers pipeline folder (with model_index.json), "
                                 "e.g. weights/tiny/nimblediff-tiny")
    if not (p / "model_index.json").is_file():
        raise WeightsFormatError(f"{label}: not a diffusers pipeline folder (no model_index.json); a single-file "
                                 "checkpoint is loaded in ComfyUI, or converted with diffusers' conversion scripts")


def missing_text_encoders(folder) -> dict:
    """{component: None} for the T5 encoder and tokenizer a folder leaves out on purpose.

    SD3's pipeline runs without its T5 (text_encoder_3=None, as diffusers documents for dropping it), but
    from_pretrained insists on every non-optional component, so a folder saved without T5 needs them passed as None.
    """
    import json

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {name: None for name in ("text_encoder_3", "tokenizer_3")
            if name in index and (index[name] is None or index[name][0] is None)
            and not (Path(folder) / name).is_dir()}
