"""Curvature along a direction from gradients: the difference quotient of the ``fd`` oracle and the
power iteration's stopping test (same conventions as :mod:`curvopt.rules`: scalars and an array namespace)."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from curvopt.config import REPLAY_PROBE_SHARE

__all__ = ["finite_difference_curvature", "replay_mismatch", "replay_judged", "replay_mismatch_in_place",
           "replay_slope_mismatch", "rayleigh_converged",
           "SecantNoiseState", "SECANT_NOISE_EMA", "SECANT_NOISE_FLOOR", "GREEDY_NOISE_CORRECTION", "gradient_weight",
           "gradient_scale", "gradient_fit", "GRADIENT_FIT_TOL", "noise_correction_on", "secant_noise_numerator",
           "secant_noise_corrected", "noise_dominated"]


def finite_difference_curvature(probe_grad_dot_u: Any, grad_dot_u: Any, h: Any, xp: Any,
                                probe_loss: Any = 0.0) -> Any:
    """``u^T H u ~ (g(w + h u) - g(w))^T u / h`` from the two directional derivatives.

    ``probe_grad_dot_u = g(w + h u)^T u`` and ``grad_dot_u = g(w)^T u``; ``h`` from
    :func:`curvopt.rules.finite_difference_step`. Exact on a quadratic up to rounding (about the square root
    of the dtype's epsilon, relative). Returns 0 when ``h = 0`` (``u = 0``): no curvature information, and NaN
    (the rules' "no estimate": rate 0 for the step, the averages untouched) when ``probe_loss``, the loss at the
    probe point, is not finite: a probe that failed there (a solver that gave up, a guard returning inf or NaN)
    has no gradient of the loss, and its zero or missing one read ``-g^T u / h``, a curvature ~1e7x too high
    that held the rate down for hundreds of steps (a field test: a neural ODE's closure returning inf once).
    """
    ok = h > 0
    curvature = xp.where(ok, (probe_grad_dot_u - grad_dot_u) / xp.where(ok, h, 1.0), 0.0)
    return xp.where(xp.isfinite(probe_loss), curvature, math.nan)


def replay_mismatch(loss: Any, probe_loss: Any, h: Any, numerator: Any, curvature: Any, loss_eps: float,
                    loss_scale: Any, xp: Any) -> tuple[Any, Any]:
    """``(mismatch, predicted)``: the loss the main call predicts at the ``fd`` probe point, and how far the
    probe's loss is from it in units of what rounding and the difference quotient allow (> 1: the probe did not
    evaluate the same smooth function).

    With ``c`` the curvature from the same two gradients, ``f + h g^T u + h^2 c / 2`` is the trapezoid rule
    ``f + h (g(w) + g(w + h u))^T u / 2``, off by ``h^3 / 12`` times the third derivative along ``u`` only:
    usually far below a tenth of the step's own first-order change ``h |g^T u|``, not always (the first steps of a
    small ViT behind Adam, 314 parameters moved alike by the sign-like first direction: the loss along ``u`` is
    far from quadratic over the probe's step, the fd curvature changes sign between ``h / 4`` and ``h`` in float64
    too, and a closure that replays exceeded it; the tuner then evaluates the closure again at the unchanged
    parameters, :func:`replay_mismatch_in_place` and :func:`replay_slope_mismatch`, before it says that the
    closure does not replay). The loss's rounding is allowed 100
    roundings of its dtype (``loss_eps``: the machine epsilon) at the larger of ``|loss|`` and ``loss_scale``: a
    loss near its minimum computed by cancellation (a least-squares residual near 0) rounds like the terms it
    cancels, not like itself (the greedy rule behind SGD lands on a linear least squares' minimum in one step:
    in float32 its next probes missed the model by 1e-13 at a loss of 2e-13); the PyTorch tuners pass the largest
    loss the check has seen. A new batch or noise the probe does not replay,
    or a closure that adds to the previous gradients, exceeds it; a forward pass in a lower precision than the
    probe was sized for (``w + h u`` rounds back to ``w``) may not (measured: CDAT behind Adam under a bf16
    autocast with a float32-sized probe, the curvature off by a median 46-127 % per seed, no warning on 3 of 6
    seeds; the backends size the probe for the precision the loss is computed in). ``numerator = -g^T u``;
    scalars of ``xp`` (NaN in, NaN out: nothing checked)."""
    model = loss - h * numerator + 0.5 * h * h * curvature
    allowed = 0.1 * h * abs(numerator) + 100 * loss_eps * xp.maximum(abs(loss), loss_scale) + 1e-30
    return abs(probe_loss - model) / allowed, model


def replay_judged(h: Any, numerator: Any, loss_scale: Any) -> Any:
    """Whether :func:`replay_mismatch` can judge the probe: its first-order change ``h |g^T u|`` is at most
    :data:`curvopt.config.REPLAY_PROBE_SHARE` of the loss's scale, so that the quadratic model's own error is small
    beside what a closure that does not replay makes of it. A probe sized for a low-precision forward pass moves the
    loss by much more (bf16 on a small transformer: 40-77 % of it). Host floats or traced scalars."""
    return h * abs(numerator) <= REPLAY_PROBE_SHARE * loss_scale


def replay_mismatch_in_place(loss: float, replay_loss: float, loss_eps: float) -> float:
    """How far the closure's loss evaluated again at the unchanged parameters is from the main call's, in units of
    100 roundings of the loss's dtype (``loss_eps``: the machine epsilon): > 1, the closure did not evaluate the
    same function (a new batch, randomness that is not replayed). The check of the tuners whose probes are not
    ``fd`` probes (:func:`replay_mismatch` checks those): the line search's trials and the sharpness's products
    have no quadratic model to compare with. Host floats."""
    return abs(replay_loss - loss) / (100 * loss_eps * abs(loss) + 1e-30)


def replay_slope_mismatch(numerator: float, replay_slope: float) -> float:
    """How far the slope ``g^T u`` of the closure evaluated again at the unchanged parameters is from the main
    call's (``numerator = -g^T u``), in units of a tenth of it: the slack :func:`replay_mismatch` gives the slope
    over the probe's step. > 1: the closure's gradient is not the main call's although its loss may be (a closure
    that does not zero the gradients adds the previous step's to the main call's; the probes start from none).
    Host floats."""
    return abs(replay_slope + numerator) / (0.1 * abs(numerator) + 1e-30)


def rayleigh_converged(value: Any, previous: Any, tol: Any) -> Any:
    """Stopping test of the power iteration: the eigenvalue estimate changed by at most ``tol`` (relative);
    False when ``previous`` is NaN (no previous estimate)."""
    return abs(value - previous) <= tol * abs(value)


# ------------------------------------------------------------------------------ the secant's mini-batch noise
#: averaging factor of the raw secant and of its noise estimate (both averaged before they are subtracted)
SECANT_NOISE_EMA = 0.9
#: the corrected secant curvature is at least this fraction of the raw one (the guard of the subtraction)
SECANT_NOISE_FLOOR = 0.1


class SecantNoiseState(NamedTuple):
    """Moving averages of the secant numerator ``(g_t - g_{t-1})^T u_{t-1}``, of its noise estimate and of the
    secant's scale ``lr_{t-1} ||u_{t-1}||^2`` (field names unique: they sit beside the rule state)."""

    secant_numerator_avg: Any
    secant_noise_avg: Any
    secant_scale_avg: Any


