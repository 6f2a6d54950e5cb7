"""The core on plain numbers, through NumPy as the array namespace: exact answers by hand, dense checks."""
import dataclasses
import math

import numpy as np
import pytest

from curvopt import eigen, rules, thresholds
from curvopt.base import BaseMethod, as_base_method
from curvopt.config import (SharpnessConfig, accumulator_dtype_name, as_sharpness, resolve_curvature,
                            sharpness_due)
from curvopt.preconditioner import adam_preconditioner, inverse_sqrt, sandwich

xp = np
f = np.float64


def _inputs(n, c=np.nan, value=np.nan, sharpness=np.nan, count=0):
    return rules.RuleInputs(f(n), f(c), f(value), f(sharpness), count)


def _run(rule, steps, state=None):
    state = rule.init(f(0)) if state is None else state
    lrs = []
    for k, step in enumerate(steps):
        lr, state = rules.apply_rule(rule, _inputs(*step, count=k), state, xp)
        lrs.append(float(lr))
    return lrs, state


def test_cdat_paper_first_step_exact_and_ema_ratio():
    rule = rules.CDATRule(sigma=2.0, ema=0.9, startup="paper")
    lrs, _ = _run(rule, [(3.0, 2.0), (1.0, 4.0)])
    assert lrs[0] == pytest.approx(3.0)  # 2 * 3/2, exact at step 1 without bias correction
    num = 0.9 * 0.1 * 3 + 0.1 * 1
    den = 0.9 * 0.1 * 2 + 0.1 * 4
    assert lrs[1] == pytest.approx(2 * num / den, rel=1e-14)


def test_cdat_robust_startup_by_hand():
    rule = rules.CDATRule(sigma=2.0, ema=0.9)
    # no loss known: no floor; numerator average not bias-corrected, denominator average corrected (ramp)
    lrs, state = _run(rule, [(3.0, 2.0), (1.0, 4.0)])
    assert lrs[0] == pytest.approx(2 * 0.1 * 3 / 2, rel=1e-14)
    num, den, weight = 0.9 * 0.3 + 0.1 * 1, 0.9 * 0.2 + 0.1 * 4, 0.19
    assert lrs[1] == pytest.approx(2 * num / (den / weight), rel=1e-14)
    assert float(state.avg_weight) == pytest.approx(weight) and float(state.cdat_lr) == pytest.approx(lrs[1])
    # the loss-bound floor: a curvature below n^2 / (2 f) (here negative) is replaced by it
    lrs, state = _run(rule, [(3.0, -19.0, 0.6)])
    floor = 3.0 ** 2 / (2 * 0.6)
    assert float(state.denominator_avg) == pytest.approx(0.1 * floor)
    assert lrs[0] == pytest.approx(2 * 0.1 * 3.0 / floor)  # = 0.1 * sigma * f / n: at most sigma x the Polyak step
    # ... and leaves a larger curvature alone
    assert _run(rule, [(3.0, 100.0, 0.6)])[1].denominator_avg == pytest.approx(10.0)
    # f_star = -inf disables the floor; a negative curvature then contributes 0
    assert float(_run(rules.CDATRule(f_star=-np.inf), [(3.0, -19.0, 0.6)])[1].denominator_avg) == 0.0
    # the growth cap: at most x2 per step once a positive rate was taken
    lrs, _ = _run(rules.CDATRule(sigma=1.0, ema=0.0), [(1.0, 1.0), (1.0, 1e-3), (1.0, 1e-3)])
    assert lrs == [1.0, 2.0, 4.0]
    lrs, _ = _run(rules.CDATRule(sigma=1.0, ema=0.0), [(-1.0, 1.0), (1.0, 1e-3)])  # a 0 rate does not cap
    assert lrs == [0.0, 1000.0]
    # ema = 0: no ramp at all
    assert _run(rules.CDATRule(sigma=1.0, ema=0.0), [(3.0, 2.0)])[0][0] == pytest.approx(1.5)


def test_paper_rule_caps_the_length_of_a_secant_step_only():
    """startup="paper" is the paper's rule where the curvature is the current point's; on a secant step
    (``lagged``) the step's length may grow by at most ``lagged_growth`` (1.1): lr <= 1.1 / sqrt(stretch) x the
    previous rate (closure-free QuadraticGreedy behind Adam diverged without it)."""
    greedy = rules.CDATRule.greedy()

    def run(steps):
        state, lrs = greedy.init(f(0)), []
        for k, (n, c, lagged, stretch) in enumerate(steps):
            x = rules.RuleInputs(f(n), f(c), f(np.nan), f(np.nan), k, lagged=lagged, stretch=f(stretch))
            lr, state = rules.apply_rule(greedy, x, state, xp)
            lrs.append(float(lr))
        return lrs

    assert run([(1.0, 1.0, False, 1.0), (1.0, 1e-3, False, 1.0)]) == [1.0, 1000.0]  # the paper's: no cap
    assert run([(1.0, 1.0, False, 1.0), (1.0, 1e-3, True, 4.0)]) == pytest.approx([1.0, 1.1 / 2.0], rel=1e-15)
    assert run([(1.0, 1.0, False, 1.0), (1.0, 2.0, True, 4.0)]) == pytest.approx([1.0, 0.5], rel=1e-15)  # below it
    assert run([(1.0, 1e-3, True, 4.0)]) == [1000.0]  # no previous rate: nothing to cap by


def test_cdat_guards():
    greedy = rules.CDATRule.greedy()
    assert _run(greedy, [(-1.0, 2.0)])[0] == [0.0]          # ascent direction: numerator clipped to 0
    assert _run(greedy, [(1.0, -4.0)])[0] == [0.25]         # negative curvature counts by magnitude
    assert _run(greedy, [(1.0, 0.0)])[0] == [0.0]           # zero curvature: no division by zero, no step
    assert _run(rules.CDATRule.greedy(lr_max=5.0), [(100.0, 1.0)])[0] == [5.0]


