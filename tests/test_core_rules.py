"""The core rules on plain numbers, through NumPy as the array namespace."""
import math

import numpy as np
import pytest

from curvopt import rules, thresholds
from curvopt.config import ArmijoConfig, CDATConfig, EdgeOfStabilityConfig, PolyakConfig, SharpnessConfig
from curvopt.preconditioner import adam_preconditioner

xp = np
f = np.float64


def test_cdat_first_step_exact_and_ema_ratio():
    st = rules.cdat_init(f(0))
    st = rules.cdat_step(f(3.0), f(2.0), st, sigma=2.0, ema=0.9, eps=0.0, lr_max=math.inf, xp=xp)
    assert st.lr == pytest.approx(3.0)  # 2 * 3/2, exact at step 1 without bias correction
    st = rules.cdat_step(f(1.0), f(4.0), st, sigma=2.0, ema=0.9, eps=0.0, lr_max=math.inf, xp=xp)
    num = 0.9 * 0.1 * 3 + 0.1 * 1
    den = 0.9 * 0.1 * 2 + 0.1 * 4
    assert st.lr == pytest.approx(2 * num / den, rel=1e-14)


def test_cdat_guards():
    st = rules.cdat_init(f(0))
    # ascent direction: numerator clipped to 0 -> lr 0
    st1 = rules.cdat_step(f(-1.0), f(2.0), st, sigma=2.0, ema=0.0, eps=0.0, lr_max=math.inf, xp=xp)
    assert st1.lr == 0
    # negative curvature counts by magnitude
    st2 = rules.cdat_step(f(1.0), f(-4.0), st, sigma=1.0, ema=0.0, eps=0.0, lr_max=math.inf, xp=xp)
    assert st2.lr == pytest.approx(0.25)
    # zero curvature, eps = 0: keep previous lr, no division by zero
    st3 = rules.cdat_step(f(1.0), f(0.0), st2._replace(denominator_avg=f(0)), sigma=1.0, ema=0.0, eps=0.0,
                          lr_max=math.inf, xp=xp)
    assert st3.lr == pytest.approx(0.25) and np.isfinite(st3.lr)
    # cap
    st4 = rules.cdat_step(f(100.0), f(1.0), st, sigma=1.0, ema=0.0, eps=0.0, lr_max=5.0, xp=xp)
    assert st4.lr == 5.0


def test_greedy_polyak_eos():
    assert rules.quadratic_greedy_lr(f(2.0), f(8.0), lr_max=math.inf, xp=xp) == pytest.approx(0.25)
    assert rules.quadratic_greedy_lr(f(0.0), f(0.0), lr_max=math.inf, xp=xp) == 0
    assert rules.polyak_lr(f(3.0), f(6.0), f_star=1.0, lr_max=10.0, xp=xp) == pytest.approx(2 / 6)
    assert rules.polyak_lr(f(0.5), f(6.0), f_star=1.0, lr_max=10.0, xp=xp) == 0
    assert rules.polyak_lr(f(3.0), f(-1.0), f_star=0.0, lr_max=10.0, xp=xp) == 0
    assert rules.polyak_lr(f(3.0), f(1e-12), f_star=0.0, lr_max=10.0, xp=xp) == 10.0
    assert rules.edge_of_stability_lr(f(4.0), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.75
    assert rules.edge_of_stability_lr(f(-4.0), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.1
    assert rules.edge_of_stability_lr(f(np.nan), f(0.1), sigma=1.5, coefficient=2.0, lr_max=math.inf, xp=xp) == 0.1


def test_armijo_error_matches_definition():
    err = rules.armijo_decrease_error(f(0.9), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp)
    assert err == pytest.approx(0.15)  # 0.9 - 1 + 0.25
    assert rules.armijo_decrease_error(f(0.7), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp) == 0
    # the (1 + delta) relaxation accepts a small increase
    assert rules.armijo_decrease_error(f(1.0005), f(1.0), f(0.5), f(0.0), c=0.5, delta=1e-3, xp=xp) == 0
    assert rules.armijo_decrease_error(f(np.nan), f(1.0), f(0.5), f(-1.0), c=0.5, delta=0.0, xp=xp) == np.inf
    assert rules.armijo_initial_lr(f(1.0), increase_factor=4.0, lr_max=2.0, xp=xp) == 2.0


def test_secant_exact_on_quadratic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5)); A = a @ a.T
    w = rng.normal(size=5); u = rng.normal(size=5); lr = 0.3
    g0, g1 = A @ w, A @ (w + lr * u)
    c = rules.secant_curvature(g1 @ u, g0 @ u, f(lr), u @ u, u @ u, xp)
    assert c == pytest.approx(u @ A @ u, rel=1e-12)


def test_fd_step_scale():
    h = rules.finite_difference_step(f(3.0), f(2.0), dtype_eps=np.finfo(np.float64).eps, xp=xp)
    assert h * 2.0 == pytest.approx(np.sqrt(np.finfo(np.float64).eps) * 4.0)
    assert rules.finite_difference_step(f(3.0), f(0.0), dtype_eps=1e-16, xp=xp) == 0


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


@pytest.mark.parametrize("cls,kw,name", [
    (CDATConfig, {"sigma": 0.0}, "sigma"),
    (CDATConfig, {"sigma": -1.0}, "sigma"),
    (CDATConfig, {"ema": 1.0}, "ema"),
    (CDATConfig, {"ema": -0.1}, "ema"),
    (CDATConfig, {"eps": -1e-3}, "eps"),
    (CDATConfig, {"curvature": "magic"}, "curvature"),
    (CDATConfig, {"sigma": float("nan")}, "sigma"),
    (ArmijoConfig, {"max_trials": 0}, "max_trials"),
    (ArmijoConfig, {"decrease_factor": 1.0}, "decrease_factor"),
    (ArmijoConfig, {"increase_factor": 0.5}, "increase_factor"),
    (ArmijoConfig, {"c": 1.5}, "c"),
    (ArmijoConfig, {"delta": -1}, "delta"),
    (PolyakConfig, {"lr_max": 0}, "lr_max"),
    (PolyakConfig, {"f_star": float("inf")}, "f_star"),
    (EdgeOfStabilityConfig, {"sigma": 0}, "sigma"),
    (SharpnessConfig, {"every": -1}, "sharpness_every"),
    (SharpnessConfig, {"iters": 0}, "sharpness_iters"),
])
def test_bad_hyperparameters_raise_naming_the_parameter(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(**kw)


def test_core_imports_no_backend():
    import subprocess, sys
    code = "import sys, curvopt, curvopt.rules, curvopt.diagnostics; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
