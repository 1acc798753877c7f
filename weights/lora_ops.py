"""Host-free LoRA file operations shared by the CLI and the ComfyUI nodes: safe output paths (never over an
existing file or an input), carried metadata, chunked merge / extract with progress, and saving."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import AdapterMismatchError, InvalidParameterError, WeightsFormatError

LAYOUTS = ("kohya", "comfyui", "peft")
DYNAMIC_METHODS = ("none", "sv_ratio", "sv_fro", "sv_cumulative", "energy")
_CARRIED_DROP = ("lora_adapter_metadata", "ss_network_dim", "ss_network_alpha", "ss_network_module", "format")

def output_path(folder, filename: str, *, overwrite: bool, inputs: Sequence = ()) -> Path:
    """`filename` inside `folder` (".safetensors" added when it has no suffix). Raises naming the path when it would
    leave the folder, replace an input, or replace an existing file without `overwrite`."""
    from .paths import inside

    path = inside(Path(folder).resolve(), filename, "filename")
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return checked_output(path, overwrite=overwrite, inputs=inputs, hint="set overwrite to true")


def checked_output(path, *, overwrite: bool, inputs: Sequence = (), hint: str = "pass --overwrite") -> Path:
    """`path`, after refusing to replace one of `inputs` (ever) or an existing file (unless `overwrite`)."""
    path = Path(path)
    resolved = path.resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == resolved:
            raise InvalidParameterError(f"{path}: is also an input of this operation; write to another file (inputs "
                                        "are never overwritten)")
    if path.exists() and not overwrite:
        raise WeightsFormatError(f"{path}: exists; {hint} to replace it, or choose another name")
    if path.exists() and path.is_dir():
        raise InvalidParameterError(f"{path}: is a directory; give a file name")
    return path


def carried_metadata(metadatas: Sequence[dict], op: str, params: dict) -> dict[str, str]:
    """Metadata for a derived file: the first input's training metadata (kohya ``ss_*``, ``modelspec.*``) without the
    entries that describe the tensors (the writer sets those), plus what was done."""
    out = {k: v for k, v in (metadatas[0] if metadatas else {}).items()
           if isinstance(v, str) and k not in _CARRIED_DROP}
    out["nimblediff_op"] = op
    out["nimblediff_params"] = ", ".join(f"{k}={v}" for k, v in params.items())
    return out


def in_chunks(fn: Callable[[list[str]], tuple[dict, object]], keys: Sequence[str], *,
              progress: Callable[[int, int], None] | None = None, size: int = 8) -> tuple[dict, list]:
    """Run `fn` on consecutive slices of `keys` (for progress and interruption between slices): the union of the
    returned dicts in key order, and the list of reports. `fn` must treat keys independently."""
    out, reports, keys = {}, [], list(keys)
    for i in range(0, len(keys), size):
        part, report = fn(keys[i:i + size])
        out.update(part)
        reports.append(report)
        if progress is not None:
            progress(min(i + size, len(keys)), len(keys))
    return out, reports


def combine_rank_reports(reports: Sequence):
    """One RankReport from the reports of disjoint key sets (None entries skipped)."""
    from ..core.adapters.rank import RankReport

    out = RankReport()
    for r in reports:
        out.add(r)
    return out


def rank_selection(rank: int | None, method: str = "none", param: float | None = None) -> dict:
    """kohya's (new_rank, dynamic_method, dynamic_param) as core keyword arguments; rank caps a dynamic method."""
    if method not in DYNAMIC_METHODS:
        raise InvalidParameterError(f"dynamic_method={method!r}; valid: {', '.join(DYNAMIC_METHODS)}")
    return {"rank": rank} if method == "none" else {"rank": rank, method: param}


def require_complete(report) -> None:
    """Refuse to derive a file from a LoRA some of whose keys the reader could not carry over (modules with no name
    for its base, DoRA magnitudes): the new file would silently lose them."""
    if report.unmatched or report.magnitude:
        lost = report.unmatched[:5] or list(report.magnitude)[:5]
        raise WeightsFormatError(
            f"{report.source}: {len(report.unmatched)} modules have no name for a {report.arch.arch} model and "
            f"{len(report.magnitude)} DoRA magnitudes cannot be written yet, e.g. {lost}; a file derived from it "
            "would silently lose them")


def read_same_base(paths: Sequence) -> tuple[list[dict], list]:
    """read_lora each file for its detected base; raises naming both files when two are for different bases."""
    from ..weights.arch import compatible
    from ..weights.lora_formats import read_lora

    deltas, reports = [], []
    for path in paths:
        d, r = read_lora(path)
        if reports and not compatible(r.arch.arch, reports[0].arch.arch):
            raise AdapterMismatchError(f"{path} is a LoRA for {r.arch} but {reports[0].source} is for "
                                       f"{reports[0].arch}; merge LoRAs made for the same base model")
        deltas.append(d)
        reports.append(r)
    return deltas, reports


