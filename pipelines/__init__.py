"""Diffusers surface: schedulers and pipelines built on nimblediff.core.

Every module that defines a saved component is imported here: diffusers reloads a saved pipeline's custom
components only from modules that are already imported.
"""

from pathlib import Path

from .caching import NimbleCacheMixin, disable_nimble_cache, enable_nimble_cache
from .compose import ComposePipeline
from .dit import FewStepFluxPipeline, FewStepPixArtPipeline, FewStepSD3Pipeline, FewStepSDXLPipeline
from .editing import EditPipeline, RestorePipeline
from .fewstep import FewStepPipeline
from .schedulers import NimbleScheduler

_CUSTOM = Path(__file__).parent / "custom"


def custom_pipeline_path(name: str) -> str:
    """Path of the one-line file for `DiffusionPipeline.from_pretrained(..., custom_pipeline=path,
    trust_remote_code=True)`; `name` is e.g. "fewstep" or "dit_flux"."""
    path = _CUSTOM / f"nimblediff_{name}.py"
    if not path.is_file():
        from ..errors import InvalidParameterError

        known = sorted(p.stem.removeprefix("nimblediff_") for p in _CUSTOM.glob("nimblediff_*.py"))
        raise InvalidParameterError(f"no custom pipeline named {name!r}; available: {', '.join(known)}")
    return str(path)


__all__ = ["FewStepPipeline", "FewStepSDXLPipeline", "FewStepPixArtPipeline", "FewStepSD3Pipeline",
           "FewStepFluxPipeline", "NimbleScheduler", "custom_pipeline_path", "EditPipeline", "RestorePipeline",
           "enable_nimble_cache", "disable_nimble_cache", "NimbleCacheMixin", "ComposePipeline"]
