"""The online sharpness's eigen-solver, written once: warm-started power iteration as a step function.

Both backends run the same algorithm: PyTorch loops ``while not bool(state.done)`` (one host read per
Hessian-vector product, which costs a closure call anyway), JAX runs ``lax.while_loop(lambda s: ~s.done,
...)``. The vectors are the backend's (a list of tensors, a pytree); the backend supplies their algebra as a
:class:`VectorOps` and the operator ``matvec`` (a Hessian-vector product, possibly preconditioned:
:func:`curvopt.preconditioner.sandwich`).

Each product ``z = (M - shift I) v`` gives the Rayleigh quotient ``lambda = v^T z`` and the next vector
``z / ||z||``. A pass stops when ``lambda`` changes by at most ``tol`` (relative,
:func:`curvopt.curvature.rayleigh_converged`) from the previous product (for the first product of a warm
start: from the previous estimate, so a converged warm start costs one product), on a zero product (``M v = 0``:
the estimate is ``shift``), or after its budget of products. The pass's estimate is then read from the span of its
last :data:`KRYLOV_WINDOW` iterates (:func:`krylov_estimate`, a Lanczos estimate at no further product), at least
the last Rayleigh quotient. A non-finite product (a NaN in one closure call)
voids the whole estimate: it is NaN, not the Rayleigh quotient of the products before it (a pass cut short after
two products can be 40x low, and an edge-of-stability rate 40x high), and the tuners retry at the next step
(:func:`curvopt.config.sharpness_due`). If the dominant eigenvalue turns out negative, a second pass on
``M - lambda I`` from a fresh vector finds the top (algebraic) one, its stopping test on the unshifted
quotient. The standalone
``hessian_top_eigenvalue`` of both backends uses SciPy's ARPACK instead (accurate to its ``tol``):
:func:`arpack_top_eigenpair`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Protocol

from .curvature import rayleigh_converged

__all__ = ["VectorOps", "PowerState", "power_init", "power_step", "KRYLOV_WINDOW", "KRYLOV_KEEP", "krylov_estimate",
           "ARPACK_TOL", "arpack_top_eigenpair"]

#: the iterates of a pass whose span :func:`krylov_estimate` reads the estimate from
KRYLOV_WINDOW = 4
#: :func:`krylov_estimate` keeps the directions of that span whose Gram eigenvalue is above this many square roots
#: of the products' machine epsilon, relative to the largest (finite-difference products are accurate to about
#: one square root)
KRYLOV_KEEP = 10.0


class VectorOps(Protocol):
    """The backend's vector algebra (a vector: a list of tensors or a pytree)."""

    def dot(self, a: Any, b: Any) -> Any: ...          # 0-d, accumulator dtype

    def scale(self, s: Any, a: Any) -> Any: ...        # s * a

    def axpy(self, a: Any, s: Any, b: Any) -> Any: ...  # a + s * b

    def select(self, pred: Any, a: Any, b: Any) -> Any: ...  # a where pred else b (pred 0-d)


class PowerState(NamedTuple):
    """One power iteration in progress. ``value``: the latest Rayleigh quotient of ``M`` (the shift added back;
    NaN before the first product, and after a non-finite one), which :func:`krylov_estimate` improves on once
    the pass is done; ``previous``: the last Rayleigh quotient of this
    pass (NaN: none); ``shift``: 0, or the negative dominant eigenvalue during the second pass; ``used``:
    products in all; ``pass_used``: products in this pass; ``recent_rayleigh``, ``recent_norm``: the Rayleigh
    quotients ``v^T z`` and norms ``||z||`` of the last :data:`KRYLOV_WINDOW` products, oldest first (the last
    ``min(pass_used, KRYLOV_WINDOW)`` entries are this pass's)."""

    v: Any
    value: Any
    previous: Any
    shift: Any
    second: Any
    used: Any
    pass_used: Any
    done: Any
    recent_rayleigh: Any
    recent_norm: Any


def power_init(v0: Any, previous: Any, ops: VectorOps, xp: Any) -> PowerState:
    """Start from ``v0`` (normalised here); ``previous`` is the last estimate of a warm start (NaN: cold)."""
    previous = xp.asarray(previous)
    zero = xp.asarray(0)
    window = xp.stack([xp.zeros_like(previous)] * KRYLOV_WINDOW)
    return PowerState(ops.scale(1 / xp.sqrt(ops.dot(v0, v0)), v0), previous * float("nan"), previous,
                      xp.zeros_like(previous), xp.asarray(False), zero, zero, xp.asarray(False), window, window)