def noise_dominated(state: SecantNoiseState, floor: Any = SECANT_NOISE_FLOOR) -> Any:
    """Whether the averaged noise estimate leaves less than ``floor`` of the averaged secant numerator
    (:func:`secant_noise_corrected`'s averages, ``state``): the corrected curvature then sits at its floor, an
    overestimate of a curvature the noise hides, and the rate set from it is too small. A rate kept small that way
    lets in more noise per unit step, which keeps it small: :func:`curvopt.config.secant_collapsed`."""
    num = state.secant_numerator_avg
    return (num > 0) & (num - state.secant_noise_avg <= floor * num)


def gradient_weight(kind: str, *, momentum: float = 0.0, dampening: float = 0.0, beta1: float = 0.9) -> float:
    """The weight ``a`` of the current gradient in the base's direction at unit rate, ``u = -a g + c`` (Adam:
    ``u = -a P^-1 g + c``, the backends divide by Adam's preconditioner ``P`` elementwise): gradient descent 1
    (any ``kind`` without momentum), heavy ball ``1 - dampening``, Nesterov ``1 + momentum (1 - dampening)``,
    Adam ``1 - beta1``. Times the base's own rate it is the metric ``A`` of :func:`secant_noise_numerator`.

    Behind Adam this is the first moment's share only, not the derivative of Adam's update: the second moment
    reacts to the same gradient (on the first step it cancels the first moment's reaction, ``u = -sign(g)``).
    For small noise that reaction is real (a bf16 forward's rounding is read as noise on the step after a
    closure-free probe: the curvature at the floor, a tenth of the raw one, for that step). For the large noise
    the correction is for it is not: ``E[xi sign(mu + xi)]`` is about ``0.8 sigma`` where the derivative says 0,
    and with the derivative as the metric two small MLPs at batch 32 ended at 0.13-0.45 instead of 0.02-0.06
    (``python -m benchmarks.closure_free``)."""
    if kind == "adam":
        return 1.0 - beta1
    if momentum == 0.0:
        return 1.0
    return 1.0 + momentum * (1.0 - dampening) if kind == "nesterov" else 1.0 - dampening


