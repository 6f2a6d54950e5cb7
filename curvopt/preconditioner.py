"""Adam's diagonal preconditioner, for the preconditioned sharpness ``lambda_max(P^-1 H)``.

Adam's update at learning rate 1 is ``u = -P^-1 m`` with ``m`` the raw first-moment EMA and
``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` (both bias corrections, ``eps`` outside the root).
``lambda_max(P^-1 H)`` is computed as ``lambda_max(P^-1/2 H P^-1/2)``, a symmetric problem with the same
eigenvalues, so power iteration and Lanczos apply: :func:`inverse_sqrt` gives the scales and
:func:`sandwich` the operator.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["adam_preconditioner", "inverse_sqrt", "sandwich"]


def adam_preconditioner(exp_avg_sq: Any, step: Any, *, beta1: float, beta2: float, eps: float, xp: Any) -> Any:
    """The diagonal ``P`` (same shape as ``exp_avg_sq``) at step ``step`` (1 after the first update)."""
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return bc1 * (xp.sqrt(exp_avg_sq / bc2) + eps)


def inverse_sqrt(diag: Any, xp: Any) -> Any:
    """``P^-1/2`` for a positive diagonal ``P``: the similarity transform of the preconditioned Hessian."""
    return 1 / xp.sqrt(diag)


def sandwich(matvec: Callable[[Any], Any], scales: Any, mul: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """``v -> S H S v`` with ``S = P^-1/2`` (``scales``, a vector of the backend) and ``mul`` the backend's
    elementwise product of two vectors: the symmetric operator whose top eigenvalue is ``lambda_max(P^-1 H)``."""
    return lambda v: mul(scales, matvec(mul(scales, v)))