@pytest.mark.parametrize("startup", rules.STARTUPS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_curvature_is_forgotten_not_averaged(bad, startup):
    rule = rules.CDATRule(sigma=2.0, ema=0.9, startup=startup)
    clean = [(1.0, 2.0), (2.0, 3.0), (0.5, 1.0), (1.5, 2.5)]
    with_nan = clean[:2] + [(7.0, bad)] + clean[2:]
    ref, ref_state = _run(rule, clean)
    got, got_state = _run(rule, with_nan)
    assert got[2] == 0.0
    # after the bad step the sequence is the one of a run where it never happened (count only feeds schedules)
    assert got[:2] + got[3:] == pytest.approx(ref, rel=1e-15)
    assert tuple(map(float, got_state)) == pytest.approx(tuple(map(float, ref_state)), rel=1e-15)


def test_schedules_and_negative_rates():
    rule = rules.CDATRule(sigma=lambda t: 2.0 - t, ema=0.0, startup="paper")
    lrs, _ = _run(rule, [(1.0, 1.0)] * 4)
    assert lrs == [2.0, 1.0, 0.0, 0.0]  # a sigma schedule crossing 0 gives lr 0, never negative
    eos = rules.EdgeOfStabilityRule(coefficient=2.0, sigma=1.5)
    lrs, _ = _run(eos, [(1.0, np.nan, np.nan, np.nan), (1.0, np.nan, np.nan, 4.0), (1.0, np.nan, np.nan, -1.0)])
    assert lrs == [0.0, 0.75, 0.75]  # nothing before the first estimate; a bad estimate holds the last rate


def test_greedy_polyak_eos():
    assert rules.polyak_lr(f(3.0), f(6.0), f_star=1.0, lr_max=10.0, xp=xp) == pytest.approx(2 / 6)
    assert rules.polyak_lr(f(0.5), f(6.0), f_star=1.0, lr_max=10.0, xp=xp) == 0
    assert rules.polyak_lr(f(3.0), f(-1.0), f_star=0.0, lr_max=10.0, xp=xp) == 0
    assert rules.polyak_lr(f(3.0), f(1e-12), f_star=0.0, lr_max=10.0, xp=xp) == 10.0
    assert _run(rules.PolyakRule(f_star=1.0, lr_max=10.0), [(6.0, np.nan, 3.0)])[0] == [pytest.approx(2 / 6)]
    assert _run(rules.PolyakRule(), [(6.0, np.nan, np.nan)])[0] == [0.0]  # Polyak needs the value
    assert rules.edge_of_stability_lr(f(4.0), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.75
    assert rules.edge_of_stability_lr(f(-4.0), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.1
    assert rules.edge_of_stability_lr(f(np.nan), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.1


def test_the_greedy_step_on_a_flat_model_is_lr_max():
    """A field test: along a piecewise-linear loss (L1 regression) the curvature is exactly 0 and the greedy rate
    was 0 forever (no step), where any curvature in (0, 1e-300] gives lr_max: the model's minimiser lies beyond
    every step, so the rate is lr_max's; without one it is the guard's 0, the averages untouched."""
    capped = rules.CDATRule.greedy(lr_max=0.5)
    lrs, state = _run(capped, [(2.0, 0.0), (2.0, 1e-300), (2.0, 0.0), (0.0, 0.0)])
    assert lrs == [0.5, 0.5, 0.5, 0.0]
    lrs, state = _run(rules.CDATRule.greedy(), [(2.0, 4.0), (2.0, 0.0)])
    assert lrs == [0.5, 0.0] and float(state.cdat_lr) == 0.5  # (the last rate the rule took, kept)
    # a sigma warm-up's 0 is no step on a flat model either (sigma x inf read NaN, capped to lr_max)
    warm = dataclasses.replace(capped, sigma=lambda t: min(1.0, t / 10))
    assert _run(warm, [(2.0, 0.0), (2.0, 0.0)])[0] == [0.0, 0.5]
    with pytest.raises(ValueError, match="max_trials must be an integer <= 2147483647"):
        rules.ArmijoRule(max_trials=2**31)
    with pytest.raises(ValueError, match="max_trials"):
        rules.ArmijoRule(max_trials=1e300)


def test_armijo_error_matches_definition():
    err = rules.armijo_decrease_error(f(0.9), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp)
    assert err == pytest.approx(0.15)  # 0.9 - 1 + 0.25
    assert rules.armijo_decrease_error(f(0.7), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp) == 0
    # the delta relaxation accepts a small increase
    assert rules.armijo_decrease_error(f(1.0005), f(1.0), f(0.5), f(0.0), c=0.5, delta=1e-3, xp=xp) == 0
    # ... also where the loss is negative (a field test: (1 + delta) f asked every step to cut delta |f| off the
    # loss there, and the search stalled at rate 0 on |w|^2 - 100 once the excess was below 0.1)
    assert rules.armijo_decrease_error(f(-99.9995), f(-100.0), f(0.5), f(0.0), c=0.5, delta=1e-3, xp=xp) == 0
    assert rules.armijo_decrease_error(f(-100.0), f(-100.0), f(0.5), f(0.0), c=0.5, delta=1e-3, xp=xp) == 0
    assert rules.armijo_decrease_error(f(-99.8), f(-100.0), f(0.5), f(0.0), c=0.5,
                                       delta=1e-3, xp=xp) == pytest.approx(0.1)
    assert rules.armijo_decrease_error(f(np.nan), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp) == np.inf
    assert rules.armijo_initial_lr(f(1.0), increase_factor=4.0, lr_max=2.0, init_lr=1.0, xp=xp) == 2.0
    # increase_factor = inf with lr_max = inf: no infinite first trial, the search starts from init_lr
    assert rules.armijo_initial_lr(f(1.0), increase_factor=np.inf, lr_max=np.inf, init_lr=0.5, xp=xp) == 0.5


def test_armijo_failed_search_takes_no_step_continues_and_restarts_after_a_stall():
    rule = rules.ArmijoRule(init_lr=1.0, c=1e-4)  # the criterion read at c = 1e-4
    ArmijoSearchState = rules.ArmijoSearchState
    st = rule.init(f(0))
    assert float(rule.first_trial(st, xp)) == 2.0
    x = _inputs(1.0, value=1.0)
    lr, st = rule.finish(x, st, f(0.3), f(0.0), f(0.9), xp)               # accepted
    assert (float(lr), float(st.search_lr)) == (0.3, 0.3)
    lr, st = rule.finish(x, st, f(0.01), f(0.5), f(1.5), xp)              # nothing accepted: no step, the
    assert float(lr) == 0.0 and float(rule.first_trial(st, xp)) == pytest.approx(0.008)  # next goes on at 0.8 x
    lr, st = rule.finish(x, st, f(1e-30), f(1e-34), f(1.0), xp)           # stalled (loss unchanged): restart
    assert (float(lr), float(st.search_lr)) == (0.0, 1.0)
    lr, st = rule.finish(_inputs(-1.0, value=1.0), ArmijoSearchState(f(0.2)), f(0.4), f(np.inf), f(np.nan), xp)
    assert (float(lr), float(st.search_lr)) == (0.0, 0.2)                 # uphill direction: no step, memory kept
    # increase_factor = inf: every search after an accepted one starts at the top, and a failed one is still
    # continued where it stopped (it restarted at the top, so a rate below 0.8^29 of it was never reached)
    inf_rule = rules.ArmijoRule(increase_factor=np.inf, lr_max=10.0)
    _, s_inf = inf_rule.finish(x, inf_rule.init(f(0)), f(0.01), f(0.5), f(1.5), xp)
    assert float(inf_rule.first_trial(s_inf, xp)) == pytest.approx(0.008)
    _, s_inf = inf_rule.finish(x, s_inf, f(0.3), f(0.0), f(0.9), xp)
    assert float(inf_rule.first_trial(s_inf, xp)) == 10.0
    assert float(rule.decrease_error(f(0.9), x, f(0.5), xp)) == 0.0  # 0.9 <= 1 - 1e-4 * 0.5 * 1
    assert float(rule.decrease_error(f(1.2), x, f(0.5), xp)) == pytest.approx(1.2 - 1 + 1e-4 * 0.5)


def test_secant_exact_on_quadratic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5)); A = a @ a.T
    w = rng.normal(size=5); u = rng.normal(size=5); lr = 0.3
    g0, g1 = A @ w, A @ (w + lr * u)
    c = rules.secant_curvature(g1 @ u, g0 @ u, f(lr), u @ u, u @ u, xp)
    assert c == pytest.approx(u @ A @ u, rel=1e-12)
    # a new direction of another length: the previous direction's Rayleigh quotient times ||u_new||^2
    u_new = 3.0 * rng.normal(size=5)
    c = rules.secant_curvature(g1 @ u, g0 @ u, f(lr), u @ u, u_new @ u_new, xp)
    assert c == pytest.approx((u @ A @ u) / (u @ u) * (u_new @ u_new), rel=1e-12)


def test_fd_step_scale():
    eps = np.finfo(np.float64).eps
    h = rules.finite_difference_step(f(3.0), f(2.0), dtype_eps=eps, xp=xp)
    assert h * 2.0 == pytest.approx(np.sqrt(eps) * 3.0)  # displacement relative to ||w||
    assert rules.finite_difference_step(f(3.0), f(0.0), dtype_eps=1e-16, xp=xp) == 0
    assert rules.finite_difference_step(f(0.0), f(2.0), dtype_eps=eps, xp=xp) == pytest.approx(np.sqrt(eps))


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 1e3, 1e6])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fd_curvature_accurate_at_every_parameter_scale(scale, dtype):
    # a non-quadratic loss whose natural length scale is the parameters' own: f(w) = sum cosh(w / s)
    from curvopt.curvature import finite_difference_curvature
    rng = np.random.default_rng(1)
    w = (scale * rng.uniform(0.5, 1.5, size=50)).astype(dtype)
    u = (scale * rng.normal(size=50)).astype(dtype)
    grad = lambda v: np.sinh(v / dtype(scale)) / dtype(scale)  # noqa: E731
    exact = float(np.sum(np.cosh(w.astype(np.float64) / scale) * (u.astype(np.float64) / scale) ** 2))
    h = rules.finite_difference_step(np.linalg.norm(w), np.linalg.norm(u), dtype_eps=float(np.finfo(dtype).eps),
                                     xp=xp).astype(dtype)
    c = finite_difference_curvature(grad(w + h * u) @ u, grad(w) @ u, h, xp)
    assert c == pytest.approx(exact, rel=3e-3 if dtype == np.float32 else 1e-6)


@pytest.mark.parametrize("n", [2, 6])
def test_arpack_estimate_with_a_failed_product_is_void(n):
    """A non-finite product (a probe that failed) voids the standalone estimate, ``(nan, v0)``: ARPACK fed it read
    2.1 for 3.0 or failed; the dense path below 3 unknowns likewise."""
    from curvopt.eigen import arpack_top_eigenpair
    A = np.diag(np.arange(1.0, n + 1))
    calls = {"k": 0}

    def matvec(v):
        calls["k"] += 1
        return A @ v * (np.nan if calls["k"] == 2 else 1.0)

    v0 = np.arange(1.0, n + 1)
    lam, v = arpack_top_eigenpair(matvec, n, v0)
    assert np.isnan(lam) and np.allclose(v, v0 / np.linalg.norm(v0))  # the start, as a unit vector
    assert arpack_top_eigenpair(lambda v: A @ v, n, v0)[0] == pytest.approx(n)


def test_fd_curvature_of_a_failed_probe_is_no_estimate():
    """A probe whose loss is not finite gives NaN (the rules' "no estimate"), whatever its gradient read; a finite
    one the difference quotient, and ``h = 0`` still 0."""
    from curvopt.curvature import finite_difference_curvature
    assert finite_difference_curvature(1.5, 1.0, 0.25, xp, probe_loss=2.0) == 2.0
    for bad in (np.inf, -np.inf, np.nan):
        assert np.isnan(finite_difference_curvature(0.0, -3.0, 1e-8, xp, probe_loss=bad))
    assert finite_difference_curvature(0.0, -3.0, 0.0, xp) == 0.0


@pytest.mark.parametrize("method,kw,expected", [
    ("gd", {}, 2.0),
    ("heavy_ball", {"momentum": 0.9}, 3.8),
    ("nesterov", {"momentum": 0.9}, 3.8 / 2.8),
    ("adam", {"beta1": 0.9}, 38.0),
])
def test_stability_coefficients(method, kw, expected):
    assert thresholds.stability_coefficient(method, **kw) == pytest.approx(expected)
    assert thresholds.stability_threshold(0.1, method, **kw) == pytest.approx(expected / 0.1)


def test_nesterov_threshold_is_the_stability_edge():
    # PyTorch's Nesterov on f = lam w^2 / 2: stable iff lr * lam < (2 + 2m)/(1 + 2m).
    m, lam = 0.9, 1.0
    c = thresholds.stability_coefficient("nesterov", momentum=m)
    for lr, stable in ((0.99 * c, True), (1.01 * c, False)):
        w, v = 1.0, 0.0
        for _ in range(4000):
            g = lam * w
            v = m * v + g
            w = w - lr * (g + m * v)
        assert (abs(w) < 1) == stable


