"""The base direction: the incoming updates ``d`` (gradient-like, as ``scale_by_adam``/``trace`` produce
them), the descent direction ``u = -d``, and the tree algebra the tuners need on it.

A chain that already negated ``d`` (e.g. ``optax.sgd(1.0)`` before the tuner) hands an ascent direction:
``-g^T u = g^T d < 0``. The paper's guard clips that numerator to 0 (``lr = 0``); the tuners count such
steps in the state's ``ascent_steps`` (a state flag: ``ascent_steps == count`` means every step so far was
uphill), :func:`jax_backend.state.stats` warns on the host when it reads that, and with ``warn_ascent=True``
the step itself warns through ``jax.debug.callback`` (jit-safe, but a host callback in the compiled step
costs milliseconds per step on CPU, so it is opt-in) when it happens on the first step.
"""
from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["descent", "vdot", "sq_norm", "norm", "add_scaled", "scale", "all_finite", "cast_like",
           "warn_if_negated", "NEGATED_DIRECTION_MESSAGE"]

NEGATED_DIRECTION_MESSAGE = (
    "curvopt: the direction handed to the tuner is an ascent direction on its first step (g^T d < 0): the "
    "chain before it probably already negated the updates (e.g. optax.sgd(1.0)). The tuner replaces "
    "optax.scale_by_learning_rate: chain it after a scale_by_* base (optax.scale_by_adam(), optax.trace(...), "
    "optax.identity() for gradient descent). With the paper's guard the learning rate is 0; the state's "
    "ascent_steps counts such steps.")


def accumulator_dtype(tree: Any) -> Any:
    """The dtype of a tuner's own scalars (learning rate, moving averages, dot products, statistics): the
    widest floating dtype of the parameters, at least float32 (bf16/fp16 parameters accumulate in float32)."""
    out = jnp.float32
    for x in jax.tree_util.tree_leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.floating):
            out = jnp.promote_types(out, x.dtype)
    return out


def least_precise_eps(tree: Any) -> float:
    """Machine epsilon of the coarsest floating dtype in ``tree``: a finite-difference displacement must be
    representable in every parameter."""
    return max(float(jnp.finfo(x.dtype).eps) for x in jax.tree_util.tree_leaves(tree))


def _real_sum(tree: Any, dtype: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum((jnp.sum(x).astype(dtype) for x in leaves), jnp.zeros((), dtype))


def vdot(a: Any, b: Any, dtype: Any) -> Any:
    """``a^T b`` over two trees of the same structure, accumulated in ``dtype``."""
    return _real_sum(jax.tree_util.tree_map(lambda x, y: x.astype(dtype) * y.astype(dtype), a, b), dtype)


def sq_norm(a: Any, dtype: Any) -> Any:
    return vdot(a, a, dtype)


def norm(a: Any, dtype: Any) -> Any:
    return jnp.sqrt(sq_norm(a, dtype))


def cast_like(tree: Any, like: Any) -> Any:
    """``tree`` with each leaf cast to the dtype of the matching leaf of ``like``."""
    return jax.tree_util.tree_map(lambda x, y: jnp.asarray(x).astype(y.dtype), tree, like)


def descent(updates: Any, params: Any) -> Any:
    """``u = -d``, in the parameters' dtypes (JVP tangents must match their primals)."""
    return jax.tree_util.tree_map(lambda d, p: (-d).astype(p.dtype), updates, params)


def scale(s: Any, tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: (s * x).astype(x.dtype), tree)


def add_scaled(a: Any, s: Any, b: Any) -> Any:
    """``a + s b`` leafwise, in ``a``'s dtypes."""
    return jax.tree_util.tree_map(lambda x, y: (x + s * y).astype(x.dtype), a, b)


def all_finite(tree: Any) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def _warn(flag: Any) -> None:
    if bool(flag):
        warnings.warn(NEGATED_DIRECTION_MESSAGE, RuntimeWarning, stacklevel=2)


def warn_if_negated(numerator: Any, count: Any, enabled: bool) -> Any:
    """Whether the direction points uphill; with ``enabled``, warn (host callback) if it does on the first
    step."""
    if enabled:
        flag = (numerator < 0) & (count == 0)
        jax.lax.cond(flag, lambda: jax.debug.callback(_warn, flag), lambda: None)
    return numerator < 0
