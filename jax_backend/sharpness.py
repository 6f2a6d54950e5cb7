"""Sharpness: the top Hessian eigenvalue ``lambda_max(H)`` and Adam's preconditioned sharpness
``lambda_max(P^-1 H) = lambda_max(P^-1/2 H P^-1/2)`` (:func:`curvopt.preconditioner.sandwich`).

Hessian-vector products are exact, forward-over-reverse (``jax.linearize`` of ``jax.grad``: the gradient is
traced once per estimate and each product is one linear JVP through it).

* **Online** (the tuners' ``sharpness=``): the core's warm-started power iteration
  (:func:`curvopt.eigen.power_init`/:func:`~curvopt.eigen.power_step`, the same algorithm as PyTorch's) in a
  ``lax.while_loop``, its estimate read from the span of the pass's last products
  (:func:`curvopt.eigen.krylov_estimate`), from the previous eigenvector (the first estimate from a fixed
  pseudo-random vector, :func:`random_unit`, with ``first_iters`` products at most), on steps ``1, 1 + k, ...``
  (:func:`curvopt.config.sharpness_due`).
* **Standalone** :func:`hessian_top_eigenvalue`: SciPy's ARPACK (``eigsh``, ``which="LA"``) on a jitted HVP,
  accurate to its ``tol`` as a relative error of the eigenvalue.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from curvopt.base import BaseMethod
from curvopt.config import SharpnessConfig, power_iters, sharpness_due
from curvopt.eigen import ARPACK_TOL, arpack_top_eigenpair, krylov_estimate, power_init, power_step
from curvopt.preconditioner import adam_preconditioner, inverse_sqrt, sandwich

from .control import cond, while_loop
from .direction import (accumulator_dtype, add_scaled, has_masked, least_precise_eps, like_params, merge_masked, norm,
                        scaled, vdot)
from .loss import bind, fn_kwargs as accepted_kwargs
from .mup import find_whole_lr_mults
from .settings import sharpness_enabled

__all__ = ["EigenMemory", "eigen_init", "moving_parts", "online_sharpness", "hessian_top_eigenvalue", "hvp_operator",
           "find_adam_state", "preconditioner_from_adam_state", "random_unit"]


class EigenMemory(NamedTuple):
    """Warm starts of the online power iterations: the last top eigenvectors (unit norm, shaped like the
    parameters) of ``H`` and, for an Adam base, of ``P^-1/2 H P^-1/2`` (None otherwise). The estimates
    themselves are the stats' ``sharpness``/``preconditioned_sharpness``."""

    eigenvector: Any
    preconditioned_eigenvector: Any


class TreeOps:
    """:class:`curvopt.eigen.VectorOps` over pytrees (vectors keep the parameters' dtypes; scalars in
    ``dtype``)."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = dtype

    def dot(self, a: Any, b: Any) -> Any:
        return vdot(a, b, self.dtype)

    def scale(self, s: Any, a: Any) -> Any:
        return scaled(s, a)

    def axpy(self, a: Any, s: Any, b: Any) -> Any:
        return add_scaled(a, s, b)

    def select(self, pred: Any, a: Any, b: Any) -> Any:
        return optax.tree.where(pred, a, b)


def hvp_operator(f: Callable[[Any], Any], params: Any) -> Callable[[Any], Any]:
    """``v -> H v`` at ``params`` (forward-over-reverse, linearised once)."""
    return jax.linearize(jax.grad(f), params)[1]


def random_unit(params: Any, salt: Any = 0) -> Any:
    """A unit-norm pseudo-random vector shaped like ``params`` (each leaf in its parameter's dtype and, under
    ``jit``, sharded like it), deterministic in ``salt`` (an int, may be traced): a hash of the entry index
    (``frac(sin(.) * 43758.5453) - 1/2``) rather than ``jax.random``, whose threefry kernels would dominate the
    update's compile time. A start vector only needs a generic direction."""
    dtype = accumulator_dtype(params)
    leaves, treedef = jax.tree.flatten(params)
    out, offset = [], 0
    for p in map(jnp.asarray, leaves):  # (a Python float too)
        # derived from p (0 * p, NaN-safe) so that the vector follows p's sharding instead of being replicated
        zero = jnp.where(jnp.isfinite(p), p, 0).astype(dtype) * 0
        i = jax.lax.broadcasted_iota(dtype, p.shape, 0) if p.ndim else jnp.zeros((), dtype)
        for axis in range(1, p.ndim):
            i = i * p.shape[axis] + jax.lax.broadcasted_iota(dtype, p.shape, axis)
        x = jnp.sin((i + offset + zero) * 12.9898 + (jnp.asarray(salt, dtype) + 1.0) * 78.233) * 43758.5453
        out.append((x - jnp.floor(x) - 0.5).astype(p.dtype))
        offset += p.size
    v = jax.tree.unflatten(treedef, out)
    return scaled(1 / norm(v, dtype), v)


