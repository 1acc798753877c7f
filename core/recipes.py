"""Sampling recipes of distilled artefacts, as data.

Wrong settings are the most common failure with a distillation LoRA (CFG left at 7, 30 steps, the wrong
sampler), so every surface reads the recipe from this one table and warns when a graph or call contradicts it.
Sources: each artefact's model card (cited in `source`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str                      # architecture the artefact was trained for: sd15, sdxl, pixart, sd3
    sampler: str                   # a key of nimblediff.core.sampling.SAMPLERS
    schedule: str                  # a key understood by core.schedules.make_sigmas
    steps: int                     # recommended step count
    steps_range: tuple[int, int]
    cfg: float                     # recommended CFG scale (1.0 = off)
    cfg_range: tuple[float, float]
    options: dict = field(default_factory=dict)        # sampler options (e.g. TCD gamma)
    license: str = ""
    source: str = ""

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (f"{self.name}: base {self.base}; sampler {self.sampler}{' (' + opts + ')' if opts else ''}, "
                f"schedule {self.schedule}, {self.steps} steps (ok {self.steps_range[0]}-{self.steps_range[1]}), "
                f"CFG {self.cfg} (ok {self.cfg_range[0]}-{self.cfg_range[1]}); license: {self.license}; "
                f"source: {self.source}")


def _flash(name, base, license_, source):
    # The cards use LCMScheduler(timestep_spacing="trailing"); LCMScheduler ignores the spacing and steps on its
    # own LCM grid (999, 759, 499, 259 at 4 steps), so the faithful schedule is "lcm".
    return Recipe(name, base, "lcm", "lcm", 4, (2, 8), 1.0, (1.0, 1.0), license=license_, source=source)


RECIPES = {r.name: r for r in (
    _flash("flash-sd15", "sd15", "CC-BY-NC-4.0", "jasperai/flash-sd"),
    _flash("flash-sdxl", "sdxl", "CC-BY-NC-4.0", "jasperai/flash-sdxl"),
    _flash("flash-pixart", "pixart", "CC-BY-NC-4.0", "jasperai/flash-pixart"),
    _flash("flash-sd3", "sd3", "stabilityai-ai-community (SD3 license)", "jasperai/flash-sd3"),
    Recipe("lcm-lora-sd15", "sd15", "lcm", "lcm", 4, (2, 8), 1.0, (1.0, 2.0),
           license="openrail++", source="latent-consistency/lcm-lora-sdv1-5"),
    Recipe("lcm-lora-sdxl", "sdxl", "lcm", "lcm", 4, (2, 8), 1.0, (1.0, 2.0),
           license="openrail++", source="latent-consistency/lcm-lora-sdxl"),
    Recipe("tcd-sd15", "sd15", "tcd", "lcm", 4, (2, 8), 1.0, (1.0, 1.0), options={"gamma": 0.3},
           license="MIT", source="h1t/TCD-SD15-LoRA"),
    Recipe("tcd-sdxl", "sdxl", "tcd", "lcm", 4, (2, 8), 1.0, (1.0, 1.0), options={"gamma": 0.3},
           license="MIT", source="h1t/TCD-SDXL-LoRA"),
    # DMD2's card fixes timesteps 999, 749, 499, 249: exactly the 4-step trailing grid
    Recipe("dmd2-sdxl", "sdxl", "lcm", "trailing", 4, (4, 4), 1.0, (1.0, 1.0),
           license="CC-BY-NC-4.0", source="tianweiy/DMD2"),
    Recipe("sdxl-lightning", "sdxl", "euler", "trailing", 4, (2, 8), 1.0, (1.0, 1.0),
           license="openrail++", source="ByteDance/SDXL-Lightning"),
    Recipe("hyper-sd15", "sd15", "tcd", "trailing", 4, (1, 8), 1.0, (1.0, 1.0), options={"gamma": 0.3},
           license="MIT", source="ByteDance/Hyper-SD (per step count LoRA; TCD scheduler in the card)"),
    Recipe("nimblediff-tiny-flash", "sd15", "lcm", "lcm", 4, (1, 8), 1.0, (1.0, 1.0),
           license="Apache-2.0", source="this repository (weights/tiny)"),
    # trained on the uniform grid 1, 0.75, 0.5, 0.25 (tiny/flash.py, FLOW_SIGMAS), each mode from a real latent
    # noised with fresh noise: LCM's re-noising matches that, and beat flow Euler on the calibration split
    # (`python bench/dit_calibrate.py --flash`)
    Recipe("nimblediff-tiny-dit-flash", "sd3", "lcm", "flow", 4, (1, 8), 1.0, (1.0, 1.0),
           license="Apache-2.0", source="this repository (weights/tiny)"),
)}


def check_recipe_usage(recipe: Recipe, *, steps: int | None = None, cfg: float | None = None,
                       sampler: str | None = None) -> list[str]:
    """Human-readable warnings where a graph or call contradicts the recipe (empty when it agrees)."""
    warnings = []
    if steps is not None and not recipe.steps_range[0] <= steps <= recipe.steps_range[1]:
        warnings.append(f"{recipe.name}: {steps} steps is outside the recipe's {recipe.steps_range[0]}-"
                        f"{recipe.steps_range[1]} (recommended {recipe.steps})")
    if cfg is not None and not recipe.cfg_range[0] - 1e-6 <= cfg <= recipe.cfg_range[1] + 1e-6:
        warnings.append(f"{recipe.name}: CFG {cfg} is outside the recipe's {recipe.cfg_range[0]}-"
                        f"{recipe.cfg_range[1]} (distilled models burn at high CFG; recommended {recipe.cfg})")
    if sampler is not None and sampler != recipe.sampler:
        warnings.append(f"{recipe.name}: sampler {sampler!r} differs from the recipe's {recipe.sampler!r}")
    return warnings
