"""Reading and writing weight files. Every failure is a WeightsFormatError that names the file.

safetensors is the format; pickle checkpoints (.ckpt/.pt/.bin/.pth) load only with ``weights_only=True``.
Writes go to a temporary file beside the target and are renamed into place, and never replace an existing file
unless asked (a bad run must not destroy the user's input).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from ..errors import WeightsFormatError

__all__ = ["load_state_dict", "load_with_metadata", "read_metadata", "read_header", "save_state_dict", "component_files"]

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def component_files(path, suffixes: tuple[str, ...], hint: str) -> tuple[list[Path], dict | None]:
    """The weight files of a checkpoint -- a file, or a diffusers component folder (config.json beside one or more
    files with these suffixes, sharded or not) -- and the folder's config (None for a bare file). `hint` says what
    the folder should hold, for the error."""
    path = Path(path)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise WeightsFormatError(f"{path}: no such file or folder")
    config_path = path / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    files = sorted(f for f in path.iterdir() if f.suffix in suffixes)
    if not files:
        raise WeightsFormatError(f"{path}: no {' / '.join(suffixes)} file in the folder ({hint})")
    return files, config


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise WeightsFormatError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))


def _safetensors_error(path: Path, exc: Exception) -> WeightsFormatError:
    return WeightsFormatError(
        f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}). A safetensors file is an 8-byte "
        "header length, a JSON header and the tensor bytes it announces; this one may be truncated or corrupt, or "
        "be another format with a .safetensors name")


def load_with_metadata(path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a safetensors file or a pickle checkpoint (metadata {} for pickles)."""
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        return _load_pickle(path, device), {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise _safetensors_error(path, exc) from exc
    return sd, metadata


def load_state_dict(path, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_with_metadata(path, device)[0]


def _load_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise WeightsFormatError(f"{path}: cannot be read as a pickle checkpoint with weights_only=True "
                                 f"({type(exc).__name__}: {exc}); convert it to .safetensors") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFormatError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}}), "
                                 f"got {type(obj).__name__}")
    return obj


def read_metadata(path) -> dict[str, str]:
    return read_header(path)[1]


def read_header(path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({key: (dtype, shape)}, metadata) from a safetensors header, without reading tensor data."""
    path = Path(path)
    _check_exists(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError(f"file has {size} bytes, fewer than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n > size - 8:
                raise ValueError(f"header announces {n} bytes but the file has only {size - 8} after the length")
            header = json.loads(fh.read(n))
        metadata = header.pop("__metadata__", None) or {}
        entries = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has {size} bytes")
    except Exception as exc:
        raise _safetensors_error(path, exc) from exc
    return entries, metadata


def save_state_dict(sd: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None, *,
                    overwrite: bool = False) -> Path:
    """Write atomically (temporary file + rename). Refuses to replace an existing file unless overwrite=True."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsFormatError(f"{path}: exists; pass overwrite=True or choose another name")
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise WeightsFormatError(f"{path}: safetensors metadata must map str to str; offending entries: {bad}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
