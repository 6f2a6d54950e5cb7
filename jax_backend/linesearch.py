"""The paper's delta-relaxed Armijo line search as an Optax transform (rule:
:class:`curvopt.rules.ArmijoRule`).

The trials run in a ``lax.while_loop``: the first is ``rule.first_trial`` (``min(increase_factor * previous,
lr_max)``, the very first with ``previous = init_lr``), each next one ``decrease_factor`` times smaller, until
``rule.decrease_error`` is 0 or ``max_trials`` evaluations of ``value_fn`` were spent; ``rule.finish`` then
decides: a search that accepts nothing, or an ascent direction (no trial is evaluated for it), takes **no
step**, and where the next search starts (from the last trial; from ``init_lr`` after a stall). The
criterion is the one of
``optax.scale_by_backtracking_linesearch`` (``rtol = delta``, ``slope_rtol = c``) where the loss is not negative
(Optax's ``(1 + rtol) f`` is stricter than ``f`` on a negative one: :func:`curvopt.rules.armijo_decrease_error`),
whose last-trial-anyway behaviour is deliberately not copied.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt.base import BaseMethod, as_base_method
from curvopt.config import ZeroRateWatch
from curvopt.rules import ArmijoRule, ArmijoSearchState, RuleInputs, default_armijo_c
from curvopt.stats import TunerStats
from curvopt.validation import check_bool

from .control import cond, while_loop
from .direction import accumulator_dtype, scaled
from .loss import require_value_fn
from .settings import make, sharpness_setting
from .sharpness import EigenMemory, eigen_init
from .tuner import (ascent_count, check_base_method, convenience, finish, fresh_leaves, prepare, sharpness_of, skip,
                    stats_init, transform, zero_rate_init, zero_rate_watched)

__all__ = ["ScaleByArmijoState", "scale_by_armijo", "armijo"]

_ARMIJO = ArmijoRule()


class ScaleByArmijoState(NamedTuple):
    """State of :func:`scale_by_armijo`: ``rule`` holds the rate the next search starts from
    (:class:`curvopt.rules.ArmijoSearchState`), ``trials`` the trial evaluations of the last search; the rest
    as in :class:`jax_backend.ScaleByCDATState` (``stats.curvature`` is NaN; ``stats.closure_calls`` is 1 +
    the trials + HVPs)."""

    steps: Any
    ascent_steps: Any
    rule: ArmijoSearchState
    trials: Any
    eigen: EigenMemory | None
    stats: TunerStats
    zero_rate: ZeroRateWatch | None = None  # (last, with a default: a state pickled before it existed loads without it)


def scale_by_armijo(
    c: float | None = None,
    delta: float = _ARMIJO.delta,
    increase_factor: float = _ARMIJO.increase_factor,
    decrease_factor: float = _ARMIJO.decrease_factor,
    lr_max: float = _ARMIJO.lr_max,
    init_lr: float = _ARMIJO.init_lr,
    max_trials: int = _ARMIJO.max_trials,
    *,
    sharpness: Any = None,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
    sharpness_every: int | None = None,
    sharpness_iters: int | None = None,
    sharpness_first_iters: int | None = None,
    sharpness_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Backtracking line search on ``f(w + lr u) <= f(w) + delta |f(w)| + c lr g^T u`` (paper: ``c`` in
    {0, 1e-4, 0.5}, ``increase_factor`` in {4, inf}, ``decrease_factor`` in {0.8, 0.9}, ``delta`` in {0, 1e-3}).

    Needs ``value_fn`` (each trial evaluates it with the forwarded extra arguments) and the value at ``w``
    (``value=``, else one forward pass). Settings as :class:`curvopt.rules.ArmijoRule`, ``c`` by default from
    ``base_method`` (:func:`curvopt.rules.default_armijo_c`: 0.1 for gradient descent, 0.5 otherwise); ``sharpness``
    and ``base_method`` as :func:`jax_backend.scale_by_cdat`. State: :class:`ScaleByArmijoState`.
    """
    name = "scale_by_armijo"
    check_bool(f"{name}: warn_ascent", warn_ascent)
    method = as_base_method(base_method)
    rule = make(ArmijoRule, c=default_armijo_c(method, c), delta=delta, increase_factor=increase_factor,
                decrease_factor=decrease_factor, lr_max=lr_max, init_lr=init_lr, max_trials=max_trials)
    sharp = sharpness_setting(sharpness, rule.default_sharpness, name, sharpness_every=sharpness_every,
                              sharpness_iters=sharpness_iters, sharpness_first_iters=sharpness_first_iters,
                              sharpness_tol=sharpness_tol)

    def init(params: Any) -> ScaleByArmijoState:
        dtype = accumulator_dtype(params)
        zero_i = jnp.zeros((), jnp.int32)
        return fresh_leaves(ScaleByArmijoState(
            steps=zero_i, ascent_steps=zero_i, rule=rule.init(jnp.zeros((), dtype)), trials=zero_i,
            eigen=eigen_init(params, sharp, method),
            stats=stats_init(dtype), zero_rate=zero_rate_init(dtype)))

    def update(updates: Any, state: ScaleByArmijoState, params: Any = None, *, value: Any = None,
               grad: Any = None, value_fn: Any = None, base_state: Any = None, base_state_before: Any = None,
               **extra_args: Any
               ) -> tuple[Any, ScaleByArmijoState]:
        require_value_fn(value_fn, name, "the line-search trials")
        dtype = state.stats.lr.dtype
        p = prepare(name, updates, params, dtype, value=value, grad=grad, value_fn=value_fn,
                    extra_args=extra_args, need_value=True)
        if p.f is None:
            raise ValueError(f"{name}: inside optax.masked/multi_transform the line search cannot evaluate "
                             "value_fn on the partial parameters")
        check_base_method(base_method, method, updates, grad, base_state, name, rate_follows_base=c is None)
        x = RuleInputs(p.numerator, jnp.full((), jnp.nan, dtype), p.value, jnp.full((), jnp.nan, dtype),
                       state.steps)

        def trial(carry):
            lr, _, _, n = carry
            lr = jnp.where(n > 0, lr * rule.decrease_factor, lr).astype(dtype)
            # the point the step lands on: the update as finish() returns it, applied as optax.apply_updates
            # does, and materialised in the parameters' dtype (the barrier: XLA may otherwise keep a bf16 point
            # in float32 inside value_fn). In bf16 either difference made the accepted trial another point than
            # the one reached, which broke the condition on 1 of 200 steps of a quadratic.
            point = jax.lax.optimization_barrier(optax.apply_updates(params, scaled(-lr, p.d)))
            new_value = p.f(point).astype(dtype)
            return lr, rule.decrease_error(new_value, x, lr, jnp).astype(dtype), new_value, n + 1

        def taken() -> tuple[Any, ScaleByArmijoState]:
            sharpness, eigen, used = sharpness_of(p, params, state.eigen, state.steps, state.stats, sharp, method,
                                                  base_state, name)
            first = rule.first_trial(state.rule, jnp).astype(dtype)
            # no trial for an ascent direction: finish() takes no step for it anyway
            nan = jnp.full((), jnp.nan, dtype)
            lr, err, new_value, n = while_loop(
                lambda c: (c[1] > 0) & (c[3] < rule.max_trials) & (p.numerator > 0),
                trial, (first, jnp.full((), jnp.inf, dtype), nan, jnp.int32(0)))
            lr, rule_state = rule.finish(x, state.rule, lr, err, new_value, jnp)
            out, stats = finish(updates, p, lr, curvature=x.curvature, sharpness=sharpness, calls=1 + n + used,
                                method=method, old=state.stats)
            return out, ScaleByArmijoState(
                steps=state.steps + 1, ascent_steps=ascent_count(p, state.ascent_steps, state.steps, warn_ascent),
                rule=optax.tree.cast_like(rule_state, state.rule), trials=n, eigen=eigen, stats=stats,
                zero_rate=zero_rate_watched(state.zero_rate, p, stats, params))

        # lax.cond (not the select of the other tuners): a skipped step must not run up to max_trials
        # evaluations of the line search.
        return cond(p.finite, taken, lambda: skip(updates, state))

    return transform(init, update)


armijo = convenience(scale_by_armijo, "armijo")
