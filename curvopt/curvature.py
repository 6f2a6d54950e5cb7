"""Curvature along a direction from gradients: the difference quotient of the ``fd`` oracle and the
power iteration's stopping test (same conventions as :mod:`curvopt.rules`: scalars and an array namespace)."""
from __future__ import annotations

from typing import Any

__all__ = ["finite_difference_curvature", "rayleigh_converged"]


def finite_difference_curvature(probe_grad_dot_u: Any, grad_dot_u: Any, h: Any, xp: Any) -> Any:
    """``u^T H u ~ (g(w + h u) - g(w))^T u / h`` from the two directional derivatives.

    ``probe_grad_dot_u = g(w + h u)^T u`` and ``grad_dot_u = g(w)^T u``; ``h`` from
    :func:`curvopt.rules.finite_difference_step`. Exact on a quadratic up to rounding (about the square root
    of the dtype's epsilon, relative). Returns 0 when ``h = 0`` (``u = 0``): no curvature information.
    """
    ok = h > 0
    return xp.where(ok, (probe_grad_dot_u - grad_dot_u) / xp.where(ok, h, 1.0), 0.0)


def rayleigh_converged(value: Any, previous: Any, tol: Any) -> Any:
    """Stopping test of the power iteration: the eigenvalue estimate changed by at most ``tol`` (relative);
    False when ``previous`` is NaN (no previous estimate)."""
    return abs(value - previous) <= tol * abs(value)
