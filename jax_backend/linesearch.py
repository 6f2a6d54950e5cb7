"""The paper's (1 + delta)-relaxed Armijo line search, on top of ``optax.scale_by_backtracking_linesearch``.

Optax's search already implements the criterion ``f(w + lr u) <= (1 + rtol) f(w) + slope_rtol lr g^T u``
(:func:`curvopt.rules.armijo_decrease_error` is the same test), starting each step at
``min(increase_factor * previous_lr, max_learning_rate)`` and shrinking by ``decrease_factor``. Its loop
evaluates ``value_fn`` at most ``max_backtracking_steps + 1`` times, so ``max_trials`` maps to
``max_backtracking_steps = max_trials - 1``. This wrapper adds only what it lacks:

* our sign convention: it receives the base's raw direction ``d`` and hands Optax ``u = -d``;
* the previous learning rate starts at ``init_lr`` (Optax's at 1): the first trial is
  ``min(increase_factor * init_lr, lr_max)``, as in PyTorch's ``ArmijoLineSearch``;
* extra arguments ``value_fn`` does not accept are ignored (Optax's search raises on them);
* a non-finite value or gradient skips the step (zero updates, the search state untouched);
* the statistics of :class:`jax_backend.state.ArmijoState`, the ascent flag and the online sharpness.

As in Optax, a search that spends all its trials without acceptance still takes its last (smallest) trial
step, and one whose trials were all non-finite takes no step (``lr = 0``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from curvopt import rules
from curvopt.config import ArmijoConfig, SharpnessConfig

from .base_method import BaseMethod, as_base_method
from .cdat import sharpness_config
from .direction import all_finite, descent, vdot, warn_if_negated
from .loss import bind, require_value_fn, value_and_grad_at
from .settings import validated
from .sharpness import online_sharpness, sharpness_init
from .state import ArmijoState
from .tuner import maybe_preconditioner, skip, stat_init, with_base_state

__all__ = ["scale_by_armijo", "armijo"]

_ARMIJO = ArmijoConfig()
_SHARP = SharpnessConfig()


def scale_by_armijo(
    c: float = _ARMIJO.c,
    delta: float = _ARMIJO.delta,
    increase_factor: float = _ARMIJO.increase_factor,
    decrease_factor: float = _ARMIJO.decrease_factor,
    lr_max: float = _ARMIJO.lr_max,
    init_lr: float = _ARMIJO.init_lr,
    max_trials: int = _ARMIJO.max_trials,
    sharpness_every: int = _SHARP.every,
    sharpness_iters: int = _SHARP.iters,
    sharpness_first_iters: int = _SHARP.first_iters,
    sharpness_tol: float = _SHARP.tol,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Backtracking line search on ``f(w + lr u) <= (1 + delta) f(w) + c lr g^T u`` (paper: ``c`` in
    {0, 1e-4, 0.5}, ``increase_factor`` in {4, inf}, ``decrease_factor`` in {0.8, 0.9}, ``delta`` in {0, 1e-3}).

    Needs ``value_fn`` (each trial evaluates it with the forwarded extra arguments) and the value at ``w``
    (``value=``, else one forward pass). ``closure_calls`` = 1 + the trials. Settings as
    :class:`curvopt.config.ArmijoConfig`; ``sharpness_*``/``base_method`` as
    :func:`jax_backend.cdat.scale_by_cdat`. State: :class:`ArmijoState`.
    """
    cfg = validated(ArmijoConfig, c=c, delta=delta, increase_factor=increase_factor,
                    decrease_factor=decrease_factor, lr_max=lr_max, init_lr=init_lr, max_trials=max_trials)
    sharp = sharpness_config(sharpness_every, sharpness_iters, sharpness_first_iters, sharpness_tol)
    method = as_base_method(base_method)
    search = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=cfg.max_trials - 1, slope_rtol=cfg.c, decrease_factor=cfg.decrease_factor,
        increase_factor=cfg.increase_factor, max_learning_rate=cfg.lr_max, rtol=cfg.delta, atol=0.0)

    def init(params: Any) -> ArmijoState:
        search_state = search.init(params)
        dtype = search_state.learning_rate.dtype
        search_state = search_state._replace(learning_rate=jnp.asarray(cfg.init_lr, dtype))
        return ArmijoState(**stat_init(params), sharpness_memory=sharpness_init(params, sharp.every,
                                                                                 method.preconditioned),
                           search=search_state)

    def update(updates: Any, state: ArmijoState, params: Any = None, *, value: Any = None, grad: Any = None,
               value_fn: Callable[..., Any] | None = None, base_state: Any = None,
               **extra_args: Any) -> tuple[Any, ArmijoState]:
        if params is None:
            raise ValueError("scale_by_armijo needs params: update(updates, state, params, ...)")
        f = bind(require_value_fn(value_fn, "scale_by_armijo", "the line-search trials"), extra_args)
        value, grad = value_and_grad_at(params, value, grad, f, need_value=True, tuner="scale_by_armijo")
        dtype = state.lr.dtype
        value = jnp.asarray(value).astype(dtype)
        finite = all_finite(grad) & jnp.isfinite(value)
        memory = state.sharpness_memory
        precond = maybe_preconditioner(method, memory, base_state, "scale_by_armijo")

        def step() -> tuple[Any, ArmijoState]:
            u = descent(updates, params)
            numerator = -vdot(grad, u, dtype)
            ascent = warn_if_negated(numerator, state.count, warn_ascent)
            lam, pre, new_memory, used = state.sharpness, state.preconditioned_sharpness, memory, jnp.int32(0)
            if memory is not None:
                lam, pre, new_memory, used = online_sharpness(
                    f, params, memory, count=state.count, last=(lam, pre), config=sharp,
                    preconditioner=precond, dtype=dtype)
            scaled, new_search = search.update(u, state.search, params, value=value, grad=grad, value_fn=f)
            lr = new_search.learning_rate.astype(dtype)
            relevant = pre if method.preconditioned else lam
            new_updates = jax.tree_util.tree_map(lambda x, d: x.astype(d.dtype), scaled, updates)
            trials = jnp.asarray(new_search.info.num_linesearch_steps).astype(jnp.int32)
            new_state = ArmijoState(
                lr=lr, numerator=numerator, curvature=jnp.full((), jnp.nan, dtype),
                sharpness=lam.astype(dtype), preconditioned_sharpness=pre.astype(dtype),
                eos_ratio=jnp.asarray(rules.eos_ratio(lr, relevant, method.coefficient)).astype(dtype),
                skipped=state.skipped, closure_calls=1 + trials + used, count=state.count + 1, last_lr=lr,
                ascent_steps=state.ascent_steps + ascent.astype(jnp.int32), sharpness_memory=new_memory,
                search=new_search)
            return new_updates, new_state

        # lax.cond here (not a select as in the other tuners): a skipped step must not run up to max_trials
        # evaluations of the line search.
        return jax.lax.cond(finite, step, lambda: skip(updates, state))

    return optax.GradientTransformationExtraArgs(init, update)


def armijo(base: optax.GradientTransformation, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, scale_by_armijo(**kwargs))``, handing the base's state to the tuner."""
    return with_base_state(base, scale_by_armijo(**kwargs))