def test_adam_preconditioner():
    v = np.array([4.0, 9.0])
    p = adam_preconditioner(v, 2, beta1=0.9, beta2=0.99, eps=1e-8, xp=xp)
    expected = (1 - 0.81) * (np.sqrt(v / (1 - 0.99 ** 2)) + 1e-8)
    np.testing.assert_allclose(p, expected, rtol=1e-15)


def test_adam_preconditioner_is_infinite_where_no_gradient_yet():
    """``v = 0`` (every gradient so far 0: Adam has not moved the coordinate) gives ``P = inf``, ``P^-1 = 0``."""
    v = np.array([0.0, 4.0, 0.0])
    p = adam_preconditioner(v, 3, beta1=0.9, beta2=0.99, eps=1e-8, xp=xp)
    assert np.isinf(p[0]) and np.isinf(p[2]) and p[1] == (1 - 0.9 ** 3) * (np.sqrt(4.0 / (1 - 0.99 ** 3)) + 1e-8)
    np.testing.assert_array_equal(1 / p, [0.0, 1 / p[1], 0.0])


@pytest.mark.parametrize("cls,kw,name", [
    (rules.CDATRule, {"sigma": 0.0}, "sigma"),
    (rules.CDATRule, {"sigma": -1.0}, "sigma"),
    (rules.CDATRule, {"sigma": "2.0"}, "sigma"),
    (rules.CDATRule, {"ema": 1.0}, "ema"),
    (rules.CDATRule, {"ema": -0.1}, "ema"),
    (rules.CDATRule, {"eps": -1e-3}, "eps"),
    (rules.CDATRule, {"startup": "magic"}, "startup"),
    (rules.CDATRule, {"sigma": float("nan")}, "sigma"),
    (rules.CDATRule, {"lr_max": "inf"}, "lr_max"),
    (rules.ArmijoRule, {"max_trials": 0}, "max_trials"),
    (rules.ArmijoRule, {"max_trials": 3.5}, "max_trials"),
    (rules.ArmijoRule, {"decrease_factor": 1.0}, "decrease_factor"),
    (rules.ArmijoRule, {"increase_factor": 0.5}, "increase_factor"),
    (rules.ArmijoRule, {"c": 1.5}, "c"),
    (rules.ArmijoRule, {"delta": -1}, "delta"),
    (rules.PolyakRule, {"lr_max": 0}, "lr_max"),
    (rules.PolyakRule, {"f_star": float("inf")}, "f_star"),
    (rules.PolyakRule, {"f_star": 1j}, "f_star"),
    (rules.EdgeOfStabilityRule, {"sigma": 0}, "sigma"),
    (SharpnessConfig, {"every": -1}, "sharpness.every"),
    (SharpnessConfig, {"iters": 0}, "sharpness.iters"),
])
def test_bad_hyperparameters_raise_naming_the_parameter(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(**kw)


def test_validated_values_are_stored_converted():
    rule = rules.ArmijoRule(max_trials=3.0, c=np.float64(0.5), lr_max=np.array(4.0))
    assert type(rule.max_trials) is int and rule.max_trials == 3
    assert type(rule.c) is float and type(rule.lr_max) is float
    assert callable(rules.CDATRule(sigma=lambda t: 1.0).sigma)  # a schedule is kept as given


def test_settings_decisions():
    assert as_sharpness(None) == SharpnessConfig() and not as_sharpness(None).enabled
    assert as_sharpness(5) == SharpnessConfig(every=5)
    assert as_sharpness(None, rules.EdgeOfStabilityRule.default_sharpness).every == 10
    with pytest.raises(ValueError, match="sharpness"):
        as_sharpness("10")
    assert [k for k in range(8) if sharpness_due(k, 3)] == [0, 3, 6]
    assert not any(sharpness_due(k, 0) for k in range(4))
    assert resolve_curvature("auto", True) == "fd" and resolve_curvature("auto", False) == "secant"
    with pytest.raises(ValueError, match="closure"):
        resolve_curvature("fd", False)
    assert accumulator_dtype_name(["torch.bfloat16", "float16"]) == "float32"
    assert accumulator_dtype_name(["float32", "float64"]) == "float64"
    with pytest.raises(ValueError, match="complex"):
        accumulator_dtype_name(["complex64"])
    for name in ("int32", "bool"):  # refused by name (they failed deep inside the JAX step before)
        with pytest.raises(ValueError, match=f"dtype {name}.*eqx.is_inexact_array"):  # equinox's filter named
            accumulator_dtype_name(["float32", name])
        with pytest.raises(ValueError, match=f"dtype {name}.*register_buffer") as e:  # a PyTorch user: torch advice
            accumulator_dtype_name(["torch.float32", f"torch.{name}"])
        assert "eqx" not in str(e.value) and "optax" not in str(e.value)
    assert BaseMethod.heavy_ball(0.9, dampening=0.5).coefficient == pytest.approx(3.8 / 0.5)
    assert BaseMethod.adam().preconditioned and BaseMethod.adam().coefficient == pytest.approx(38.0)


class _NumpyOps:
    dot = staticmethod(np.dot)
    scale = staticmethod(lambda s, a: s * a)
    axpy = staticmethod(lambda a, s, b: a + s * b)
    select = staticmethod(np.where)


def _power(M, v0, fresh, *, iters, tol, previous=np.nan):
    st = eigen.power_init(v0, f(previous), _NumpyOps, np)
    while not bool(st.done):
        st = eigen.power_step(st, lambda v: M @ v, fresh=fresh, iters=iters, tol=tol, ops=_NumpyOps, xp=np)
    return st


def test_power_iteration_against_dense_eigendecomposition():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    lam = np.linspace(-1.0, 3.0, 40)  # a clear top eigenvalue 3 (gap 0.1)
    M = q @ np.diag(lam) @ q.T
    v0, fresh = rng.normal(size=40), rng.normal(size=40)
    st = _power(M, v0, fresh / np.linalg.norm(fresh), iters=2000, tol=1e-12)
    assert float(st.value) == pytest.approx(3.0, rel=1e-8)
    # warm start from the converged vector with the converged value: one product
    warm = _power(M, st.v, fresh, iters=50, tol=1e-6, previous=float(st.value))
    assert int(warm.used) == 1 and float(warm.value) == pytest.approx(3.0, rel=1e-6)
    # a dominant negative eigenvalue: the shifted second pass finds the top (algebraic) one
    M2 = q @ np.diag(np.linspace(-5.0, 1.0, 40)) @ q.T
    st2 = _power(M2, v0, fresh / np.linalg.norm(fresh), iters=5000, tol=1e-13)
    assert bool(st2.second) and float(st2.value) == pytest.approx(1.0, rel=1e-5)
    # a NaN product stops with no estimate
    bad = eigen.power_step(eigen.power_init(v0, f(np.nan), _NumpyOps, np), lambda v: v * np.nan, fresh=fresh,
                           iters=5, tol=1e-3, ops=_NumpyOps, xp=np)
    assert bool(bad.done) and np.isnan(bad.value)


def test_preconditioned_sandwich_has_the_eigenvalues_of_p_inverse_h():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6)); H = a @ a.T
    P = rng.uniform(0.5, 3.0, size=6)
    op = sandwich(lambda v: H @ v, inverse_sqrt(P, np), lambda s, v: s * v)
    S = np.stack([op(e) for e in np.eye(6)], axis=1)
    np.testing.assert_allclose(np.linalg.eigvalsh(S), np.sort(np.linalg.eigvals(np.diag(1 / P) @ H).real),
                               rtol=1e-10)


def test_core_imports_no_backend():
    import subprocess, sys
    code = "import sys, curvopt, curvopt.rules, curvopt.eigen, curvopt.mup, curvopt.diagnostics; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]



def test_cdat_default_ema_by_base():
    """The tuners' ``ema=None`` is resolved by the base: 0.99 for Adam and unknown bases (the rule value's own
    default), 0.9 for gradient descent, heavy ball and Nesterov; an explicit ``ema`` is kept."""
    assert rules.CDATRule().ema == rules.default_ema(BaseMethod.adam()) == 0.99
    assert rules.default_ema(None) == 0.99
    for method in (BaseMethod.gd(), BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9)):
        assert rules.default_ema(method) == 0.9
    assert rules.default_ema(BaseMethod.gd(), 0.5) == 0.5 and rules.default_ema(BaseMethod.adam(), 0.0) == 0.0


def test_eos_growth_cap_by_hand():
    """The edge-of-stability rate rises at most ``growth`` times per step and falls at once; the first rate and
    a held rate are not capped by a zero previous one; ``growth=inf`` is the paper's rule."""
    rule = rules.EdgeOfStabilityRule(coefficient=2.0, sigma=1.5, growth=1.25)
    sharp = [np.nan, 4.0, 1.0, 1.0, 1.0, -1.0, 8.0, 0.5]
    lrs, state = _run(rule, [(1.0, np.nan, np.nan, s) for s in sharp])
    # 3 / sharpness: -, 0.75, 3, 3, 3, (held), 0.375, 6
    want = [0.0, 0.75, 0.75 * 1.25, 0.75 * 1.25 ** 2, 0.75 * 1.25 ** 3, 0.75 * 1.25 ** 3, 0.375, 0.375 * 1.25]
    assert lrs == pytest.approx(want, rel=1e-15)
    assert float(state.held_lr) == pytest.approx(0.375 * 1.25, rel=1e-15)
    paper, _ = _run(dataclasses.replace(rule, growth=math.inf), [(1.0, np.nan, np.nan, s) for s in sharp])
    assert paper == pytest.approx([0.0, 0.75, 3.0, 3.0, 3.0, 3.0, 0.375, 6.0], rel=1e-15)
    assert rules.EdgeOfStabilityRule().growth == 1.005
    with pytest.raises(ValueError, match="growth"):
        rules.EdgeOfStabilityRule(growth=0.99)


