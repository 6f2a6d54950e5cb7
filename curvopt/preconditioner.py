"""Adam's diagonal preconditioner, for the preconditioned sharpness ``lambda_max(P^-1 H)``.

Adam's update at learning rate 1 is ``u = -P^-1 m`` with ``m`` the raw first-moment EMA and
``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` (both bias corrections, ``eps`` outside the root;
infinite where ``v = 0``, see :func:`adam_preconditioner`).
``lambda_max(P^-1 H)`` is computed as ``lambda_max(P^-1/2 H P^-1/2)``, a symmetric problem with the same
eigenvalues, so power iteration and Lanczos apply: :func:`inverse_sqrt` gives the scales and
:func:`sandwich` the operator.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

__all__ = ["adam_preconditioner", "inverse_sqrt", "sandwich", "relative_rates"]


def adam_preconditioner(exp_avg_sq: Any, step: Any, *, beta1: float, beta2: float, eps: float, xp: Any) -> Any:
    """The diagonal ``P`` (same shape as ``exp_avg_sq``) at step ``step`` (1 after the first update).

    ``P`` is infinite (``P^-1 = 0``) where ``exp_avg_sq`` is 0: a coordinate whose gradients have all been zero,
    whose first moment is 0 too, so Adam has not moved it and its update there is 0 whatever ``P``. The formula
    would give ``P = (1 - beta1^t) eps`` there, and a curvature along such a coordinate (a parabola's coordinate
    started at its optimum, the layers behind a zero-initialised head) would make ``lambda_max(P^-1 H)`` that
    curvature / eps: a sharpness of 1e8-1e10 for a coordinate that takes no part in Adam's dynamics. It enters
    the preconditioned sharpness with its first nonzero gradient."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return xp.where(exp_avg_sq > 0, bc1 * (xp.sqrt(exp_avg_sq / bc2) + eps), math.inf)


def inverse_sqrt(diag: Any, xp: Any) -> Any:
    """``P^-1/2`` for a positive diagonal ``P``: the similarity transform of the preconditioned Hessian."""
    return 1 / xp.sqrt(diag)


def sandwich(matvec: Callable[[Any], Any], scales: Any, mul: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """``v -> S H S v`` with ``S = P^-1/2`` (``scales``, a vector of the backend) and ``mul`` the backend's
    elementwise product of two vectors: the symmetric operator whose top eigenvalue is ``lambda_max(P^-1 H)``."""
    return lambda v: mul(scales, matvec(mul(scales, v)))


def relative_rates(group_lrs: Sequence[float]) -> tuple[float, Optional[list[float]]]:
    """``(top, ratios)``: the largest of the param groups' learning rates and each group's rate relative to it,
    ``lr_g / top`` (None when every group has the same rate, or none is positive).

    A tuner's ``lr`` multiplies every group's own rate (a relative multiplier, as μP groups use), so the step
    moves group ``g`` by ``lr * lr_g`` times the base's direction. Its edge of stability is then that of
    ``M H`` (``M P^-1 H`` behind Adam) with ``M`` the groups' rates: with ``M = top R``, the step is on the edge
    when ``lr * top * lambda_max(R^1/2 H R^1/2) = c`` (a frozen group, rate 0, drops out; equal rates: the plain
    ``lambda_max(H)``). The ratios enter the sharpness's operator as the scales ``sqrt(lr_g / top)``
    (:func:`sandwich`); ``top`` multiplies the tuner's rate like a scheduler's factor (the edge-of-stability
    rule's ``lr = sigma c / sharpness`` then sits at ``sigma * top`` of the edge)."""
    rates = [float(r) for r in group_lrs]
    top = max(rates, default=0.0)
    if top <= 0 or all(r == top for r in rates):
        return top, None
    return top, [r / top for r in rates]
