"""Learning-rate rules: the math of every tuner, written once, as formulas and as rule values.

**Formulas** take scalars (Python floats, 0-d ``torch.Tensor`` or 0-d ``jax.Array``) and the array namespace
``xp`` of those scalars (``torch`` or ``jax.numpy``). Only ``xp.where``, ``xp.isfinite``, ``xp.sqrt`` and
arithmetic are used, so the same code runs eagerly in PyTorch (no host sync: results stay tensors) and traced
under ``jax.jit`` (no Python branching on values).

**Rule values** (:class:`CDATRule`, :class:`PolyakRule`, :class:`EdgeOfStabilityRule`, :class:`ArmijoRule`)
are frozen dataclasses holding a tuner's validated hyperparameters, with ``init(zero) -> state`` and
``update(inputs, state, xp) -> (lr, state)`` over a :class:`RuleInputs` record; their states are flat
NamedTuples of scalars. Backends call them through :func:`apply_rule`, which owns the guard every tuner
shares: a non-finite input the rule needs leaves the rule state unchanged and gives ``lr = 0`` for that step,
and the learning rate is never negative or non-finite. ``needs`` says which inputs a rule reads, so a
backend computes only those.

Notation: ``g`` the gradient, ``u`` the base optimizer's update at learning
rate 1 (sign included, so ``u = -g`` for gradient descent), ``H`` the Hessian; the step is ``w <- w + lr u``.

* ``numerator``  is ``-g^T u`` (positive for a descent direction);
* ``curvature``  is ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .config import SharpnessConfig
from .validation import (
    INT32_MAX,
    at_step,
    check_at_least,
    check_choice,
    check_finite,
    check_in_unit_interval,
    check_lower_bound,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_schedulable,
    traced_validity,
)

__all__ = [
    "RuleInputs",
    "apply_rule",
    "sigma_at",
    "CDATRule",
    "CDATState",
    "default_ema",
    "default_sigma",
    "default_numerator",
    "LAGGED_GROWTH",
    "default_lagged_growth",
    "above_edge_guard",
    "loss_bound_curvature",
    "loss_bound_step",
    "POLYAK_LR_MAX",
    "PolyakRule",
    "EdgeOfStabilityRule",
    "polyak_cap_warning",
    "default_armijo_c",
    "default_eos_sigma",
    "default_eos_free_steps",
    "capped_growth",
    "EdgeOfStabilityState",
    "ArmijoRule",
    "ArmijoSearchState",
    "NoState",
    "cdat_step",
    "NUMERATORS",
    "check_numerator",
    "momentum_numerator",
    "paired_numerator",
    "paired_prediction_weight",
    "polyak_lr",
    "edge_of_stability_lr",
    "armijo_decrease_error",
    "armijo_initial_lr",
    "finite_difference_step",
    "secant_curvature",
    "secant_stretch",
    "eos_ratio",
    "cap",
]


# ------------------------------------------------------------------------------------------------ formulas
def _pos(x: Any, xp: Any) -> Any:
    """max(x, 0) that keeps the dtype of ``x``."""
    return xp.where(x > 0, x, 0.0)


def cap(lr: Any, lr_max: Any, xp: Any) -> Any:
    """min(lr, lr_max); ``lr_max = inf`` leaves ``lr`` unchanged."""
    return xp.where(lr < lr_max, lr, lr_max)


def capped_growth(lr: Any, growth: Any, previous: Any, xp: Any) -> Any:
    """``lr`` at most ``growth`` times ``previous``, the rate the rule took last, once that was positive
    (``growth`` may be inf: no cap). The rate may always fall at once."""
    grown = previous > 0
    return xp.where(grown, cap(lr, growth * xp.where(grown, previous, 1.0), xp), lr)


def _safe_div(num: Any, den: Any, ok: Any, xp: Any) -> Any:
    """``num / den`` where ``ok``, 0 elsewhere, with no division by zero traced."""
    return xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)


def cdat_step(numerator: Any, curvature: Any, numerator_avg: Any, denominator_avg: Any, *, ema: Any,
              eps: Any, xp: Any) -> tuple[Any, Any]:
    """CDAT's moving averages (Roulet et al. 2024): ``n = max(-g^T u, 0)`` (an ascent direction contributes 0)
    and ``d = curvature + eps``, each averaged with factor ``ema`` from 0 (the paper passes ``|u^T H u|``: a
    negative curvature counts by its magnitude; :class:`CDATRule` says what its variants pass). Returns the
    new ``(numerator_avg, denominator_avg)``; the rate is their ratio times sigma."""
    n = _pos(numerator, xp)
    d = curvature + eps
    return ema * numerator_avg + (1 - ema) * n, ema * denominator_avg + (1 - ema) * d


#: CDAT's numerator: ``"direction"`` (``-g^T u``, the paper's), ``"momentum"`` (:func:`momentum_numerator`, Adam)
#: or ``"paired"`` (:func:`paired_numerator`, Adam, fd curvature)
NUMERATORS = ("direction", "momentum", "paired")


def check_numerator(numerator: str, method: Any, base: str, curvature: str = "auto") -> str:
    """``numerator`` validated against the base (a :class:`curvopt.base.BaseMethod`, or None when unknown) and
    the curvature oracle the steps can use (``curvature``, a :data:`curvopt.config.CURVATURE_ORACLES` setting):
    one of :data:`NUMERATORS`; ``"momentum"`` and ``"paired"`` only behind Adam (they read Adam's state), and
    ``"paired"`` only with the ``"fd"`` oracle (or ``"auto"``, fd wherever the loss is known): its prediction is
    the previous step's fd probe gradient, which the secant and the exact oracle do not evaluate. ``base``
    names the base in the error."""
    check_choice("numerator", numerator, NUMERATORS)
    if numerator in ("momentum", "paired") and (method is None or method.kind != "adam"):
        raise ValueError(f"numerator={numerator!r} needs an Adam base (its first moment), got {base}")
    if numerator == "paired" and curvature not in ("fd", "auto"):
        raise ValueError(f"numerator='paired' needs the fd curvature oracle (curvature=\"fd\" or \"auto\" with "
                         f"the loss: a closure with probes, value_fn): it predicts the previous batch's gradient "
                         f"from the previous step's fd probe; got curvature={curvature!r}")
    return numerator


def momentum_numerator(numerator: Any, self_term: Any, momentum_term: Any, *, beta1: float, step: Any,
                       xp: Any) -> Any:
    """CDAT's numerator behind Adam without the batch's correlation with itself (``numerator="momentum"``).

    Adam's direction (learning rate ``lr_g``) is ``u = -D m_t`` (plus decoupled weight decay) with
    ``D = lr_g P^-1`` (:func:`curvopt.preconditioner.adam_preconditioner`) and ``m_t = b1 m_{t-1} + (1 - b1) g``,
    so ``-g^T u`` holds ``(1 - b1) g^T D g``. With a mini-batch gradient ``g = G + xi`` that term's mean carries
    ``(1 - b1) E[xi^T D xi]``: a positive slope that is noise, does not shrink as the signal ``G`` does, and
    on the default suite's mini-batch LM is most of ``-g^T u`` (docs/minibatch_study.md, section 8). This
    numerator is ``-g^T u`` with the batch's gradient inside ``m_t`` replaced by the bias-corrected previous
    momentum ``m_{t-1} / (1 - b1^(t-1))``, which does not share the batch's noise::

        n = -g^T u + (1 - b1) (g^T D m_{t-1} / (1 - b1^(t-1)) - g^T D g)

    from ``self_term = g^T D g`` (``g`` on the right: the gradient Adam averaged, with L2 weight decay
    included) and ``momentum_term = g^T D m_t`` (``m_t`` Adam's raw first moment after its update;
    ``g^T D m_{t-1} = (momentum_term - (1 - b1) self_term) / b1``). ``step`` is Adam's count after the update
    (``t``); on the first step (``m_0 = 0``: nothing is known before the batch) and for ``b1 = 0`` the
    numerator is ``-g^T u`` unchanged. In full batch the previous momentum lags the gradient, and at the edge of
    stability (a gradient that flips sign along the sharp directions) ``g^T D m_{t-1}`` is far below
    ``g^T D g``: the rate is lower than with ``-g^T u`` (measured 10x on the full-batch LM, whose loss is flat in
    the rate).
    """
    if beta1 == 0:
        return numerator
    previous = (momentum_term - (1 - beta1) * self_term) / beta1
    has = step > 1
    correction = (1 - beta1) * (_safe_div(previous, 1 - beta1 ** (step - 1), has, xp) - self_term)
    return xp.where(has, numerator + correction, numerator)


def paired_numerator(numerator: Any, noise_term: Any, *, beta1: float, has: Any, xp: Any) -> Any:
    """CDAT's numerator behind Adam without the mean of the batch noise (``numerator="paired"``).

    As in :func:`momentum_numerator`, ``-g^T u`` (``u = -D m_t``, ``m_t = b1 m_{t-1} + (1 - b1) g_t``, ``D``
    Adam's diagonal ``lr_g P^-1``) holds ``(1 - b1) g_t^T D g_t``, whose mean over batches carries
    ``(1 - b1) E[xi^T D xi]`` of the batch noise ``xi``. This numerator subtracts that second moment, measured
    between two batches at one point::

        n = -g_t^T u_t - (1 - b1) r^T D r / 2,   r = g_t - ghat_{t-1}

    with ``noise_term = r^T D r`` (``D`` after Adam's update of step ``t``) and ``ghat_{t-1}`` the previous
    batch's gradient predicted at ``w_t`` to first order, ``g_{t-1} + lr_{t-1} H_{t-1} u_{t-1}``, from the
    previous step's fd probe (``H_{t-1} u_{t-1} ~ (g_{t-1}(w_{t-1} + h u_{t-1}) - g_{t-1}) / h``). In mini-batch
    ``r`` is the difference of two batches' noise at one point (``E[r^T D r] = 2 E[xi^T D xi]``); in full batch
    it is only the drift's second-order residual (the change of the curvature over the step and the fd error):
    zero on a quadratic, but not small over a step at the edge of stability on a network (measured: the
    full-batch LM's rate 5x lower, its loss unchanged; docs/minibatch_study.md, section 8).
    ``has``: a prediction exists (the previous step took ``lr > 0`` after an fd probe); without one the
    numerator is ``-g^T u`` unchanged. A non-finite ``noise_term`` where ``has`` gives a non-finite numerator,
    which :func:`apply_rule`'s guard turns into ``lr = 0`` with the rule state unchanged.
    """
    return xp.where(has, numerator - (1 - beta1) / 2 * noise_term, numerator)


def paired_prediction_weight(lr: Any, h: Any, xp: Any) -> Any:
    """The weight of :func:`paired_numerator`'s prediction ``ghat = g + weight (g_probe - g)``: this batch's
    gradient moved to the next point to first order, the step ``lr u`` over the fd probe's ``h u``, so
    ``weight = lr / h``. 0, meaning no prediction, without a probe step (``h <= 0``) or a step (``lr <= 0``)."""
    ok = (h > 0) & (lr > 0)
    return xp.where(ok, lr / xp.where(ok, h, 1), 0)


def polyak_lr(value: Any, numerator: Any, *, f_star: Any, lr_max: Any, xp: Any) -> Any:
    """Polyak step ``min((f - f*) / (-g^T u), lr_max)``; 0 when ``f <= f*`` or ``-g^T u <= 0``.

    With ``u = -g`` the denominator is ``||g||^2``, the classical form; for a preconditioned base it is
    ``g^T P^{-1} g``.
    """
    return cap(_safe_div(_pos(value - f_star, xp), numerator, numerator > 0, xp), lr_max, xp)


def edge_of_stability_lr(sharpness: Any, previous_lr: Any, *, sigma: Any, coefficient: float, lr_max: Any,
                         xp: Any) -> Any:
    """``sigma * c / sharpness`` with ``c`` the base method's stability coefficient (see ``thresholds``).

    ``sigma = 1`` sits exactly on the edge of stability (lr * sharpness = c). A non-positive or non-finite
    sharpness estimate keeps ``previous_lr``. Capped at ``lr_max``.
    """
    ok = (sharpness > 0) & xp.isfinite(sharpness)
    lr = xp.where(ok, sigma * coefficient / xp.where(ok, sharpness, 1.0), previous_lr)
    return cap(lr, lr_max, xp)


def armijo_decrease_error(new_value: Any, value: Any, lr: Any, slope: Any, *, c: Any, delta: Any,
                          xp: Any) -> Any:
    """How far ``f(w + lr u)`` is above the delta-relaxed Armijo bound; 0 means accepted.

    Bound: ``f(w + lr u) <= f(w) + delta |f(w)| + c lr g^T u`` with ``slope = g^T u``: the paper's ``(1 + delta)
    f(w)`` where ``f >= 0``, and a slack, never a stricter test, where the loss is negative (a log-likelihood:
    ``(1 + delta) f`` asked each step to cut ``delta |f|`` off the loss, and the search stalled at rate 0). The
    same criterion for ``f >= 0``, and the same NaN handling (a NaN trial counts as infinitely bad), as
    ``optax.scale_by_backtracking_linesearch``, whose ``rtol`` is ``delta`` and ``slope_rtol`` is ``c``.
    """
    err = new_value - value - delta * xp.where(value < 0, -value, value) - lr * c * slope
    err = xp.where(err != err, float("inf"), err)
    return _pos(err, xp)


def armijo_initial_lr(previous_lr: Any, *, increase_factor: Any, lr_max: Any, init_lr: Any, xp: Any) -> Any:
    """The first trial of a backtracking search: ``min(increase_factor * previous_lr, lr_max)`` after an
    accepted rate ``previous_lr``, ``min(-previous_lr, lr_max)`` where ``previous_lr`` is negative (a failed
    search's next trial, stored negated: :class:`ArmijoSearchState`), or ``min(init_lr, lr_max)`` when that is
    not a finite positive number (``increase_factor = inf`` with ``lr_max = inf``; an ``lr_max`` that is 0 in
    the working precision, where ``init_lr`` alone stepped at 0.41 past a cap of 1e-50 in float32)."""
    resume = previous_lr < 0
    first = cap(xp.where(resume, -previous_lr, increase_factor * xp.where(resume, 1.0, previous_lr)), lr_max, xp)
    return xp.where(xp.isfinite(first) & (first > 0), first, cap(init_lr, lr_max, xp))


def moved_entries(w: Any, u: Any, xp: Any) -> Any:
    """``w`` where the direction ``u`` moves it, 0 elsewhere: the parameters whose norm sizes a finite-difference
    displacement along ``u`` (:func:`finite_difference_step`'s ``moved_norm``). A frozen part (a param group at
    lr 0, a zero gradient, ``optax.set_to_zero`` inside the base) does not move and does not count: a frozen tensor
    of norm 1e5 beside a trained one of norm 1.3 made the closure-free probing step, a real step, 7.5e4x longer
    (loss 0.54 -> 300), in a field test."""
    return xp.where(u != 0, w, 0)


def finite_difference_step(param_norm: Any, direction_norm: Any, *, dtype_eps: float, xp: Any,
                           moved_norm: Any = None) -> Any:
    """Step ``h`` for the forward difference ``u^T H u ~ (g(w + h u) - g(w))^T u / h``.

    The displacement is ``h ||u|| = sqrt(eps) ||w||``: relative to the parameters' own scale (1e-6 or 1e6: no
    absolute floor), which balances the rounding error of forming ``w + h u`` against the truncation error of the
    difference. Both are about ``sqrt(eps)`` relative (1.5e-8 in float64, 3.5e-4 in float32) where the curvature
    changes over a distance of about ``||w||``; the truncation error is the displacement times the curvature's
    relative rate of change, so a loss whose curvature changes faster reads worse (a field test, tanh MLP at
    ``||w|| ~ 59``, float64: 1e-8 to 5.6e-6 relative against the dense Hessian; a central difference at the same
    ``h``: 2.4e-8, at twice the gradients). ``||w||`` is ``moved_norm``, the norm over the entries ``u`` moves
    (:func:`moved_entries`), where it is given and positive, else ``param_norm``, the whole parameters' (the part
    that moves may start at 0: a LoRA adapter's zero-initialised ``B``, whose probe the rest of the model sizes as
    before); where both are 0 the scale is ``||u||`` (``h = sqrt(eps)``). Returns 0 when ``u = 0``.
    """
    ok = direction_norm > 0
    if moved_norm is not None:
        param_norm = xp.where(moved_norm > 0, moved_norm, param_norm)
    scale = xp.where(param_norm > 0, param_norm, direction_norm)
    return _safe_div(dtype_eps ** 0.5 * scale, direction_norm, ok, xp)


def secant_curvature(new_grad_dot_prev_u: Any, prev_grad_dot_prev_u: Any, prev_lr: Any, prev_u_sq: Any,
                     u_sq: Any, xp: Any) -> Any:
    """Curvature along the current direction from the previous step's secant (no extra gradient).

    The previous step moved ``w`` by ``prev_lr * u_prev``; the change of the gradient along ``u_prev`` gives
    ``u_prev^T H u_prev ~ (g_new - g_prev)^T u_prev / prev_lr`` (exact on a quadratic). The approximation is
    that the Rayleigh quotient along the new direction equals the one along the previous direction, so the
    result is rescaled by ``||u||^2 / ||u_prev||^2``. Lagged by one step. When no step was taken
    (``prev_lr = 0`` or ``u_prev = 0``) there is no secant: the result is NaN, which the guard of
    :func:`apply_rule` turns into "no step from this estimate" and backends replace by their fallback.
    """
    ok = (prev_lr > 0) & (prev_u_sq > 0)
    rayleigh = _safe_div(new_grad_dot_prev_u - prev_grad_dot_prev_u, prev_lr * prev_u_sq, ok, xp)
    return xp.where(ok, rayleigh * u_sq, float("nan"))


def secant_stretch(prev_u_sq: Any, u_sq: Any, xp: Any) -> Any:
    """``||u||^2 / ||u_prev||^2``, the secant's rescaling from the previous direction to this one
    (:attr:`RuleInputs.stretch`); 1 when there was no previous direction (``u_prev = 0``: no secant either)."""
    ok = prev_u_sq > 0
    return xp.where(ok, u_sq / xp.where(ok, prev_u_sq, 1.0), 1.0)


def eos_ratio(lr: Any, sharpness: Any, coefficient: float) -> Any:
    """``lr * sharpness / c``: 1 means exactly on the edge of stability, above 1 unstable on a quadratic."""
    return lr * sharpness / coefficient


# ------------------------------------------------------------------------------------------------ rules
class RuleInputs(NamedTuple):
    """What a rule sees each step (0-d arrays of the accumulator dtype; NaN where not computed).

    ``numerator = -g^T u``; ``curvature = u^T H u`` (rules that need it); ``value = f(w)`` (NaN when the
    backend does not have it, e.g. PyTorch's closure-free step); ``sharpness``: the latest estimate of the
    sharpness the base's stability threshold refers to (``lambda_max(P^-1 H)`` for Adam); ``count``: the
    number of steps taken before this one (for schedules); ``lagged``: the curvature is the secant's, measured
    over the previous step (``False``, a Python bool, when it is the current point's; may be a boolean array when
    the choice is made at run time); ``stretch``: on a lagged step, ``||u||^2 / ||u_prev||^2`` (the secant's
    rescaling from the previous direction to this one, :func:`secant_stretch`; read only where ``lagged``);
    ``unit``: the scale of this step's direction that the rule's rate undoes but its averages must follow (a
    clip's factor behind gradient descent, :func:`curvopt.base.direction_unit`; 1 behind other bases, NaN where
    not known); CDAT carries its averages from the last step's unit into this one's (:meth:`CDATRule.carry`).
    ``sigma``: the rule's ``sigma`` at this step, a schedule evaluated once by :func:`apply_rule` (None: the rule
    evaluates it, :func:`sigma_at`).
    """

    numerator: Any
    curvature: Any
    value: Any
    sharpness: Any
    count: Any
    lagged: Any = False
    stretch: Any = 1.0
    unit: Any = 1.0
    sigma: Any = None


def sigma_at(rule: Any, x: RuleInputs) -> Any:
    """``rule.sigma`` at this step: ``x.sigma`` where :func:`apply_rule` evaluated it, else the schedule's value at
    ``x.count`` (a user's schedule is called once a step)."""
    return at_step(rule.sigma, x.count, "sigma") if x.sigma is None else x.sigma


class NoState(NamedTuple):
    """The state of a stateless rule."""


def apply_rule(rule: Any, inputs: RuleInputs, state: Any, xp: Any) -> tuple[Any, Any]:
    """One guarded step of ``rule``: ``(lr, new state)``.

    The guard (every tuner, both backends): if the numerator or an input the rule ``needs`` (curvature,
    value) is not finite, or the rule's learning rate comes out non-finite, the step's learning rate is 0 and
    the rule state is left as it was (a NaN curvature probe is forgotten, not averaged in); so too where the
    rule's ``sigma`` at this step (a schedule's value, or one injected by ``optax.inject_hyperparams``) is not
    finite, or a setting injected as a traced value is out of the range its check accepts
    (:func:`curvopt.validation.traced_validity`: an ``ema`` of NaN written into ``state.hyperparams`` mid-run
    made the averages NaN for good). A negative learning rate (e.g. a schedule of ``sigma`` that crosses 0) is
    clipped to 0. A state field
    that is None (one added after the state was saved) stays None.
    """
    ok = xp.isfinite(inputs.numerator)
    valid = traced_validity(rule)
    if valid is not None:
        ok = ok & valid
    for name in ("curvature", "value"):
        if name in rule.needs:
            ok = ok & xp.isfinite(getattr(inputs, name))
    if getattr(rule, "sigma", None) is not None:
        inputs = inputs._replace(sigma=sigma_at(rule, inputs))
        ok = ok & xp.isfinite(inputs.sigma)
    lr, new = rule.update(inputs, state, xp)
    ok = ok & xp.isfinite(lr)
    lr = xp.where(ok & (lr > 0), lr, 0.0)
    kept = type(state)(*(o if o is None else xp.where(ok, n, o) for n, o in zip(new, state)))
    return lr, kept


class CDATState(NamedTuple):
    """CDAT's moving averages of ``n`` and ``d``, the averages' weight ``1 - ema^t`` (``t`` = updates), the
    last learning rate the rule gave (the growth cap's reference), the above-edge guard's memory
    (:func:`above_edge_guard`): the moving average of the loss's gap to ``f_star``, its weight, and the
    lowest bias-corrected value of that average (``inf`` before the first known loss), the unit the averages
    and the rate are in (:attr:`RuleInputs.unit`; 0, not known, at the start and in a state saved before it
    existed: the first step's unit is taken as it is), and the guard's lagged lowest gap and the first average
    (``inf`` before the first known loss; None in an Optax state saved before they existed, which keeps the
    guard as it was then; a PyTorch state saved before them loads them as ``inf``, to the same effect)."""

    numerator_avg: Any
    denominator_avg: Any
    avg_weight: Any
    cdat_lr: Any
    gap_avg: Any
    gap_weight: Any
    gap_min: Any
    unit: Any
    gap_lagged: Any = None
    gap_first: Any = None


#: the fields of :class:`CDATState` added after curvopt 0.1 (the above-edge guard's memory, the averages' unit) and
#: the values they start from (a state saved before them is completed with them)
ADDED_START = {"gap_avg": 0.0, "gap_weight": 0.0, "gap_min": math.inf, "unit": 0.0, "gap_lagged": math.inf,
               "gap_first": math.inf}

STARTUPS = ("robust", "paper")

#: CDAT's default ``ema`` for a preconditioned base (Adam) and for a base the core does not know
EMA_PRECONDITIONED = 0.99
#: CDAT's default ``ema`` for gradient descent, heavy ball and Nesterov (see :class:`CDATRule`)
EMA_UNPRECONDITIONED = 0.9


#: the quadratic model's edge: ``sigma = 2`` is the largest rate with ``q(lr) <= f`` along the direction
SIGMA_EDGE = 2.0
#: CDAT's default ``sigma`` for plain gradient descent (GD/SGD without momentum) with ``startup="robust"``:
#: twice the edge, held in check by the above-edge guard (:class:`CDATRule`)
SIGMA_ABOVE_EDGE = 4.0


def default_numerator(method: Any, numerator: str | None = None, startup: str = "robust",
                      has_moments: bool = True) -> str:
    """CDAT's numerator: ``numerator`` when given, else ``"momentum"`` (:func:`momentum_numerator`) behind Adam
    (``method.kind == "adam"``) with the robust start-up when the tuner sees Adam's moments (``has_moments``:
    always in PyTorch; in Optax when the base's state is handed over, as the conveniences do), and
    ``"direction"`` (``-g^T u``, the paper's) otherwise (:class:`CDATRule` gives the measurements)."""
    if numerator is not None:
        return numerator
    if startup == "robust" and has_moments and method is not None and method.kind == "adam":
        return "momentum"
    return "direction"


def default_sigma(method: Any, sigma: Any = None, startup: str = "robust", numerator: str = "direction") -> Any:
    """CDAT's ``sigma``: ``sigma`` when given, else :data:`SIGMA_ABOVE_EDGE` (4, guarded) with the robust
    start-up for plain gradient descent (``method.kind == "gd"``) and for Adam with the momentum numerator
    (``numerator``, from :func:`default_numerator`), and :data:`SIGMA_EDGE` (2) for every other base (heavy
    ball, Nesterov, Adam with another numerator, a base the core does not know: ``method=None``) and for
    ``startup="paper"`` (:class:`CDATRule` gives the measurements behind the split)."""
    if sigma is not None:
        return sigma
    if startup == "robust" and method is not None and (
            method.kind == "gd" or (method.kind == "adam" and numerator == "momentum")):
        return SIGMA_ABOVE_EDGE
    return SIGMA_EDGE


#: the secant steps' length cap (:class:`CDATRule`'s ``lagged_growth``) behind gradient descent, heavy ball,
#: Nesterov, a base the core does not know, and under ``startup="paper"``
LAGGED_GROWTH = 1.1


def default_lagged_growth(method: Any, lagged_growth: float | None = None, startup: str = "robust",
                          growth: float = 2.0) -> float:
    """CDAT's cap on a secant step's length over the previous step's (:class:`CDATRule`, item 3):
    ``lagged_growth`` when given, else the rate's own ``growth`` cap behind Adam (``method.kind == "adam"``) with
    the robust start-up, and :data:`LAGGED_GROWTH` (1.1) otherwise.

    The tight cap is for the failure it was measured on: behind SGD and heavy ball a benign step lands where the
    curvature is far higher and ``||u|| = ||g||`` jumps (the full-batch ResNet died without it). Adam's direction
    does not jump with the gradient's norm, and its start-up is already ramped (``1 - ema^t``) and capped by
    ``growth``; there 1.1 held the closure-free rate back for its first ~50 steps (a field test's GPT-2 behind
    AdamW: 1.9e-5 at step 1, 3.7e-3 at step 50). Measured closure-free behind Adam (seeds 0-2, final train loss,
    1.1 -> 2): the default suite's mini-batch LM 2.38 / 2.41 / 2.64 -> 2.29 / 2.30 / 2.51 (eval 2.07 / 2.06 / 2.33
    -> 1.98 / 1.98 / 2.17), full-batch LM 2.27 / 2.18 / 2.23 -> 2.24 / 2.17 / 2.26, full-batch ViT 1.5e-4 -
    1.9e-4 -> 1.4e-4 - 1.8e-4; two small MLPs in batches of 32 of 512 0.023-0.057 -> 0.017-0.037; a ReLU MLP
    regressing the diabetes targets, full batch, 0.0029-0.022 -> 0.0011-0.0062. Worse: the small MLPs on their
    full batch of 512 (2.2e-5-4.5e-5 -> 3.2e-5-4.8e-5 and 6.5e-7-1.3e-6 -> 4.9e-6-8.0e-6, the eval loss lower in
    both) and the digits MLP in batches of 128 (3.4e-4-6.3e-4 -> 4.9e-4-7.3e-4); docs/defaults.md. Under
    ``startup="paper"`` the cap stays 1.1: the greedy step behind Adam diverged without it."""
    if lagged_growth is not None:
        return lagged_growth
    if startup == "robust" and method is not None and method.kind == "adam":
        return growth
    return LAGGED_GROWTH


#: the above-edge guard's lag, in horizons ``1 / (1 - ema)`` of the rule's averages: the lowest gap is averaged
#: over that many horizons, and only after that many is a loss that stopped falling held to its recent progress
GUARD_LAG = 2.0
#: the share of its first value above which the lowest gap counts as not having fallen (:func:`above_edge_guard`)
GUARD_FALLEN = 0.5


def above_edge_guard(value: Any, f_star: Any, gap_avg: Any, gap_weight: Any, gap_min: Any, gap_lagged: Any = None,
                     gap_first: Any = None, *, guard: Any, ema: Any, xp: Any) -> tuple:
    """The loss watch that lets CDAT's ``sigma`` exceed the edge 2 only while the loss is not rising.

    The gap ``f - f_star`` is averaged with factor ``ema`` (bias-corrected by its weight; a step whose
    loss is unknown, NaN, or below ``f_star``, which is then not the loss's lower bound, leaves the average as
    it was), and the lowest value of that average is kept. The verdict: the average at most ``guard`` times
    its lowest value. That alone cannot see a loss whose minimum sits far above ``f_star`` (distillation to soft
    targets, whose cross-entropy ends at their entropy): the gap is mostly that offset and the loss can climb back
    a long way inside ``guard`` times it. So the lowest gap is also averaged over :data:`GUARD_LAG` horizons
    (``gap_lagged``; ``gap_lagged - gap_min`` is the recent progress, which no offset changes), and while the
    lowest gap has not fallen to :data:`GUARD_FALLEN` of the first average (``gap_first``) after those horizons,
    the average's rise over its lowest value must moreover stay within ``guard - 1`` times that progress.
    Returns ``(allowed, seen, gap_avg, gap_weight, gap_min, gap_lagged, gap_first)``: ``seen`` is true once a loss
    has been known, ``allowed`` while moreover the verdict holds. Without ``gap_lagged`` (a state saved before it,
    None) the verdict is the first alone and the two stay None."""
    gap = value - f_star
    known = xp.isfinite(gap) & (gap >= 0)
    first = known & (gap_weight == 0)
    gap_avg = xp.where(known, ema * gap_avg + (1 - ema) * xp.where(known, gap, 0.0), gap_avg)
    gap_weight = xp.where(known, ema * gap_weight + (1 - ema), gap_weight)
    seen = gap_weight > 0
    mean = _safe_div(gap_avg, gap_weight, seen, xp)
    gap_min = xp.where(seen & (mean < gap_min), mean, gap_min)
    allowed = seen & (mean <= guard * gap_min)
    if gap_lagged is None:
        return allowed, seen, gap_avg, gap_weight, gap_min, None, None
    slow = 1 - (1 - ema) / GUARD_LAG
    gap_lagged = xp.where(first, gap_min, xp.where(known, slow * gap_lagged + (1 - slow) * gap_min, gap_lagged))
    gap_first = xp.where(first, mean, gap_first)
    stalled = (gap_min > GUARD_FALLEN * gap_first) & (gap_weight >= 1 - ema ** (GUARD_LAG / (1 - ema)))
    low = xp.where(seen, gap_min, 0.0)  # (no inf - inf before the first loss)
    rise = _safe_div(mean - low, guard - 1, guard > 1, xp)  # per unit of tolerance (guard 1 or inf: first verdict)
    allowed = allowed & ~(stalled & (rise > gap_lagged - low))
    return allowed, seen, gap_avg, gap_weight, gap_min, gap_lagged, gap_first


def default_ema(method: Any, ema: float | None = None) -> float:
    """CDAT's averaging factor: ``ema`` when given, else the default for the base ``method`` (a
    :class:`curvopt.base.BaseMethod`, or None for a base outside the ones the core knows):
    :data:`EMA_PRECONDITIONED` for Adam and unknown bases, :data:`EMA_UNPRECONDITIONED` for gradient descent,
    heavy ball and Nesterov (:class:`CDATRule` gives the measurements behind the split)."""
    if ema is not None:
        return ema
    if method is None or method.preconditioned:
        return EMA_PRECONDITIONED
    return EMA_UNPRECONDITIONED


def loss_bound_curvature(numerator: Any, value: Any, f_star: Any, xp: Any) -> Any:
    """The smallest curvature consistent with the loss bound ``f >= f_star``: ``n^2 / (2 (f - f_star))``.

    The quadratic model ``q(lr) = f - lr n + lr^2 c / 2`` has its minimum ``f - n^2 / (2 c)``; a curvature below
    this one puts that minimum under ``f_star``, which the loss cannot reach, so it carries no step-size
    information beyond the bound. 0 when the value is unknown (NaN) or not above ``f_star``.
    """
    n = _pos(numerator, xp)
    gap = value - f_star
    known = xp.isfinite(gap) & (gap > 0)
    # (n / sqrt(2 gap))^2, not n^2 / 2 gap: in float32 n^2 overflows from n ~ 1.8e19 (a gradient norm ~ 4e9), and
    # the inf curvature stopped CDAT for good where the curvature itself was finite (a field test); the square
    # overflows only where the curvature does
    root = _safe_div(n, xp.sqrt(xp.where(known, 2 * gap, 1.0)), known, xp)
    return root * root


def loss_bound_step(numerator: Any, value: Any, f_star: Any, xp: Any) -> Any:
    """``2 (f - f_star) / n``: the minimiser of the flattest quadratic model along ``u`` consistent with the loss
    bound (its curvature is :func:`loss_bound_curvature`), so twice the Polyak step. ``inf`` when the value is
    unknown (NaN), not above ``f_star``, or ``n <= 0``: no bound."""
    gap = value - f_star
    known = xp.isfinite(gap) & (gap > 0) & (numerator > 0)
    return xp.where(known, _safe_div(2 * gap, numerator, known, xp), math.inf)


@dataclass(frozen=True)
class CDATRule:
    """CDAT (Curvature Dynamics Aware Tuning, Roulet et al. 2024): ``lr = sigma * avg(n) / avg(d)`` with
    ``n = max(-g^T u, 0)`` and ``d`` the curvature ``u^T H u`` (:func:`cdat_step`). ``sigma = 1, ema = 0`` is
    the quadratically greedy step (:meth:`greedy`); ``sigma = 2`` the step "on edge" (the largest lr with
    ``q(lr) <= f``). ``sigma`` may be a schedule ``step -> sigma``.

    ``startup="paper"`` is the paper's rule exactly: ``d = |u^T H u| + eps``, both averages start at 0
    without bias correction (the correction would cancel in the ratio, so step 1 is ``sigma n_1 / d_1``), no
    other guard where the curvature is the current point's, as in the paper. Where the denominator's average is
    exactly 0 (``eps = 0``, the greedy step's, on a flat model: a piecewise-linear loss) along a descent direction,
    the model's minimiser lies beyond every step: the rate is ``lr_max`` (without one, inf: the guard's 0, and
    the step is left out of the averages); also where the curvature is 0 only by rounding. On a step whose curvature
    is the secant's (closure-free, ``RuleInputs.lagged``), which the paper did not use, the step's length is capped
    as in 3 below (``lagged_growth``): the quadratically greedy step closure-free behind Adam diverged without it
    (digits MLP, full batch, seeds 0-2: loss 2.3 -> 2e4-2e6; with a closure 0-4e-8; a rate cap of 2x per step
    instead still lost one seed). Its price: after a step far too short (a secant spoiled by other parameters'
    moves, as in ``optax.multi_transform``) the rate recovers by 1.1x per step. The paper used ``ema`` in {0, 0.9,
    0.99}.

    ``startup="robust"`` (default) keeps the rule and adds what the first, least informative directions need
    (Adam's sign-like first update can have a tiny or negative curvature, which the paper's ``|c|`` turns into
    a rate 100x the best constant):

    1. a **loss-bound floor** ``d = max(c, n^2 / (2 (f - f_star))) + eps`` (:func:`loss_bound_curvature`): a
       curvature that would put the model's minimum below the loss's lower bound ``f_star`` (0 for
       cross-entropy and squared errors) is replaced by the smallest one consistent with it; so the step is
       at most ``sigma`` times the one that would reach ``f_star`` (a Polyak bound that follows from the
       model). Inactive when the loss is unknown (PyTorch's closure-free step) or ``f_star = -inf``; a
       negative ``c`` then contributes 0;
    2. a **ramp** by the averages' weight ``1 - ema^t``: the numerator's average is not bias-corrected but the
       denominator's is, so a step is trusted in proportion to the evidence the averages hold;
    3. a **growth cap** ``lr_t <= growth * lr_{t-1}`` (from the second step with a positive rate): one
       spuriously small curvature cannot multiply the rate by 100. On a step whose curvature is the secant's
       (``RuleInputs.lagged``) the cap is on the step's length instead, ``lr_t ||u_t|| <= lagged_growth
       lr_{t-1} ||u_{t-1}||`` (``||u_t|| / ||u_{t-1}||`` from ``RuleInputs.stretch``; ``lagged_growth`` 1.1, the
       tuners' default behind Adam ``growth``: :func:`default_lagged_growth`), as well as ``growth``: the
       secant measured the curvature over the segment the previous step travelled and vouches for nothing beyond
       it. Behind SGD on networks the failure it stops is a benign step landing where the curvature is far
       higher: the gradient, hence ``||u||``, jumps, the secant (measured over the benign step) cannot see it, and
       the rate it keeps sends the next step ``||u_t|| / ||u_{t-1}||`` times farther into the sharp region, where
       the ReLUs die. Measured on the full-batch ResNet (width 4, seeds 0-2, 500 steps, final train loss):
       heavy ball closure-free died on 3 of 3 seeds without it and trains with it to 1e-8-4e-8 (fd ~1e-8);
       plain GD closure-free died on 2 of 3 and trains to 0.022-0.029 (fd 0.006-0.025 then, 0.0012-0.0026
       since the loss-bound cap); a cap of 1.25 instead of 1.1 still lost one heavy-ball seed, a rate (not
       length) cap of 1.1 lost all three;
    4. an **above-edge guard** for ``sigma > 2`` (:func:`above_edge_guard`): the loss's gap to ``f_star`` is
       averaged with the rule's ``ema``; while that average stays within ``guard`` (2) times its lowest value
       the rate is ``sigma`` times the quadratic step, once it has risen past that it is ``guard_sigma`` (1,
       the quadratic model's minimiser) times it until the average is back under ``guard`` times its minimum,
       and while no loss is known (PyTorch's closure-free step) it is the rate on the edge (``sigma = 2``).
       The same holds on steps whose curvature is the secant's (``RuleInputs.lagged``): measured over the
       previous step, it cannot see the current point's curvature grow, and above the edge the top mode grows
       by ``|1 - lr lambda|`` per step (measured: GD on the full-batch ResNet at width 4 with the secant and the
       loss known died on 3 of 3 seeds with ``sigma = 4``, trained on 3 of 3 on the edge).
       Where the loss's minimum sits far above ``f_star`` the gap is mostly that offset, and once its lowest value
       has not halved from the first after :data:`GUARD_LAG` horizons, the loss's rise is moreover held to its
       recent progress. Measured (distillation by cross-entropy to a teacher's softmax at temperature 4 on the
       digits, an MLP behind SGD, full batch, 300 steps, seeds 0-2; the targets' entropy H = 1.9923): the loss
       fell to H + 0.018 and climbed back to H + 0.198 (median and worst) without the progress rule, ends at
       H + 0.0011 (worst H + 0.0030) with it (a factor-2 grid's best constant: H + 0.0009); sum-reduced, H + 472
       (worst H + 635) against H + 2.0 (2.9). Its cost on the default suite (seeds 0-2, final train loss against
       the first verdict alone): full-batch ResNet width 2 1.87 / 1.00 / 1.21 and width 4 1.00 / 1.06 / 1.55 (eval
       loss 0.83-1.01 of it on every seed), mini-batch ResNet 1.00 / 1.29 / 0.79, width 8 and the Adam tasks
       unchanged (replayed on their losses, the progress rule refused no step the first verdict allowed).
       ``guard=inf`` turns it off; a ``sigma <= 2`` is never touched;
    5. a **loss-bound cap** for ``sigma > 2``, with the guard: ``lr <= loss_cap * w * 2 (f - f_star) / n`` with
       ``w = 1 - ema^t`` the ramp above, so at ``loss_cap = 1`` (default) the step is at most the minimiser of
       the flattest quadratic model consistent with the loss bound (:func:`loss_bound_step`), ramped like the
       rate. The averages say how curved the landscape was; the loss says how far down it can go from here, so
       a step that would need the loss to fall below ``f_star`` on the flattest model that fits the slope is cut
       back. It binds in the first steps (where the averages hold little evidence) and at the catapults of the
       edge of stability (the numerator jumps); inactive without a loss (PyTorch's closure-free step);
       ``loss_cap=inf`` turns it off. Measured (``make bench``, seeds 0-2, final train loss / the best constant
       of the same run, median (worst seed); docs/minibatch_study.md section 7, where it is variant A):
       full-batch ResNet 0.53 (0.81) / 0.11 (0.13) / 0.04 (0.12) at widths 2 / 4 / 8, against 0.77 (1.11) /
       0.27 (2.28) / 0.54 (0.78) without it, eval loss 0.80 / 0.31 / 0.13 against 0.60 / 0.30 / 0.14 (the
       constant's: 0.83 / 0.37 / 0.17); μP final-rate spread across widths 26 / 40 / 32 % (17 / 26 / 17 % with
       the study's wrapper, whose arithmetic differs in rounding only; without the cap: 132 / 345 / 100 %) and
       no start-up overshoot. The price is in mini-batch, where the batch's ``n = ||g_B||^2`` carries the
       gradient noise that does not fall with the loss, so the cap binds more and more: ResNet 0.85 (2.89,
       seed 0) against 0.58 (0.86);
    6. **until the averages hold a positive curvature**, a curvature that is not positive after the floor (no loss
       to floor it: PyTorch's closure-free step, the Optax update without ``value``, ``f_star = -inf``) says
       nothing about the step's size: the step's rate is 0 and the averages and their weight stay as they were,
       so the first positive curvature gives the rate it gives at a run's first step. Averaged in as 0, such steps
       grew the numerator's average alone, and the first positive rate, with no previous rate for the growth cap
       to refer to, was uncapped: closure-free on the benchmark's full-batch LM (width 8, seed 1) the first 78
       steps alternated between the probing step and a negative secant, then the rate was 181 (the best
       constant's is ~0.02) and the loss went from 5.9 to 3.7e5; now it trains (2.37, fd 2.21). Later the growth
       cap bounds what a run of such steps does to the rate, and they are averaged in as 0 (leaving them out there
       too made the closure-free mini-batch LM end 1-11 % higher on seeds 0-2).

    **Above the edge for plain gradient descent.** The tuners' default ``sigma`` depends on the base
    (:func:`default_sigma`; ``sigma=None`` in both backends): 4 for gradient descent / SGD without momentum
    with this start-up, 2 otherwise. On networks under GD a rate on the edge loses to a tuned constant: the
    sharpness adapts to the rate (edge of stability, ``lambda -> 2 / lr``) and the rule sets the rate from the
    sharpness, so every transient that raises the curvature (the early catapult) lowers the rate for good
    (full-batch ResNet: 1.8-7.3x the best constant's final loss, mini-batch 4.8x). Twice the edge breaks the
    loop: above the edge the network flattens its landscape (the sharpness falls back) and the rate climbs
    back. A problem that cannot flatten (a convex quadratic: the top mode grows by ``|1 - lr lambda| = 3``
    per step) shows a rising loss instead; the guard sees it within a few steps and takes greedy steps until
    the loss is back, so the guard alone converges there (faster than ``sigma = 2``, which on a quadratic leaves
    the top mode neutral and stalls), where ``sigma = 4`` with neither safeguard diverges; with the loss-bound
    cap (item 5) the loss does not rise in the first place and the guard has nothing to do. The guard steps in
    during the late loss spikes of the networks. Measured before the cap (docs/minibatch_study.md, section 5;
    final train loss / the best constant of the default suite, median of seeds 0-2, worst seed in brackets):
    full-batch ResNet 0.63 (0.80) / 0.66 (1.06) / 0.76 (0.81) at widths 2 / 4 / 8, against 1.8 / 7.3 / 7.2 for
    ``sigma = 2`` and 0.92 (2.70) unguarded at width 4 (widths 2 and 8 move to 0.77 (1.11) and 0.54 (0.78)
    with rounding-level changes elsewhere); mini-batch ResNet 0.72 (0.76) against 4.8 (38) for ``sigma = 2``
    and 0.90 (1.01) unguarded; eval loss below the constant's in every case. Heavy ball
    and Nesterov keep 2: measured, ``sigma = 4`` diverges with heavy ball.

    **Adam: above the edge with the momentum numerator.** Behind Adam ``-g^T u`` holds ``(1 - b1) g^T D g``, the
    batch's gradient correlated with itself through the first moment: in mini-batch mostly noise, which already
    holds the rate 4-13x above the best constant's on the mini-batch LM, so ``sigma = 4`` with that numerator
    loses on both LMs (docs/minibatch_study.md, section 6). The default behind Adam (:func:`default_numerator`) is the momentum numerator
    (:func:`momentum_numerator`, the batch's gradient inside the moment replaced by the previous momentum) with
    ``sigma = 4`` and the guard and cap below it. Measured on the default suite's Adam cells (final train loss /
    the best constant of the same task, width and seed; median over seeds 0-2, worst seed in brackets; paper
    numerator at ``sigma = 2`` against this default): mini-batch LM 1.14 (1.18) -> 1.01 (1.04); full-batch ViT
    2.31 (2.62) / 1.39 (1.44) / 1.37 (1.38) -> 2.06 (2.87) / 1.22 (1.28) / 0.85 (0.86) at widths 4 / 8 / 16 (over
    seeds 0-5: 2.02 / 1.42 / 1.37 -> 1.93 / 1.11 / 0.79, worst 5.99 / 2.49 / 1.42 -> 5.69 / 1.28 / 0.86);
    full-batch LM 1.00 / 0.99 / 1.00 -> 1.00 / 0.99 / 1.00 (flat in the rate). The momentum numerator at
    ``sigma = 2`` is lower still on the mini-batch LM (0.98) but 1.3-1.9x worse than this default on the ViT,
    where at the edge of stability the self term is a real slope (the previous momentum lags the gradient).

    The tuners' default ``ema`` depends on the base (:func:`default_ema`; both backends take ``ema=None`` to
    mean it): 0.99 for Adam (this value's own default), 0.9 for gradient descent, heavy ball and Nesterov. Why the base
    matters: the two averages weight each step by its own curvature (the rate is a harmonic mean of the
    per-step rates ``n_t / d_t`` weighted by ``n_t``), so one step whose curvature is ``k`` times the usual
    one holds the rate down for about ``log(k) / -log(ema)`` steps (``k = 100``: 460 steps at 0.99, 44 at
    0.9). Under gradient descent such spikes are the base's own oscillations at the edge of stability
    (catapults); with 0.99 they kept the rate at 0.45-0.8 of the edge ``2 n / c`` while the sharpness of the full-batch
    ResNet rose 1.5 -> 20-65 (progressive sharpening, which nothing opposes below the edge), and the rate ended 70x
    below its peak: 15.6x the best constant's final loss (median of 3 seeds), 3.1x with 0.9 against the same grid
    (7.3x against the default suite's, whose best constant ends 2x lower; that task's final loss moves 3-7x between
    constants 0.1% apart). Weighting the steps equally instead (a geometric mean of the rates, or each step's weight
    capped) fails earlier: on the initial plateau the curvature along the gradient is ~0 or negative and the
    unweighted rates grow until the ReLUs die. Under Adam the preconditioned curvature itself falls by orders of
    magnitude while the second moments fill in (~1e5 -> 600 over the first steps); there the longer horizon breaks
    the loop "lr falls -> the sharpness rises -> lr falls" seen with 0.9.
    """

    sigma: Any = SIGMA_EDGE
    ema: float = EMA_PRECONDITIONED
    eps: float = 0.0
    lr_max: float = math.inf
    startup: str = "robust"
    f_star: float = 0.0
    growth: float = 2.0
    guard: float = 2.0
    guard_sigma: float = 1.0
    lagged_growth: float = LAGGED_GROWTH
    loss_cap: float = 1.0

    needs: ClassVar[frozenset] = frozenset({"curvature"})
    #: online sharpness is off unless asked for
    default_sharpness: ClassVar[SharpnessConfig] = SharpnessConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_schedulable(check_positive, "sigma", self.sigma))
        object.__setattr__(self, "ema", check_in_unit_interval("ema", self.ema))
        object.__setattr__(self, "eps", check_nonnegative("eps", self.eps))
        object.__setattr__(self, "lr_max", check_positive("lr_max", self.lr_max, allow_inf=True))
        check_choice("startup", self.startup, STARTUPS)
        object.__setattr__(self, "f_star", check_lower_bound("f_star", self.f_star))
        object.__setattr__(self, "growth", check_at_least("growth", self.growth, 1.0))
        object.__setattr__(self, "guard", check_at_least("guard", self.guard, 1.0))
        object.__setattr__(self, "guard_sigma", check_positive("guard_sigma", self.guard_sigma))
        object.__setattr__(self, "lagged_growth", check_at_least("lagged_growth", self.lagged_growth, 1.0))
        object.__setattr__(self, "loss_cap", check_positive("loss_cap", self.loss_cap, allow_inf=True))

    @classmethod
    def greedy(cls, lr_max: float = math.inf) -> "CDATRule":
        """The quadratically greedy step ``-g^T u / |u^T H u|`` (the minimiser of the quadratic model; ``lr_max``
        where the curvature is exactly 0 along a descent direction)."""
        return cls(sigma=1.0, ema=0.0, eps=0.0, lr_max=lr_max, startup="paper")

    def loss_bound(self, xp: Any) -> Any:
        """The lower bound of the loss the rule leans on (``-inf``: none; :mod:`curvopt.bound_watch`): ``f_star``
        under the robust start-up; the paper's rule uses none."""
        return self.f_star if self.startup == "robust" else -math.inf

    def _lagged_reach(self, x: RuleInputs, growth: Any, xp: Any) -> Any:
        """The factor the rate may grow by on this step: ``growth``, and on a step whose curvature is the
        secant's (a segment-old measurement that vouches for that segment only) at most ``lagged_growth`` times
        the previous step's length, ``lagged_growth / sqrt(stretch)``."""
        reach = _safe_div(self.lagged_growth, xp.sqrt(x.stretch), x.stretch > 0, xp)
        return xp.where(x.lagged & (x.stretch > 0) & (reach < growth), reach, growth)

    def init(self, zero: Any) -> CDATState:
        """The state before the first step: empty averages (weight 0), no rate yet (0), the guard's memory empty
        and the unit not known (:data:`ADDED_START`); ``zero`` is a 0-d zero of the accumulator dtype, whose array
        type every field takes."""
        return CDATState(zero, zero, zero, zero, **{f: zero + v for f, v in ADDED_START.items()})

    @staticmethod
    def carry(state: CDATState, unit: Any, xp: Any) -> tuple[CDATState, Any]:
        """The state in the units of this step's direction (:attr:`RuleInputs.unit`) and the factor ``r`` it was
        carried by: this unit over the state's (1 where either is not a positive number; the state's unit becomes
        this one where this one is). ``n`` is linear in the direction, ``d`` quadratic and a rate inverse, so
        ``n_avg r``, ``d_avg r^2`` and ``lr / r``, with which unchanged averages take the last step's step along
        the rescaled direction. The rule is invariant to the scale of the direction on one step; this makes its
        averages so across steps."""
        known = (unit > 0) & xp.isfinite(unit)
        both = known & (state.unit > 0)
        ratio = xp.where(both, unit / xp.where(both, state.unit, 1.0), 1.0)
        return state._replace(numerator_avg=state.numerator_avg * ratio,
                              denominator_avg=state.denominator_avg * ratio ** 2, cdat_lr=state.cdat_lr / ratio,
                              unit=xp.where(known, unit, state.unit)), ratio

    def update(self, x: RuleInputs, state: CDATState, xp: Any) -> tuple[Any, CDATState]:
        """``(lr, new state)``: the averages carried into this step's unit and updated by :func:`cdat_step`,
        ``sigma`` times their ratio; under the robust start-up with the loss-bound curvature floor, the ramp, the
        growth cap and, above the edge, the loss watch and the loss-bound cap; at most ``lr_max``."""
        state, ratio = self.carry(state, x.unit, xp)
        x = x._replace(stretch=x.stretch / ratio ** 2)  # this step's length over the last one's, in the last's units
        sigma = sigma_at(self, x)
        guard = (state.gap_avg, state.gap_weight, state.gap_min, state.gap_lagged, state.gap_first)
        weight = self.ema * state.avg_weight + (1 - self.ema)
        if self.startup == "paper":
            curvature = abs(x.curvature)
        else:
            floor = loss_bound_curvature(x.numerator, x.value, self.f_star, xp)
            curvature = xp.where(x.curvature > floor, x.curvature, floor)
        num_avg, den_avg = cdat_step(x.numerator, curvature, state.numerator_avg, state.denominator_avg,
                                     ema=self.ema, eps=self.eps, xp=xp)
        if self.startup != "paper":  # before a positive curvature, one that says nothing is not averaged (rule 6)
            informative = (curvature > 0) | (state.denominator_avg > 0)
            num_avg = xp.where(informative, num_avg, state.numerator_avg)
            den_avg = xp.where(informative, den_avg, state.denominator_avg)
            weight = xp.where(informative, weight, state.avg_weight)
        if self.startup == "paper":
            # a flat model (d = 0, as along a piecewise-linear loss) along a descent direction: its minimiser lies
            # beyond every step, so the rate is lr_max's (inf without one: the guard's 0); at sigma 0 (a warm-up's
            # first step) it is 0
            flat = xp.where(num_avg * sigma > 0, math.inf, 0.0)
            lr = sigma * xp.where(den_avg > 0, _safe_div(num_avg, den_avg, den_avg > 0, xp), flat)
            if x.lagged is not False:  # the paper measured the current point's curvature, not a step-old secant
                lr = capped_growth(lr, self._lagged_reach(x, math.inf, xp), state.cdat_lr, xp)
        else:
            lr = sigma * _safe_div(num_avg * weight, den_avg, den_avg > 0, xp)
            # above the edge only while the loss is not rising (above_edge_guard) and the curvature is the current
            # point's: once the loss has risen, the rate at guard_sigma; while no loss is known (a closure-free
            # step) or the curvature is the secant's (a step old), the rate at the edge
            allowed, seen, *guard = above_edge_guard(x.value, self.f_star, *guard, guard=self.guard,
                                                     ema=self.ema, xp=xp)
            above = sigma > SIGMA_EDGE
            if above is not False:
                edge = lr * (SIGMA_EDGE / sigma)
                top = lr if x.lagged is False else xp.where(x.lagged, edge, lr)
                if not isinstance(above, bool):  # a schedule's traced or tensor value
                    allowed, top = allowed | ~above, xp.where(above, top, lr)
                lr = xp.where(allowed, top, xp.where(seen, lr * (self.guard_sigma / sigma), edge))
            growth = self.growth if x.lagged is False else self._lagged_reach(x, self.growth, xp)
            lr = capped_growth(lr, growth, state.cdat_lr, xp)
            if above is not False:  # above the edge, at most the flattest consistent model's minimiser (ramped)
                bounded = cap(lr, self.loss_cap * weight * loss_bound_step(x.numerator, x.value, self.f_star, xp), xp)
                lr = bounded if isinstance(above, bool) else xp.where(above, bounded, lr)
        lr = cap(lr, self.lr_max, xp)
        return lr, CDATState(num_avg, den_avg, weight, lr, *guard[:3], state.unit, *guard[3:])


#: the Polyak step's default cap (a rate of gradient descent)
POLYAK_LR_MAX = 1.0


@dataclass(frozen=True)
class PolyakRule:
    """Polyak's step ``min((f - f_star) / (-g^T u), lr_max)`` (:func:`polyak_lr`); ``lr_max=None`` is
    :data:`POLYAK_LR_MAX` (:func:`polyak_cap_warning` says where that default is not a rate)."""

    f_star: float = 0.0
    lr_max: float | None = None

    needs: ClassVar[frozenset] = frozenset({"value"})
    default_sharpness: ClassVar[SharpnessConfig] = SharpnessConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "f_star", check_finite("f_star", self.f_star))
        lr_max = POLYAK_LR_MAX if self.lr_max is None else self.lr_max
        object.__setattr__(self, "lr_max", check_positive("lr_max", lr_max, allow_inf=True))

    def loss_bound(self, xp: Any) -> Any:
        """The lower bound of the loss the rule leans on (:mod:`curvopt.bound_watch`): ``f_star``."""
        return self.f_star

    def init(self, zero: Any) -> NoState:
        """No state: the step depends on this step's inputs only."""
        return NoState()

    def update(self, x: RuleInputs, state: NoState, xp: Any) -> tuple[Any, NoState]:
        """``(lr, state)``: :func:`polyak_lr` of this step's loss and ``-g^T u``."""
        return polyak_lr(x.value, x.numerator, f_star=self.f_star, lr_max=self.lr_max, xp=xp), state


def polyak_cap_warning(method: Any, lr_max: Any) -> str | None:
    """The warning for a Polyak step behind a base other than plain gradient descent (``method.kind``; None, a
    base the core does not know, included) left at the default ``lr_max`` (``lr_max=None``), else None.

    ``(f - f_star) / (-g^T u)`` with ``f_star = 0`` is the step that would reach the loss's floor along ``u``:
    far longer than any stable rate until the loss is near 0, so ``lr_max`` sets the rate. Behind GD the default
    1 is a sensible rate; behind heavy ball or Adam it is not (a field test on a digits MLP: the rate at the cap
    on nearly every step, the loss at chance level, 4,500-490,000x the best constant)."""
    if lr_max is not None or (method is not None and method.kind == "gd"):
        return None
    base = "a base other than gradient descent" if method is None else method.kind.replace("_", " ")
    return (f"the Polyak step behind {base} with the default lr_max={POLYAK_LR_MAX:g}: until the loss nears "
            "f_star its rate (f - f_star) / (-g^T u) sits at lr_max, which is a learning rate of this base; pass "
            "lr_max= (in the base's units, e.g. its tuned constant learning rate)")


class EdgeOfStabilityState(NamedTuple):
    """The previous learning rate: kept while the sharpness estimate is not positive and finite, and the
    reference of the growth cap."""

    held_lr: Any


#: the edge-of-stability rule's default ``sigma`` (gradient descent, a base the core does not know)
SIGMA_EOS = 1.5
#: the edge-of-stability rule's default ``sigma`` behind heavy ball, Nesterov and Adam (see
#: :class:`EdgeOfStabilityRule`)
SIGMA_EOS_MOMENTUM = 0.25


def default_eos_sigma(method: Any, sigma: Any = None) -> Any:
    """The edge-of-stability rule's ``sigma``: ``sigma`` when given, else :data:`SIGMA_EOS_MOMENTUM` behind heavy
    ball, Nesterov and Adam (``method.kind``) and :data:`SIGMA_EOS` otherwise (:class:`EdgeOfStabilityRule` gives
    the measurements)."""
    if sigma is not None:
        return sigma
    if method is not None and method.kind in ("heavy_ball", "nesterov", "adam"):
        return SIGMA_EOS_MOMENTUM
    return SIGMA_EOS


def default_eos_free_steps(method: Any, every: Any, free_steps: Any = None) -> Any:
    """The edge-of-stability rule's ``free_steps``: ``free_steps`` when given, else ``every + 1`` behind a
    preconditioned base (Adam: ``method.preconditioned``), so that the growth cap is anchored at the rate of the
    second sharpness estimate (step ``every + 1``), and 0 (the cap from the second step) otherwise. ``every``: the
    sharpness period (:attr:`curvopt.config.SharpnessConfig.every`); behind a preconditioned base a period that
    is an array (injected by ``optax.inject_hyperparams``, traced under ``jit``) is a ValueError: it cannot be
    read, and the rule's default period in its place moved the rates 7-23x. :class:`EdgeOfStabilityRule` says
    why."""
    if free_steps is not None:
        return free_steps
    if method is None or not method.preconditioned:
        return 0
    if not isinstance(every, int) or isinstance(every, bool):
        raise ValueError("the edge-of-stability rule behind Adam anchors its growth cap at step sharpness + 1, so it "
                         "needs the sharpness period as a number: it was given as an array (optax.inject_hyperparams "
                         "injects an int sharpness=): pass static_args=('sharpness',) to inject_hyperparams, or "
                         "free_steps=")
    return min(every, INT32_MAX - 1) + 1 if every >= 1 else EdgeOfStabilityRule.default_sharpness.every + 1


@dataclass(frozen=True)
class EdgeOfStabilityRule:
    """``lr = sigma * c / sharpness`` (:func:`edge_of_stability_lr`), ``c`` the base's stability coefficient
    (:attr:`curvopt.base.BaseMethod.coefficient`) and the sharpness the online estimate (Adam: the
    preconditioned one), then at most ``growth`` times the previous rate (:func:`capped_growth`; the rate may
    fall at once). ``sigma * c = 3`` worked well for GD in the paper (``sigma = 1.5``). Between estimates the
    backends pass the last estimate, and the rate is recomputed from it at every step, so a ``sigma`` schedule
    (or, in PyTorch, a scheduled momentum/beta1 through ``c``) moves it; when the estimate is not positive and
    finite the previous rate is held (0 before the first estimate). ``sigma`` may be a schedule; the tuners'
    ``sigma=None`` is :func:`default_eos_sigma` (0.25 behind heavy ball, Nesterov and Adam, 1.5 otherwise). The
    rate is also at most ``loss_cap`` (1) times the **loss-bound step** ``2 (f - f_star) / (-g^T u)``
    (:func:`loss_bound_step`, CDAT's item 5 without its ramp: the minimiser of the flattest quadratic model
    consistent with the loss bound ``f_star``; inactive where the loss is unknown; ``loss_cap=inf``: off).

    Why the cap: above the edge (``sigma > 1``) the sharpness falls (the edge of stability's self-stabilisation),
    so a rate set from it rises, pushing the sharpness lower still; near a fitted cross-entropy, after an
    overshoot into a saturated or dead-ReLU region, the sharpness goes toward 0 and the rate with it to
    infinity. Without the cap (``growth=inf``, the paper's rule) every run of a field test diverged or died:
    a digits MLP (ReLU and tanh, full batch and batches of 64, exact Hessian-vector products, 500 steps, seeds
    0-2) behind GD (a stale estimate held for 10 steps at 1.5x the edge: dead networks, 42-619x the best
    constant of a sqrt(2) grid, or divergence), heavy ball and Adam (all 24 runs diverged; Adam's rate to 1e29,
    its preconditioned sharpness falling as the oscillation inflates its second moment). With ``growth =
    1.005`` no run diverged: GD at 0.46-1.36x the best constant (median per cell; eval loss at or below the
    constant's); heavy ball at ``sigma = 0.25`` (its best constants sit at ~0.25 of the edge in mini-batch;
    at 1.5 it still diverged) 0.87-3.5x, Nesterov at 0.25 3-50x with its eval loss below the constant's (at
    1.5: 0.3-0.4x in full batch, 50-87x and eval loss 2-4x higher in mini-batch); Adam 8-106x (at 1.02: 0.01x
    in full batch but 660-2,800x in mini-batch). The cap binds on most steps: the rate climbs at most 1.005x
    per step (12x over 500 steps), and falls when the sharpness rises.

    **Behind Adam** the cap's first reference is the problem: the first estimate, ``lambda_max(P^-1 H)`` with
    Adam's ``P`` built from one squared gradient, is 20-500x the sharpness of the second estimate ten steps later
    (1-2.5x behind GD and heavy ball; digits MLP above), so the whole run's rate was that first estimate's times
    ``1.005^t``: 8-106x the best constant. ``free_steps`` (the tuners' default: :func:`default_eos_free_steps`,
    ``every + 1`` behind Adam, 0 otherwise) lets the rate follow the estimates, uncapped, on the first
    ``free_steps`` steps (``count < free_steps``), so the cap is anchored at the second estimate's rate. Then
    ``sigma = 1.5`` is too high in mini-batch (the best constants sit far below the edge, as for heavy ball:
    518-1,220x), and behind Adam ``sigma`` defaults to 0.25 (:func:`default_eos_sigma`).

    Why the loss-bound cap (``loss_cap = 1``): it binds on the batch loss's catapults in mini-batch and after
    an overshoot, where the sharpness estimate (10 steps old) cannot see the rate is too long. The same MLP,
    seeds 0-2, median (worst) of final train loss / the best constant, full batch ReLU / tanh then mini-batch
    ReLU / tanh, without -> with it: behind Adam (with ``free_steps`` and ``sigma`` 0.25) 0.21 / 0.25, 0.82
    (11.2) / 1.03 (1.63) -> 1.16 (1.7) / 1.7 (2.4), 0.33 (2.6) / 0.99 (1.03), eval loss 0.13 / 0.070 / 0.115 /
    0.080 against the constant's 0.14 / 0.12 / 0.08 / 0.08 (before both: 8-106x); behind heavy ball the
    mini-batch ReLU's worst seed 177x -> 1.28x (medians 1.28 / 0.87 -> 0.98 / 0.98, full batch unchanged);
    behind GD full batch 0.97 / 0.46 -> 0.84 / 0.46 and mini-batch 1.36 / 0.79 -> 2.48 / 1.44 with eval loss
    0.074 / 0.065 against 0.092 / 0.064. On the benchmark's full-batch ResNet (width 4, GD, exact
    products, ``python -m benchmarks --suite default --tasks resnet --regimes full --widths 4 --tuners
    constant,eos``) the rule without it died on 2 of 3 seeds (train loss ln 10; 33x / 31x / 8.4x: the first
    rates 0.85-2.5 against the best constant 0.25), with it 3.8x / 3.2x / 0.77x, eval loss 0.27 / 0.36 / 0.34
    against the constant's 0.18 / 0.23 / 0.40."""

    coefficient: float = 2.0
    sigma: Any = SIGMA_EOS
    lr_max: float = math.inf
    growth: float = 1.005
    free_steps: int = 0
    loss_cap: float = 1.0
    f_star: float = 0.0

    needs: ClassVar[frozenset] = frozenset({"sharpness"})
    #: this rule needs the sharpness: estimated every 10 steps unless configured
    default_sharpness: ClassVar[SharpnessConfig] = SharpnessConfig(every=10)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficient", check_positive("stability_coefficient", self.coefficient))
        object.__setattr__(self, "sigma", check_schedulable(check_positive, "sigma", self.sigma))
        object.__setattr__(self, "lr_max", check_positive("lr_max", self.lr_max, allow_inf=True))
        object.__setattr__(self, "growth", check_at_least("growth", self.growth, 1.0))
        object.__setattr__(self, "free_steps", check_positive_int("free_steps", self.free_steps, minimum=0))
        object.__setattr__(self, "loss_cap", check_positive("loss_cap", self.loss_cap, allow_inf=True))
        object.__setattr__(self, "f_star", check_lower_bound("f_star", self.f_star))

    def loss_bound(self, xp: Any) -> Any:
        """The lower bound of the loss the rule leans on (:mod:`curvopt.bound_watch`): ``f_star`` with the
        loss-bound cap on, else ``-inf`` (``loss_cap`` may be injected: a traced array)."""
        return xp.where(self.loss_cap != math.inf, self.f_star, -math.inf)

    def init(self, zero: Any) -> EdgeOfStabilityState:
        """The state before the first step: no rate held yet (0)."""
        return EdgeOfStabilityState(zero)

    def update(self, x: RuleInputs, state: EdgeOfStabilityState, xp: Any) -> tuple[Any, EdgeOfStabilityState]:
        """``(lr, new state)``: :func:`edge_of_stability_lr` of the latest sharpness, its rise capped by
        ``growth`` after the first ``free_steps`` steps, at most ``loss_cap`` times the loss-bound step."""
        lr = edge_of_stability_lr(x.sharpness, state.held_lr, sigma=sigma_at(self, x),
                                  coefficient=self.coefficient, lr_max=self.lr_max, xp=xp)
        # on the first free_steps steps the rate is the estimate's: the cap is anchored after them
        lr = xp.where(x.count < self.free_steps, lr, capped_growth(lr, self.growth, state.held_lr, xp))
        # at most loss_cap times the flattest consistent model's minimiser (inf where the loss is unknown); a
        # where, not an if: loss_cap may be traced (optax.inject_hyperparams), and inf * 0 must not reach cap
        bound = loss_bound_step(x.numerator, x.value, self.f_star, xp)
        lr = cap(lr, xp.where(self.loss_cap < math.inf, self.loss_cap * bound, math.inf), xp)
        return lr, EdgeOfStabilityState(lr)


#: the line search's default ``c`` behind gradient descent (SLS's, Vaswani et al. 2019)
ARMIJO_C_GD = 0.1
#: the line search's default ``c`` behind every other base (SPS's, Loizou et al. 2021; in the paper's grid)
ARMIJO_C_MOMENTUM = 0.5


def default_armijo_c(method: Any, c: Any = None) -> Any:
    """The line search's ``c``: ``c`` when given, else :data:`ARMIJO_C_GD` behind plain gradient descent
    (``method.kind == "gd"``) and :data:`ARMIJO_C_MOMENTUM` behind heavy ball, Nesterov, Adam and a base the core
    does not know (:class:`ArmijoRule` gives the measurements)."""
    if c is not None:
        return c
    return ARMIJO_C_GD if method is not None and method.kind == "gd" else ARMIJO_C_MOMENTUM


class ArmijoSearchState(NamedTuple):
    """Where the next search starts (:func:`armijo_initial_lr`): the rate the last search accepted (positive; the
    next starts ``increase_factor`` times higher), or minus the trial a failed search hands on (negative; the
    next starts there, whatever ``increase_factor``: with ``inf`` every search would restart at the top)."""

    search_lr: Any


@dataclass(frozen=True)
class ArmijoRule:
    """Backtracking line search on ``f(w + lr u) <= f(w) + delta |f(w)| + c lr g^T u`` (paper grid: ``c`` in
    {0, 1e-4, 0.5}, ``increase_factor`` in {4, inf}, ``decrease_factor`` in {0.8, 0.9}, ``delta`` in
    {0, 1e-3}; at most 30 trials in mini-batch).

    The backend runs the trials: the first is :meth:`first_trial` (``min(increase_factor * previous, lr_max)``,
    the very first with ``previous = init_lr``), each next one ``decrease_factor`` times smaller, until
    :meth:`decrease_error` is 0 or ``max_trials`` evaluations were spent; then :meth:`finish` decides. A
    search that accepts nothing, or an ascent direction (``-g^T u <= 0``, where no positive step can satisfy
    the test with ``c > 0``), takes **no step** (``lr = 0``): a failed search never moves the parameters
    uphill. After a failed search the next one continues where it stopped, at its last trial times
    ``decrease_factor`` (so a rate below ``decrease_factor^max_trials`` times the first is still reached over
    several steps, whatever ``increase_factor``), unless the search
    **stalled** (its last trial left the loss exactly unchanged: the step is below the parameters'
    resolution, where no trial can ever be accepted), in which case it restarts from ``init_lr``. An ascent
    direction leaves the search's memory as it was.

    The tuners' ``c=None`` is :func:`default_armijo_c`: 0.1 behind gradient descent, 0.5 behind the others.
    The textbook ``c = 1e-4`` (the default before) accepts almost any decrease, and in mini-batch a decrease of
    the batch's own loss: on a digits MLP (batches of 64, 400 steps, seeds 0-2) it ended 8,400-13,000x the best
    constant of a sqrt(2) grid behind GD, heavy ball and Adam; with 0.1 behind GD 0.19x (full batch 1.02x);
    behind heavy ball and Adam 0.1 still lost (5,300-7,600x) and 0.5 ended 7.2x / 6.0x (full-batch eval loss
    1.26 / 1.7 against 1.81 / 2.17 with 1e-4). On a quadratic ``c = 0.5`` accepts at most the greedy step.
    """

    c: float = ARMIJO_C_GD
    delta: float = 0.0
    increase_factor: float = 2.0
    decrease_factor: float = 0.8
    lr_max: float = math.inf
    init_lr: float = 1.0
    max_trials: int = 30

    needs: ClassVar[frozenset] = frozenset({"value"})
    default_sharpness: ClassVar[SharpnessConfig] = SharpnessConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "c", check_in_unit_interval("c", self.c))
        object.__setattr__(self, "delta", check_nonnegative("delta", self.delta))
        object.__setattr__(self, "increase_factor", check_at_least("increase_factor", self.increase_factor, 1.0))
        object.__setattr__(self, "decrease_factor",
                           check_in_unit_interval("decrease_factor", self.decrease_factor, closed_low=False))
        object.__setattr__(self, "lr_max", check_positive("lr_max", self.lr_max, allow_inf=True))
        object.__setattr__(self, "init_lr", check_positive("init_lr", self.init_lr))
        object.__setattr__(self, "max_trials", check_positive_int("max_trials", self.max_trials))

    def init(self, zero: Any) -> ArmijoSearchState:
        """The state before the first search: ``init_lr`` held as if accepted, so the first trial is
        ``min(increase_factor * init_lr, lr_max)``."""
        return ArmijoSearchState(zero + self.init_lr)

    def first_trial(self, state: ArmijoSearchState, xp: Any) -> Any:
        """This search's first trial rate (:func:`armijo_initial_lr` of the state's memory)."""
        return armijo_initial_lr(state.search_lr, increase_factor=self.increase_factor, lr_max=self.lr_max,
                                 init_lr=self.init_lr, xp=xp)

    def decrease_error(self, new_value: Any, x: RuleInputs, lr: Any, xp: Any) -> Any:
        """How far the trial ``lr`` with loss ``new_value`` misses the sufficient-decrease test (<= 0: accepted;
        :func:`armijo_decrease_error`)."""
        return armijo_decrease_error(new_value, x.value, lr, -x.numerator, c=self.c, delta=self.delta, xp=xp)

    def finish(self, x: RuleInputs, state: ArmijoSearchState, lr: Any, error: Any, new_value: Any, xp: Any
               ) -> tuple[Any, ArmijoSearchState]:
        """``(lr to take, new state)`` from the last trial ``lr``, its decrease error and its loss
        ``new_value`` (NaN when no trial ran)."""
        descent = x.numerator > 0
        valid = traced_validity(self)  # (an injected setting out of range: no step, the memory kept)
        descent = descent if valid is None else descent & valid
        accepted = (error <= 0) & descent & xp.isfinite(lr) & (lr > 0)
        stalled = new_value == x.value
        # a failed search hands on its next trial, lr * decrease_factor, negated (remembering lr as an accepted
        # rate, the next search started increase_factor times higher: when increase_factor *
        # decrease_factor^(max_trials - 1) >= 1, or increase_factor = inf, it never came down)
        memory = xp.where(accepted, lr, -lr * self.decrease_factor)
        memory = xp.where(stalled | ~(xp.isfinite(lr) & (lr > 0)), self.init_lr, memory)
        memory = xp.where(descent, memory, state.search_lr)
        return xp.where(accepted, lr, 0.0), ArmijoSearchState(memory)
