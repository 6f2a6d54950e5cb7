"""The tuners' control flow: ``lax.cond`` and ``lax.while_loop`` that, on concrete values, run in Python.

Outside ``jax.jit`` (a plain Python loop, an un-jitted ``nnx.Optimizer.update``) JAX runs a ``lax.cond`` or
``lax.while_loop`` by compiling its branches, cached on the branch functions; the tuners' branches are closures
made anew at each update, so every eager step compiled them again (a field test: 3 compilations a step, 1.3 s a
step against Adam's 8 ms, memory growing 6 MiB a step). Where the predicate and the loop's state are concrete,
these run the branch taken, or the loop, in Python instead (each operation dispatched on its own, as eager JAX
runs everything else), their outputs fresh arrays as JAX's are; under tracing they are JAX's own.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["concrete", "cond", "while_loop"]


def concrete(*trees: Any) -> bool:
    """Whether no leaf of ``trees`` is a JAX tracer (their values are known here, outside any transformation)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _own_buffers(tree: Any) -> Any:
    """``tree`` with every array copied, as ``lax.cond`` and ``lax.while_loop`` return them: a branch that passes
    an operand or a captured array through (a skipped step's old state, the caller's gradient kept as the
    secant's memory) or holds one array twice (a state's ``prev_lr`` and ``lr``) would otherwise hand out arrays
    the inputs share, which ``jax.jit(step, donate_argnums=...)`` deletes from under the caller or refuses to
    donate twice; a NumPy leaf (a state restored as NumPy) becomes a JAX array, as there."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, (jax.Array, np.ndarray)) else x, tree)


def cond(pred: Any, true_fun: Callable[..., Any], false_fun: Callable[..., Any], *operands: Any) -> Any:
    """``jax.lax.cond(pred, true_fun, false_fun, *operands)``; the branch taken alone where ``pred`` is a concrete
    scalar (anything else is ``lax.cond``'s, and its error)."""
    if concrete(pred) and jnp.ndim(pred) == 0:
        return _own_buffers((true_fun if bool(pred) else false_fun)(*operands))
    return jax.lax.cond(pred, true_fun, false_fun, *operands)


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any) -> Any:
    """``jax.lax.while_loop(cond_fun, body_fun, init_val)``; a Python loop while the loop's state is concrete."""
    val = init_val
    while concrete(val):
        going = cond_fun(val)
        if not concrete(going):
            break
        if not bool(going):
            return _own_buffers(val)
        val = body_fun(val)
    return jax.lax.while_loop(cond_fun, body_fun, val)