def power_step(state: PowerState, matvec: Callable[[Any], Any], *, fresh: Any, iters: Any, tol: Any,
               ops: VectorOps, xp: Any) -> PowerState:
    """One product; ``fresh`` is the unit start vector of a second (shifted) pass, ``iters`` each pass's
    budget."""
    v, shift = state.v, state.shift
    z = ops.axpy(matvec(v), -shift, v)
    lam = ops.dot(v, z)
    n = xp.sqrt(ops.dot(z, z))
    broken = ~xp.isfinite(lam) | ~xp.isfinite(n)
    bad = broken | (n == 0)
    v_next = ops.select(bad, v, ops.scale(1 / xp.where(bad, 1.0, n), z))
    pass_used = state.pass_used + 1
    # converged on the estimate itself: in the shifted pass a change that is small next to the shifted
    # quotient (|shift| + top) can be large next to the top eigenvalue (-1.9 read where the top was +124)
    over = bad | rayleigh_converged(lam + shift, state.previous + shift, tol) | (pass_used >= iters)
    value = xp.where(broken, float("nan"), lam + shift)
    switch = over & ~state.second & ~bad & (lam < 0)
    return PowerState(
        v=ops.select(switch, fresh, v_next),
        value=value,
        previous=xp.where(switch, state.previous * float("nan"), lam),
        shift=xp.where(switch, lam, shift),
        second=state.second | switch,
        used=state.used + 1,
        pass_used=xp.where(switch, pass_used * 0, pass_used),
        done=over & ~switch,
        recent_rayleigh=_pushed(state.recent_rayleigh, lam, xp),
        recent_norm=_pushed(state.recent_norm, n, xp),
    )


def _pushed(window: Any, x: Any, xp: Any) -> Any:
    """``window`` with its oldest entry dropped and ``x`` appended."""
    return xp.concatenate([window[1:], xp.reshape(x, (1,))])