def merge_with_progress(adapters: Sequence[dict], weights: Sequence[float], method: str, *, density: float,
                        seed: int, rank: int | None, progress=None, svd: str = "fast"):
    """core merge() with a progress callback after every layer (progress(done, total); raise from it to cancel);
    without one, a tqdm bar on a terminal. The rank reduction is the fast one (see core merge's `svd`).
    (Was merge_chunked: the merge works layer by layer, and within a layer in row blocks, on its own.)"""
    from ..core.adapters.merge import merge

    bar = None
    if progress is None:
        from tqdm import tqdm

        bar = tqdm(total=len(dict.fromkeys(k for a in adapters for k in a)), desc=f"merge ({method})", unit="layer",
                   disable=None)
        progress = lambda done, total: bar.update(done - bar.n)  # noqa: E731
    try:
        return merge(adapters, weights, method, density=density, generator=torch.Generator().manual_seed(int(seed)),
                     seed=int(seed), rank=rank, svd=svd, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def check_merge_keys(adapters: Sequence[dict], reports: Sequence) -> None:
    """Refuse to merge a LoRA none of whose modules is a module of the model it claims (read_lora names any PEFT /
    diffusers module as given, so a LoRA for something else reads without error) or shares a module with the other
    LoRAs; warn when only some of its modules are known. Raises naming the file and what matched. UNet bases are
    checked against their module lists (any UNet base's when the base is unknown); DiT modules have no list without
    a model, so they meet only the check against the other LoRAs."""
    import warnings

    from ..weights.arch import ArchGuess
    from ..weights.lora_formats import Target

    for deltas, report in zip(adapters, reports):
        known = set(Target.for_arch(report.arch).kohya.values())
        base = f"a {report.arch.arch} model"
        if report.arch.arch in ("unknown", "unet"):
            known |= set(Target.for_arch(ArchGuess("sdxl", "any UNet base")).kohya.values())
            base = "an SD1.x / SD2.x / SDXL UNet or text encoder"
        checked = [k for k in deltas if not k.startswith("transformer.")] if known else []
        stray = [k for k in checked if k not in known]
        if stray and len(stray) == len(deltas):
            raise AdapterMismatchError(
                f"{report.source}: none of its {len(deltas)} modules is a module of {base}, e.g. {stray[:3]}; valid "
                f"names look like {sorted(known)[:2]}. Is it a LoRA for another model?")
        if stray:
            warnings.warn(f"{report.source}: {len(stray)} of its {len(deltas)} modules are not modules of {base} and "
                          f"are merged as they are, e.g. {stray[:3]}", stacklevel=2)
    if len(adapters) > 1:
        for i, (deltas, report) in enumerate(zip(adapters, reports)):
            others = {k for j, a in enumerate(adapters) if j != i for k in a}
            if not others & set(deltas):
                raise AdapterMismatchError(
                    f"{report.source}: none of its {len(deltas)} modules (e.g. {list(deltas)[:3]}) is in the other "
                    f"LoRAs ({', '.join(r.source for j, r in enumerate(reports) if j != i)}: {len(others)} modules, "
                    f"e.g. {sorted(others)[:3]}); merge LoRAs that adapt the same modules")


def merge_metadata(reports: Sequence, sources: str, merged: dict, **params) -> dict[str, str]:
    """carried_metadata for a merge; `rank` says the rank(s) written, not the budget asked for (a linear merge of
    ranks 4 + 4 under rank 16 is written at rank 8), and the budget is kept as `max_rank`."""
    ranks = sorted({d.rank for d in merged.values() if hasattr(d, "rank")})
    written = "none (full differences)" if not ranks else str(ranks[0]) if len(ranks) == 1 else \
        f"{ranks[0]}..{ranks[-1]}"
    return carried_metadata([r.metadata for r in reports], "merge", dict(
        sources=sources, **{k: v for k, v in params.items() if k != "rank"}, rank=written,
        max_rank=params.get("rank")))


def extract_chunked(base: dict, tuned: dict, *, component: str, progress=None, **options):
    """core extract_lora() over slices of the layers (state dicts keyed ``<module>.weight``), with progress."""
    from ..core.adapters.extract import extract_lora

    names = [k for k, v in base.items() if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.ndim in (2, 4)]

    def part(chunk):
        return extract_lora({k: base[k] for k in chunk}, {k: tuned[k] for k in chunk if k in tuned},
                            component=component, **options)

    out, reports = in_chunks(part, names, progress=progress)
    return out, combine_rank_reports(reports)


def save_deltas(deltas: dict, path: Path, layout: str, *, dtype=None, overwrite: bool, metadata: dict, target=None
                ) -> Path:
    """save_lora with one alpha per file for kohya / comfyui (diffusers' kohya reader mis-scales mixed alphas)."""
    from ..weights.lora_write import save_lora

    if layout not in LAYOUTS:
        raise InvalidParameterError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    if not deltas:
        raise InvalidParameterError(f"{path}: nothing to write (the result has no layers)")
    return save_lora(deltas, path, layout, metadata=metadata, overwrite=overwrite, target=target, dtype=dtype,
                     uniform_alpha=layout != "peft")


def describe_file(path: Path) -> str:
    size = path.stat().st_size
    return f"wrote {path} ({size / 1e6:.2f} MB)"


# ------------------------------------------------------------------------------------------------ ComfyUI glue
