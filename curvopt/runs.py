"""How the backends cut a model's parameters into runs for their vector work.

A tuner's inner products and elementwise formulas over every parameter run fastest, on a small model, over the
parameters flattened and concatenated into one vector: one kernel (PyTorch) or one compiled XLA:CPU kernel (JAX)
instead of one per tensor. On a large model the concatenation is a copy of the whole model per operand, so both
backends work in runs of consecutive parameters of at most :data:`CONCAT_BELOW` entries (a larger tensor alone):
a small model is one run, a large one's temporaries stay within a few runs' sizes. A computation that may span
more than one device concatenates nothing (:func:`concat_limit`).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["CONCAT_BELOW", "concat_limit", "cut_into_runs"]

#: the most entries a run of concatenated parameters holds (a larger tensor is a run of its own)
CONCAT_BELOW = 1 << 20


def concat_limit(devices: int, limit: int = CONCAT_BELOW) -> int:
    """The run size :func:`cut_into_runs` takes for a computation that may span ``devices`` devices: ``limit`` on
    one; 0 on more, every tensor a run of its own in its own shape. Raveling a tensor split across devices (a
    weight split by columns over a ``model`` mesh axis) into a concatenation gathers it whole on every device, and
    a traced array does not tell whether it is split (under ``jax.jit`` its sharding reads as replicated unless the
    mesh axes are explicit). (A field test, an MLP of four 2^18-entry weights split 4 ways: closure-free CDAT behind
    Adam gathered them 90 times per step and held 59 MiB of temporaries per device, 45 MiB unsplit on one.)"""
    return limit if devices <= 1 else 0


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
