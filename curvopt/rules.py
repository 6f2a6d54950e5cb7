"""Learning-rate rules: the math of every tuner, written once.

Each function takes scalars (Python floats, 0-d ``torch.Tensor`` or 0-d ``jax.Array``) and the array
namespace ``xp`` of those scalars (``torch`` or ``jax.numpy``). Only ``xp.where``, ``xp.isfinite`` and
``xp.sqrt`` plus arithmetic operators are used, so the same code runs eagerly in PyTorch (no host sync: the
results stay tensors) and traced under ``jax.jit`` (no Python branching on values).

Notation (DESIGN §3): ``g`` the gradient, ``u`` the base optimizer's update at learning rate 1 (sign
included, so ``u = -g`` for gradient descent), ``H`` the Hessian; the step is ``w <- w + lr * u``.

* ``numerator``  is ``-g^T u`` (positive for a descent direction);
* ``curvature``  is ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0.
"""
from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "CDATState",
    "cdat_init",
    "cdat_step",
    "quadratic_greedy_lr",
    "polyak_lr",
    "edge_of_stability_lr",
    "armijo_decrease_error",
    "armijo_initial_lr",
    "finite_difference_step",
    "secant_curvature",
    "eos_ratio",
    "cap",
]


def _pos(x: Any, xp: Any) -> Any:
    """max(x, 0) that keeps the dtype of ``x``."""
    return xp.where(x > 0, x, 0.0)


def cap(lr: Any, lr_max: float, xp: Any) -> Any:
    """min(lr, lr_max); ``lr_max = inf`` leaves ``lr`` unchanged."""
    return xp.where(lr < lr_max, lr, lr_max)


class CDATState(NamedTuple):
    """Exponential moving averages of CDAT's numerator and denominator, and the last learning rate.

    The averages start at zero and are *not* bias-corrected: the correction factor ``1 - ema**t`` is the
    same for both and cancels in their ratio, so the first step is already exact (``lr_1 = sigma n_1/d_1``).
    """

    numerator_avg: Any
    denominator_avg: Any
    lr: Any


def cdat_init(zero: Any) -> CDATState:
    """Initial state; ``zero`` is a 0-d array of the accumulator dtype."""
    return CDATState(numerator_avg=zero, denominator_avg=zero, lr=zero)


def cdat_step(
    numerator: Any,
    curvature: Any,
    state: CDATState,
    *,
    sigma: float,
    ema: float,
    eps: float,
    lr_max: float,
    xp: Any,
) -> CDATState:
    """One CDAT update (Roulet et al. 2024): ``lr = sigma * avg(n) / avg(d)``.

    ``n = max(-g^T u, 0)`` (an ascent direction contributes 0), ``d = |u^T H u| + eps`` (negative curvature
    counts by its magnitude). ``sigma = 1, ema = 0`` is the quadratically greedy step, ``sigma = 2`` the step
    "on edge" (the largest lr with q(lr) <= f). When the averaged denominator is 0 (only possible with
    ``eps = 0`` and zero curvature so far) the previous learning rate is kept (0 at the first step): no
    division by zero. The result is capped at ``lr_max``.
    """
    n = _pos(numerator, xp)
    d = abs(curvature) + eps
    num_avg = ema * state.numerator_avg + (1 - ema) * n
    den_avg = ema * state.denominator_avg + (1 - ema) * d
    ok = den_avg > 0
    ratio = num_avg / xp.where(ok, den_avg, 1.0)
    lr = xp.where(ok, sigma * ratio, state.lr)
    return CDATState(num_avg, den_avg, cap(lr, lr_max, xp))


def quadratic_greedy_lr(numerator: Any, curvature: Any, *, lr_max: float, xp: Any) -> Any:
    """``-g^T u / u^T H u``, the minimiser of the quadratic model along ``u`` (CDAT with sigma=1, ema=0).

    Guards as in :func:`cdat_step`: an ascent direction gives 0, negative curvature counts by its magnitude,
    zero curvature gives 0 (no step) rather than a division by zero.
    """
    state = cdat_step(
        numerator, curvature, cdat_init(0.0), sigma=1.0, ema=0.0, eps=0.0, lr_max=lr_max, xp=xp
    )
    return state.lr