def test_eos_default_sigma_by_base():
    """The edge-of-stability tuners' ``sigma=None``: 0.25 behind heavy ball, Nesterov and Adam, 1.5 otherwise (GD,
    an unknown base); an explicit ``sigma`` is kept."""
    assert rules.EdgeOfStabilityRule().sigma == rules.SIGMA_EOS == 1.5
    for method in (None, BaseMethod.gd()):
        assert rules.default_eos_sigma(method) == 1.5
    for method in (BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9), BaseMethod.adam()):
        assert rules.default_eos_sigma(method) == rules.SIGMA_EOS_MOMENTUM == 0.25
    assert rules.default_eos_sigma(BaseMethod.heavy_ball(0.9), 1.0) == 1.0


def test_eos_default_free_steps_by_base():
    """``free_steps=None``: the sharpness period + 1 behind Adam (the cap anchored at the second estimate), 0
    otherwise; a period that is not an int (an array injected by ``inject_hyperparams``) is a ValueError behind
    Adam; an explicit value is kept; the largest period stays within int32."""
    assert rules.EdgeOfStabilityRule().free_steps == 0
    assert rules.default_eos_free_steps(BaseMethod.adam(), 10) == 11
    assert rules.default_eos_free_steps(BaseMethod.adam(), 3) == 4
    with pytest.raises(ValueError, match="static_args"):
        rules.default_eos_free_steps(BaseMethod.adam(), object())
    assert rules.default_eos_free_steps(BaseMethod.adam(), 2**31 - 1) == 2**31 - 1
    for method in (None, BaseMethod.gd(), BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9)):
        assert rules.default_eos_free_steps(method, 10) == 0
    assert rules.default_eos_free_steps(BaseMethod.adam(), 10, 0) == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="free_steps"):
            rules.EdgeOfStabilityRule(free_steps=bad)


def test_eos_free_steps_anchor_the_growth_cap():
    """On the first ``free_steps`` steps the rate is the estimate's (it may rise past the growth cap, e.g. to a
    second estimate 100x lower in sharpness); from step ``free_steps`` on the cap holds, anchored at that rate."""
    rule = rules.EdgeOfStabilityRule(coefficient=2.0, sigma=1.5, growth=1.25, free_steps=3)
    sharp = [300.0, 300.0, 3.0, 1.0, 1.0]
    lrs, state = _run(rule, [(1.0, np.nan, np.nan, s) for s in sharp])
    assert lrs == pytest.approx([0.01, 0.01, 1.0, 1.25, 1.25 ** 2], rel=1e-15)
    capped, _ = _run(dataclasses.replace(rule, free_steps=0), [(1.0, np.nan, np.nan, s) for s in sharp])
    assert capped == pytest.approx([0.01, 0.01, 0.0125, 0.0125 * 1.25, 0.0125 * 1.25 ** 2], rel=1e-15)


def test_polyak_cap_warning_by_base():
    """Only a base other than gradient descent (an unknown one included) at the default lr_max is warned about."""
    assert rules.polyak_cap_warning(BaseMethod.gd(), None) is None
    assert rules.polyak_cap_warning(BaseMethod.adam(), 1e-3) is None
    assert "behind adam" in rules.polyak_cap_warning(BaseMethod.adam(), None)
    assert "behind nesterov" in rules.polyak_cap_warning(BaseMethod.nesterov(0.9), None)
    assert "other than gradient descent" in rules.polyak_cap_warning(None, None)


def test_polyak_default_cap_lives_in_the_rule():
    """``lr_max=None`` (what both backends pass when the user gives none) is the core's one default."""
    assert rules.PolyakRule().lr_max == rules.PolyakRule(lr_max=None).lr_max == rules.POLYAK_LR_MAX == 1.0
    assert rules.PolyakRule(lr_max=0.5).lr_max == 0.5
    assert dataclasses.replace(rules.PolyakRule(lr_max=0.5), lr_max=None).lr_max == rules.POLYAK_LR_MAX


def test_armijo_default_c_by_base():
    """The line search's ``c=None``: 0.1 behind gradient descent, 0.5 behind heavy ball, Nesterov, Adam and an
    unknown base; an explicit ``c`` is kept; the rule's own default is gradient descent's."""
    assert rules.ArmijoRule().c == rules.default_armijo_c(BaseMethod.gd()) == rules.ARMIJO_C_GD == 0.1
    for method in (None, BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9), BaseMethod.adam()):
        assert rules.default_armijo_c(method) == rules.ARMIJO_C_MOMENTUM == 0.5
    assert rules.default_armijo_c(BaseMethod.adam(), 1e-4) == 1e-4


def test_cdat_default_sigma_by_base():
    """The tuners' ``sigma=None`` is resolved by the base: 4 (twice the edge, guarded) for plain gradient
    descent and for Adam with the momentum numerator, both with the robust start-up, 2 (the edge) for heavy
    ball, Nesterov, Adam with another numerator, an unknown base and the paper's start-up; an explicit ``sigma``
    is kept."""
    assert rules.CDATRule().sigma == rules.SIGMA_EDGE == 2.0
    assert rules.default_sigma(BaseMethod.gd()) == rules.SIGMA_ABOVE_EDGE == 4.0
    for method in (None, BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9), BaseMethod.adam()):
        assert rules.default_sigma(method) == 2.0
    assert rules.default_sigma(BaseMethod.gd(), None, "paper") == 2.0
    assert rules.default_sigma(BaseMethod.gd(), 2.0) == 2.0 and rules.default_sigma(BaseMethod.adam(), 4.0) == 4.0
    # behind Adam the numerator decides: above the edge with the momentum numerator only
    assert rules.default_sigma(BaseMethod.adam(), None, "robust", "momentum") == 4.0
    for numerator in ("direction", "paired"):
        assert rules.default_sigma(BaseMethod.adam(), None, "robust", numerator) == 2.0
    assert rules.default_sigma(BaseMethod.adam(), None, "paper", "momentum") == 2.0
    assert rules.default_sigma(BaseMethod.adam(), 3.0, "robust", "momentum") == 3.0


def test_cdat_default_lagged_growth_by_base():
    """The tuners' ``lagged_growth=None`` is resolved by the base: the rate's ``growth`` behind Adam with the robust
    start-up, 1.1 behind every other base (an unknown one included) and under ``startup="paper"``; a given value is
    kept. Both backends' CDAT take it, the greedy step keeps 1.1."""
    assert rules.CDATRule().lagged_growth == rules.LAGGED_GROWTH == 1.1
    assert rules.default_lagged_growth(BaseMethod.adam()) == rules.CDATRule().growth == 2.0
    assert rules.default_lagged_growth(BaseMethod.adam(), None, "robust", 3.0) == 3.0
    assert rules.default_lagged_growth(BaseMethod.adam(), None, "paper") == 1.1
    for method in (None, BaseMethod.gd(), BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9)):
        assert rules.default_lagged_growth(method) == 1.1
    assert rules.default_lagged_growth(BaseMethod.adam(), 1.25) == 1.25
    import torch
    from curvopt.torch import CDAT, QuadraticGreedy
    w = [torch.zeros(2, requires_grad=True)]
    assert CDAT(torch.optim.AdamW(w, lr=1.0)).rule.lagged_growth == 2.0
    assert CDAT(torch.optim.AdamW(w, lr=1.0), growth=1.5).rule.lagged_growth == 1.5
    assert CDAT(torch.optim.AdamW(w, lr=1.0), lagged_growth=1.1).rule.lagged_growth == 1.1
    assert CDAT(torch.optim.SGD(w, lr=1.0, momentum=0.9)).rule.lagged_growth == 1.1
    assert QuadraticGreedy(torch.optim.Adam(w, lr=1.0)).rule.lagged_growth == 1.1


def test_cdat_default_numerator_by_base():
    """``numerator=None``: the momentum numerator behind Adam with the robust start-up when Adam's moments are at
    hand, the paper's ``-g^T u`` otherwise (other bases, ``startup="paper"``, no moments); a given one is kept."""
    adam = BaseMethod.adam()
    assert rules.default_numerator(adam) == "momentum"
    assert rules.default_numerator(adam, None, "paper") == "direction"
    assert rules.default_numerator(adam, None, "robust", has_moments=False) == "direction"
    for method in (None, BaseMethod.gd(), BaseMethod.heavy_ball(0.9), BaseMethod.nesterov(0.9)):
        assert rules.default_numerator(method) == "direction"
    assert rules.default_numerator(adam, "paired") == "paired"
    assert rules.default_numerator(adam, "direction") == "direction"


