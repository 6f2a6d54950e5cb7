"""CDAT and the quadratically greedy rule as Optax transforms (rules: :class:`curvopt.rules.CDATRule`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvopt.base import BaseMethod, as_base_method
from curvopt.curvature import GREEDY_NOISE_CORRECTION, noise_correction_on, noise_dominated
from curvopt.config import (CURVATURE_ORACLES, DEFAULT_CURVATURE, ZeroRateWatch, concave_reprobe, has_gradient,
                            probes_along, secant_caveat)
from curvopt.bound_watch import BoundWatch
from curvopt.minibatch_watch import MinibatchWatch, held_rate, holds, watch_minibatch, watches
from curvopt.rules import (CDATRule, CDATState, RuleInputs, apply_rule, check_numerator, default_ema,
                           default_lagged_growth, default_numerator, default_sigma, momentum_numerator,
                           paired_numerator, paired_prediction_weight)
from curvopt.stats import TunerStats
from curvopt.validation import check_bool, check_choice, traced_validity

from .direction import abs_max, accumulator_dtype, flat, moved, moving_leaves, runs_vdot
from .noise import (NoiseMemory, adam_averaged_gradient, gradient_descent_unit, noise_init, noise_metric,
                    over_preconditioner, rate_multipliers, seen_scale)
from .oracles import (ReplayCheck, SecantMemory, curvature as curvature_of, replay_check, replay_init, secant_init,
                      secant_remember, secant_unwatched, secant_watch_motion)
from .settings import make, sharpness_setting
from .sharpness import EigenMemory, eigen_init, find_adam_state
from .tuner import (ascent_count, bound_init, bound_watched, check_base_method, convenience, finish, fresh_leaves,
                    oracle_for, prepare, select, sharpness_of, skip, stats_init, transform, zero_rate_init,
                    zero_rate_watched)
from .warning import warn

__all__ = ["ScaleByCDATState", "ScaleByQuadraticGreedyState", "PairedMemory", "scale_by_cdat",
           "scale_by_quadratic_greedy"]

_CDAT = CDATRule()


class PairedMemory(NamedTuple):
    """What ``numerator="paired"`` keeps from the previous step (:func:`curvopt.rules.paired_numerator`): its
    batch's gradient predicted at the current parameters, ``g + lr (g_probe - g) / h`` from its fd probe
    (shaped like the parameters), and whether it is one (False before the first step, after a step with
    ``lr = 0`` or without an fd probe)."""

    predicted_grad: Any
    predicted: Any


class ScaleByCDATState(NamedTuple):
    """State of :func:`scale_by_cdat` and :func:`scale_by_quadratic_greedy`.

    * ``steps``: steps taken (skipped ones not counted), int32; the sharpness schedule and a ``sigma``
      schedule read it;
    * ``ascent_steps``: steps whose incoming direction pointed uphill (see :mod:`jax_backend.direction`);
    * ``rule``: CDAT's moving averages (:class:`curvopt.rules.CDATState`);
    * ``secant``: :class:`~jax_backend.oracles.SecantMemory` when the oracle can be the secant
      (``curvature="secant"`` or ``"auto"``), else None;
    * ``eigen``: :class:`~jax_backend.sharpness.EigenMemory` when the online sharpness is on, else None;
    * ``paired``: :class:`PairedMemory` with ``numerator="paired"``, else None;
    * ``noise``: :class:`~jax_backend.noise.NoiseMemory` when the secant's noise correction is on and the oracle
      can be the secant, else None;
    * ``watch``: :class:`curvopt.minibatch_watch.MinibatchWatch` behind heavy ball and Nesterov (``base_method``),
      else None: the watch for mini-batch training, fed by the steps that know their loss and their current
      curvature (``value_fn``); once it fired the rate is held at most at that step's (but for the paper's rule:
      :func:`curvopt.minibatch_watch.held_rate`) and :func:`jax_backend.stats` warns;
    * ``stats``: the logged numbers (:class:`curvopt.stats.TunerStats`; ``tree_get(state, "lr")``);
    * ``replay``: :class:`~jax_backend.oracles.ReplayCheck` when the oracle can be ``fd`` (``curvature="fd"`` or
      ``"auto"``), else None: the first fd probes' check that ``value_fn`` computes the step's loss (None too in a
      state pickled before the check existed, which resumes without it);
    * ``bound``: :class:`curvopt.bound_watch.BoundWatch`, the watch on the loss against ``f_star``
      (:func:`jax_backend.stats` warns when the loss went below it or pressed on it; None in a state pickled
      before the watch existed);
    * ``zero_rate``: :class:`curvopt.config.ZeroRateWatch`, the watch on runs of steps at rate 0, fed by the steps
      whose curvature is the current point's (:func:`jax_backend.stats` warns after
      :data:`curvopt.config.ZERO_RATE_STEPS` of them on a run that has not converged; None likewise).
    """

    steps: Any
    ascent_steps: Any
    rule: CDATState
    secant: SecantMemory | None
    eigen: EigenMemory | None
    paired: PairedMemory | None
    noise: NoiseMemory | None
    watch: MinibatchWatch | None
    stats: TunerStats
    replay: ReplayCheck | None = None  # (last, with a default: a state pickled before it existed loads without it)
    bound: BoundWatch | None = None  # (likewise)
    zero_rate: ZeroRateWatch | None = None  # (likewise)


ScaleByQuadraticGreedyState = ScaleByCDATState


def scale_by_cdat(
    sigma: Any = None,
    ema: float | None = None,
    eps: float = _CDAT.eps,
    lr_max: float = _CDAT.lr_max,
    *,
    startup: str = _CDAT.startup,
    f_star: float = _CDAT.f_star,
    growth: float = _CDAT.growth,
    guard: float = _CDAT.guard,
    guard_sigma: float = _CDAT.guard_sigma,
    lagged_growth: float | None = None,
    loss_cap: float = _CDAT.loss_cap,
    curvature: str = DEFAULT_CURVATURE,
    sharpness: Any = None,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
    numerator: str | None = None,
    noise_correction: bool | None = None,
    sharpness_every: int | None = None,
    sharpness_iters: int | None = None,
    sharpness_first_iters: int | None = None,
    sharpness_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """CDAT in place of ``optax.scale_by_learning_rate``: ``lr = sigma * avg(n) / avg(d + eps)``, ``n =
    max(-g^T u, 0)`` (the rule's numerator, see ``numerator``) and ``d`` the curvature ``u^T H u``, under the
    default ``startup="robust"`` floored by the loss bound, ``max(u^T H u, n^2 / (2 (f - f_star)))``, under
    ``startup="paper"`` the paper's ``|u^T H u|`` (:class:`curvopt.rules.CDATRule`, which documents
    ``startup``, the above-edge ``guard``/``guard_sigma`` and ``loss_cap`` (the above-edge steps' cap by the
    loss bound), and ``lagged_growth``, the secant steps' cap on the step's length, None: by ``base_method``,
    :func:`curvopt.rules.default_lagged_growth`); ``sigma`` may be a schedule
    ``step -> sigma`` (or injected with ``optax.inject_hyperparams``); ``sigma=None`` (default): by
    ``base_method`` and the numerator (:func:`curvopt.rules.default_sigma`: 4, guarded, with the robust
    start-up for gradient descent and for Adam with the momentum numerator; 2 for heavy ball, Nesterov, Adam
    with another numerator and ``startup="paper"``). The guard and the cap need the loss (``value``, or
    ``value_fn``: one more forward pass when ``value`` is not given); without it a ``sigma`` above 2 is held at
    2, and so is a step whose curvature is the secant's (a step old). Behind heavy ball and Nesterov the steps
    with ``value_fn`` also feed a watch for mini-batch training (the state's ``watch``): once it fires,
    :func:`jax_backend.stats` warns and, but for ``startup="paper"``, the rate is held from then on at most at
    that step's (:mod:`curvopt.minibatch_watch`).

    Receives the base's direction ``d`` (``u = -d``) and returns ``lr * u``. ``curvature``: ``"auto"``
    (default: ``"fd"`` when the update gets ``value_fn``, ``"secant"`` without one), ``"fd"``, ``"exact"`` or
    ``"secant"`` (:mod:`jax_backend.oracles`). ``sharpness``: online top-eigenvalue estimation
    (:class:`curvopt.config.SharpnessConfig`, or an int period; off by default; needs ``value_fn``);
    ``base_method`` (:class:`curvopt.base.BaseMethod`) gives the stability coefficient, Adam's
    hyperparameters for the preconditioned sharpness and the default ``ema`` (``ema=None``:
    :func:`curvopt.rules.default_ema`, 0.99 for Adam, 0.9 for gradient descent and heavy ball; so pass
    ``base_method="adam"`` behind an Adam base, as for its sharpness; ``optax.inject_hyperparams`` injects
    ``ema`` only when it is given as a number). Unset, ``base_method`` is gradient descent, and the update
    warns when the base is visibly another (:func:`jax_backend.tuner.check_base_method`). ``warn_ascent``:
    also warn from inside the jitted step when the first direction points uphill. ``numerator``:
    None (default: :func:`curvopt.rules.default_numerator`, ``"momentum"`` behind Adam, ``base_method="adam"``,
    with the robust start-up when the update gets Adam's state, as from the :func:`cdat` convenience; else
    ``"direction"``, and a chain that does not hand Adam's state over gets a warning at trace time),
    ``"direction"`` (``-g^T u``) or ``"momentum"`` (an Adam base, ``base_method="adam"``, whose state is
    handed over: the :func:`cdat` convenience): ``-g^T u`` without the batch's correlation with itself, the
    batch's gradient inside Adam's first moment replaced by the previous momentum
    (:func:`curvopt.rules.momentum_numerator`; as in PyTorch's ``CDAT(numerator="momentum")``), or ``"paired"``
    (the same Adam base, and the fd oracle: ``curvature="fd"``, or ``"auto"`` with ``value_fn``): ``-g^T u`` minus
    the batch noise's second moment, measured between this batch's gradient and the previous batch's predicted at
    the current parameters from the previous step's fd probe (:func:`curvopt.rules.paired_numerator`; one more
    parameter-sized buffer in the state, :class:`PairedMemory`; as ``CDAT(numerator="paired")``). Only the rule
    sees either: the stats' ``numerator`` and the secant keep ``-g^T u``. ``noise_correction``: whether the secant
    curvature has its mini-batch noise bias removed (:mod:`jax_backend.noise`; one more parameter-sized buffer in
    the state, the previous gradient; as PyTorch's ``CDAT(noise_correction=...)``): None (default) behind Adam
    (``base_method="adam"``) only (:func:`curvopt.curvature.noise_correction_on`), when the update gets Adam's state
    before its update (the :func:`cdat` convenience hands it over; without it the default is off, and True raises
    ``ValueError``); True/False: on/off. Only the secant oracle uses it.
    ``sharpness_every/_iters/_first_iters/_tol``: deprecated.

    ``update(updates, state, params, *, value=None, grad=None, value_fn=None, base_state=None,
    base_state_before=None, **extra)``: ``grad`` is needed (given, or computed from ``value_fn``, or handed over by
    the :func:`cdat` convenience, as are the base's state after and before its update);
    ``value_fn(params, **extra)`` enables the fd/exact oracles and the sharpness. Bad settings raise
    ``ValueError`` here. State: :class:`ScaleByCDATState`.
    """
    method = as_base_method(base_method)
    rate_follows_base = sigma is None or ema is None
    ema = default_ema(method, ema)  # None: the base's default
    rules = {}  # the rule for each numerator the update may use: the default's depends on Adam's state at hand
    for has_moments in (True, False):
        kind = check_numerator(default_numerator(method, numerator, startup, has_moments), method,
                               f"base_method={method.kind!r} (scale_by_cdat)", curvature)
        rules[kind] = make(CDATRule, sigma=default_sigma(method, sigma, startup, kind), ema=ema, eps=eps,
                           lr_max=lr_max, startup=startup, f_star=f_star, growth=growth, guard=guard,
                           guard_sigma=guard_sigma, loss_cap=loss_cap,
                           lagged_growth=default_lagged_growth(method, lagged_growth, startup, growth))
    return _curvature_tuner("scale_by_cdat", rules, curvature, base_method, rate_follows_base, warn_ascent,
                            sharpness,
                            dict(sharpness_every=sharpness_every, sharpness_iters=sharpness_iters,
                                 sharpness_first_iters=sharpness_first_iters, sharpness_tol=sharpness_tol),
                            noise_correction, numerator, startup)


def scale_by_quadratic_greedy(
    lr_max: float = _CDAT.lr_max,
    *,
    curvature: str = DEFAULT_CURVATURE,
    sharpness: Any = None,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
    noise_correction: bool | None = GREEDY_NOISE_CORRECTION,
    sharpness_every: int | None = None,
    sharpness_iters: int | None = None,
    sharpness_first_iters: int | None = None,
    sharpness_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The quadratically greedy step ``lr = -g^T u / |u^T H u|`` (:meth:`curvopt.rules.CDATRule.greedy`), the
    minimiser of the quadratic model along ``u``; arguments as :func:`scale_by_cdat` (``noise_correction`` off
    by default behind every base: :data:`curvopt.curvature.GREEDY_NOISE_CORRECTION`)."""
    return _curvature_tuner("scale_by_quadratic_greedy", {"direction": CDATRule.greedy(lr_max)}, curvature,
                            base_method, False, warn_ascent, sharpness,
                            dict(sharpness_every=sharpness_every, sharpness_iters=sharpness_iters,
                                 sharpness_first_iters=sharpness_first_iters, sharpness_tol=sharpness_tol),
                            noise_correction)


def _adam(base_state: Any, method: BaseMethod, name: str, numerator: str) -> Any:
    """Adam's state after its update, for the Adam numerators."""
    adam = find_adam_state(base_state, method.b2)
    if adam is None:
        raise ValueError(f"{name}: numerator={numerator!r} needs Adam's state: build the optimizer with the "
                         "convenience (cdat(optax.scale_by_adam(), ...)) or with_base_state, or pass base_state=")
    return adam


def _over_adam(x: Any, p: Any, method: BaseMethod, adam: Any, base_state: Any) -> Any:
    """``D x = M P^-1 x`` for a flat ``x`` (:func:`jax_backend.direction.flat` of a tree shaped like the gradient),
    with Adam's ``P`` (:func:`curvopt.preconditioner.adam_preconditioner`) from its state after its update and
    ``M`` the group rates' multipliers in the base (:func:`jax_backend.noise.rate_multipliers`; PyTorch's ``D``
    is ``lr_group / P``; without them the rates of a μP or layer-wise-decay base drifted 0.3-27 % from
    PyTorch's), on the leaves the base's direction moves (:func:`jax_backend.direction.moving_leaves`). The Adam
    numerators work on the flattened trees: ``P`` and ``P^-1 x`` leaf by leaf were ~0.1 of a bare step's compile
    time."""
    d = moved(over_preconditioner(x, adam, method, p.grad, p.dtype), moving_leaves(p.d, p.grad))
    mults = rate_multipliers(base_state, p.grad, p.dtype)
    return d if mults is None else optax.tree.mul(d, mults)


def _momentum_numerator(p: Any, method: BaseMethod, base_state: Any, before: Any, name: str) -> Any:
    """:func:`curvopt.rules.momentum_numerator` from Adam's state after its update (``m_t = mu``,
    ``t = count``) and the incoming gradient ``g``. The gradient Adam averaged, ``g_in``, is
    ``(m_t - b1 m_{t-1}) / (1 - b1)`` when Adam's state before the update is known (``before``: handed over by
    :func:`jax_backend.tuner.with_base_state`), else ``g``: a transform before Adam that rescales the gradient
    (``clip_by_global_norm``) makes them differ, and ``g`` in its place gave a rate 5-17x too low."""
    adam = _adam(base_state, method, name, "momentum")
    if not jax.tree.leaves(p.grad):
        return p.numerator
    g = flat(p.grad, p.dtype)
    mu = flat(adam.mu, p.dtype, like=p.grad)
    g_in = adam_averaged_gradient(p.grad, adam, find_adam_state(before, method.b2), method, p.dtype)
    scaled_g = _over_adam(g, p, method, adam, base_state)
    return momentum_numerator(p.numerator, runs_vdot(scaled_g, g_in), runs_vdot(scaled_g, mu),
                              beta1=method.b1, step=adam.count.astype(p.dtype), xp=jnp)


def _paired_numerator(p: Any, method: BaseMethod, base_state: Any, memory: PairedMemory, name: str) -> Any:
    """:func:`curvopt.rules.paired_numerator` with ``r = g - ghat`` (the incoming gradient against the previous
    step's prediction) and ``D = M P^-1`` (:func:`_over_adam`) from Adam's state after its update."""
    adam = _adam(base_state, method, name, "paired")
    if not jax.tree.leaves(p.grad):
        return p.numerator
    r = optax.tree.sub(flat(p.grad, p.dtype), flat(memory.predicted_grad, p.dtype, like=p.grad))
    d_r = _over_adam(r, p, method, adam, base_state)
    return paired_numerator(p.numerator, runs_vdot(d_r, r), beta1=method.b1, has=memory.predicted, xp=jnp)


def _predict(p: Any, fd_probe: Any, lr: Any, memory: PairedMemory) -> PairedMemory:
    """The next step's :class:`PairedMemory`: ``g + lr (g_probe - g) / h`` from this step's fd probe
    ``(g_probe, h)`` (none under the secant: no prediction)."""
    if fd_probe is None:
        return PairedMemory(memory.predicted_grad, jnp.zeros((), bool))
    probe, h, _ = fd_probe
    weight = paired_prediction_weight(lr, h, jnp)
    predicted = jax.tree.map(lambda g, q: (g + weight.astype(g.dtype) * (q - g)).astype(g.dtype), p.grad, probe)
    return PairedMemory(optax.tree.cast_like(predicted, memory.predicted_grad), weight > 0)


def _curvature_tuner(name: str, rules: dict[str, CDATRule], curvature: str, base_method: Any,
                     rate_follows_base: bool, warn_ascent: bool, sharpness: Any, legacy: dict,
                     noise_correction: bool | None, numerator: str | None = "direction", startup: str = "paper"
                     ) -> optax.GradientTransformationExtraArgs:
    """The CDAT-rule transform; ``rules``: the rule for each numerator :func:`curvopt.rules.default_numerator`
    can pick for ``numerator`` (None: the default, which depends on whether the update gets Adam's state)."""
    check_choice("curvature", curvature, CURVATURE_ORACLES)
    check_bool(f"{name}: noise_correction", noise_correction, none=True)
    check_bool(f"{name}: warn_ascent", warn_ascent)
    rule = next(iter(rules.values()))  # every one has the same state and default sharpness
    sharp = sharpness_setting(sharpness, rule.default_sharpness, name, **legacy)
    method = as_base_method(base_method)
    denoise = noise_correction_on(noise_correction, method.preconditioned) and curvature in ("auto", "secant")
    preferred = default_numerator(method, numerator, startup)

    def init(params: Any) -> ScaleByCDATState:
        dtype = accumulator_dtype(params)
        zero_i = jnp.zeros((), jnp.int32)
        return fresh_leaves(ScaleByCDATState(
            steps=zero_i, ascent_steps=zero_i, rule=rule.init(jnp.zeros((), dtype)),
            secant=secant_init(params, dtype) if curvature in ("auto", "secant") else None,
            eigen=eigen_init(params, sharp, method),
            paired=PairedMemory(optax.tree.zeros_like(params), jnp.zeros((), bool)) if numerator == "paired" else None,
            noise=noise_init(params, dtype) if denoise else None,
            watch=MinibatchWatch.start(jnp.zeros((), dtype)) if watches(method) else None,
            stats=stats_init(dtype), replay=replay_init(dtype) if curvature in ("auto", "fd") else None,
            bound=bound_init(dtype), zero_rate=zero_rate_init(dtype)))

    def update(updates: Any, state: ScaleByCDATState, params: Any = None, *, value: Any = None,
               grad: Any = None, value_fn: Any = None, base_state: Any = None, base_state_before: Any = None,
               **extra_args: Any
               ) -> tuple[Any, ScaleByCDATState]:
        dtype = state.stats.lr.dtype
        # the robust start-up's floor, guard and cap use the loss: given value_fn but not value (the grad handed
        # over, as the conveniences do), one forward pass computes it
        p = prepare(name, updates, params, dtype, value=value, grad=grad, value_fn=value_fn,
                    extra_args=extra_args, need_value=False, want_value=startup == "robust")
        oracle = oracle_for(curvature, p, name)
        check_base_method(base_method, method, updates, grad, base_state, name, rate_follows_base=rate_follows_base)
        caveat = secant_caveat(method) if oracle == "secant" else None
        if caveat is not None:  # at trace time
            warn(caveat)
        kind = default_numerator(method, numerator, startup, find_adam_state(base_state, method.b2) is not None)
        if kind != preferred:  # at trace time
            warn(f"{name}: behind Adam the default numerator is 'momentum' (with sigma 4), which reads "
                 f"Adam's state; this update did not get it, so it uses the paper's numerator on the edge "
                 f"(sigma 2). Build the optimizer with the convenience (cdat(optax.scale_by_adam(), "
                 f"base_method='adam')) or with_base_state, or pass numerator='direction' to silence this")
        rule = rules[kind]

        noise = None
        if denoise and oracle == "secant":  # by default (None) only where Adam's state before the update is at hand
            metric = noise_metric(method, base_state_before, p.grad, dtype, name, required=noise_correction is True)
            if metric is not None:
                noise = (state.noise, metric, seen_scale(method, base_state, base_state_before, p.grad, p.d, params,
                                                          dtype))

        # the direction's unit, which CDAT's averages follow (behind gradient descent: a clip's factor)
        unit = gradient_descent_unit(method, base_state_before, p.grad, p.d, params, dtype)

        def taken() -> tuple[Any, ScaleByCDATState]:
            curv, calls, probe, reference, lagged, stretch, fd_probe, noise_memory = curvature_of(
                oracle, p.f, params, p.grad, p.d, p.numerator, state.secant, dtype, noise)
            sharpness, eigen, used = sharpness_of(p, params, state.eigen, state.steps, state.stats, sharp, method,
                                                  base_state, name)
            relevant = sharpness[1] if method.preconditioned else sharpness[0]
            num = p.numerator
            if kind == "momentum":
                num = _momentum_numerator(p, method, base_state, base_state_before, name)
            elif kind == "paired":
                num = _paired_numerator(p, method, base_state, state.paired, name)
            lr, rule_state = apply_rule(
                rule, RuleInputs(num, curv, p.value, relevant, state.steps, lagged, stretch, unit), state.rule, jnp)
            if state.watch is not None:  # held once the mini-batch watch has fired
                lr = held_rate(state.watch, lr, unit, jnp)
            # closure-free secant without a secant: probe with h along a descent direction (else the rule's 0)
            probe, reference = (jnp.where(probes_along(p.numerator), x, jnp.nan) for x in (probe, reference))
            lr = jnp.where(jnp.isnan(probe), lr, probe)
            if oracle == "secant" and p.f is None:  # a concave start probes farther
                lr, reprobe = concave_reprobe(lr, p.numerator, curv, state.secant.last_probe, rule.lr_max, jnp)
                probe, reference = jnp.where(reprobe, lr, probe), jnp.where(reprobe, lr, reference)
            valid = traced_validity(rule)
            if valid is not None:  # an injected setting out of range: no step, the probing ones included
                lr = jnp.where(valid, lr, 0.0)
                probe, reference = (jnp.where(valid, x, jnp.nan) for x in (probe, reference))
            secant = state.secant
            if oracle == "secant":
                dominated = False if noise_memory is None else noise_dominated(noise_memory.averages)
                secant = secant_remember(state.secant, p.d, p.numerator, lr, probe, reference, state.steps, dtype,
                                         p.grad, unit, dominated)
            out, stats = finish(updates, p, lr, curvature=curv, sharpness=sharpness, calls=1 + calls + used,
                                method=method, old=state.stats)
            if oracle == "secant":
                secant = secant_watch_motion(secant, params, out, dtype)
            elif secant is not None:  # value_fn this step, maybe closure-free steps around it
                secant = secant_unwatched(secant, dtype)
            watch = state.watch
            if watch is not None:  # the secant's curvature is a step old: it predicts nothing
                watch = watch_minibatch(watch, p.value, lr, p.numerator, jnp.nan if oracle == "secant" else curv,
                                        float(jnp.finfo(dtype).eps), holds(rule), unit, jnp)
            return out, ScaleByCDATState(
                steps=state.steps + 1, ascent_steps=ascent_count(p, state.ascent_steps, state.steps, warn_ascent),
                rule=optax.tree.cast_like(rule_state, state.rule), secant=secant, eigen=eigen,
                paired=state.paired if state.paired is None else _predict(p, fd_probe, lr, state.paired),
                noise=state.noise if noise_memory is None else noise_memory,
                watch=optax.tree.cast_like(watch, state.watch), stats=stats,
                replay=state.replay if fd_probe is None or state.replay is None else replay_check(
                    state.replay, p.value, p.numerator, curv, fd_probe, state.steps, dtype),
                bound=bound_watched(state.bound, p, rule.loss_bound(jnp)),
                zero_rate=state.zero_rate if oracle == "secant" else zero_rate_watched(state.zero_rate, p, stats,
                                                                                        params))

        ok = p.finite
        closure_free = oracle == "secant" and p.f is None
        if closure_free:  # a gradient that was never computed is skipped
            ok = ok & has_gradient(abs_max(p.grad, dtype))
        return select(ok, taken(), skip(updates, state), leafwise_updates=closure_free)

    return transform(init, update)


cdat = convenience(scale_by_cdat, "cdat")
quadratic_greedy = convenience(scale_by_quadratic_greedy, "quadratic_greedy")
__all__ += ["cdat", "quadratic_greedy"]