def polyak_lr(value: Any, numerator: Any, *, f_star: float, lr_max: float, xp: Any) -> Any:
    """Polyak step ``min((f - f*) / (-g^T u), lr_max)``; 0 when ``f <= f*`` or ``-g^T u <= 0``.

    With ``u = -g`` the denominator is ``||g||^2``, the classical form; for a preconditioned base it is
    ``g^T P^{-1} g``.
    """
    gap = _pos(value - f_star, xp)
    ok = numerator > 0
    lr = xp.where(ok, gap / xp.where(ok, numerator, 1.0), 0.0)
    return cap(lr, lr_max, xp)


def edge_of_stability_lr(sharpness: Any, previous_lr: Any, *, sigma: float, coefficient: float,
                         lr_max: float, xp: Any) -> Any:
    """``sigma * c / sharpness`` with ``c`` the base method's stability coefficient (see ``thresholds``).

    ``sigma = 1`` sits exactly on the edge of stability (lr * sharpness = c). A non-positive or non-finite
    sharpness estimate keeps ``previous_lr``. Capped at ``lr_max``.
    """
    ok = (sharpness > 0) & xp.isfinite(sharpness)
    lr = xp.where(ok, sigma * coefficient / xp.where(ok, sharpness, 1.0), previous_lr)
    return cap(lr, lr_max, xp)


def armijo_decrease_error(new_value: Any, value: Any, lr: Any, slope: Any, *, c: float, delta: float,
                          xp: Any) -> Any:
    """How far ``f(w + lr u)`` is above the (1+delta)-relaxed Armijo bound; 0 means accepted.

    Bound: ``f(w + lr u) <= (1 + delta) f(w) + c lr g^T u`` with ``slope = g^T u``. The same criterion and
    NaN handling (a NaN trial counts as infinitely bad) as ``optax.scale_by_backtracking_linesearch``, whose
    ``rtol`` is ``delta`` and ``slope_rtol`` is ``c``.
    """
    err = new_value - (1 + delta) * value - lr * c * slope
    err = xp.where(err != err, float("inf"), err)
    return _pos(err, xp)


def armijo_initial_lr(previous_lr: Any, *, increase_factor: float, lr_max: float, xp: Any) -> Any:
    """The first trial of a backtracking search: ``min(increase_factor * previous_lr, lr_max)``."""
    return cap(increase_factor * previous_lr, lr_max, xp)


def finite_difference_step(param_norm: Any, direction_norm: Any, *, dtype_eps: float, xp: Any) -> Any:
    """Step ``h`` for the forward difference ``u^T H u ~ (g(w + h u) - g(w))^T u / h``.

    ``h ||u|| = sqrt(eps) (1 + ||w||)``: the displacement is ``sqrt(eps)`` relative to the parameters, which
    balances the rounding error of forming ``w + h u`` against the truncation error of the difference, so the
    curvature is accurate to about ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
    Returns 0 when ``u = 0``.
    """
    ok = direction_norm > 0
    return xp.where(ok, dtype_eps ** 0.5 * (1 + param_norm) / xp.where(ok, direction_norm, 1.0),
                    0.0)


def secant_curvature(new_grad_dot_prev_u: Any, prev_grad_dot_prev_u: Any, prev_lr: Any, prev_u_sq: Any,
                     u_sq: Any, xp: Any) -> Any:
    """Curvature along the current direction from the previous step's secant (no extra gradient).

    The previous step moved ``w`` by ``prev_lr * u_prev``; the change of the gradient along ``u_prev`` gives
    ``u_prev^T H u_prev ~ (g_new - g_prev)^T u_prev / prev_lr`` (exact on a quadratic). The approximation is
    that the Rayleigh quotient along the new direction equals the one along the previous direction, so the
    result is rescaled by ``||u||^2 / ||u_prev||^2``. Lagged by one step; returns 0 when no step was taken
    (``prev_lr = 0`` or ``u_prev = 0``), which callers treat as "no estimate".
    """
    ok = (prev_lr > 0) & (prev_u_sq > 0)
    rayleigh = (new_grad_dot_prev_u - prev_grad_dot_prev_u) / (xp.where(ok, prev_lr, 1.0) * xp.where(ok, prev_u_sq, 1.0))
    return xp.where(ok, rayleigh * u_sq, 0.0)


def eos_ratio(lr: Any, sharpness: Any, coefficient: float) -> Any:
    """``lr * sharpness / c``: 1 means exactly on the edge of stability, above 1 unstable on a quadratic."""
    return lr * sharpness / coefficient