def test_above_edge_guard_by_hand():
    """The guard's average of the loss gap, its minimum, its lagged minimum and its verdict, step by step (guard 2,
    ema 0.5: the lagged minimum's factor 1 - 0.5 / GUARD_LAG = 0.75, and the progress rule from the weight
    1 - 0.5^(GUARD_LAG / 0.5) = 0.9375 on). A state without the lagged minimum (None: saved before it) keeps the
    first verdict alone."""
    assert (rules.GUARD_LAG, rules.GUARD_FALLEN) == (2.0, 0.5)

    def step(value, state):
        allowed, seen, *state = rules.above_edge_guard(f(value), 0.0, *state, guard=2.0, ema=0.5, xp=xp)
        return bool(allowed), bool(seen), state

    state = (f(0), f(0), f(np.inf), f(np.inf), f(np.inf))
    old = (f(0), f(0), f(np.inf), None, None)
    allowed, seen, state = step(np.nan, state)  # no loss known yet: not seen, not allowed, nothing averaged
    assert (allowed, seen) == (False, False) and list(map(float, state)) == [0.0, 0.0, np.inf, np.inf, np.inf]
    allowed, seen, state = step(4.0, state)     # mean 4 (bias-corrected), min 4; the lagged min and the first: 4
    assert (allowed, seen) == (True, True) and list(map(float, state[2:])) == [4.0, 4.0, 4.0]
    allowed, seen, state = step(2.0, state)     # mean (0.25*4 + 0.5*2) / 0.75 = 8/3, the new min
    assert allowed and float(state[2]) == pytest.approx(8 / 3)
    assert float(state[3]) == pytest.approx(0.75 * 4 + 0.25 * 8 / 3) and float(state[4]) == 4.0
    allowed, seen, state = step(12.0, state)    # mean (0.5*2 + 6) / 0.875 = 8: above 2 x 8/3
    assert (allowed, seen) == (False, True) and float(state[2]) == pytest.approx(8 / 3)
    allowed, seen, state = step(np.nan, state)  # an unknown loss leaves the average: still 8, still refused
    assert not allowed and float(state[0]) / float(state[1]) == pytest.approx(8.0)
    lagged = float(state[3])
    # mean 3.5 / 0.9375 = 3.73 <= 16/3, but the weight is 0.9375 and the min 8/3 is above half the first 4: the
    # rise 3.73 - 8/3 = 1.07 exceeds the recent progress, the lagged min 0.75 * 3.67 + 0.25 * 8/3 = 3.42 less 8/3
    allowed, seen, state = step(0.0, state)
    assert float(state[3]) == pytest.approx(0.75 * lagged + 0.25 * 8 / 3) and float(state[1]) == 0.9375
    assert not allowed and float(state[2]) == pytest.approx(8 / 3)
    before = list(map(float, state))
    allowed, seen, state = step(-1.0, state)    # below f_star (then not a lower bound): ignored like NaN
    assert not allowed and list(map(float, state)) == before
    for value in (np.nan, 4.0, 2.0, 12.0, np.nan):  # the same losses on a state saved before the lagged minimum
        allowed, seen, old = step(value, old)
    allowed, seen, old = step(0.0, old)         # 3.73 <= 16/3: allowed, as the first verdict alone
    assert allowed and old[3:] == [None, None] and float(old[2]) == pytest.approx(8 / 3)
    # a PyTorch state saved (after a known loss) before them loads them as inf (ADDED_START): the same
    _, _, resumed = step(4.0, (f(0), f(0), f(np.inf), None, None))
    resumed[3:] = [f(rules.ADDED_START["gap_lagged"]), f(rules.ADDED_START["gap_first"])]
    for value in (2.0, 12.0, np.nan, 0.0):
        allowed, seen, resumed = step(value, resumed)
    assert allowed and list(map(float, resumed[3:])) == [np.inf, np.inf]


def test_as_base_method_refuses_momentum_kinds_without_their_momentum():
    assert as_base_method("adam") == BaseMethod.adam() and as_base_method(None) == BaseMethod.gd()
    for kind in ("heavy_ball", "nesterov"):
        with pytest.raises(ValueError, match=f"BaseMethod.{kind}"):
            as_base_method(kind)


def test_cdat_guard_scales_the_rate_by_hand():
    """sigma 4 while allowed; once the loss rose past the guard, the rate at ``guard_sigma`` (1: the greedy
    step of the same averages); without a known loss, the rate at the edge (2)."""
    rule = rules.CDATRule(sigma=4.0, ema=0.0, guard=2.0, growth=1e9, loss_cap=math.inf)  # the guard alone
    losses = [2.0, 1.0, 1.5, 2.5, 0.5, 1.5]  # halved from the first at once: the first verdict alone
    lrs, _ = _run(rule, [(1.0, 1.0, v) for v in losses])
    assert lrs == [4.0, 4.0, 4.0, 1.0, 4.0, 1.0]  # ema 0: the verdict is on the raw loss against its minimum
    assert _run(rule, [(1.0, 1.0)] * 2)[0] == [2.0, 2.0]  # loss unknown (closure-free): on the edge
    # sigma <= 2 is never touched (Adam's and heavy ball's default), nor the paper's rule
    assert _run(dataclasses.replace(rule, sigma=2.0), [(1.0, 1.0, 1.0), (1.0, 1.0, 9.0)])[0] == [2.0, 2.0]
    paper = dataclasses.replace(rule, startup="paper")
    assert _run(paper, [(1.0, 1.0, 1.0), (1.0, 1.0, 9.0), (1.0, 1.0)])[0] == [4.0, 4.0, 4.0]


def _gd_on_quadratic(rule, steps=400, seed=0, cond=100.0, d=50):
    """Plain gradient descent on f = w^T A w / 2 (eigenvalues log-spaced in [1, cond]) with the exact
    curvature and the loss known, the way the backends feed the rule. Returns the losses and the verdicts."""
    rng = np.random.default_rng(seed)
    lam = np.logspace(0, np.log10(cond), d)
    w = rng.standard_normal(d)
    state = rule.init(f(0))
    losses, refused = [], 0
    for k in range(steps):
        g = lam * w
        value = 0.5 * w @ g
        allowed, *_ = rules.above_edge_guard(f(value), rule.f_star, *state[4:7], *state[8:], guard=rule.guard,
                                             ema=rule.ema, xp=xp)
        refused += not bool(allowed)
        lr, state = rules.apply_rule(rule, rules.RuleInputs(f(g @ g), f(g @ (lam * g)), f(value), f(np.nan), k),
                                     state, xp)
        w = w - float(lr) * g
        losses.append(float(value))
        if not np.isfinite(value) or value > 1e30:
            break
    return losses, refused