#: the quadratically greedy rule's default ``noise_correction``: off behind every base. Full batch, where there is no
#: noise, the correction subtracts part of the gradient's drift instead: closure-free behind Adam on a digits MLP
#: (full batch, 60 steps, seeds 0-2) it took the greedy rule's final loss from 5e-6-5e-5 to 2e-4-1.2e-2 (40-260x;
#: CDAT's moved by 0.95-1.4x, and CDAT keeps it on behind Adam, where mini-batch training gains)
GREEDY_NOISE_CORRECTION = False


def noise_correction_on(setting: Any, adam: bool) -> bool:
    """Whether the secant's curvature has its mini-batch noise bias removed (:func:`secant_noise_corrected`):
    ``setting`` True/False as given; None (the default) behind Adam only. Measured closure-free
    (docs/minibatch_study.md, section 10): behind Adam it trained two small MLPs that the raw secant left untrained
    (batch 32 of 512) and ended at or below the raw secant on the default suite's Adam cells (mini-batch LM
    1.02-1.09x ``fd`` against 1.05-1.14x, full-batch ViT 1.5-1.8x against 1.9-2.1x, full-batch LM 0.98-1.01x
    against 1.00-1.06x); behind SGD its rate collapsed late on the mini-batch ResNet."""
    return adam if setting is None else bool(setting)


def secant_noise_numerator(diff_sq: Any, diff_dot_direction: Any, direction_sq: Any, xp: Any) -> Any:
    """The noise bias of the secant numerator ``(g_t - g_{t-1})^T u_{t-1}``, estimated from one step.

    In mini-batch training ``g = grad f + xi`` with fresh noise each batch. For a base whose update is linear
    in the current gradient, ``u = -A g + c`` (SGD: ``A = lr_group``; heavy ball: ``(1 - dampening) lr_group``;
    Nesterov: ``(1 + momentum (1 - dampening)) lr_group``; Adam: ``lr_group (1 - beta1) / P`` elementwise), the
    numerator contains ``-xi_{t-1}^T u_{t-1}``, whose mean is ``E[xi^T A xi] = tr(A Sigma)``, not 0, so the
    secant curvature is biased up by ``tr(A Sigma) / lr_{t-1}`` (per unit ``||u||^2``): a smaller lr gives a
    larger curvature and a smaller lr again. Consecutive noises are independent, so
    ``E ||g_t - g_{t-1}||_A^2 = 2 tr(A Sigma) + ||grad f_t - grad f_{t-1}||_A^2``. The second term (the drift,
    ``lr^2 ||H u||_A^2``) is second order but not negligible near the edge of stability, where it lies mostly
    along the direction moved: the estimate removes the ``A``-orthogonal projection of the difference on
    ``u_{t-1}`` and returns ``0.5 ||D_perp||_A^2``. That projection holds more than ``1/dim`` of the noise:
    ``u_{t-1}`` carries the previous batch's own noise ``xi_{t-1}``, so the estimate is low by a factor of about
    ``1 - rho / 2``, ``rho`` the noise's share of ``||g_{t-1}||_A^2`` (a field test, SGD on a quadratic with
    isotropic noise, dimension 50: 0.49 of ``tr(A Sigma)`` at pure noise, 0.74 at equal shares, 0.98 where the
    gradient is 200 times the noise), and the corrected curvature high (greedy behind SGD there: 2.47 for 2):

    ``diff_sq = D^T A D``, ``diff_dot_direction = D^T A u_{t-1}``, ``direction_sq = u_{t-1}^T A u_{t-1}`` with
    ``D = g_t - g_{t-1}``. Never negative; 0 when the direction is 0.

    Measured (docs/minibatch_study.md): on earlier code the drift part of ``||D_perp||``, which grows with the
    rate, fed back into a larger rate on the default suite's tasks (``python -m benchmarks.minibatch_study
    noise``: mini-batch ResNet lr 7-11, the mini-batch Adam LM diverged on 3 of 3 seeds, the full-batch ResNet
    died); on this release's (``python -m benchmarks.closure_free suite``, section 10) it runs away on none of
    them and ends below the uncorrected secant on 13 of 15 runs, but behind SGD on the mini-batch ResNet its rate
    collapses late (from step ~250, once the loss is near 0.02). On by default behind Adam only
    (:func:`noise_correction_on`).
    """
    ok = direction_sq > 0
    along = xp.where(ok, diff_dot_direction * diff_dot_direction / xp.where(ok, direction_sq, 1.0), 0.0)
    out = 0.5 * (diff_sq - along)
    return xp.where(out > 0, out, 0.0)


