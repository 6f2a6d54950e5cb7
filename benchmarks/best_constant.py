"""The best constant learning rate of a grid: the one rule the report, the grid widening and the study scripts
share.

A grid value is judged by its runs' losses over the seeds (``inf``: the run diverged or failed; NaN: not known):
the values that trained on every seed come first, and among them the lowest median, a tie going to the lower
rate (:func:`best_rate`). Where the best by the final train loss fits its training set (its median below
:data:`FITTED`) train losses that small are noise, and the grid is judged again by the eval loss, which the
report's verdict there is on (:func:`best_constant`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["FITTED", "best_rate", "best_constant"]

#: a best constant below this median final train loss has (nearly) fitted its training set
FITTED = 1e-3


def best_rate(losses: dict) -> Optional[float]:
    """The best value of ``{lr: [loss of each seed]}``: of the rates that trained on every seed (every loss finite),
    if any did, the one with the lowest median (a loss not known counting as ``inf``), a tie going to the lower
    rate (by number: ``10`` is not below ``2``); None for an empty grid. A rate that diverged on one seed is no
    tuned constant a user could rely on, however low its median (one diverged seed in three left it the best, and
    the tuner's ratio on that seed a 0, a win)."""
    def rank(lr: float) -> tuple:
        xs = [math.inf if math.isnan(x) else x for x in losses[lr]]
        return (not all(math.isfinite(x) for x in xs), float(np.median(xs)) if xs else math.inf, lr)
    return min(losses, key=rank, default=None)


def best_constant(finals: dict, evals: Optional[dict] = None) -> tuple[Optional[float], bool]:
    """``(lr, fitted)``: the best value of the grid ``{lr: [final train loss of each seed]}`` by :func:`best_rate`;
    where that value fits its training set (``fitted``: its median final train loss below :data:`FITTED`), the best
    by the eval losses ``evals`` (same shape) instead, when they are known."""
    lr = best_rate(finals)
    kept = [x for x in finals.get(lr, ()) if not math.isnan(x)]
    fitted = bool(kept) and float(np.median(kept)) < FITTED
    if fitted and evals and any(math.isfinite(x) for xs in evals.values() for x in xs):
        lr = best_rate(evals)
    return lr, fitted
