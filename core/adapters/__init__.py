"""Adapter math: canonical deltas, and applying them to torch modules."""

from .delta import Delta, Diff, LoRA

__all__ = ["Delta", "Diff", "LoRA"]
