"""How the backends cut a model's parameters into runs for their vector work.

A tuner's inner products and elementwise formulas over every parameter run fastest, on a small model, over the
parameters flattened and concatenated into one vector: one kernel (PyTorch) or one compiled XLA:CPU kernel (JAX)
instead of one per tensor. On a large model the concatenation is a copy of the whole model per operand, so both
backends work in runs of consecutive parameters of at most :data:`CONCAT_BELOW` entries (a larger tensor alone):
a small model is one run, a large one's temporaries stay within a few runs' sizes.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["CONCAT_BELOW", "cut_into_runs"]

#: the most entries a run of concatenated parameters holds (a larger tensor is a run of its own)
CONCAT_BELOW = 1 << 20


def cut_into_runs(positions: Sequence[int], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """``positions`` (indices into ``sizes``, the tensors' entry counts) cut in order into consecutive runs of at
    most ``limit`` entries in total (a larger tensor alone)."""
    out: list[list[int]] = []
    total = 0
    for i in positions:
        if not out or (out[-1] and total + sizes[i] > limit):
            out.append([])
            total = 0
        out[-1].append(i)
        total += sizes[i]
    return out