def _along_residual(seen_dot_grad: Any, seen_dot_params: Any, grad_dot_params: Any, grad_sq: Any, params_sq: Any,
                    xp: Any) -> tuple[Any, Any]:
    """``(g_seen^T r, ||r||^2)`` with ``r = g - (g^T w / ||w||^2) w``, the gradient's part orthogonal to the
    parameters (``r = g`` where ``w = 0``)."""
    ratio = grad_dot_params / xp.where(params_sq > 0, params_sq, 1.0)
    return seen_dot_grad - ratio * seen_dot_params, grad_sq - ratio * grad_dot_params


def gradient_scale(seen_dot_grad: Any, seen_dot_params: Any, grad_dot_params: Any, grad_sq: Any, params_sq: Any,
                   xp: Any) -> Any:
    """How much of the raw gradient ``g`` the base saw, ``c`` in ``g_seen = c g + b w`` (a global-norm clip before
    the base: its factor; coupled weight decay, before or after the clip, the multiple of the parameters ``w``):
    ``g_seen^T r / g^T r`` with ``r`` the gradient's part orthogonal to the parameters, from the five inner
    products. 1 where ``g^T r`` is below 1e-6 of ``||g||^2`` (a gradient along the parameters, or zero) or an
    input is not finite. The :func:`secant_noise_corrected`'s ``input_scale``."""
    num, den = _along_residual(seen_dot_grad, seen_dot_params, grad_dot_params, grad_sq, params_sq, xp)
    ok = (den > 1e-6 * grad_sq) & xp.isfinite(num) & xp.isfinite(den)
    return xp.where(ok, num / xp.where(ok, den, 1.0), 1.0)


#: the largest squared residual of the fit ``g_seen = c g + b w``, relative to ``||g_seen||^2``, under which a
#: direction counts as a rescaled gradient (:func:`gradient_fit`): 1% of its norm, far above float32's rounding
GRADIENT_FIT_TOL = 1e-4


def gradient_fit(seen_sq: Any, seen_dot_grad: Any, seen_dot_params: Any, grad_dot_params: Any, grad_sq: Any,
                 params_sq: Any, xp: Any) -> Any:
    """Whether ``g_seen`` is ``c g + b w`` (:func:`gradient_scale`'s model) to within :data:`GRADIENT_FIT_TOL`: the
    least-squares residual ``||g_seen||^2 - (g_seen^T w)^2 / ||w||^2 - (g_seen^T r)^2 / ||r||^2`` (``r`` the
    gradient's part orthogonal to the parameters) from the six inner products. False for a direction that carries
    more (a momentum buffer) or an input that is not finite."""
    num, den = _along_residual(seen_dot_grad, seen_dot_params, grad_dot_params, grad_sq, params_sq, xp)
    along_w = seen_dot_params * seen_dot_params / xp.where(params_sq > 0, params_sq, 1.0)
    along_r = num * num / xp.where(den > 0, den, 1.0)
    residual = seen_sq - along_w - along_r
    return (residual <= GRADIENT_FIT_TOL * seen_sq) & xp.isfinite(residual)