def test_cdat_loss_cap_by_hand():
    """Above the edge the rate is at most ``loss_cap * w * 2 (f - f_star) / n`` (``w = 1 - ema^t``): here
    n = 1, c = 2 (above the loss-bound floor n^2 / 2f), ema 0.5, sigma 4, f_star 0. Step 1 (f = 0.5): w = 0.5,
    the averages' rate 4 * 0.5 * 0.5 / 1 = 1, the cap 0.5 * 2 * 0.5 / 1 = 0.5. Step 2 (f = 0.4): w = 0.75, the
    rate 4 * 0.75 * 0.75 / 1.5 = 1.5, cut by the growth cap to 2 * 0.5 = 1, then by the cap 0.75 * 2 * 0.4 = 0.6."""
    rule = rules.CDATRule(sigma=4.0, ema=0.5, guard=math.inf)
    lrs, state = _run(rule, [(1.0, 2.0, 0.5), (1.0, 2.0, 0.4)])
    assert lrs == pytest.approx([0.5, 0.6], rel=1e-12)
    assert float(state.cdat_lr) == pytest.approx(0.6, rel=1e-12)  # the capped rate is the growth cap's reference
    assert _run(dataclasses.replace(rule, loss_cap=1.5), [(1.0, 2.0, 0.5)])[0] == pytest.approx([0.75], rel=1e-12)
    assert _run(dataclasses.replace(rule, loss_cap=math.inf), [(1.0, 2.0, 0.5)])[0] == pytest.approx([1.0])
    assert _run(rule, [(1.0, 2.0)])[0] == pytest.approx([0.5])  # loss unknown: no cap (sigma held at the edge)
    # on the edge and below (Adam's and heavy ball's default sigma) there is no cap: 2 * 0.25 / 2, not 0.2
    assert _run(dataclasses.replace(rule, sigma=2.0), [(1.0, 4.0, 0.2)])[0] == pytest.approx([0.25], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guarded_above_edge_default_converges_on_a_convex_quadratic(seed):
    """GD's default (sigma 4, guarded, loss-bound cap) on a convex quadratic, where nothing flattens the
    landscape above the edge: without either safeguard the top mode grows every step and the run diverges;
    each safeguard makes it converge (the guard by falling back to the greedy step whenever the loss average
    has doubled from its minimum; the cap by bounding each step by the flattest consistent model's minimiser,
    which leaves the guard nothing to do), far below where sigma 2 stalls (on a quadratic the edge rule leaves
    the top mode neutral)."""
    gd = rules.CDATRule(sigma=rules.default_sigma(BaseMethod.gd()), ema=rules.default_ema(BaseMethod.gd()))
    losses, refused = _gd_on_quadratic(gd, seed=seed)
    assert len(losses) == 400 and losses[-1] < 1e-10 * losses[0] and refused == 0
    guard_only, refused = _gd_on_quadratic(dataclasses.replace(gd, loss_cap=np.inf), seed=seed)
    assert len(guard_only) == 400 and guard_only[-1] < 1e-8 * guard_only[0] and refused > 0
    neither, _ = _gd_on_quadratic(dataclasses.replace(gd, guard=np.inf, loss_cap=np.inf), seed=seed)
    assert neither[-1] > 1e20
    edge, _ = _gd_on_quadratic(dataclasses.replace(gd, sigma=2.0), seed=seed)
    assert edge[-1] > 1e-3 * edge[0] > losses[-1]


def test_momentum_numerator_by_hand():
    """``numerator="momentum"`` (:func:`curvopt.rules.momentum_numerator`): Adam's ``-g^T u`` with the batch's
    gradient inside ``m_t`` replaced by the bias-corrected previous momentum, from the two inner products a
    backend reads after the step; float64, one Adam step written out."""
    rng = np.random.default_rng(0)
    g, m_prev, v_prev = rng.normal(size=7), rng.normal(size=7), rng.uniform(0.1, 1.0, size=7)
    b1, b2, eps, lr, t = 0.9, 0.999, 1e-8, 0.5, 3
    m = b1 * m_prev + (1 - b1) * g
    v = b2 * v_prev + (1 - b2) * g * g
    d = lr / adam_preconditioner(v, t, beta1=b1, beta2=b2, eps=eps, xp=np)  # u = -D m_t
    u = -d * m
    numerator = -g @ u
    want = g @ (d * (b1 * m_prev + (1 - b1) * m_prev / (1 - b1 ** (t - 1))))
    got = rules.momentum_numerator(numerator, g @ (d * g), g @ (d * m), beta1=b1, step=t, xp=np)
    assert got == pytest.approx(want, rel=1e-12)
    # the batch's self term is what goes: (1 - b1) g^T D g, replaced by (1 - b1) g^T D m_{t-1} / (1 - b1^(t-1))
    assert numerator - got == pytest.approx((1 - b1) * (g @ (d * g) - g @ (d * m_prev) / (1 - b1 ** (t - 1))),
                                            rel=1e-12)
    # the first step (m_0 = 0) and beta1 = 0 leave -g^T u as it is
    assert rules.momentum_numerator(numerator, 1.0, 2.0, beta1=b1, step=1, xp=np) == numerator
    assert rules.momentum_numerator(numerator, 1.0, 2.0, beta1=0.0, step=t, xp=np) == numerator


def test_check_numerator_refuses_momentum_without_adam():
    """The numerator setting's guard, once in the core for both backends."""
    assert rules.check_numerator("momentum", BaseMethod.adam(), "Adam") == "momentum"
    assert rules.check_numerator("direction", None, "unknown") == "direction"
    for method in (BaseMethod.gd(), BaseMethod.heavy_ball(0.9), None):
        with pytest.raises(ValueError, match="needs an Adam base"):
            rules.check_numerator("momentum", method, "SGD")
    with pytest.raises(ValueError, match="numerator"):
        rules.check_numerator("batch", BaseMethod.adam(), "Adam")


def test_paired_numerator_by_hand():
    """``numerator="paired"`` (:func:`curvopt.rules.paired_numerator`): ``-g^T u - (1 - b1) r^T D r / 2`` with
    ``r = g_t - ghat_{t-1}``, the previous batch's gradient predicted at ``w_t`` from its fd probe
    (``ghat = g_{t-1} + lr_{t-1} (g_probe - g_{t-1}) / h``); float64, made-up numbers, one Adam step written out.
    Without a prediction the numerator is ``-g^T u`` unchanged; a NaN noise term with a prediction gives a NaN
    numerator, which the rule's guard turns into ``lr = 0`` with the state unchanged."""
    rng = np.random.default_rng(1)
    g, g_prev, hu_prev = rng.normal(size=7), rng.normal(size=7), rng.normal(size=7)
    m_prev, v_prev = rng.normal(size=7), rng.uniform(0.1, 1.0, size=7)
    b1, b2, eps, lr_g, t, lr_prev, h = 0.9, 0.999, 1e-8, 0.5, 3, 0.05, 1e-4
    g_probe = g_prev + h * hu_prev  # the previous batch's gradient at w_{t-1} + h u_{t-1}
    ghat = g_prev + lr_prev * (g_probe - g_prev) / h
    m = b1 * m_prev + (1 - b1) * g
    v = b2 * v_prev + (1 - b2) * g * g
    d = lr_g / adam_preconditioner(v, t, beta1=b1, beta2=b2, eps=eps, xp=np)
    numerator = -g @ (-d * m)
    r = g - ghat  # = g - g_prev - lr_prev * hu_prev
    want = numerator - (1 - b1) / 2 * float(np.sum(d * r * r))
    got = rules.paired_numerator(numerator, r @ (d * r), beta1=b1, has=True, xp=np)
    assert got == pytest.approx(want, rel=1e-12) and got < numerator
    assert rules.paired_numerator(numerator, r @ (d * r), beta1=b1, has=False, xp=np) == numerator
    assert rules.paired_numerator(numerator, math.nan, beta1=b1, has=False, xp=np) == numerator
    weight = rules.paired_prediction_weight(lr_prev, h, np)  # the backends' ghat = g + weight (g_probe - g)
    assert np.allclose(g_prev + weight * (g_probe - g_prev), ghat, rtol=1e-12) and weight == lr_prev / h
    for lr_, h_ in ((0.0, h), (lr_prev, 0.0), (math.nan, h)):  # no step, no probe step: no prediction
        assert rules.paired_prediction_weight(lr_, h_, np) == 0
    bad = rules.paired_numerator(numerator, math.nan, beta1=b1, has=True, xp=np)
    assert math.isnan(bad)
    rule = rules.CDATRule(sigma=2.0, ema=0.9)
    state = rule.init(np.float64(0.0))
    lr, after = rules.apply_rule(rule, rules.RuleInputs(bad, 1.0, 1.0, math.nan, 3), state, np)
    assert lr == 0.0 and after == state


def test_check_numerator_paired_needs_adam_and_fd():
    """``"paired"`` needs Adam (its ``D``) and the fd oracle (its probe gradient): ``"fd"`` or ``"auto"``."""
    for curvature in ("fd", "auto"):
        assert rules.check_numerator("paired", BaseMethod.adam(), "Adam", curvature) == "paired"
    with pytest.raises(ValueError, match="needs an Adam base"):
        rules.check_numerator("paired", BaseMethod.gd(), "SGD", "fd")
    for curvature in ("secant", "exact"):
        with pytest.raises(ValueError, match="fd curvature oracle"):
            rules.check_numerator("paired", BaseMethod.adam(), "Adam", curvature)
    assert rules.check_numerator("momentum", BaseMethod.adam(), "Adam", "secant") == "momentum"


def test_relative_rates():
    from curvopt.preconditioner import relative_rates
    assert relative_rates([0.5, 0.5]) == (0.5, None)
    assert relative_rates([0.0, 0.0]) == (0.0, None)
    assert relative_rates([0.1, 0.0, 0.4]) == (0.4, [0.25, 0.0, 1.0])


def test_eos_loss_cap_by_hand():
    """``loss_cap``: the rate at most ``loss_cap * 2 (f - f_star) / (-g^T u)`` (the flattest consistent model's
    minimiser), inactive where the loss is unknown (NaN) or the cap is off; the capped rate anchors the growth cap;
    the default is 1."""
    rule = rules.EdgeOfStabilityRule(coefficient=2.0, sigma=1.5, growth=2.0, loss_cap=1.0)
    # 3 / sharpness = 3; the loss bound 2 f / n: 0.5 (step 1), unknown (step 2), 100 (step 3)
    lrs, _ = _run(rule, [(4.0, np.nan, 1.0, 1.0), (4.0, np.nan, np.nan, 1.0), (1.0, np.nan, 50.0, 1.0)])
    assert lrs == pytest.approx([0.5, 1.0, 2.0], rel=1e-15)
    off, _ = _run(dataclasses.replace(rule, loss_cap=math.inf), [(4.0, np.nan, 1.0, 1.0)])
    assert off == pytest.approx([3.0], rel=1e-15)
    assert rules.EdgeOfStabilityRule().loss_cap == 1.0 and rules.EdgeOfStabilityRule().loss_bound(np) == 0.0
    assert dataclasses.replace(rule, loss_cap=math.inf).loss_bound(np) == -math.inf


def test_gradient_compute_eps_takes_the_coarsest_half_dtype_most_entries_fit():
    from curvopt.precision import MIN_NONZERO, gradient_compute_eps

    bf16, f16 = 2.0 ** -7, 2.0 ** -10
    assert gradient_compute_eps(1000, [1000, 1000], np) == bf16  # bf16 values fit fp16 too: the coarser wins
    assert gradient_compute_eps(1000, [120, 990], np) == f16
    assert gradient_compute_eps(1000, [500, 500], np) == bf16  # half is enough
    assert gradient_compute_eps(1000, [499, 499], np) == 0.0
    assert gradient_compute_eps(1000, [1, 0], np) == 0.0  # a float32 computation
    assert gradient_compute_eps(MIN_NONZERO - 1, [MIN_NONZERO - 1] * 2, np) == 0.0  # too few to tell


def test_significant_bit_budgets_are_the_half_dtypes_bits_widened_for_an_average():
    """One gradient: bfloat16's 8 and float16's 11 significant bits (exactly representable); the average of n
    gradients (data-parallel ranks) may have ceil(log2 n) more bits, plus SPREAD_BITS (2) for the exponents' spread."""
    from curvopt.precision import SPREAD_BITS, significant_bit_budgets, summed_bits, within_budgets

    assert SPREAD_BITS == 2
    assert significant_bit_budgets() == significant_bit_budgets(1) == (8, 11)
    assert [summed_bits(n) for n in (1, 2, 3, 4, 8, 9, 32)] == [0, 3, 4, 4, 5, 6, 7]
    assert significant_bit_budgets(8) == (13, 16)
    # the budgets against values of known significant bits: 1 + 2^-7 has 8, 1 + 2^-8 has 9
    values = np.array([1 + 2.0 ** -7, 1 + 2.0 ** -8])
    within = [w.tolist() for w in within_budgets(values, 1, np)]
    assert within == [[True, False], [True, True]]
    assert [w.tolist() for w in within_budgets(values, 2, np)] == [[True, True], [True, True]]  # 8 + 3 bits


def test_cdat_robust_does_not_average_a_curvature_that_says_nothing():
    """Rule 6 of CDATRule: with no loss to floor it (closure-free), a curvature that is not positive before the
    averages hold a positive one leaves them and their weight as they were (rate 0). Averaged in as 0, 50 such
    steps grew the numerator's average alone and the first positive curvature gave a rate 1,600x the one the same
    curvature gives at the start (closure-free full-batch LM, seed 1: lr 181, loss 5.9 -> 3.7e5). Later they are
    averaged in as before (0), under the growth cap."""
    rule = rules.CDATRule(sigma=2.0, ema=0.99, guard=math.inf, loss_cap=math.inf)
    lrs, state = _run(rule, [(1.0, -3.0)] * 50 + [(1.0, 2.0)])
    assert lrs[:50] == [0.0] * 50
    assert lrs[50] == pytest.approx(2 * 0.01 * 1.0 / 2.0, rel=1e-12)  # as the run's first step: sigma w n / c
    assert float(state.avg_weight) == pytest.approx(0.01)
    fresh, _ = _run(rule, [(1.0, 2.0)])
    assert lrs[50] == pytest.approx(fresh[0], rel=1e-12)
    # mid-run: averaged in as 0 (the denominator's average decays, the numerator's grows)
    lrs, state = _run(rule, [(1.0, 2.0)] * 20 + [(1.0, -5.0)])
    w = 1 - 0.99 ** 21
    num, den = 0.99 * (1 - 0.99 ** 20) + 0.01, 0.99 * 2 * (1 - 0.99 ** 20)
    assert lrs[20] == pytest.approx(2 * num * w / den, rel=1e-12) and float(state.avg_weight) == pytest.approx(w)
    # with the loss known the floor makes the curvature positive and it is averaged as before
    floor, _ = _run(rule, [(1.0, -3.0, 5.0)])
    assert floor[0] == pytest.approx(2 * 0.01 * 1.0 / (1.0 / (2 * 5.0)), rel=1e-12)


def test_cdat_averages_follow_the_directions_unit():
    """``RuleInputs.unit`` (a clip's factor behind gradient descent): the same steps fed in a unit that changes from
    step to step (``n`` times the unit, ``d`` times its square, the secant's stretch in the actual directions) give
    the rates of the unit-1 run divided by the unit, on every step, so ``lr * u`` is the same step; with the unit left
    at 1 the rates part. A unit that is not a positive number is not known: the averages stay in the last one's.
    The start-up's growth and length caps included (lagged steps, stretch); float64, by hand."""
    rng = np.random.default_rng(4)
    rule = rules.CDATRule(sigma=2.0, ema=0.9, f_star=-np.inf)
    n, d, stretch = rng.uniform(0.5, 2.0, 30), rng.uniform(0.5, 2.0, 30), rng.uniform(0.3, 3.0, 30)
    units = np.where(rng.uniform(size=30) < 0.5, 1.0, rng.uniform(0.05, 1.0, 30))
    units[7] = np.nan  # not known: no carry, so this step's rate stays in the last step's unit
    scale = np.nan_to_num(units, nan=units[6])  # the directions' actual scale
    stretch_seen = stretch * (scale / np.r_[1.0, scale[:-1]]) ** 2

    def run(scaled, with_unit):
        state, out = rule.init(np.float64(0)), []
        for t in range(30):
            k = scale[t] if scaled else 1.0
            x = rules.RuleInputs(np.float64(n[t] * k), np.float64(d[t] * k * k), np.float64(np.nan),
                                 np.float64(np.nan), t, lagged=t > 0,
                                 stretch=np.float64(stretch_seen[t] if scaled else stretch[t]),
                                 unit=np.float64(units[t] if with_unit else 1.0))
            lr, state = rules.apply_rule(rule, x, state, np)
            out.append(float(lr) * k)  # the step's length along the unscaled direction
        return np.array(out)

    plain = run(False, False)
    assert plain.min() > 0
    np.testing.assert_allclose(run(True, True), plain, rtol=1e-12)
    assert np.max(np.abs(run(True, False) / plain - 1)) > 0.5


def test_direction_unit_and_gradient_fit():
    """``curvopt.base.direction_unit``: the seen share behind gradient descent where the direction fits ``c g + b w``,
    NaN where it does not, 1 behind other bases; ``curvopt.curvature.gradient_fit`` from the six inner products."""
    from curvopt.base import direction_unit
    from curvopt.curvature import gradient_fit, gradient_scale
    rng = np.random.default_rng(2)
    g, w, m = rng.normal(size=20), rng.normal(size=20), rng.normal(size=20)
    for seen, fits in ((0.3 * g + 0.01 * w, True), (0.3 * g + 0.9 * m, False)):
        dots = (seen @ g, seen @ w, g @ w, g @ g, w @ w)
        assert bool(gradient_fit(seen @ seen, *dots, xp=np)) is fits
        fit = gradient_fit(seen @ seen, *dots, xp=np)
        unit = direction_unit(BaseMethod.gd(), gradient_scale(*dots, xp=np), np, fits=fit)
        assert (float(unit) == pytest.approx(0.3, rel=1e-12)) if fits else np.isnan(unit)
    assert direction_unit(BaseMethod.adam(), 0.3, np) == 1.0
    assert direction_unit(BaseMethod.heavy_ball(0.9), 0.3, np) == 1.0
    assert direction_unit(None, 0.3, np) == 1.0
    assert direction_unit(BaseMethod.adam(), 0.3, np, rate=0.25) == 0.25  # the rate it steps at


def test_followed_rate():
    """``curvopt.base.followed_rate``: the held unit times the rate's change, 1 where nothing is held yet, and no
    change where either rate is not positive (a zero rate, no last rate)."""
    from curvopt.base import followed_rate
    assert followed_rate(2.0, 0.5, 0.25) == 4.0
    assert followed_rate(0.0, 0.5, 0.25) == 2.0
    assert followed_rate(2.0, 0.5, 0.0) == 2.0 and followed_rate(2.0, 0.0, 0.5) == 2.0


def test_moved_outside_allows_only_the_stated_roundings():
    """The check that the parameters a closure-free step starts from are those the tuner left: exact with
    eps = 0, within OUTSIDE_MOTION_ULPS roundings of eps relative to the recorded norm (float32 here), never where a
    norm was not recorded (NaN) or is not finite."""
    import numpy as np

    from curvopt.config import OUTSIDE_MOTION_ULPS, moved_outside

    eps = float(np.finfo(np.float32).eps)
    assert not moved_outside(2.0, 2.0, 0.0, np) and moved_outside(np.nextafter(2.0, 3.0), 2.0, 0.0, np)
    assert not moved_outside(2.0 * (1 + 0.9 * OUTSIDE_MOTION_ULPS * eps), 2.0, eps, np)
    assert moved_outside(2.0 * (1 + 1.1 * OUTSIDE_MOTION_ULPS * eps), 2.0, eps, np)
    assert moved_outside(1.0, 2.0, eps, np)
    for left, found in ((np.nan, 1.0), (1.0, np.inf), (np.inf, np.inf)):
        assert not moved_outside(found, left, 0.0, np)


def test_zero_rate_run_counts_only_numerators_a_converged_run_would_not_have():
    """``zero_rate_run`` counts a step at rate 0 whose numerator is not rounding's: measured against the run's
    first numerator (``numerator_scale``, which a later divergence does not inflate) and, with the loss, against
    the decrease the last rate would promise in units of the loss's last place."""
    import math

    from curvopt.config import ZERO_RATE_ROUNDING, ZERO_RATE_STEPS, ZeroRateWatch, numerator_scale, watch_zero_rate
    from curvopt.config import zero_rate_run as run_with

    def zero_rate_run(run, lr, num, scale, eps, loss=math.nan, last=math.nan):
        return int(run_with(run, lr, num, scale, eps, loss, last, np))

    eps = 2.0 ** -52
    scale = math.nan
    for num in (0.0, 2.0, 1e6, -3.0):  # exactly 0 is no numerator; the first nonzero one is kept
        scale = float(numerator_scale(scale, num, np))
    assert scale == 2.0
    assert zero_rate_run(4, 0.0, -1.0, scale, eps) == 5  # uphill, not rounding: counted
    assert zero_rate_run(4, 0.0, 1e-14, scale, eps) == 5  # above eps * scale, no loss given
    assert zero_rate_run(4, 0.0, -1e-17, scale, eps) == 0  # within eps * scale: converged
    assert zero_rate_run(4, 0.0, 0.0, math.nan, eps) == 0
    assert zero_rate_run(4, 0.5, -1.0, scale, eps) == 0  # a step that moved ends the run
    loss, last = 0.5, 0.1  # a decrease of 1e-14 * 0.1 is below the loss's last places, 1e-3 * 0.1 is not
    assert zero_rate_run(4, 0.0, 1e-14, scale, eps, loss, last) == 0
    assert 1e-14 * last <= ZERO_RATE_ROUNDING * eps * loss
    assert zero_rate_run(4, 0.0, 1e-3, scale, eps, loss, last) == 5
    # the watch: the last rate above 0 is the reference; the run's sign is kept from the step it reached the count
    watch = watch_zero_rate(ZeroRateWatch.start(0.0, 0), 0.1, 2.0, 0.5, eps, np)
    assert (int(watch.zero_run), float(watch.zero_scale), float(watch.zero_last_rate)) == (0, 2.0, 0.1)
    for t in range(ZERO_RATE_STEPS):
        assert math.isnan(float(watch.zero_rising))
        watch = watch_zero_rate(watch, 0.0, -1.0, 0.5, eps, np)
    assert (int(watch.zero_run), float(watch.zero_rising), float(watch.zero_last_rate)) == (ZERO_RATE_STEPS, 1.0, 0.1)
    watch = watch_zero_rate(watch, 0.0, 1.0, 0.5, eps, np)  # later steps leave the sign said
    assert float(watch.zero_rising) == 1.0 and int(watch.zero_run) == ZERO_RATE_STEPS + 1


def test_the_bound_watch_by_hand():
    """``watch_bound``, independent of either backend: the reference distance is the first finite positive one,
    the slope's reference its largest; pressing needs the distance within ``BOUND_PRESS_GAP`` of the first while
    the slope keeps ``BOUND_PRESS_SLOPE`` of its largest; a loss below the bound is kept; each is said once
    (``since``); NaN losses and ``f_star=-inf`` leave it unchanged."""
    from curvopt.bound_watch import BOUND_PRESS_GAP, BOUND_PRESS_SLOPE, BoundWatch, bound_messages, watch_bound

    watch = BoundWatch.start(0.0)
    watch = watch_bound(watch, math.nan, 1.0, 0.0, np)  # an unknown loss: no reference yet
    assert math.isnan(float(watch.bound_first_gap)) and float(watch.bound_peak_slope) == 0.0
    watch = watch_bound(watch, 10.0, 4.0, 0.0, np)
    assert (float(watch.bound_first_gap), float(watch.bound_peak_slope)) == (10.0, 4.0)
    falling = watch_bound(watch, 10.0 * BOUND_PRESS_GAP, 4.0 * BOUND_PRESS_SLOPE * 0.99, 0.0, np)  # slope fell
    assert math.isnan(float(falling.bound_pressed)) and bound_messages(falling, "T") == []
    far = watch_bound(watch, 10.0 * BOUND_PRESS_GAP * 1.01, 4.0, 0.0, np)  # not close enough yet
    assert math.isnan(float(far.bound_pressed))
    pressed = watch_bound(watch, 10.0 * BOUND_PRESS_GAP, 4.0 * BOUND_PRESS_SLOPE, 0.0, np)
    assert float(pressed.bound_pressed) == pytest.approx(10.0 * BOUND_PRESS_GAP)
    (said,) = bound_messages(pressed, "T", since=watch)
    assert said.startswith("T: the loss 1e-07 presses on f_star=0")
    assert bound_messages(watch_bound(pressed, 1e-8, 4.0, 0.0, np), "T", since=pressed) == []  # once
    below = watch_bound(pressed, -0.5, 4.0, 0.0, np)
    assert float(below.bound_below) == -0.5 and float(below.bound_first_gap) == 10.0  # (no gap below the bound)
    (said,) = bound_messages(below, "T", since=pressed)
    assert said.startswith("T: the loss -0.5 is below f_star=0")
    assert len(bound_messages(below, "T")) == 2
    unbounded = watch_bound(BoundWatch.start(0.0), -5.0, 4.0, -math.inf, np)
    assert bound_messages(unbounded, "T") == [] and math.isnan(float(unbounded.bound_first_gap))


def test_a_loss_below_its_bound_by_rounding_alone_is_not_reported():
    """defaults.md advises passing the minimum as ``f_star`` when it is known: a loss that reached the exact
    least-squares minimum to its rounding (1e-17 below) was said to be below the bound, the message advising to
    change a bound that was right. Below by more than ``BOUND_BELOW_ROUNDING`` of the loss's scale (the larger of
    ``|f_star|`` and ``|loss|``: a large first loss hides no wrong bound) it is said; below a bound of 0, any
    negative loss."""
    from curvopt.bound_watch import BOUND_BELOW_ROUNDING, BoundWatch, bound_messages, watch_bound

    for f_star, first in ((0.0926278, 1.0), (-3.0, 1e5)):
        watch = watch_bound(BoundWatch.start(0.0), f_star + first, 4.0, f_star, np)
        assert bound_messages(watch_bound(watch, f_star - 1e-17, 4.0, f_star, np), "T") == []
        assert bound_messages(watch_bound(watch, f_star - 0.9 * BOUND_BELOW_ROUNDING * abs(f_star), 4.0, f_star, np),
                              "T") == []
        (said,) = bound_messages(watch_bound(watch, f_star - 2 * BOUND_BELOW_ROUNDING * abs(f_star), 4.0, f_star, np),
                                 "T")
        assert "is below f_star" in said
    watch = watch_bound(BoundWatch.start(0.0), 1e5, 4.0, 0.0, np)
    (said,) = bound_messages(watch_bound(watch, -0.9, 4.0, 0.0, np), "T")  # (a first gap of 1e5 hid it)
    assert "is below f_star" in said


def test_the_bound_watch_starts_afresh_under_another_bound():
    """What the watch found was about the bound it had: after ``f_star`` is corrected (injected, set) or dropped
    (``-inf``), the old findings go and the references are taken again (a follow-up field test: Optax kept saying
    "the loss -3.9e-08 is below f_star=-1" after the user lowered ``f_star`` to -1)."""
    from curvopt.bound_watch import BoundWatch, bound_messages, watch_bound

    watch = watch_bound(BoundWatch.start(0.0), 1.0, 4.0, 0.0, np)
    watch = watch_bound(watch, -0.5, 4.0, 0.0, np)
    assert [m[:31] for m in bound_messages(watch, "T")] == ["T: the loss -0.5 is below f_sta"]
    moved = watch_bound(watch, -0.5, 2.0, -1.0, np)
    assert bound_messages(moved, "T") == [] and float(moved.bound_f_star) == -1.0
    assert (float(moved.bound_first_gap), float(moved.bound_peak_slope)) == (0.5, 2.0)
    dropped = watch_bound(watch, -0.5, 2.0, -math.inf, np)
    assert bound_messages(dropped, "T") == [] and math.isnan(float(dropped.bound_first_gap))
    kept = watch_bound(watch, -0.6, 2.0, 0.0, np)  # the same bound: said once, kept
    assert float(kept.bound_below) == -0.5 and float(kept.bound_first_gap) == 1.0


def test_loss_bound_curvature_does_not_overflow_where_it_is_finite():
    """``n^2 / (2 (f - f*))`` with ``n = 2.57e19``, ``f = 4.7e9`` in float32: ``n^2`` overflows (6.6e38) though the
    curvature is 7.0e28; the inf stopped CDAT for good on a float32 loss scaled by 1e9 (a field test; the greedy
    rule trained it). The value is the float64 formula's."""
    n, f = np.float32(2.57e19), np.float32(4.7e9)
    got = rules.loss_bound_curvature(n, f, np.float32(0.0), np)
    assert got.dtype == np.float32 and np.isfinite(got)
    assert float(got) == pytest.approx(2.57e19 ** 2 / (2 * float(f)), rel=1e-6)
    assert float(rules.loss_bound_curvature(np.float32(0.0), f, np.float32(0.0), np)) == 0.0
    assert float(rules.loss_bound_curvature(n, np.float32(np.nan), np.float32(0.0), np)) == 0.0
    # the other end: a small slope over a subnormal gap (n / 2 gap alone would overflow; the curvature is 5e35)
    got = rules.loss_bound_curvature(np.float32(1e-3), np.float32(1e-42), np.float32(0.0), np)
    assert float(got) == pytest.approx(1e-6 / (2 * float(np.float32(1e-42))), rel=1e-3)


def test_the_finite_difference_displacement_is_sized_by_the_part_that_moves():
    """``h ||u|| = sqrt(eps) ||w||`` with ``||w||`` over the entries ``u`` moves (``moved_norm``) where they are
    not all 0: a frozen part does not size it; where the moving part starts at 0 (a LoRA adapter's ``B``), the whole
    parameters do, as before; where everything is 0, ``||u||``."""
    eps = 1e-16
    def h(whole, direction, moved):
        return rules.finite_difference_step(whole, direction, dtype_eps=eps, xp=np, moved_norm=moved)

    assert h(1e5, 2.0, 1.3) == pytest.approx(1e-8 * 1.3 / 2)
    assert h(1e5, 2.0, 0.0) == pytest.approx(1e-8 * 1e5 / 2)
    assert h(0.0, 2.0, 0.0) == pytest.approx(1e-8)
    assert h(3.0, 0.0, 1.0) == 0.0
    np.testing.assert_array_equal(rules.moved_entries(np.array([1.0, 2.0, 3.0]), np.array([0.0, -1.0, np.nan]), np),
                                  [0.0, 2.0, 3.0])


def test_cdat_trains_a_float32_loss_whose_gradient_norm_is_5e9():
    """The same in the PyTorch backend, end to end: a float32 quadratic scaled by 1e9 behind SGD trains as the
    unscaled one does (its rate 1e9 times smaller); it took no step at all (rate 0 for 20 steps)."""
    import torch
    from curvopt.torch import CDAT
    a = torch.tensor([1.0, 2, 3, 5, 8])

    def run(scale):
        w = torch.nn.Parameter(torch.full((5,), 0.5))
        opt = CDAT(torch.optim.SGD([w], lr=1.0))

        def closure():
            opt.zero_grad()
            loss = scale * 0.5 * (a * (w - 1) ** 2).sum()
            loss.backward()
            return loss
        for _ in range(20):
            opt.step(closure)
        return float(0.5 * (a * (w.detach() - 1) ** 2).sum())

    assert run(1e9) < 1e-4 and run(1.0) < 1e-4


def test_a_step_that_did_not_move_leaves_the_clip_watch_window_as_it_was():
    """The outside-clip watch's window of gradient norms (:func:`curvopt.config.watched_norms`): a step that did
    not move the parameters (rate 0, a probe) neither counts nor clears it. Cleared, the window of a clip in front
    of the greedy rule behind heavy ball, whose rate swung between 0 and 1e9-1e14 while the loss went to 1e14,
    never filled, and nothing warned (a field test). Three clipped norms around a rate-0 step are a clip."""
    from curvopt.config import external_clip_suspected, watched_norms
    window = np.zeros(3)
    for norm, counted in [(0.2, True), (0.2, True), (0.7, False), (0.2, True)]:
        window = watched_norms(window, np.float64(norm), counted, np)
    assert window.tolist() == [0.2, 0.2, 0.2] and bool(external_clip_suspected(window, np))
    window = watched_norms(window, np.float64(0.9), True, np)  # a true gradient after a move: no clip
    assert not bool(external_clip_suspected(window, np))
