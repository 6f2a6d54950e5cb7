"""Sharpness: the top Hessian eigenvalue ``lambda_max(H)`` and Adam's preconditioned sharpness
``lambda_max(P^-1 H) = lambda_max(P^-1/2 H P^-1/2)``, by power iteration on Hessian-vector products.

HVPs are forward-over-reverse (``jax.linearize`` of ``jax.grad``: the gradient's forward and backward pass
are traced once per estimate and each product is one linear JVP through them: exact, where PyTorch uses
finite differences of gradients). The power iteration is PyTorch's (``torch_backend.sharpness``): it stops
once the eigenvalue changes by at most ``tol`` (relative, :func:`curvopt.curvature.rayleigh_converged`) or
after ``iters`` products, the contract of :class:`curvopt.config.SharpnessConfig`, and reports how many
products it used; if the dominant eigenvalue is negative, a second pass on ``A - lambda I`` finds the top
(algebraic) one.

Online estimation warm-starts each power iteration from the previous eigenvector, so that a few products
per estimate suffice once training moves slowly; the first estimate starts from a fixed pseudo-random
vector (:func:`random_unit`) with ``first_iters`` products at most.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from curvopt.curvature import rayleigh_converged
from curvopt.preconditioner import adam_preconditioner, inverse_sqrt

from .direction import accumulator_dtype, norm, scale, vdot
from .loss import fn_kwargs as fn_kwargs_of
from .settings import is_traced
from .state import SharpnessMemory

__all__ = ["hessian_top_eigenvalue", "hvp_operator", "power_iteration", "find_adam_state",
           "preconditioner_from_adam_state", "random_unit", "sharpness_init", "online_sharpness"]


def hvp_operator(f: Callable[[Any], Any], params: Any) -> Callable[[Any], Any]:
    """``v -> H v`` at ``params`` (forward-over-reverse, linearised once)."""
    _, lin = jax.linearize(jax.grad(f), params)
    return lin


def _dtype(params: Any) -> Any:
    return accumulator_dtype(params)


def random_unit(params: Any, salt: Any = 0) -> Any:
    """A unit-norm pseudo-random vector shaped like ``params``, deterministic in ``salt`` (an int, may be
    traced): a hash of the entry index (``frac(sin(.) * 43758.5453) - 1/2``) rather than ``jax.random``,
    whose threefry kernels would dominate the update's compile time. A start vector only needs a generic
    direction (a nonzero component along the top eigenvector)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    dtype = _dtype(params)
    out, offset = [], 0
    for p in leaves:
        i = jnp.arange(p.size, dtype=dtype).reshape(p.shape) + offset
        x = jnp.sin(i * 12.9898 + (jnp.asarray(salt, dtype) + 1.0) * 78.233) * 43758.5453
        out.append((x - jnp.floor(x) - 0.5).astype(p.dtype))
        offset += p.size
    v = jax.tree_util.tree_unflatten(treedef, out)
    return scale(1 / norm(v, dtype), v)


