"""The Polyak step as an Optax transform (rule: :class:`curvopt.rules.PolyakRule`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from curvopt.base import BaseMethod, as_base_method
from curvopt.bound_watch import BoundWatch
from curvopt.config import ZeroRateWatch
from curvopt.rules import PolyakRule, RuleInputs, apply_rule, polyak_cap_warning
from curvopt.stats import TunerStats
from curvopt.validation import check_bool

from .direction import accumulator_dtype
from .settings import make, sharpness_setting
from .sharpness import EigenMemory, eigen_init
from .tuner import (ascent_count, bound_init, bound_watched, check_base_method, convenience, finish, fresh_leaves,
                    prepare, select, sharpness_of, skip, stats_init, transform, zero_rate_init,
                    zero_rate_watched)
from .warning import warn

__all__ = ["ScaleByPolyakState", "scale_by_polyak", "polyak"]

_POLYAK = PolyakRule()


class ScaleByPolyakState(NamedTuple):
    """State of :func:`scale_by_polyak`: ``steps``, ``ascent_steps``, ``eigen``, ``stats``, ``bound`` and
    ``zero_rate`` as in :class:`jax_backend.ScaleByCDATState` (the rule keeps no state; ``stats.curvature`` is
    NaN)."""

    steps: Any
    ascent_steps: Any
    eigen: EigenMemory | None
    stats: TunerStats
    bound: BoundWatch | None = None  # (last, with a default: a state pickled before it existed loads without it)
    zero_rate: ZeroRateWatch | None = None  # (likewise)


def scale_by_polyak(
    f_star: float = _POLYAK.f_star,
    lr_max: float | None = None,
    *,
    sharpness: Any = None,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
    sharpness_every: int | None = None,
    sharpness_iters: int | None = None,
    sharpness_first_iters: int | None = None,
    sharpness_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Polyak's step ``lr = min((f - f_star) / (-g^T u), lr_max)`` (:class:`curvopt.rules.PolyakRule`).

    Needs the loss value (``value=``, else one forward pass of ``value_fn``) and the gradient; no curvature.
    ``value_fn`` is needed only for a missing value/grad or the online sharpness. ``lr_max`` defaults to 1; behind a
    ``base_method`` other than gradient descent give it, in the base's units (else a warning:
    :func:`curvopt.rules.polyak_cap_warning`). Other arguments as :func:`jax_backend.scale_by_cdat`. State:
    :class:`ScaleByPolyakState`.
    """
    name = "scale_by_polyak"
    check_bool(f"{name}: warn_ascent", warn_ascent)
    method = as_base_method(base_method)
    message = polyak_cap_warning(method, lr_max)
    if message:
        warn(f"{name}: {message}")
    rule = make(PolyakRule, f_star=f_star, lr_max=lr_max)
    sharp = sharpness_setting(sharpness, rule.default_sharpness, name, sharpness_every=sharpness_every,
                              sharpness_iters=sharpness_iters, sharpness_first_iters=sharpness_first_iters,
                              sharpness_tol=sharpness_tol)

    def init(params: Any) -> ScaleByPolyakState:
        dtype = accumulator_dtype(params)
        zero_i = jnp.zeros((), jnp.int32)
        return fresh_leaves(ScaleByPolyakState(
            steps=zero_i, ascent_steps=zero_i,
            eigen=eigen_init(params, sharp, method),
            stats=stats_init(dtype), bound=bound_init(dtype),
            zero_rate=zero_rate_init(dtype)))

    def update(updates: Any, state: ScaleByPolyakState, params: Any = None, *, value: Any = None,
               grad: Any = None, value_fn: Any = None, base_state: Any = None, base_state_before: Any = None,
               **extra_args: Any
               ) -> tuple[Any, ScaleByPolyakState]:
        dtype = state.stats.lr.dtype
        p = prepare(name, updates, params, dtype, value=value, grad=grad, value_fn=value_fn,
                    extra_args=extra_args, need_value=True)
        check_base_method(base_method, method, updates, grad, base_state, name,
                          rate_follows_base=lr_max is None)
        if p.masked:  # at trace time
            warn(f"{name}: inside optax.masked/multi_transform the Polyak step divides the whole loss gap "
                 "f - f_star by this part's slope alone: right when the other parts are frozen, but when "
                 "another part moves too, each takes the whole decrease (twice the step with two parts)")

        def taken() -> tuple[Any, ScaleByPolyakState]:
            sharpness, eigen, used = sharpness_of(p, params, state.eigen, state.steps, state.stats, sharp, method,
                                                  base_state, name)
            nan = jnp.full((), jnp.nan, dtype)
            lr, _ = apply_rule(rule, RuleInputs(p.numerator, nan, p.value, nan, state.steps), rule.init(nan), jnp)
            out, stats = finish(updates, p, lr, curvature=nan, sharpness=sharpness, calls=1 + used,
                                method=method, old=state.stats)
            return out, ScaleByPolyakState(
                steps=state.steps + 1, ascent_steps=ascent_count(p, state.ascent_steps, state.steps, warn_ascent),
                eigen=eigen, stats=stats, bound=bound_watched(state.bound, p, rule.loss_bound(jnp)),
                zero_rate=zero_rate_watched(state.zero_rate, p, stats, params))

        return select(p.finite, taken(), skip(updates, state))

    return transform(init, update)


polyak = convenience(scale_by_polyak, "polyak")