def eigen_init(params: Any, config: SharpnessConfig, method: BaseMethod) -> EigenMemory | None:
    """The warm-start memory (the preconditioned vector for an Adam base), or None when estimation is off."""
    if not sharpness_enabled(config):
        return None
    return EigenMemory(random_unit(params), random_unit(params) if method.preconditioned else None)


def find_adam_state(tree: Any, b2: float) -> optax.ScaleByAdamState | None:
    """The first Adam state in an optimizer state, as an ``optax.ScaleByAdamState`` (``count``, ``mu``, ``nu``),
    or None. ``optax.scale_by_amsgrad``'s counts (at its default ``bias_correction_nu=True``): it divides by
    ``sqrt(nu_max) + eps``, ``nu_max`` the running maximum of the bias-corrected second moment, which is Adam's
    ``P`` for ``nu = nu_max (1 - b2^t)``; ``b2`` is the base's (``BaseMethod.b2``). A base that runs Adam on parts
    of the tree (``optax.multi_transform`` with an Adam group and a frozen one, ``optax.masked(scale_by_adam())``)
    holds masked views: their moments are merged into one state (the first group's ``count``), still masked
    where no Adam group covers the leaf (:func:`jax_backend.direction.flat` reads zeros there: ``P^-1 = 0``)."""
    known = (optax.ScaleByAdamState, optax.ScaleByAmsgradState)
    is_adam = lambda x: isinstance(x, known)  # noqa: E731
    found = []
    for node in jax.tree.leaves(tree, is_leaf=is_adam):
        if isinstance(node, optax.ScaleByAdamState):
            found.append(node)
        elif isinstance(node, optax.ScaleByAmsgradState):
            def unbiased(v: Any) -> Any:  # in at least float32: 1 - b2^t is 0 in bfloat16
                wide = v.astype(jnp.promote_types(v.dtype, jnp.float32))
                return wide * (1 - b2 ** node.count.astype(wide.dtype))
            found.append(optax.ScaleByAdamState(node.count, node.mu, jax.tree.map(unbiased, node.nu_max)))
    if len(found) <= 1 or not has_masked(found[0].mu):
        return found[0] if found else None
    return optax.ScaleByAdamState(found[0].count, merge_masked([s.mu for s in found]),
                                  merge_masked([s.nu for s in found]))


