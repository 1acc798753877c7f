"""Adapter math: canonical deltas, and applying them to torch modules."""

from .delta import Delta, Diff, DoRA, Factored, LoHa, LoKr, LoRA, Rows, Sparse, select_rows

__all__ = ["Delta", "Diff", "DoRA", "Factored", "LoHa", "LoKr", "LoRA", "Rows", "Sparse", "select_rows"]
