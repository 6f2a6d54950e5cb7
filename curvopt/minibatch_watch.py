"""The watch for mini-batch training behind heavy ball and Nesterov, and (PyTorch) a base the core does not know
that has a momentum (:func:`watches`; the steps that know their loss and their
current curvature: a closure in PyTorch, ``value_fn`` in Optax).

A step with a closure knows its quadratic model along the update, ``q(lr) = f - lr n + lr^2 c / 2`` (``n = -g^T u``,
``c = u^T H u``), and so the loss it predicts at the point it moves to. In full batch the next step's loss is that
prediction up to the model's error, a small share of the predicted change ``lr n``; in mini-batch the next loss is
another batch's, and from a few dozen steps on the batches' differences outweigh the change on many steps. Behind
heavy ball and Nesterov CDAT's rate climbs in mini-batch training and its final loss ended 4-5,000x a tuned
constant's in batches of 64. Once the watch fires the tuner says so, once (:func:`minibatch_message`), and from the
next step on holds the rate at most at the rate of the step it fired on (:func:`held_rate`): the model that let the
rate climb no longer predicts the loss. That limits the damage and does not remove it (docs/limits.md). The paper's
rule (``startup="paper"``, the quadratically greedy step included) is watched and left exact (:func:`holds`).

Measured (CDAT with a closure, digits MLP of width 64 and the default suite's ResNet and LM with a momentum base,
seeds 0-2; docs/limits.md): in full batch the share of missed steps (:data:`MISS`) stayed at most 0.12 per 50
steps once the loss's rounding is allowed for (:data:`ROUNDING`: a cross-entropy at float32's floor, 1e-8, is
rounded in steps of ~6e-9) and the watch never fired; in batches of 32-256 it fired 50-130 steps in on every run.
The held rate, on the same runs in mini-batch (final train loss / the best constant's): digits MLP in batches of 64,
heavy ball 1,000-2,000x -> 33-81x, Nesterov 4.2-6.0x -> 0.69-3.6x; the default suite's ResNet with a momentum base
1,410x / 29x / 1,860x -> 72x / 0.27x / 0.40x, its LM 1.08-1.10x -> 1.02-1.17x; the eval loss lower in every run
but one.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .config import in_direction_units

__all__ = ["MISS", "ROUNDING", "WATCH_EMA", "WATCH_STEPS", "WATCH_SHARE", "MinibatchWatch", "watches",
           "missed_share", "holds", "watch_minibatch", "held_rate", "minibatch_message"]

#: a step is missed when its loss differs from the previous step's prediction by more than this many times the
#: predicted change ``lr n``
MISS = 1.0
#: a step is judged only when the predicted change exceeds the loss's rounding, this many float epsilons times the
#: largest loss seen
ROUNDING = 100.0
#: the averaging factor of the missed share (a horizon of ~20 judged steps)
WATCH_EMA = 0.95
#: judged steps before the watch may fire
WATCH_STEPS = 50
#: the (bias-corrected) missed share above which the watch fires
WATCH_SHARE = 0.3

_MESSAGE = (
    "curvopt: the loss of each step is often not the one the previous step's quadratic model predicted ({share:.0%} "
    "of the last ~20 steps missed it by more than the predicted change): the loss changes between steps, as in "
    "mini-batch training. Behind heavy ball, Nesterov or another base with momentum (RAdam, Adamax, RMSprop with "
    "momentum, ...) CDAT's rate climbs in mini-batch training{action} "
    "(the README's Known limits). Use Adam or AdamW as the base, or a tuned constant rate. (Dropout drawn anew each "
    "step also changes the loss between steps.)")
_HELD = (", so from now on the rate is held at most at this step's, {held:.4g}. Held so, its final loss was still up "
         "to 81x a tuned constant rate's on the problems measured")
_NOT_HELD = (": its final loss was 4x to 5,000x a tuned constant rate's on the problems measured, 81x at most with "
             "the rate held, which the paper's rule (startup='paper', the greedy step) does not do")


def watches(method: Any, momentum: float = 0.0) -> bool:
    """Whether CDAT watches for mini-batch training behind the base ``method`` (a
    :class:`curvopt.base.BaseMethod`, or None for a base the core does not know): behind heavy ball and Nesterov,
    and behind an unknown base with a momentum (``momentum``: its first-moment factor, PyTorch's ``momentum`` or
    ``betas[0]`` of its first group). A field test (digits MLP in batches of 64, 200 steps, seeds 0-2, CDAT with a
    closure against each base at its best constant, median / worst seed): watched, RAdam 23 / 29x -> 3.8 / 6.1x,
    Adamax 3.5 / 7.8x -> 1.4 / 1.6x, RMSprop(momentum=0.9) 4.1 / 13x -> 1.3 / 1.7x, NAdam 1.22 / 1.32x -> 1.17 /
    1.48x, torch.optim.Muon with AdamW 13x either way; in full batch unchanged but behind Muon (497 / 656 / 40x ->
    86 / 959 / 40x). Behind the momentum-free Adagrad and RMSprop the held rate was worse (1.75 / 1.97x -> 2.33 /
    2.43x, 1.78 / 2.22x -> 2.26 / 2.55x): not watched."""
    if method is None:
        return momentum > 0
    return method.kind in ("heavy_ball", "nesterov")


class MinibatchWatch(NamedTuple):
    """The watch's memory (scalars of the tuner's accumulator dtype; field names unique, as they sit in Optax's
    state beside the rule's): the moving average of the missed indicator (its weight follows from the count of
    judged steps, :func:`missed_share`), the count of judged steps, the largest loss seen, the previous step's
    prediction and predicted change (NaN: none, the next step is not judged), the missed share at which the
    watch fired and the rate of the step it fired on, the rate's cap from then on (both NaN until it fires; then
    kept)."""

    watch_share: Any
    watch_judged: Any
    watch_scale: Any
    watch_predicted: Any
    watch_change: Any
    watch_fired: Any
    watch_held: Any

    @classmethod
    def start(cls, zero: Any) -> "MinibatchWatch":
        """The memory before any step, from a 0 of the accumulator dtype (a float, a NumPy or JAX scalar)."""
        nan = zero + math.nan
        return cls(zero, zero, zero, nan, nan, nan, nan)


def missed_share(watch: MinibatchWatch, xp: Any) -> Any:
    """The share of recent judged steps that missed the prediction: the moving average bias-corrected by its weight
    ``1 - WATCH_EMA^judged`` (0 before any judged step)."""
    weight = 1 - WATCH_EMA ** watch.watch_judged
    return xp.where(weight > 0, watch.watch_share / xp.where(weight > 0, weight, 1.0), 0.0)


def holds(rule: Any) -> bool:
    """Whether the rate is held once the watch fires: under CDAT's robust rule, not under the paper's
    (``startup="paper"``, the quadratically greedy step included), which is left exact."""
    return rule.startup != "paper"


def watch_minibatch(watch: MinibatchWatch, value: Any, lr: Any, numerator: Any, curvature: Any, loss_eps: float,
                    hold: bool, unit: Any, xp: Any) -> MinibatchWatch:
    """Judge this step's loss ``value`` against the previous step's prediction, then record this step's: the rate
    ``lr`` it takes (after :func:`held_rate`), its ``numerator = -g^T u`` and ``curvature = u^T H u`` at the
    current point (a NaN ``curvature``, lagged or unknown, records none; so does a NaN ``value``, which judges
    nothing). ``xp``: the array namespace (``where``, ``isfinite``). The new memory's ``watch_fired`` is the missed
    share once :data:`WATCH_STEPS` steps have been judged and it exceeds :data:`WATCH_SHARE` (then kept), else NaN;
    its ``watch_held`` is ``lr`` on the step it fires, in the direction's units (times ``unit``, see
    :func:`held_rate`), where the rule holds its rate (``hold``, :func:`holds`; then kept)."""
    share, judged, scale, predicted, change, fired, held = watch
    known = xp.isfinite(value)
    size = xp.where(known, abs(value), 0.0)
    scale = xp.where(size > scale, size, scale)
    judge = known & xp.isfinite(predicted) & (change > ROUNDING * loss_eps * scale)
    missed = xp.where(abs(value - predicted) > MISS * change, 1.0, 0.0)
    share = xp.where(judge, WATCH_EMA * share + (1 - WATCH_EMA) * missed, share)
    judged = xp.where(judge, judged + 1, judged)
    step_change = lr * numerator
    model = known & (lr > 0) & (numerator > 0) & xp.isfinite(curvature) & xp.isfinite(step_change)
    predicted = xp.where(model, value - step_change + 0.5 * lr * lr * curvature, math.nan)
    change = xp.where(model, step_change, math.nan)
    watch = MinibatchWatch(share, judged, scale, predicted, change, fired, held)
    now = missed_share(watch, xp)
    fires = ~xp.isfinite(fired) & (judged >= WATCH_STEPS) & (now > WATCH_SHARE)
    return watch._replace(watch_fired=xp.where(fires, now, fired),
                          watch_held=xp.where(fires & hold, in_direction_units(lr, unit, xp), held))


def held_rate(watch: MinibatchWatch, lr: Any, unit: Any, xp: Any) -> Any:
    """The rule's rate ``lr`` held at most at ``watch.watch_held`` once the watch has fired (before, and under the
    paper's rule: ``lr``). The held rate is kept in the direction's units (:func:`curvopt.config.in_direction_units`
    of this step's ``unit``), so a scheduler's factor after the watch fired leaves the effective cap where it was:
    in the tuner's own units a warm-up that fired the watch at a small group rate let the effective rate climb 3-6x
    above the held one once it ended (a field test, a digits MLP behind SGD with momentum 0.9 in batches of 64, the
    group rate 0.05 -> 1 over 500 steps: train loss 0.12-2.4 at step 1500 against 4e-5-5e-3 without the warm-up;
    under ``OneCycleLR`` the loss went back to chance)."""
    cap = watch.watch_held / in_direction_units(1.0, unit, xp)
    return xp.where(lr > cap, cap, lr)


def minibatch_message(watch: MinibatchWatch, unit: float = 1.0) -> str:
    """The warning of a watch that has fired (host values): what it saw, the rate held in the tuner's own units at
    the direction's ``unit`` (or that the paper's rule is not held), what to do."""
    held = float(watch.watch_held) / float(in_direction_units(1.0, unit, np))
    action = _HELD.format(held=held) if math.isfinite(held) else _NOT_HELD
    return _MESSAGE.format(share=float(watch.watch_fired), action=action)
