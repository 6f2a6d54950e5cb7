"""Step timing shared by the overhead rows of both backends (:mod:`benchmarks.overhead`,
:mod:`benchmarks.overhead_jax`).

A *step* is a zero-argument callable that completes its work before returning (a JAX step blocks on its
result). :func:`step_time_ratio` warms both steps up, then alternates blocks of ``steps`` base steps and
``steps`` tuned steps ``repeats`` times, so that a slow phase of a shared machine hits both alike; the ratio
is the median over repeats of (median tuned step / median base step).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["time_block", "step_time_ratio"]


def time_block(step: Callable[[], None], n: int) -> float:
    """Median wall seconds of ``n`` calls of ``step``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time_ratio(base_step: Callable[[], None], tuned_step: Callable[[], None], *, repeats: int, steps: int,
                    warmup: int = 3) -> tuple[float, float]:
    """``(median over repeats of tuned/base, the last block's median base step in seconds)``."""
    for s in (base_step, tuned_step):  # first calls compile (JAX) or allocate (torch)
        for _ in range(warmup):
            s()
    ratios, tb = [], float("nan")
    for _ in range(repeats):
        tb = time_block(base_step, steps)
        ratios.append(time_block(tuned_step, steps) / tb)
    return statistics.median(ratios), tb