def power_iteration(mvp: Callable[[Any], Any], v0: Any, *, iters: Any, tol: Any, dtype: Any,
                    previous: Any = None, fresh: Any = None) -> tuple[Any, Any, Any]:
    """(top eigenvalue, unit eigenvector, products used) of the symmetric operator ``mvp`` from ``v0``.

    PyTorch's ``top_eigenpair`` (``torch_backend.sharpness``): power iteration, each product
    ``z = A v`` giving ``lambda = v^T z`` and ``v <- z / ||z||``, a pass stopping when
    :func:`curvopt.curvature.rayleigh_converged` holds against the previous estimate (``previous`` for the
    first product: a warm start may stop after one), on a non-finite or zero product, or after ``iters``
    products. If the dominant eigenvalue is negative and ``fresh`` (a start vector) is given, a second pass on
    ``A - lambda I`` from ``fresh`` finds the top (algebraic) one. Both passes run in one ``while_loop`` (one
    compiled HVP instead of two).
    """
    nan = jnp.full((), jnp.nan, dtype)
    unit = lambda t: scale(1 / norm(t, dtype), t)  # noqa: E731
    v0 = unit(v0)
    fresh = None if fresh is None else unit(fresh)
    zero_i = jnp.int32(0)

    def cond(c):
        return ~c["done"]

    def body(c):
        v, shift = c["v"], c["shift"]
        z = jax.tree_util.tree_map(lambda a, b: (a - shift * b).astype(b.dtype), mvp(v), v)
        lam = vdot(v, z, dtype)
        n = norm(z, dtype)
        bad = ~jnp.isfinite(lam) | ~jnp.isfinite(n) | (n == 0)
        v = jax.tree_util.tree_map(lambda a, b: jnp.where(bad, b, a / jnp.where(bad, 1.0, n)).astype(b.dtype), z, v)
        i = c["i"] + 1
        over = bad | rayleigh_converged(lam, c["prev"], tol) | (i >= iters)  # False while prev is NaN
        c = dict(c, v=v, lam=lam, prev=lam, i=i, used=c["used"] + 1, done=over)
        if fresh is None:
            return c
        switch = over & (c["phase"] == 0) & jnp.isfinite(lam) & (lam < 0)
        pick = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(switch, x, y), a, b)  # noqa: E731
        return dict(c, v=pick(fresh, v), prev=jnp.where(switch, nan, lam), i=jnp.where(switch, zero_i, i),
                    phase=jnp.where(switch, 1, c["phase"]), shift=jnp.where(switch, lam, shift),
                    best_lam=jnp.where(switch, lam, c["best_lam"]), best_v=pick(v, c["best_v"]),
                    done=over & ~switch)

    prev = nan if previous is None else jnp.asarray(previous).astype(dtype)
    init = dict(v=v0, lam=nan, prev=prev, i=zero_i, used=zero_i, done=jnp.array(False), phase=zero_i,
                shift=jnp.zeros((), dtype), best_lam=nan, best_v=v0)
    c = jax.lax.while_loop(cond, body, init)
    # second pass: its eigenvalue plus the shift, or the first pass's result if it failed
    ok2 = (c["phase"] == 1) & jnp.isfinite(c["lam"])
    lam = jnp.where(c["phase"] == 1, jnp.where(ok2, c["lam"] + c["shift"], c["best_lam"]), c["lam"])
    v = jax.tree_util.tree_map(lambda a, b: jnp.where((c["phase"] == 1) & ~ok2, b, a), c["v"], c["best_v"])
    return lam, v, c["used"]


def find_adam_state(tree: Any) -> optax.ScaleByAdamState | None:
    """The first ``optax.ScaleByAdamState`` (``count``, ``mu``, ``nu``) in an optimizer state, or None."""
    if tree is None:
        return None
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    for node in jax.tree_util.tree_leaves(tree, is_leaf=is_adam):
        if is_adam(node):
            return node
    return None


