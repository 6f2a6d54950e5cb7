"""The secant's mini-batch noise in Optax (``scale_by_cdat``'s ``noise_correction``): the base's noise metric
``A`` and the secant curvature with the noise bias removed (the formulas and their derivation are the core's:
:func:`curvopt.curvature.secant_noise_numerator` and :func:`curvopt.curvature.secant_noise_corrected`).

The incoming direction is ``d = A g + c`` (``u = -d``), ``A = a`` with ``a`` the core's
:func:`curvopt.curvature.gradient_weight` of ``base_method``, times the per-leaf multipliers of a
:func:`jax_backend.mup.scale_by_mup` in the base's state (as PyTorch's group rates); behind Adam divided
elementwise by ``P``, the core's Adam preconditioner from the base's state before its update (the ``P`` of the
previous step, the one the noise of the previous gradient went through; handed over by the conveniences as
``base_state_before``). Other per-leaf rescalings inside the base (an ``optax.multi_transform`` of scales) are
not seen. A clip before the base's own transform inside the base (``optax.clip_by_global_norm``) scales the
gradient the base took in: its factor is read (:func:`seen_scale`) from Adam's states before and after the update,
from ``optax.trace``'s behind heavy ball and Nesterov, and from the incoming direction behind gradient descent, and
enters the next step's estimate (:func:`curvopt.curvature.secant_noise_corrected`'s ``input_scale``), as PyTorch's
``max_grad_norm`` factor does.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt.base import BaseMethod, direction_unit
from curvopt.curvature import (SecantNoiseState, gradient_fit, gradient_scale, gradient_weight,
                               secant_noise_corrected, secant_noise_numerator)
from curvopt.preconditioner import adam_preconditioner

from .direction import flat, like_params, moved, moving_leaves, runs_vdot
from .mup import find_lr_mults
from .sharpness import find_adam_state

__all__ = ["NoiseMemory", "noise_init", "noise_metric", "adam_averaged_gradient", "find_trace_state", "seen_scale",
           "gradient_descent_unit", "corrected_secant", "rate_multipliers", "over_preconditioner"]


class NoiseMemory(NamedTuple):
    """What the noise correction keeps: the previous step's gradient (shaped like the parameters), the share of it
    the base saw (:func:`seen_scale`; 1 before a step) and the moving averages of the secant numerator, its noise
    estimate and its scale (:class:`curvopt.curvature.SecantNoiseState`)."""

    prev_grad: Any
    prev_scale: Any
    averages: SecantNoiseState


def noise_init(params: Any, dtype: Any) -> NoiseMemory:
    return NoiseMemory(optax.tree.zeros_like(params), jnp.ones((), dtype),
                       SecantNoiseState(*(jnp.zeros((), dtype) for _ in range(3))))


def adam_averaged_gradient(grad: Any, adam: optax.ScaleByAdamState, before: optax.ScaleByAdamState | None,
                           method: BaseMethod, dtype: Any) -> Any:
    """The gradient Adam averaged into its first moment this step, ``(m_t - b1 m_{t-1}) / (1 - b1)``, flat
    (:func:`jax_backend.direction.flat` like ``grad``), from its states after and before the update; ``grad``
    itself when the state before is unknown."""
    if before is None:
        return flat(grad, dtype)
    return jax.tree.map(lambda m, b: (m - method.b1 * b) / (1 - method.b1), flat(adam.mu, dtype, like=grad),
                        flat(before.mu, dtype, like=grad))


def find_trace_state(tree: Any) -> optax.TraceState | None:
    """The first ``optax.TraceState`` (``optax.trace``'s momentum buffer) in an optimizer state, or None."""
    is_trace = lambda x: isinstance(x, optax.TraceState)  # noqa: E731
    return next((node for node in jax.tree.leaves(tree, is_leaf=is_trace) if is_trace(node)), None)


def seen_scale(method: BaseMethod, base_state: Any, base_state_before: Any, grad: Any, incoming: Any, params: Any,
               dtype: Any) -> Any:
    """The share of ``grad`` the base saw (:func:`curvopt.curvature.gradient_scale`, which leaves coupled weight
    decay out), from the gradient the base took in: behind Adam the one it averaged (:func:`adam_averaged_gradient`);
    behind heavy ball and Nesterov the one ``optax.trace`` added, ``trace_t - momentum trace_{t-1}``, over ``1 -
    dampening`` (a damped trace is ``optax.trace`` behind a scale by ``1 - dampening``, a share the noise metric
    already holds); behind gradient descent ``incoming``, the base's direction (the tuner's ``d``), which holds it
    times the group rates' multipliers (:func:`jax_backend.mup.scale_by_mup`'s, in the base's state), so the
    gradient and the parameters are weighted by them too (a frozen group, multiplier 0, drops out). 1 where the
    base's states are not at hand."""
    g, w = flat(grad, dtype), flat(params, dtype, like=grad)
    if method.preconditioned:
        adam, before = find_adam_state(base_state, method.b2), find_adam_state(base_state_before, method.b2)
        if adam is None or before is None:
            return jnp.ones((), dtype)
        seen = adam_averaged_gradient(grad, adam, before, method, dtype)
    elif method.momentum:
        trace, before = find_trace_state(base_state), find_trace_state(base_state_before)
        if trace is None or before is None:
            return jnp.ones((), dtype)
        seen = jax.tree.map(lambda t, b: (t - method.momentum * b) / (1 - method.dampening),
                            flat(trace.trace, dtype, like=grad), flat(before.trace, dtype, like=grad))
    else:
        seen, g, w = _incoming_terms(base_state_before, grad, incoming, params, dtype)
    mask = moving_leaves(incoming, grad)
    g, w = moved(g, mask), moved(w, mask)  # (every product has one of them: seen needs no mask)
    return gradient_scale(_dot(seen, g), _dot(seen, w), _dot(g, w), _dot(g, g), _dot(w, w), xp=jnp)


def _incoming_terms(base_state_before: Any, grad: Any, incoming: Any, params: Any, dtype: Any
                    ) -> tuple[Any, Any, Any]:
    """Behind gradient descent: the incoming direction, the gradient and the parameters, flat, the last two
    weighted by the group rates' multipliers (:func:`jax_backend.mup.scale_by_mup`'s) as the direction is."""
    seen, g, w = flat(incoming, dtype, like=grad), flat(grad, dtype), flat(params, dtype, like=grad)
    m = rate_multipliers(base_state_before, grad, dtype)
    if m is not None:
        g, w = optax.tree.mul(g, m), optax.tree.mul(w, m)
    return seen, g, w


def gradient_descent_unit(method: BaseMethod, base_state_before: Any, grad: Any, incoming: Any, params: Any,
                          dtype: Any) -> Any:
    """The unit CDAT's averages follow (:func:`curvopt.base.direction_unit`): behind gradient descent the share of
    ``grad`` the incoming direction holds (:func:`curvopt.curvature.gradient_scale`: a clip's factor inside the base
    times the base's own scale), NaN where the direction is not that share of the gradient plus a multiple of the
    parameters (:func:`curvopt.curvature.gradient_fit`: a momentum base declared as gradient descent); 1 behind
    other bases."""
    if not method.rescaled_gradient:
        return direction_unit(method, 1.0, jnp)
    seen, g, w = _incoming_terms(base_state_before, grad, incoming, params, dtype)
    dots = (_dot(seen, g), _dot(seen, w), _dot(g, w), _dot(g, g), _dot(w, w))
    fits = gradient_fit(_dot(seen, seen), *dots, xp=jnp)
    return direction_unit(method, gradient_scale(*dots, xp=jnp), jnp, fits=fits)


def rate_multipliers(base_state: Any, grad: Any, dtype: Any) -> Any:
    """The group rates' multipliers (:func:`jax_backend.mup.scale_by_mup`'s, in the base's state: PyTorch's group
    lrs) broadcast to every entry, flat like ``grad``; None without a ``scale_by_mup`` in the base."""
    mults = find_lr_mults(base_state)
    if mults is None:
        return None
    return flat(jax.tree.map(lambda g, m: jnp.broadcast_to(m, g.shape), grad, like_params(mults, grad)), dtype,
                like=grad)


def noise_metric(method: BaseMethod, base_state_before: Any, grad: Any, dtype: Any, name: str, required: bool
                 ) -> Any:
    """``A``: a scalar for the gradient-descent family, flat (:func:`jax_backend.direction.flat` of a tree shaped
    like ``grad``) behind Adam or with group rates. Behind Adam without its state before the update:
    ``ValueError`` if ``required`` (``noise_correction=True``), else None (the default's correction off)."""
    a = jnp.asarray(gradient_weight(method.kind, momentum=method.momentum, dampening=method.dampening,
                                    beta1=method.b1), dtype)
    mults = rate_multipliers(base_state_before, grad, dtype)
    if mults is not None:  # group rates: a per-leaf factor
        a = optax.tree.scale(a, mults)
    if not method.preconditioned:
        return a
    adam = find_adam_state(base_state_before, method.b2)
    if adam is None and not required:
        return None
    if adam is None:
        raise ValueError(f"{name}: noise_correction=True behind Adam needs Adam's state before its update: build the "
                         "optimizer with the convenience (cdat(optax.scale_by_adam(), ...)) or with_base_state, or "
                         "pass base_state_before=")
    return over_preconditioner(a, adam, method, grad, dtype)


def over_preconditioner(x: Any, adam: optax.ScaleByAdamState, method: BaseMethod, grad: Any, dtype: Any) -> Any:
    """``x / P``, flat like ``grad`` (:func:`jax_backend.direction.flat`), for ``x`` a scalar or flat like
    ``grad`` and ``P`` Adam's diagonal (:func:`curvopt.preconditioner.adam_preconditioner`) from its state
    ``adam``."""
    count = adam.count.astype(dtype)
    nus = flat(adam.nu, dtype, like=grad)
    over_p = lambda v, nu: v / adam_preconditioner(nu, count, beta1=method.b1, beta2=method.b2,  # noqa: E731
                                                   eps=method.eps, xp=jnp)
    return jax.tree.map(over_p, x if isinstance(x, tuple) else (x,) * len(nus), nus)


def _times(metric: Any, v: Any) -> Any:
    """``A v`` for ``A`` (:func:`noise_metric`) a scalar or flat, and ``v`` flat."""
    return optax.tree.mul(metric, v) if isinstance(metric, tuple) else optax.tree.scale(metric, v)


_dot = runs_vdot  # over flat trees: one reduction per run


def corrected_secant(memory: NoiseMemory, metric: Any, seen: Any, grad: Any, prev_incoming: Any,
                     prev_grad_dot_direction: Any, prev_lr: Any, prev_direction_sq: Any, d_sq: Any, dtype: Any
                     ) -> tuple[Any, NoiseMemory]:
    """``(curvature along u_t, memory)``: :func:`curvopt.curvature.secant_noise_corrected` of the secant numerator
    ``(g_t - g_{t-1})^T u_{t-1}`` and of its noise estimate from ``D = g_t - g_{t-1}`` (NaN without a secant, the
    averages then kept); the memory keeps ``g_t`` and ``seen``, the share of it the base saw (:func:`seen_scale`),
    for the next step."""
    g = flat(grad, dtype)
    diff = optax.tree.sub(g, flat(memory.prev_grad, dtype, like=grad))
    prev_u = flat(prev_incoming, dtype, like=grad)  # -u_{t-1}: the sign cancels in every A-product below
    # (prev_u is 0 where the mask is off)
    a_diff = moved(_times(metric, diff), moving_leaves(prev_incoming, memory.prev_grad, like=grad))
    noise = secant_noise_numerator(_dot(a_diff, diff), _dot(a_diff, prev_u), _dot(_times(metric, prev_u), prev_u),
                                   xp=jnp)
    secant_numerator = -_dot(g, prev_u) - prev_grad_dot_direction
    curvature, averages = secant_noise_corrected(secant_numerator, noise, prev_lr, prev_direction_sq, d_sq,
                                                 memory.averages, input_scale=memory.prev_scale, xp=jnp)
    kept = NoiseMemory(optax.tree.cast_like(grad, memory.prev_grad), seen.astype(memory.prev_scale.dtype),
                       optax.tree.cast_like(averages, memory.averages))
    return curvature.astype(dtype), kept
