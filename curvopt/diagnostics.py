"""Diagnostics from logged histories (NumPy only): catapults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Catapult", "detect_catapults"]


@dataclass(frozen=True)
class Catapult:
    """A loss spike at ``start`` that peaked at ``peak`` and came back below its start value by ``end``.

    ``sharpness_before`` / ``sharpness_after`` are the sharpness at the start and at the end: a catapult
    ends in a flatter region (after < before).
    """

    start: int
    peak: int
    end: int
    spike: float
    sharpness_before: float
    sharpness_after: float


def detect_catapults(loss: Sequence[float], sharpness: Sequence[float], *, spike: float = 2.0) -> list[Catapult]:
    """Find catapults: the loss rises by ``spike``x over its running minimum, then returns below it, while
    the sharpness falls. NaN sharpness entries (steps without an estimate) are filled forward."""
    loss = np.asarray(loss, dtype=float)
    sharp = np.asarray(sharpness, dtype=float)
    if loss.shape != sharp.shape:
        raise ValueError(f"loss and sharpness must have the same length, got {loss.shape} and {sharp.shape}")
    if spike <= 1:
        raise ValueError(f"spike must be in (1, inf), got {spike!r}")
    filled = sharp.copy()
    for i in range(1, len(filled)):
        if not np.isfinite(filled[i]):
            filled[i] = filled[i - 1]
    out: list[Catapult] = []
    i, n = 0, len(loss)
    while i < n:
        base = loss[i]
        if not np.isfinite(base):
            i += 1
            continue
        j = i + 1
        while j < n and np.isfinite(loss[j]) and loss[j] <= spike * base:
            if loss[j] < base:
                base, i = loss[j], j
            j += 1
        if j >= n or not np.isfinite(loss[j]):
            break
        start, k = i, j
        while k < n and np.isfinite(loss[k]) and loss[k] > base:
            k += 1
        if k >= n or not np.isfinite(loss[k]):
            break
        peak = start + int(np.nanargmax(loss[start:k + 1]))
        before, after = filled[start], filled[k]
        if np.isfinite(before) and np.isfinite(after) and after < before:
            out.append(Catapult(start, peak, k, float(loss[peak] / base), float(before), float(after)))
        i = k
    return out

