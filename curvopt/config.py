"""Validated settings of every tuner, shared by both backends.

Each backend builds one of these frozen dataclasses from its constructor's keywords, so a bad value raises
``ValueError`` (naming the parameter and its accepted range) at construction in PyTorch and in Optax alike,
and both backends agree on defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .validation import (
    check_at_least,
    check_choice,
    check_finite,
    check_in_unit_interval,
    check_nonnegative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "CURVATURE_ORACLES",
    "SharpnessConfig",
    "CDATConfig",
    "ArmijoConfig",
    "PolyakConfig",
    "EdgeOfStabilityConfig",
]

#: How ``u^T H u`` is obtained. ``"fd"``: one extra gradient at ``w + h u``; ``"secant"``: reuse the next
#: step's gradient along the previous direction (free, lagged by one step); ``"exact"``: automatic
#: differentiation (forward-over-forward JVP in JAX, ``torch.func`` in PyTorch when a functional loss is given).
CURVATURE_ORACLES = ("fd", "secant", "exact")


@dataclass(frozen=True)
class SharpnessConfig:
    """Online top-eigenvalue estimation.

    ``every``: estimate every ``every`` steps (0 = never). Each estimate spends at most ``iters``
    Hessian-vector products (one per power-iteration or Lanczos step), warm-started from the previous
    eigenvector, and stops once the eigenvalue changes by less than ``tol`` (relative). The first estimate
    spends up to ``first_iters`` products from a random start.
    """

    every: int = 0
    iters: int = 4
    first_iters: int = 50
    tol: float = 1e-3

    def __post_init__(self) -> None:
        check_positive_int("sharpness_every", self.every, minimum=0)
        check_positive_int("sharpness_iters", self.iters)
        check_positive_int("sharpness_first_iters", self.first_iters)
        check_nonnegative("sharpness_tol", self.tol)


@dataclass(frozen=True)
class CDATConfig:
    """CDAT ``lr = sigma * avg(max(-g^T u, 0)) / avg(|u^T H u| + eps)``; greedy is sigma=1, ema=0."""

    sigma: float = 2.0
    ema: float = 0.9
    eps: float = 0.0
    lr_max: float = math.inf
    curvature: str = "fd"

    def __post_init__(self) -> None:
        check_positive("sigma", self.sigma)
        check_in_unit_interval("ema", self.ema)
        check_nonnegative("eps", self.eps)
        check_positive("lr_max", self.lr_max, allow_inf=True)
        check_choice("curvature", self.curvature, CURVATURE_ORACLES)


@dataclass(frozen=True)
class ArmijoConfig:
    """Backtracking line search on ``f(w + lr u) <= (1 + delta) f(w) + c lr g^T u``.

    Each step starts at ``min(increase_factor * previous_lr, lr_max)`` (the first from ``init_lr``) and
    multiplies by ``decrease_factor`` until accepted or ``max_trials`` function evaluations were spent.
    Same meaning as Optax's ``scale_by_backtracking_linesearch`` (``slope_rtol=c``, ``rtol=delta``,
    ``max_backtracking_steps=max_trials - 1``).
    """

    c: float = 1e-4
    delta: float = 0.0
    increase_factor: float = 2.0
    decrease_factor: float = 0.8
    lr_max: float = math.inf
    init_lr: float = 1.0
    max_trials: int = 30

    def __post_init__(self) -> None:
        check_in_unit_interval("c", self.c)
        check_nonnegative("delta", self.delta)
        check_at_least("increase_factor", self.increase_factor, 1.0)
        check_in_unit_interval("decrease_factor", self.decrease_factor, closed_low=False)
        check_positive("lr_max", self.lr_max, allow_inf=True)
        check_positive("init_lr", self.init_lr)
        check_positive_int("max_trials", self.max_trials)


@dataclass(frozen=True)
class PolyakConfig:
    """Polyak step ``min((f - f_star) / (-g^T u), lr_max)``."""

    f_star: float = 0.0
    lr_max: float = 1.0

    def __post_init__(self) -> None:
        check_finite("f_star", self.f_star)
        check_positive("lr_max", self.lr_max, allow_inf=True)


@dataclass(frozen=True)
class EdgeOfStabilityConfig:
    """``lr = sigma * c / sharpness``; sigma * c = 3 worked well for GD in the paper (sigma = 1.5)."""

    sigma: float = 1.5
    lr_max: float = math.inf

    def __post_init__(self) -> None:
        check_positive("sigma", self.sigma)
        check_positive("lr_max", self.lr_max, allow_inf=True)
