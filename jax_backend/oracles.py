"""Curvature oracles: ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0.

* ``"exact"`` (default in JAX): forward-over-forward JVP of ``value_fn`` along ``u`` (the paper's choice),
  about three forward passes, exact to rounding. Counts as one loss evaluation.
* ``"fd"``: one extra gradient at ``w + h u`` with ``h`` from :func:`curvopt.rules.finite_difference_step`
  (accurate to about the square root of the dtype's epsilon): ``(g(w + h u) - g(w))^T u / h``.
* ``"secant"``: free: the gradient at the current ``w`` against the previous step's, along the previous
  direction (:func:`curvopt.rules.secant_curvature`), lagged by one step and rescaled to the current
  direction. It assumes the previous step moved the parameters by exactly ``lr u`` (nothing after the tuner
  in the chain changed the updates). When there is no previous step to use (first step, or a previous
  ``lr = 0``) it falls back to an ``"fd"`` probe.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from curvopt import rules
from curvopt.curvature import finite_difference_curvature

from .direction import least_precise_eps, add_scaled, norm, sq_norm, vdot
from .state import SecantMemory

__all__ = ["exact_curvature", "fd_curvature", "secant_curvature", "secant_init", "curvature"]


def exact_curvature(f: Callable[[Any], Any], params: Any, u: Any, dtype: Any) -> Any:
    """``u^T H u`` by a JVP of the directional derivative ``w -> grad f(w)^T u`` (itself a JVP)."""
    def directional(w: Any) -> Any:
        return jax.jvp(f, (w,), (u,))[1]

    return jnp.asarray(jax.jvp(directional, (params,), (u,))[1]).astype(dtype)


def fd_curvature(f: Callable[[Any], Any], params: Any, grad: Any, u: Any, dtype: Any) -> Any:
    """Forward difference of the gradient along ``u``; 0 when ``u = 0``."""
    h = rules.finite_difference_step(norm(params, dtype), norm(u, dtype),
                                     dtype_eps=least_precise_eps(params), xp=jnp)
    # The barrier materialises w + h u: fused into a convolution's weight operand it would push XLA:CPU off
    # its fast convolution path (a 30x slower step on a small CNN).
    probe = jax.grad(f)(jax.lax.optimization_barrier(add_scaled(params, h, u)))
    return finite_difference_curvature(vdot(probe, u, dtype), vdot(grad, u, dtype), h, jnp).astype(dtype)


def secant_init(params: Any, dtype: Any) -> SecantMemory:
    zero = jnp.zeros((), dtype)
    return SecantMemory(jax.tree_util.tree_map(jnp.zeros_like, params), zero, zero)


def secant_curvature(f: Callable[[Any], Any], params: Any, grad: Any, u: Any, memory: SecantMemory,
                     prev_lr: Any, dtype: Any, grad_dot_u: Any) -> tuple[Any, Any, SecantMemory]:
    """(curvature, extra evaluations, new memory): the secant estimate, or an fd probe when unavailable.
    ``grad_dot_u`` is this step's ``g^T u`` (the tuner already has it)."""
    u_sq = sq_norm(u, dtype)
    available = prev_lr > 0  # as PyTorch: a previous step with lr > 0
    estimate = rules.secant_curvature(vdot(grad, memory.direction, dtype), memory.grad_dot_direction,
                                      prev_lr, memory.direction_sq, u_sq, jnp)
    curv, calls = jax.lax.cond(
        available,
        lambda: (estimate.astype(dtype), jnp.int32(0)),
        lambda: (fd_curvature(f, params, grad, u, dtype), jnp.int32(1)),
    )
    return curv, calls, SecantMemory(u, grad_dot_u, u_sq)


def curvature(oracle: str, f: Callable[[Any], Any], params: Any, grad: Any, u: Any, grad_dot_u: Any,
              memory: SecantMemory | None, prev_lr: Any, dtype: Any) -> tuple[Any, Any, SecantMemory | None]:
    """(``u^T H u``, extra loss evaluations, new secant memory) with the named oracle."""
    if oracle == "exact":
        return exact_curvature(f, params, u, dtype), jnp.int32(1), memory
    if oracle == "fd":
        return fd_curvature(f, params, grad, u, dtype), jnp.int32(1), memory
    return secant_curvature(f, params, grad, u, memory, prev_lr, dtype, grad_dot_u)