def preconditioner_from_adam_state(state: Any, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Any:
    """Adam's diagonal ``P`` (:func:`curvopt.preconditioner.adam_preconditioner`) from the state of
    ``optax.scale_by_adam(b1, b2, eps)`` (or ``optax.scale_by_amsgrad``) after its update (``t = count``), or any
    optimizer state that contains it; the hyperparameters must be the base's own (they are not in its state).
    Computed in at least float32 (``nu``'s dtype if wider)."""
    adam = find_adam_state(state, b2)
    if adam is None:
        raise ValueError("no optax.ScaleByAdamState or ScaleByAmsgradState in the given state")

    def of(nu: Any) -> Any:  # in at least float32: 1 - b2^t is 0 in bfloat16 (0.999 rounds to 1)
        dtype = jnp.promote_types(nu.dtype, jnp.float32)
        return adam_preconditioner(nu.astype(dtype), adam.count.astype(dtype), beta1=b1, beta2=b2, eps=eps, xp=jnp)
    return jax.tree.map(of, adam.nu)


def _precondition(matvec: Callable[[Any], Any], preconditioner: Any, rates: Any = None) -> Callable[[Any], Any]:
    scales = jax.tree.map(lambda p: inverse_sqrt(p, jnp), preconditioner)
    if rates is not None:
        scales = jax.tree.map(lambda r, x: r * x, rates, scales)
    return sandwich(matvec, scales, lambda a, b: optax.tree.cast_like(optax.tree.mul(a, b), b))


def group_rate_scales(base_state: Any, params: Any, dtype: Any) -> tuple[Any, Any]:
    """``(top, scales)``: the largest of the group rates the base applies (:func:`jax_backend.mup.scale_by_mup`'s
    multipliers, PyTorch's group lrs) and each leaf's ``sqrt(rate / top)``, the scale its rate enters the sharpness's
    operator with (:func:`curvopt.preconditioner.relative_rates`'s ratios, here on arrays: the state is traced under
    ``jit``; a frozen leaf's rate 0 drops it out; PyTorch's ``_rate_scales``); ``(1, None)`` without one
    ``scale_by_mup`` over the whole tree in the base (:func:`jax_backend.mup.find_whole_lr_mults`: one inside
    ``optax.masked`` or ``multi_transform``, or several, are not read, and the sharpness is the plain Hessian's)."""
    mults = find_whole_lr_mults(base_state)
    if mults is None:
        return jnp.ones((), dtype), None
    mults = jax.tree.map(lambda m: jnp.asarray(m, dtype), like_params(mults, params))
    top = jnp.max(jnp.stack([jnp.max(m) for m in jax.tree.leaves(mults)]))
    return top, jax.tree.map(lambda m: jnp.sqrt(jnp.where(top > 0, m / top, 0.0)), mults)


def _power(matvec: Callable[[Any], Any], v0: Any, last: Any, config: SharpnessConfig, fresh: Any,
           ops: TreeOps) -> tuple[Any, Any, Any]:
    """One warm-started estimate: ``(eigenvalue, eigenvector, products)``, at most
    :func:`curvopt.config.power_iters` products, the eigenvalue read from the pass's last iterates
    (:func:`curvopt.eigen.krylov_estimate`). A failed estimate (a non-finite product) is NaN, as in PyTorch,
    and keeps ``v0`` (the next step retries: :func:`curvopt.config.sharpness_due`)."""
    iters = power_iters(config, last, jnp)
    step = functools.partial(power_step, matvec=matvec, fresh=fresh, iters=iters, tol=config.tol, ops=ops, xp=jnp)
    st = while_loop(lambda s: ~s.done, step, power_init(v0, last, ops, jnp))
    value = krylov_estimate(st, least_precise_eps(v0), jnp)
    return value, ops.select(jnp.isfinite(value), st.v, v0), st.used.astype(jnp.int32)


def moving_parts(direction: Any, dtype: Any) -> Any:
    """Per leaf of the base's ``direction`` (the incoming updates), 1 where any entry is nonzero, else 0: the
    parameters this step moves. A part the base keeps frozen (``optax.set_to_zero`` inside its
    ``multi_transform``/``masked``) is 0; so, on that step, is a trained leaf whose whole update is exactly 0."""
    return jax.tree.map(lambda x: jnp.any(x != 0).astype(dtype), direction)


def online_sharpness(f: Callable[[Any], Any], params: Any, memory: EigenMemory, last: tuple[Any, Any], *,
                     steps: Any, config: SharpnessConfig, preconditioner: Any, dtype: Any, direction: Any = None,
                     rates: Any = None) -> tuple[Any, Any, EigenMemory, Any]:
    """On the scheduled steps (``steps`` taken before this one, and the step after a failed estimate: NaN,
    :func:`curvopt.config.sharpness_due`) re-estimate the sharpness and, with an Adam ``preconditioner``, the
    preconditioned one; otherwise keep ``last``. Returns ``(sharpness, preconditioned
    sharpness, memory, HVPs used)``. The sharpness is that of the parts the base's ``direction`` moves
    (:func:`moving_parts`, read on the estimate's steps only; None, the whole tree), ``lambda_max(M H M)``, as
    PyTorch's drops a frozen group: with a frozen head inside the base it was the whole tree's (4.09 in a field
    test, the trained body's block 1.04: the edge-of-stability rate behind gradient descent 3.9x too low). Adam's
    preconditioner already leaves a frozen part out (no moments). ``rates``: each leaf's group-rate scale
    (:func:`group_rate_scales`), folded into both operators as PyTorch folds its groups' (``lambda_max(R^1/2 H
    R^1/2)``, ``lambda_max(R^1/2 P^-1/2 H P^-1/2 R^1/2)``); None: every leaf at one rate."""
    ops = TreeOps(dtype)

    def estimate():
        hvp = hvp_operator(f, params)
        fresh = random_unit(params, steps + 1)
        mask = lambda m, v: jax.tree.map(lambda a, b: (a * b).astype(b.dtype), m, v)  # noqa: E731
        scales = None if direction is None else moving_parts(direction, dtype)
        if rates is not None:
            scales = rates if scales is None else mask(rates, scales)
        plain = hvp if scales is None else sandwich(hvp, scales, mask)
        lam, v, used = _power(plain, memory.eigenvector, last[0], config, fresh, ops)
        pre, vp = last[1], memory.preconditioned_eigenvector
        if vp is not None and preconditioner is not None:
            pre, vp, used_p = _power(_precondition(hvp, preconditioner, rates), vp, last[1], config, fresh, ops)
            used = used + used_p
        return lam, pre, EigenMemory(v, vp), used

    def keep():
        return last[0], last[1], memory, jnp.int32(0)

    reference = last[1] if memory.preconditioned_eigenvector is not None and preconditioner is not None else last[0]
    return cond(sharpness_due(steps, config.every, reference), estimate, keep)


def hessian_top_eigenvalue(value_fn: Callable[..., Any], params: Any, *, preconditioner: Any = None,
                           v0: Any = None, tol: float = ARPACK_TOL, max_products: int | None = None,
                           **fn_kwargs: Any) -> tuple[float, Any]:
    """``(lambda_max, unit eigenvector)`` of the Hessian of ``value_fn(params, **fn_kwargs)`` at ``params``
    (on the host, not inside ``jit``): SciPy's ARPACK (``eigsh``, ``which="LA"``, the largest algebraic
    eigenvalue) on a jitted forward-over-reverse HVP, in float64 on the host.

    ``tol`` is ARPACK's relative accuracy of the eigenvalue (the default 1e-6 gives a relative error of at most
    about 1e-6 against a dense eigendecomposition when the HVP is float64). ``preconditioner``: a diagonal
    ``P`` shaped like ``params`` (e.g. :func:`preconditioner_from_adam_state`) for ``lambda_max(P^-1 H)``
    instead (the eigenvector returned is that of ``P^-1/2 H P^-1/2``). ``v0``: a start vector shaped like
    ``params`` (default: :func:`random_unit`). ``max_products``: ARPACK's iteration cap (default
    ``max(100, 10 n)``). Extra keyword arguments that ``value_fn`` does not accept are ignored; ``value_fn``
    may return ``(loss, aux)``. The HVP is compiled once per ``value_fn`` (the same function object, or the same
    object's method; a new lambda per call compiles again), so what ``value_fn`` reads from outside its arguments (its
    closure's arrays, an object's attributes) is fixed at the first call, as under ``jax.jit``: pass data that changes
    as keyword arguments. The arrays among those (leaves of pytrees too) are traced arguments of the HVP (new values
    of the same shapes reuse its compilation); the other leaves
    (``train=True``, ``mode="sum"``, Python numbers) are bound as Python values, so ``value_fn`` can branch on
    them (each new value compiles once more).
    """
    flat, unravel = ravel_pytree(params)
    n = flat.size
    arrays, static = _split_kwargs(accepted_kwargs(value_fn, fn_kwargs))
    start = random_unit(params) if v0 is None else v0
    start = np.asarray(ravel_pytree(start)[0], np.float64)
    hvp = _compiled_hvp(value_fn)

    def mv(x: np.ndarray) -> np.ndarray:
        v = unravel(jnp.asarray(np.ravel(x), flat.dtype))
        return np.asarray(ravel_pytree(hvp(static, params, v, preconditioner, arrays))[0], np.float64)

    lam, v = arpack_top_eigenpair(mv, n, start, tol=tol, maxiter=max_products)
    return lam, unravel(jnp.asarray(v, flat.dtype))


class _Static:
    """A non-array keyword leaf as a static jit argument: equal and hashed by value, or by identity when it
    is not hashable (such an object then compiles once per object)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        try:
            self._key: Any = ("value", hash(value), value)
        except TypeError:
            self._key = ("id", id(value))

    def __hash__(self) -> int:
        return hash(self._key[:2])

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, _Static) or self._key[0] != other._key[0]:
            return False
        if self._key[0] == "id":
            return self.value is other.value
        return type(self.value) is type(other.value) and self.value == other.value


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _split_kwargs(kwargs: dict) -> tuple[list, tuple]:
    """``(array leaves, static part)`` of the keyword arguments: the arrays are traced arguments of
    :func:`_hvp`; the static part (the tree structure and the other leaves, None where an array goes) is
    hashable and rebuilt by :func:`_join_kwargs`."""
    leaves, treedef = jax.tree.flatten(kwargs)
    arrays = [x for x in leaves if _is_array(x)]
    return arrays, (treedef, tuple(None if _is_array(x) else _Static(x) for x in leaves))


def _join_kwargs(static: tuple, arrays: list) -> dict:
    treedef, slots = static
    it = iter(arrays)
    return jax.tree.unflatten(treedef, [next(it) if slot is None else slot.value for slot in slots])


#: the jitted HVP of each ``value_fn`` while it lives (:func:`_compiled_hvp`), by identity: ``id(value_fn)``, or
#: ``(id(self), id(function))`` for a bound method -> (weak reference, HVP)
_HVPS: dict = {}


def _compiled_hvp(value_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``value_fn``'s jitted HVP ``(static, params, v, preconditioner, arrays) -> H v`` (or the preconditioned
    product), compiled once per static keyword values and argument structure; the keyword arguments are bound the
    tuners' way (:func:`jax_backend.loss.bind`). One per ``value_fn`` while it lives, found by identity (a bound
    method by its object and function: ``model.loss`` is a new object at each read) and held weakly: a module-level
    ``jit`` taking it as a static argument kept every ``value_fn`` ever given, and all it closes over, for the life
    of the process (a field test's 20 hyperparameter trials each kept their dataset). A function that cannot be held
    weakly is compiled at each call."""
    method = inspect.ismethod(value_fn)
    key = (id(value_fn.__self__), id(value_fn.__func__)) if method else id(value_fn)
    entry = _HVPS.get(key)
    if entry is not None and entry[0]() is not None:  # (alive, so the same object: a live id is never another's)
        return entry[1]

    def forget(ref: Any) -> None:
        if _HVPS.get(key, (None,))[0] is ref:
            del _HVPS[key]
    try:
        ref = (weakref.WeakMethod if method else weakref.ref)(value_fn, forget)
    except TypeError:  # (not weakly referenceable)
        return _jitted_hvp(lambda: value_fn)
    hvp = _jitted_hvp(ref)
    _HVPS[key] = (ref, hvp)
    return hvp


def _jitted_hvp(get_fn: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    @functools.partial(jax.jit, static_argnums=(0,))
    def hvp(static: tuple, params: Any, v: Any, preconditioner: Any, arrays: list) -> Any:
        f = bind(get_fn(), _join_kwargs(static, arrays))
        product = lambda x: jax.jvp(jax.grad(f), (params,), (x,))[1]  # noqa: E731
        return (product if preconditioner is None else _precondition(product, preconditioner))(v)
    return hvp
