"""Step timing shared by the overhead rows of both backends (:mod:`benchmarks.overhead`,
:mod:`benchmarks.overhead_jax`).

A *step* is a zero-argument callable that completes its work before returning (a JAX step blocks on its
result). :func:`step_time_ratio` warms both steps up, then alternates blocks of ``steps`` base steps and
``steps`` tuned steps ``repeats`` times, so that a slow phase of a shared machine hits both alike; the ratio
is the median over repeats of (median tuned step / median base step).

``clock="wall"`` (default) times with ``time.perf_counter``; ``clock="cpu"`` with the calling thread's CPU
time (``time.thread_time``), which on a shared machine leaves out the time the process waited for a core (torch
runs its CPU ops on the calling thread when it has one intra-op thread, as the overhead benchmark sets).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["CLOCKS", "time_block", "step_time_ratio"]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_block(step: Callable[[], None], n: int, clock: str = "wall") -> float:
    """Median seconds (``clock``: see the module docstring) of ``n`` calls of ``step``."""
    now = CLOCKS[clock]
    times = []
    for _ in range(n):
        t0 = now()
        step()
        times.append(now() - t0)
    return statistics.median(times)


def step_time_ratio(base_step: Callable[[], None], tuned_step: Callable[[], None], *, repeats: int, steps: int,
                    warmup: int = 3, clock: str = "wall") -> tuple[float, float]:
    """``(median over repeats of tuned/base, the last block's median base step in seconds)``."""
    for s in (base_step, tuned_step):  # first calls compile (JAX) or allocate (torch)
        for _ in range(warmup):
            s()
    ratios, tb = [], float("nan")
    for _ in range(repeats):
        tb = time_block(base_step, steps, clock)
        ratios.append(time_block(tuned_step, steps, clock) / tb)
    return statistics.median(ratios), tb
