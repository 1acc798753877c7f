"""Input widgets that several nodes share (guidance, seeds, inversion, a box as fractions of the image), so a
range or a tooltip is stated once and reads the same in every node."""

from __future__ import annotations

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # ComfyUI's own seed widgets go to 2**64 - 1
NEGATIVE = ("CONDITIONING", {"tooltip": "the negative prompt (used only when cfg > 1)"})


def cfg_input(default: float, tooltip: str, minimum: float = 0.0):
    return ("FLOAT", {"default": default, "min": minimum, "max": 30.0, "step": 0.1, "tooltip": tooltip})


def seed_input(tooltip: str, maximum: int = SEED_MAX):
    return ("INT", {"default": 0, "min": 0, "max": maximum, "tooltip": tooltip})


def fixed_point_input(tooltip: str):
    """Extra model calls per inversion step (core.editing.invert's fixed-point iterations)."""
    return ("INT", {"default": 0, "min": 0, "max": 20, "tooltip": tooltip})


def box_inputs(default: tuple[float, float, float, float], tooltips: tuple[str, str, str, str]) -> dict:
    """box_x, box_y, box_width, box_height as fractions of the image (core.editing.inpaint.box_span reads them)."""
    names = ("box_x", "box_y", "box_width", "box_height")
    return {n: ("FLOAT", {"default": d, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": t})
            for n, d, t in zip(names, default, tooltips)}
