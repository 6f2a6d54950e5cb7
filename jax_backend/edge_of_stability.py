"""The edge-of-stability rule ``lr = sigma * c / sharpness`` as an Optax transform (rule:
:class:`curvopt.rules.EdgeOfStabilityRule`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from curvopt.base import BaseMethod, as_base_method
from curvopt.bound_watch import BoundWatch
from curvopt.config import SharpnessConfig, ZeroRateWatch
from curvopt.rules import (EdgeOfStabilityRule, EdgeOfStabilityState, RuleInputs, apply_rule, default_eos_free_steps,
                           default_eos_sigma)
from curvopt.stats import TunerStats
from curvopt.validation import check_bool

from .direction import accumulator_dtype
from .settings import make, sharpness_enabled, sharpness_setting
from .sharpness import EigenMemory, eigen_init
from .tuner import (ascent_count, bound_init, bound_watched, check_base_method, convenience, finish, fresh_leaves,
                    prepare, select, sharpness_of, skip, stats_init, transform, zero_rate_init,
                    zero_rate_watched)

__all__ = ["ScaleByEdgeOfStabilityState", "scale_by_edge_of_stability", "edge_of_stability"]

_EOS = EdgeOfStabilityRule()


class ScaleByEdgeOfStabilityState(NamedTuple):
    """State of :func:`scale_by_edge_of_stability`: ``rule`` holds the previous learning rate, kept while the
    estimate is not positive and finite (:class:`curvopt.rules.EdgeOfStabilityState`; between estimates the
    rate is recomputed from the last one); ``eigen`` is always present; the rest as in
    :class:`jax_backend.ScaleByCDATState`."""

    steps: Any
    ascent_steps: Any
    rule: EdgeOfStabilityState
    eigen: EigenMemory
    stats: TunerStats
    bound: BoundWatch | None = None  # (last, with a default: a state pickled before it existed loads without it)
    zero_rate: ZeroRateWatch | None = None  # (likewise)


def scale_by_edge_of_stability(
    sigma: Any = None,
    lr_max: float = _EOS.lr_max,
    *,
    growth: float = _EOS.growth,
    free_steps: int | None = None,
    loss_cap: float = _EOS.loss_cap,
    f_star: float = _EOS.f_star,
    sharpness: Any = None,
    stability_coefficient: float | None = None,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
    sharpness_every: int | None = None,
    sharpness_iters: int | None = None,
    sharpness_first_iters: int | None = None,
    sharpness_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``lr = sigma * c / lambda`` (:class:`curvopt.rules.EdgeOfStabilityRule`) with ``c`` the base's stability
    coefficient (``stability_coefficient``, default from ``base_method``), ``sigma`` by default from ``base_method``
    (:func:`curvopt.rules.default_eos_sigma`: 0.25 behind heavy ball, Nesterov and Adam, 1.5 otherwise), the rate at
    most ``growth`` (1.005) times the previous one (the rule says why; ``inf``: the paper's rule) after the first
    ``free_steps`` steps (:func:`curvopt.rules.default_eos_free_steps`: ``every + 1`` behind Adam, 0 otherwise) and
    at most ``loss_cap`` (1; ``inf``: off) times the loss-bound step ``2 (f - f_star) / (-g^T u)`` (inactive
    without the loss), and ``lambda`` the online
    sharpness (Adam: the preconditioned one, which needs the base's state: use :func:`edge_of_stability` or
    pass ``base_state=``). ``sharpness`` defaults to the rule's (every 10 steps) and cannot be off (a period
    injected by ``optax.inject_hyperparams`` and set to 0 is refused, and under ``jit``, where it cannot be,
    estimates every step); the last
    estimate is used in between, the rate recomputed from it at every step (a ``sigma`` schedule moves it); a
    non-positive estimate keeps the previous lr. Needs ``value_fn``. Other
    arguments as :func:`jax_backend.scale_by_cdat`. State: :class:`ScaleByEdgeOfStabilityState`.
    """
    name = "scale_by_edge_of_stability"
    check_bool(f"{name}: warn_ascent", warn_ascent)
    method = as_base_method(base_method)
    coefficient = method.coefficient if stability_coefficient is None else stability_coefficient
    rule = make(EdgeOfStabilityRule, coefficient=coefficient, sigma=default_eos_sigma(method, sigma), lr_max=lr_max,
                growth=growth, loss_cap=loss_cap, f_star=f_star)
    sharp = sharpness_setting(sharpness, rule.default_sharpness, name, sharpness_every=sharpness_every,
                              sharpness_iters=sharpness_iters, sharpness_first_iters=sharpness_first_iters,
                              sharpness_tol=sharpness_tol)
    if not sharpness_enabled(sharp):
        raise ValueError(f"{name}: the rule needs the online sharpness; sharpness must estimate every k >= 1 steps")
    if not isinstance(sharp.every, int):  # a traced period (jit) cannot be refused: 0 is every step
        sharp = make(SharpnessConfig, **{**vars(sharp), "every": jnp.maximum(sharp.every, 1)})
    rule = make(EdgeOfStabilityRule, **{**vars(rule), "free_steps": default_eos_free_steps(method, sharp.every,
                                                                                           free_steps)})

    def init(params: Any) -> ScaleByEdgeOfStabilityState:
        dtype = accumulator_dtype(params)
        zero_i = jnp.zeros((), jnp.int32)
        return fresh_leaves(ScaleByEdgeOfStabilityState(
            steps=zero_i, ascent_steps=zero_i, rule=rule.init(jnp.zeros((), dtype)),
            eigen=eigen_init(params, sharp, method), stats=stats_init(dtype), bound=bound_init(dtype),
            zero_rate=zero_rate_init(dtype)))

    def update(updates: Any, state: ScaleByEdgeOfStabilityState, params: Any = None, *, value: Any = None,
               grad: Any = None, value_fn: Any = None, base_state: Any = None, base_state_before: Any = None,
               **extra_args: Any
               ) -> tuple[Any, ScaleByEdgeOfStabilityState]:
        dtype = state.stats.lr.dtype
        p = prepare(name, updates, params, dtype, value=value, grad=grad, value_fn=value_fn,
                    extra_args=extra_args, need_value=False)
        check_base_method(base_method, method, updates, grad, base_state, name,
                          rate_follows_base=stability_coefficient is None)

        def taken() -> tuple[Any, ScaleByEdgeOfStabilityState]:
            sharpness, eigen, used = sharpness_of(p, params, state.eigen, state.steps, state.stats, sharp, method,
                                                  base_state, name, optional=False)
            relevant = sharpness[1] if method.preconditioned else sharpness[0]
            nan = jnp.full((), jnp.nan, dtype)
            lr, rule_state = apply_rule(rule, RuleInputs(p.numerator, nan, p.value, relevant, state.steps),
                                        state.rule, jnp)
            out, stats = finish(updates, p, lr, curvature=nan, sharpness=sharpness, calls=1 + used,
                                method=method, old=state.stats, coefficient=rule.coefficient)
            return out, ScaleByEdgeOfStabilityState(
                steps=state.steps + 1, ascent_steps=ascent_count(p, state.ascent_steps, state.steps, warn_ascent),
                rule=optax.tree.cast_like(rule_state, state.rule), eigen=eigen, stats=stats,
                bound=bound_watched(state.bound, p, rule.loss_bound(jnp)),
                zero_rate=zero_rate_watched(state.zero_rate, p, stats, params))

        return select(p.finite, taken(), skip(updates, state))

    return transform(init, update)


edge_of_stability = convenience(scale_by_edge_of_stability, "edge_of_stability")