def krylov_estimate(state: PowerState, eps: float, xp: Any) -> Any:
    """The estimate of a finished pass: the largest eigenvalue of the operator restricted to the span of the pass's
    last ``k = min(pass_used, KRYLOV_WINDOW)`` iterates ``v_j`` (Rayleigh-Ritz on that Krylov space, what ``k``
    steps of Lanczos from the oldest of them give), at least the last Rayleigh quotient (``state.value``); NaN
    where the pass failed.

    No product beyond the pass's: ``v_{j+1} = z_j / n_j`` with ``z_j = M v_j``, so for a symmetric ``M`` every
    inner product of the span follows from the products' Rayleigh quotients ``r_j = v_j^T z_j`` and norms
    ``n_j``: with ``mu_s = v_0^T M^s v_0``, ``mu_{2q} = prod_{i<q} n_i^2`` and ``mu_{2q+1} = mu_{2q} r_q``, the
    Gram matrix is ``v_i^T v_j = mu_{i+j} / sqrt(mu_{2i} mu_{2j})`` and ``v_i^T M v_j`` the same with
    ``mu_{i+j+1}``. Why: power iteration's Rayleigh quotient converges like ``(lambda_2 / lambda_1)^{2t}``, Lanczos
    on the same products like a Chebyshev polynomial in the gap; early in training, where the sharpness rises
    fast and a warm start lags it, the lowest estimates of ``python -m benchmarks.sharpness_accuracy`` rose from
    0.70-0.80 of the exact top eigenvalue to 0.72-0.83 (docs/pytorch.md). The iterates grow nearly
    parallel as the pass converges, and the products carry rounding (``sqrt(eps)`` relative by finite
    differences): directions of the span whose Gram eigenvalue is below ``KRYLOV_KEEP sqrt(eps)`` of the largest
    are dropped (``eps`` the products' machine epsilon)."""
    k = KRYLOV_WINDOW
    r, n = state.recent_rayleigh, state.recent_norm
    valid = [state.pass_used >= k - j for j in range(k)]
    usable = xp.isfinite(state.value)
    for j in range(k):
        usable = usable & (~valid[j] | (xp.isfinite(r[j]) & xp.isfinite(n[j]) & (n[j] > 0)))
    unit = xp.where(usable, n[k - 1], 1.0)  # the operator in units of its last product's norm: entries of order 1
    rel = [xp.where(valid[j] & usable, r[j] / unit, 0.0) for j in range(k)]
    log_mu = [xp.zeros_like(unit)]  # log mu_{2q} in those units, counted from the window's first entry
    for j in range(k - 1):
        log_mu.append(log_mu[-1] + 2 * xp.log(xp.where(valid[j] & usable, n[j] / unit, 1.0)))

    def moment(s: int, i: int, j: int) -> Any:  # mu_s / sqrt(mu_{2i} mu_{2j})
        out = xp.exp(log_mu[s // 2] - (log_mu[i] + log_mu[j]) / 2)
        return out * rel[s // 2] if s % 2 else out

    last = rel[k - 1]
    gram = xp.stack([xp.stack([xp.where(valid[i] & valid[j], moment(i + j, i, j), float(i == j))
                               for j in range(k)]) for i in range(k)])
    proj = xp.stack([xp.stack([xp.where(valid[i] & valid[j], moment(i + j + 1, i, j), last * float(i == j))
                               for j in range(k)]) for i in range(k)])
    e, q = xp.linalg.eigh(gram)
    keep = e > KRYLOV_KEEP * eps ** 0.5 * e[k - 1]
    basis = q * xp.where(keep, 1 / xp.sqrt(xp.where(keep, e, 1.0)), 0.0)[None, :]  # (no implicit rank promotion)
    reduced = basis.T @ proj @ basis
    reduced = (reduced + reduced.T) / 2 + xp.diag(xp.where(keep, 0.0, last))
    ritz = xp.linalg.eigvalsh(reduced)[k - 1] * unit + state.shift
    return xp.where(usable & xp.isfinite(ritz) & (ritz > state.value), ritz, state.value)


#: the standalone eigen-solver's default relative accuracy of the eigenvalue (:func:`arpack_top_eigenpair`)
ARPACK_TOL = 1e-6


def arpack_top_eigenpair(matvec: Callable[[Any], Any], n: int, v0: Any = None, *, tol: float = ARPACK_TOL,
                         maxiter: int | None = None) -> tuple[float, Any]:
    """``(lambda, unit eigenvector)``: the largest algebraic eigenvalue of the symmetric operator ``matvec`` on
    float64 NumPy vectors of size ``n``, by SciPy's ARPACK (``eigsh``, ``which="LA"``) from ``v0`` (None: ARPACK's
    random start), ``tol`` its relative accuracy of the eigenvalue, ``maxiter`` its cap on restarts (None:
    ``max(100, 10 n)``). Below 3 unknowns, the dense matrix from ``n`` products and its exact decomposition instead
    (ARPACK's Lanczos basis there would cost as many products). A product that is not finite (a probe that
    failed) voids the estimate, as in the tuners' power iteration: ``(nan, v0 / ||v0||)`` (NaN entries without
    ``v0``); ARPACK given one returned a wrong eigenvalue (2.1 for 3.0) or failed. Both backends' standalone
    ``hessian_top_eigenvalue`` call it, on the host."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    def checked(x: Any) -> Any:
        y = matvec(x)
        if not np.all(np.isfinite(y)):
            raise _VoidProduct
        return y

    try:
        if n < 3:
            H = np.stack([checked(np.eye(n)[i]) for i in range(n)], axis=1)
            vals, vecs = np.linalg.eigh(0.5 * (H + H.T))
            return float(vals[-1]), vecs[:, -1]
        op = LinearOperator((n, n), matvec=checked, dtype=np.float64)
        vals, vecs = eigsh(op, k=1, which="LA", v0=v0, tol=tol, maxiter=maxiter or max(100, 10 * n))
    except _VoidProduct:
        return math.nan, (np.full(n, math.nan) if v0 is None else v0 / np.linalg.norm(v0))
    return float(vals[0]), vecs[:, 0] / np.linalg.norm(vecs[:, 0])


class _VoidProduct(Exception):
    """A product of :func:`arpack_top_eigenpair`'s operator was not finite."""