def secant_noise_corrected(secant_numerator: Any, noise_numerator: Any, prev_lr: Any, prev_u_sq: Any, u_sq: Any,
                           state: SecantNoiseState, *, input_scale: Any = 1.0, rate: Any = 1.0,
                           ema: Any = SECANT_NOISE_EMA, floor: Any = SECANT_NOISE_FLOOR, xp: Any
                           ) -> tuple[Any, SecantNoiseState]:
    """The secant curvature along ``u_t`` with the mini-batch noise bias removed: ``(curvature, state)``.

    ``secant_numerator = (g_t - g_{t-1})^T u_{t-1}`` and ``noise_numerator`` (:func:`secant_noise_numerator` of
    the raw gradients, times ``input_scale``: the share of the previous step's raw gradient its base saw, the
    factor of a clip before the base, by which the noise entered ``u_{t-1}``; without it a small float32 MLP
    behind Adam, clipped to 1e-3 at every step, took 7-9x the unclipped run's rates, with it 0.85-0.87x)
    are averaged with factor ``ema``, and so is the scale ``prev_lr * prev_u_sq``; the Rayleigh quotient along
    ``u_{t-1}`` is ``(avg numerator - avg noise) / avg scale``. Averaging *before* dividing weighs each step
    by its ``lr ||u||^2``: the signal of a secant grows with the step it spans while its noise does not, so a
    tiny step (the closure-free probing step ``lr = h``) barely counts; and one step's noise estimate is as
    noisy as the secant itself, so the subtraction happens after averaging. The guard: the corrected quotient
    is at least ``floor`` times the raw one (a noise estimate larger than the secant cannot make the curvature
    vanish or change sign); a non-positive raw quotient is returned as it is (negative curvature: the paper's
    rule, ``startup="paper"``, takes its magnitude; the default robust start-up raises it to the loss-bound
    floor, 0 without a loss: :class:`curvopt.rules.CDATRule`). The quotient is rescaled by ``u_sq = ||u_t||^2`` like
    :func:`curvopt.rules.secant_curvature`. With no secant (``prev_lr = 0`` or ``prev_u_sq = 0``) or a
    non-finite input: NaN, state unchanged. ``ema = 0`` and no noise give :func:`curvopt.rules.secant_curvature`.

    ``rate``: the rate ``u_{t-1}`` was taken at (PyTorch's largest group lr; 1 in Optax). The three terms are each
    linear in it (``A`` holds it, the tuner's ``prev_lr`` its inverse) and are averaged divided by it, so that a
    scheduler's factor cancels in the quotient as it does in the rule (:meth:`curvopt.rules.CDATRule.carry`); with
    the terms in their own units, the rates of a run with warm restarts every 5 steps drifted from the unscheduled
    run's, 2e-3 relative by step 40 (tests/test_torch_dropin.py).
    """
    scale = prev_lr * prev_u_sq / rate
    secant_numerator = secant_numerator / rate
    noise_numerator = noise_numerator * input_scale / rate
    ok = (scale > 0) & xp.isfinite(secant_numerator) & xp.isfinite(noise_numerator) & xp.isfinite(scale)
    zero = 0.0 * scale
    num_avg = ema * state.secant_numerator_avg + (1 - ema) * xp.where(ok, secant_numerator, zero)
    noise_avg = ema * state.secant_noise_avg + (1 - ema) * xp.where(ok, noise_numerator, zero)
    scale_avg = ema * state.secant_scale_avg + (1 - ema) * xp.where(ok, scale, zero)
    good = ok & (scale_avg > 0)
    den = xp.where(good, scale_avg, 1.0)
    r, q = num_avg / den, noise_avg / den
    corrected = xp.where(r - q > floor * r, r - q, floor * r)
    rayleigh = xp.where(r > 0, corrected, r)
    new = SecantNoiseState(num_avg, noise_avg, scale_avg)
    kept = SecantNoiseState(*(xp.where(good, n, o) for n, o in zip(new, state)))
    return xp.where(good, rayleigh * u_sq, float("nan")), kept
