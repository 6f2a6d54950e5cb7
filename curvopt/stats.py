"""The per-step numbers every tuner exposes for logging (``opt.stats`` in PyTorch, the state in Optax).

The names and meanings are shared by both backends; a value that was not computed this step is NaN
(sharpness between estimates keeps the last estimate). Where they differ: before the first step an Optax state
reads ``lr`` 0 (PyTorch NaN); after ``load_state_dict`` PyTorch's ``lr``, ``numerator``, ``curvature`` and
``eos_ratio`` read NaN until the next step (the counters and the sharpness come back; an Optax state restores
them all); closure-free, Optax counts the gradient it was handed as one evaluation (``closure_calls`` 1),
PyTorch counts closure calls (0). In Optax ``eos_ratio`` leaves out a scale inside the base (``optax.scale(s)``,
``scale_by_schedule``: behind gradient descent with ``s = 0.1`` it read 1.5 where the step sat at 0.15 of the
edge), which PyTorch's group lr is in.
"""
from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["STAT_FIELDS", "STAT_DOCS", "TunerStats"]

STAT_DOCS = {
    "lr": "the global learning rate the tuner chose for this step (multiplies the base's per-group lr)",
    "numerator": "-g^T u: the decrease rate of the loss along the base direction u (positive = descent)",
    "curvature": "u^T H u: the second derivative of the loss along u (from the curvature oracle)",
    "sharpness": "lambda_max(H), the latest online estimate (NaN until the first estimate); with param groups at "
                 "different rates, of R^1/2 H R^1/2, R each group's rate over the largest (PyTorch)",
    "preconditioned_sharpness": "lambda_max(P^-1 H) for Adam-like bases, the latest estimate (NaN otherwise); "
                                "with param groups at different rates, of R^1/2 P^-1/2 H P^-1/2 R^1/2 (PyTorch)",
    "eos_ratio": "effective lr (PyTorch: times the largest group lr) * (preconditioned) sharpness / the base's "
                 "stability coefficient (1 = edge of stability)",
    "skipped": "number of steps skipped so far because the loss or gradient was not finite (or, closure-free, "
               "zero in every entry)",
    "closure_calls": "loss/gradient evaluations spent in this step (PyTorch: closure calls)",
}

STAT_FIELDS = tuple(STAT_DOCS)


class TunerStats(NamedTuple):
    """The statistics as a record (the Optax states nest one; PyTorch's ``opt.stats`` is its ``_asdict()``)."""

    lr: Any
    numerator: Any
    curvature: Any
    sharpness: Any
    preconditioned_sharpness: Any
    eos_ratio: Any
    skipped: Any
    closure_calls: Any


assert TunerStats._fields == STAT_FIELDS