def preconditioner_from_adam_state(state: Any, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Any:
    """Adam's diagonal ``P = (1 - b1^t)(sqrt(nu / (1 - b2^t)) + eps)`` (DESIGN §3) from the state of
    ``optax.scale_by_adam(b1, b2, eps)`` after its update (``t = count``), or any optimizer state that
    contains it; the hyperparameters must be the base's own (they are not in its state)."""
    adam_state = find_adam_state(state)
    if adam_state is None:
        raise ValueError("no optax.ScaleByAdamState in the given state")
    t = adam_state.count
    return jax.tree_util.tree_map(
        lambda nu: adam_preconditioner(nu, t.astype(nu.dtype), beta1=b1, beta2=b2, eps=eps, xp=jnp).astype(nu.dtype),
        adam_state.nu)


def _preconditioned(mvp: Callable[[Any], Any], preconditioner: Any) -> Callable[[Any], Any]:
    s = jax.tree_util.tree_map(lambda p: inverse_sqrt(p, jnp), preconditioner)
    mul = lambda a, b: jax.tree_util.tree_map(lambda x, y: (x * y).astype(x.dtype), a, b)  # noqa: E731
    return lambda v: mul(mvp(mul(v, s)), s)


def hessian_top_eigenvalue(value_fn: Callable[..., Any], params: Any, *, preconditioner: Any = None,
                           v0: Any = None, iters: int = 100, tol: float = 1e-6, seed: int = 0,
                           **fn_kwargs: Any) -> tuple[Any, Any]:
    """``(lambda_max, eigenvector)`` of the Hessian of ``value_fn(params, **fn_kwargs)`` at ``params``.

    Mirrors PyTorch's ``hessian_top_eigenvalue``. ``preconditioner``: a diagonal ``P`` shaped like
    ``params`` (e.g. from :func:`preconditioner_from_adam_state`) to get ``lambda_max(P^-1 H)`` instead,
    through the symmetric ``P^-1/2 H P^-1/2`` (the eigenvector returned is that operator's). ``v0``
    warm-starts the power iteration (default: the pseudo-random :func:`random_unit` of ``seed``);
    ``iters``/``tol`` as in :func:`power_iteration`. Keyword arguments ``value_fn`` does not accept are
    ignored. Compiled with ``jax.jit`` (once per ``value_fn`` and argument structure: pass the same function
    object each time); also usable inside a jitted function. On XLA:CPU, Hessian-vector products of
    convolutional models run slower inside the iteration's ``while_loop`` than at top level (jax-ml/jax#12868).
    """
    kwargs = fn_kwargs_of(value_fn, fn_kwargs)
    return _top_eigenpair(value_fn, params, preconditioner, v0, iters, tol, seed, kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _top_eigenpair(value_fn, params, preconditioner, v0, iters, tol, seed, kwargs):
    f = functools.partial(value_fn, **kwargs)
    mvp = hvp_operator(f, params)
    if preconditioner is not None:
        mvp = _preconditioned(mvp, preconditioner)
    v0 = random_unit(params, seed) if v0 is None else v0
    fresh = random_unit(params, seed + 1)
    lam, v, _ = power_iteration(mvp, v0, iters=iters, tol=tol, dtype=_dtype(params), fresh=fresh)
    return lam, v


def sharpness_init(params: Any, every: Any, preconditioned: bool) -> SharpnessMemory | None:
    """The warm-start memory, or None when estimation is off (``every`` concretely 0)."""
    if not is_traced(every) and int(every) == 0:
        return None
    v = random_unit(params)
    return SharpnessMemory(v, v if preconditioned else None)


def _estimate(mvp: Callable[[Any], Any], v0: Any, last: Any, config: Any, fresh: Any, dtype: Any):
    """One warm-started estimate (``first_iters`` products before any estimate, else ``iters``, with the
    last estimate as the previous Rayleigh quotient); a non-finite result keeps the last estimate and vector."""
    first = jnp.isnan(last)
    iters = jnp.where(first, config.first_iters, config.iters)
    lam, v, used = power_iteration(mvp, v0, iters=iters, tol=config.tol, dtype=dtype, previous=last,
                                   fresh=fresh)
    ok = jnp.isfinite(lam)
    v = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), v, v0)
    return jnp.where(ok, lam, last).astype(dtype), v, used


def online_sharpness(f: Callable[[Any], Any], params: Any, memory: SharpnessMemory, *, count: Any,
                     last: tuple[Any, Any], config: Any, preconditioner: Any,
                     dtype: Any) -> tuple[Any, Any, SharpnessMemory, Any]:
    """One scheduled estimate: on steps ``1, 1 + k, 1 + 2k, ...`` (``count`` = steps taken before this one,
    ``k = config.every``) run the warm-started power iteration(s) at the current parameters; otherwise keep
    the last estimates. Returns (sharpness, preconditioned sharpness, memory, HVPs used)."""
    every = config.every
    due = (count % jnp.maximum(every, 1) == 0) & (every > 0)
    last_sharp, last_pre = last

    def estimate():
        mvp = hvp_operator(f, params)
        fresh = random_unit(params, count + 1)
        lam, v, used = _estimate(mvp, memory.eigenvector, last_sharp, config, fresh, dtype)
        pre, vp = last_pre, memory.preconditioned_eigenvector
        if vp is not None and preconditioner is not None:
            pre, vp, used_p = _estimate(_preconditioned(mvp, preconditioner), vp, last_pre, config, fresh, dtype)
            used = used + used_p
        return lam, pre, SharpnessMemory(v, vp), used

    def keep():
        return last_sharp, last_pre, memory, jnp.int32(0)

    return jax.lax.cond(due, estimate, keep)
