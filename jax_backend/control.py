"""The tuners' control flow: ``lax.cond`` and ``lax.while_loop`` that, on concrete values, run in Python.

Outside ``jax.jit`` (a plain Python loop, an un-jitted ``nnx.Optimizer.update``) JAX runs a ``lax.cond`` or
``lax.while_loop`` by compiling its branches, cached on the branch functions; the tuners' branches are closures
made anew at each update, so every eager step compiled them again (a field test: 3 compilations a step, 1.3 s a
step against Adam's 8 ms, memory growing 6 MiB a step). Where the predicate and the loop's state are concrete,
these run the branch taken, or the loop, in Python instead (each operation dispatched on its own, as eager JAX
runs everything else), their outputs each its own buffer as JAX's are; under tracing they are JAX's own.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["cond", "while_loop"]


def _concrete(*trees: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def _own_buffers(tree: Any) -> Any:
    """``tree`` with an array met a second time copied: the branch's outputs may hold one array twice (a state's
    ``prev_lr`` and ``lr``), which ``lax.cond`` returns as two buffers, and ``jax.jit(step, donate_argnums=...)``
    refuses to donate one buffer twice."""
    seen: set[int] = set()

    def own(x: Any) -> Any:
        if isinstance(x, jax.Array) and id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x
    return jax.tree.map(own, tree)


def cond(pred: Any, true_fun: Callable[..., Any], false_fun: Callable[..., Any], *operands: Any) -> Any:
    """``jax.lax.cond(pred, true_fun, false_fun, *operands)``; the branch taken alone where ``pred`` is concrete."""
    if _concrete(pred):
        return _own_buffers((true_fun if bool(pred) else false_fun)(*operands))
    return jax.lax.cond(pred, true_fun, false_fun, *operands)


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any) -> Any:
    """``jax.lax.while_loop(cond_fun, body_fun, init_val)``; a Python loop while the loop's state is concrete."""
    val = init_val
    while _concrete(val):
        going = cond_fun(val)
        if not _concrete(going):
            break
        if not bool(going):
            return _own_buffers(val)
        val = body_fun(val)
    return jax.lax.while_loop(cond_fun, body_fun, val)
