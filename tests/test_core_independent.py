"""Independent checks of the shared core (NumPy float64, exact answers by hand, quadratics, dense matrices), none
through a backend: each was written against a mutation of the core (named in its docstring: R rules, C curvature,
E eigen, M mup, D diagnostics) that the rest of the suite let pass."""
import math

import numpy as np
import pytest

from curvopt import eigen, rules
from curvopt.base import BETAS_RTOL, BaseMethod, adam_betas_seen, adam_update_unlike
from curvopt.curvature import (SecantNoiseState, rayleigh_converged, replay_mismatch, replay_slope_mismatch,
                               secant_noise_corrected, secant_noise_numerator)
from curvopt.diagnostics import detect_catapults
from curvopt import mup as core_mup

f = np.float64
xp = np


def _run(rule, steps):
    state, lrs = rule.init(f(0)), []
    for k, (n, c, value) in enumerate(steps):
        lr, state = rules.apply_rule(rule, rules.RuleInputs(f(n), f(c), f(value), f(np.nan), k), state, xp)
        lrs.append(float(lr))
    return lrs, state


# ------------------------------------------------------------------------------------------------ rules.py
def test_an_ascent_step_enters_the_numerator_average_as_zero():
    """R01 (cdat_step ``n = max(-g^T u, 0)`` -> ``n = -g^T u``): an ascent direction averages in 0, not its
    negative slope; with ema 0.9 the next rate is 2 * 0.27 / 0.38, not 2 * 0.17 / 0.38."""
    rule = rules.CDATRule(sigma=2.0, ema=0.9, startup="paper")
    lrs, state = _run(rule, [(3.0, 2.0, np.nan), (-1.0, 2.0, np.nan)])
    assert float(state.numerator_avg) == pytest.approx(0.9 * 0.3, rel=1e-15)
    assert lrs[1] == pytest.approx(2 * 0.27 / (0.9 * 0.2 + 0.1 * 2.0), rel=1e-14)


def test_eps_is_added_to_the_curvature():
    """R03 (``d = curvature + eps`` -> ``- eps``): the paper's greedy step with eps = 1 on a curvature of 2 is
    n / (2 + 1), not n / (2 - 1)."""
    rule = rules.CDATRule(sigma=1.0, ema=0.0, eps=1.0, startup="paper")
    assert _run(rule, [(3.0, 2.0, np.nan)])[0] == [pytest.approx(1.0, rel=1e-15)]


def test_momentum_numerator_at_the_second_step():
    """R06 (``has = step > 1`` -> ``step > 2``): at t = 2 the previous momentum m_1 exists and its bias
    correction is 1 - b1; one Adam step written out in float64."""
    rng = np.random.default_rng(5)
    g, g1, v_prev = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 1.0, size=6)
    b1 = 0.9
    m_prev = (1 - b1) * g1                     # m_1 after the first step (m_0 = 0)
    m = b1 * m_prev + (1 - b1) * g             # m_2
    d = 0.5 / np.sqrt(v_prev)                  # any positive diagonal D
    numerator = g @ (d * m)                    # -g^T u with u = -D m
    want = g @ (d * (b1 * m_prev + (1 - b1) * m_prev / (1 - b1)))  # the batch's g replaced by m_1 / (1 - b1) = g1
    got = rules.momentum_numerator(numerator, g @ (d * g), g @ (d * m), beta1=b1, step=2, xp=np)
    assert got == pytest.approx(want, rel=1e-12)
    assert got == pytest.approx((1 - b1) * (1 + b1) * g @ (d * g1), rel=1e-12)  # m_1 / (1 - b1) = g1


def test_polyak_takes_no_step_on_a_zero_slope():
    """R08 (``numerator > 0`` -> ``>= 0``): a zero slope is no descent: lr 0, not lr_max."""
    assert rules.polyak_lr(f(3.0), f(0.0), f_star=0.0, lr_max=10.0, xp=xp) == 0.0
    assert _run(rules.PolyakRule(lr_max=10.0), [(0.0, np.nan, 3.0)])[0] == [0.0]


def test_armijo_restarts_from_init_lr_when_the_memory_is_zero():
    """R11 (drop ``first > 0``): a search memory of 0 (a -0.0 from an underflowed failed trial, a state written
    by hand) would make every later trial 0 * increase_factor = 0: the search restarts from init_lr instead."""
    assert rules.armijo_initial_lr(f(0.0), increase_factor=2.0, lr_max=10.0, init_lr=0.5, xp=xp) == 0.5
    assert rules.armijo_initial_lr(f(-0.0), increase_factor=2.0, lr_max=10.0, init_lr=0.5, xp=xp) == 0.5
    rule = rules.ArmijoRule(init_lr=0.5)
    assert float(rule.first_trial(rules.ArmijoSearchState(f(0.0)), xp)) == 0.5


def test_secant_without_a_previous_step_is_nan():
    """R14 (drop ``prev_lr > 0``): no step taken means no secant: NaN (the documented signal the backends
    replace by their fallback), not +-inf or a 0/0 from dividing by prev_lr = 0."""
    for num in (1.0, 0.0):
        c = rules.secant_curvature(f(num), f(0.0), f(0.0), f(2.0), f(2.0), xp)
        assert np.isnan(c)


def test_eos_ratio_uses_the_base_coefficient():
    """R16 (``/ coefficient`` -> ``/ 2``): Adam (c = 38) at lr 0.1 with preconditioned sharpness 380 is on the
    edge: ratio 1, not 19."""
    assert rules.eos_ratio(0.1, 380.0, 38.0) == pytest.approx(1.0, rel=1e-15)
    assert rules.eos_ratio(0.5, 4.0, 2.0) == 1.0


def test_a_non_finite_rate_from_finite_inputs_gives_no_step_and_keeps_the_state():
    """R18 (drop ``ok & isfinite(lr)``): finite inputs whose ratio overflows (greedy n = 1e300 over c = 1e-300;
    an edge-of-stability rule over a denormal sharpness) must give lr 0 and leave the state as it was."""
    greedy = rules.CDATRule.greedy()
    start = greedy.init(f(0))
    lr, state = rules.apply_rule(greedy, rules.RuleInputs(f(1e300), f(1e-300), f(np.nan), f(np.nan), 0), start, xp)
    assert lr == 0.0 and tuple(map(float, state)) == tuple(map(float, start))
    eos = rules.EdgeOfStabilityRule(coefficient=2.0, sigma=1.5)
    lr, state = rules.apply_rule(eos, rules.RuleInputs(f(1.0), f(np.nan), f(np.nan), f(1e-320), 0),
                                 eos.init(f(0)), xp)
    assert lr == 0.0 and float(state.held_lr) == 0.0


def test_loss_bound_step_is_unbounded_on_an_ascent_direction():
    """R23 (drop ``numerator > 0`` in loss_bound_step): ``2 (f - f*) / n`` with n <= 0 is no bound (inf); the
    mutant gives a negative cap, which zeroes the above-edge rate of the averages. sigma 4, ema 0.5: step 1 as in
    test_cdat_loss_cap_by_hand (0.5); step 2 ascends (n = -1, counted 0): 4 * 0.25 * 0.75 / 1.5 = 0.5."""
    assert rules.loss_bound_step(f(-1.0), f(0.4), 0.0, xp) == math.inf
    assert rules.loss_bound_step(f(0.0), f(0.4), 0.0, xp) == math.inf
    lrs, _ = _run(rules.CDATRule(sigma=4.0, ema=0.5, guard=math.inf), [(1.0, 2.0, 0.5), (-1.0, 2.0, 0.4)])
    assert lrs == pytest.approx([0.5, 0.5], rel=1e-14)


def test_paper_rule_lets_a_secant_step_grow_by_the_length_cap_only():
    """R33 (paper's lagged reach ``inf`` -> ``growth``): with ||u|| shrunk 10x (stretch 0.01) the step's length
    may grow 1.1x, i.e. the rate 11x; the paper's rule has no 2x rate cap."""
    greedy = rules.CDATRule.greedy()
    state, lrs = greedy.init(f(0)), []
    for k, (n, c, lagged, stretch) in enumerate([(1.0, 1.0, False, 1.0), (1.0, 1e-3, True, 0.01)]):
        x = rules.RuleInputs(f(n), f(c), f(np.nan), f(np.nan), k, lagged=lagged, stretch=f(stretch))
        lr, state = rules.apply_rule(greedy, x, state, xp)
        lrs.append(float(lr))
    assert lrs == pytest.approx([1.0, 11.0], rel=1e-14)


def test_above_edge_guard_is_scale_free():
    """R38 (guard's start ``gap_min = inf`` -> 1e3): a first loss of 1e4 (a sum-reduced loss) is its own
    minimum: sigma 4 is allowed, as at 1e-4. The guard's verdict cannot depend on the loss's units (n = c = the
    scale keeps the curvature above the loss-bound floor n^2 / 2f, so the rate is 4 n / c = 4)."""
    rule = rules.CDATRule(sigma=4.0, ema=0.0, guard=2.0, growth=1e9, loss_cap=math.inf)
    for scale in (1e-4, 1.0, 1e4, 1e8):
        losses = [2 * scale, scale, 1.5 * scale, 2.5 * scale]
        lrs, state = _run(rule, [(scale, scale, v) for v in losses])
        assert lrs == [4.0, 4.0, 4.0, 1.0], scale
        assert float(state.gap_min) == scale


def test_cdat_sigma4_guarded_run_is_invariant_to_the_loss_scale():
    """R38 end to end: GD's default CDAT (sigma 4, guard, loss cap) on f = c * w^T A w / 2 takes the same rates
    for c = 1 and c = 1e6 up to the factor 1/c (u = -g scales by c: n by c^2, u^T H u by c^3, f - f* by c, so every
    safeguard's rate by 1/c): lr(c) * c is the same sequence, to the rounding the run amplifies above the edge."""
    lam = np.logspace(0, 2, 20)
    seqs = []
    for c in (1.0, 1e6):
        rule = rules.CDATRule(sigma=4.0, ema=0.9)
        state, w, seq = rule.init(f(0)), np.linspace(1.0, 2.0, 20), []
        for k in range(60):
            g = c * lam * w
            lr, state = rules.apply_rule(rule, rules.RuleInputs(f(g @ g), f(g @ (c * lam * g)), f(0.5 * w @ g),
                                                                f(np.nan), k), state, xp)
            w = w - float(lr) * g
            seq.append(float(lr) * c)
        seqs.append(seq)
    np.testing.assert_allclose(seqs[1], seqs[0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ curvature.py
def test_replay_model_is_exact_on_a_quadratic():
    """C02 (``0.5 h^2 c`` -> ``h^2 c``): on a quadratic the model f - h n + h^2 c / 2 is f(w + h u) exactly,
    whatever h; a replaying closure's mismatch is rounding only."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6)); A = a @ a.T
    w, u = rng.normal(size=6), rng.normal(size=6)
    loss = lambda v: 0.5 * v @ A @ v  # noqa: E731
    for h in (1e-4, 0.1, 1.0):
        mismatch, model = replay_mismatch(loss(w), loss(w + h * u), h, -(A @ w) @ u, u @ A @ u,
                                          np.finfo(np.float64).eps, 0.0, np)
        assert model == pytest.approx(loss(w + h * u), rel=1e-12, abs=1e-12)
        assert mismatch < 1e-3


def test_replay_model_allows_the_rounding_of_the_terms_a_small_loss_cancels():
    """A float32 least squares at its minimum: the loss (~1e-12) sums the squares of residuals that cancel O(1)
    terms, so it rounds like them. At a probe 1e-5 away along u (every entry of w moved) the float32 loss misses
    the float64 quadratic model by ~10 allowances at the loss's own scale, and by ~1e-7 of one at the scale
    of the loss at the start (~50)."""
    rng = np.random.default_rng(2)
    A = rng.normal(size=(10, 5)).astype(np.float32)
    b = (A @ rng.normal(size=5)).astype(np.float32)  # interpolating: the minimum is 0
    w = np.linalg.lstsq(A.astype(np.float64), b.astype(np.float64), rcond=None)[0].astype(np.float32)
    u = rng.normal(size=5).astype(np.float32)
    loss32 = lambda v: float(np.sum(np.square(A @ v - b, dtype=np.float32)))  # noqa: E731
    r = (A @ w - b).astype(np.float64)
    h = 1e-5 / float(np.linalg.norm(u))
    numerator, curvature = -2.0 * float(r @ (A @ u)), 2.0 * float(np.sum((A @ u.astype(np.float64)) ** 2))
    f, got, eps = loss32(w), loss32((w + h * u).astype(np.float32)), float(np.finfo(np.float32).eps)
    start = loss32(np.zeros(5, np.float32))
    assert f < 1e-9 < start
    assert replay_mismatch(f, got, h, numerator, curvature, eps, 0.0, np)[0] > 1
    assert replay_mismatch(f, got, h, numerator, curvature, eps, start, np)[0] < 1


def test_replay_slope_mismatch_flags_a_gradient_added_to_the_previous_one():
    """The slope at the unchanged parameters: the same gradient is 0 units, 5 % off is under 1, and a gradient
    added to the previous step's (no zero_grad) is several units, on a quadratic in float64."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5)); A = a @ a.T
    w, u = rng.normal(size=5), rng.normal(size=5)
    g, g_prev = A @ w, A @ (w - 0.1 * u)
    numerator = -(g @ u)
    assert replay_slope_mismatch(numerator, g @ u) == 0.0
    assert replay_slope_mismatch(numerator, 1.05 * (g @ u)) < 1
    assert replay_slope_mismatch(-((g + g_prev) @ u), g @ u) > 5


def test_power_iteration_converges_relative_to_the_eigenvalue_scale():
    """C03 (relative tol -> absolute): the stopping test is relative, so a Hessian scaled by 1e-6 (a loss in
    small units) is estimated as accurately as the unscaled one; an absolute test stops after 2 products."""
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    lam = np.linspace(-1.0, 3.0, 30)
    v0, fresh = rng.normal(size=30), rng.normal(size=30)

    class Ops:
        dot = staticmethod(np.dot)
        scale = staticmethod(lambda s, a: s * a)
        axpy = staticmethod(lambda a, s, b: a + s * b)
        select = staticmethod(np.where)

    for scale in (1.0, 1e-6, 1e6):
        M = scale * (q @ np.diag(lam) @ q.T)
        st = eigen.power_init(v0, f(np.nan), Ops, np)
        while not bool(st.done):
            st = eigen.power_step(st, lambda v: M @ v, fresh=fresh / np.linalg.norm(fresh), iters=3000, tol=1e-10,
                                  ops=Ops, xp=np)
        assert float(st.value) == pytest.approx(3.0 * scale, rel=1e-6), scale
    assert bool(rayleigh_converged(1e6, 1e6 * (1 + 1e-9), 1e-6))
    assert not bool(rayleigh_converged(1e-9, 2e-9, 1e-3))


def test_secant_noise_numerator_by_hand():
    """C04 (drop the 0.5): D = (1, 2), u_prev = (1, 0), A = I: ||D||^2 = 5, along u 1, so 0.5 * (5 - 1) = 2.
    And in expectation: two independent N(0, s^2 I) noises in dim d give E = s^2 (d - 1) = tr(A Sigma) (1 - 1/d)."""
    assert secant_noise_numerator(f(5.0), f(1.0), f(1.0), xp) == 2.0
    rng = np.random.default_rng(0)
    d, s, n = 20, 0.3, 4000
    u = rng.normal(size=d)
    diffs = s * (rng.normal(size=(n, d)) - rng.normal(size=(n, d)))
    est = np.mean([secant_noise_numerator(D @ D, D @ u, u @ u, xp) for D in diffs])
    assert est == pytest.approx(s * s * (d - 1), rel=0.03)


def test_secant_noise_corrected_by_hand():
    """C05 (drop the floor) and C06 (scale's EMA weights swapped): two steps with ema 0.5, floor 0.1.
    Step 1: num 4, noise 1, scale 2 -> averages 2, 0.5, 1 -> r = 2, q = 0.5, rayleigh 1.5, times u_sq 3 = 4.5.
    Step 2: num 1, noise 10, scale 4 -> averages 1.5, 5.25, 2.5 -> r = 0.6, q = 2.1 > r: the floor 0.1 r = 0.06,
    times u_sq 1 = 0.06 (not the negative r - q)."""
    st = SecantNoiseState(f(0), f(0), f(0))
    c1, st = secant_noise_corrected(f(4.0), f(1.0), f(1.0), f(2.0), f(3.0), st, ema=0.5, floor=0.1, xp=xp)
    assert float(c1) == pytest.approx(4.5, rel=1e-15)
    assert tuple(map(float, st)) == pytest.approx((2.0, 0.5, 1.0), rel=1e-15)
    c2, st = secant_noise_corrected(f(1.0), f(10.0), f(2.0), f(2.0), f(1.0), st, ema=0.5, floor=0.1, xp=xp)
    assert tuple(map(float, st)) == pytest.approx((1.5, 5.25, 2.5), rel=1e-15)
    assert float(c2) == pytest.approx(0.06, rel=1e-12)
    # ema 0 and no noise: the plain secant, exact on a quadratic
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 5)); A = a @ a.T
    w, up, u, lr = rng.normal(size=5), rng.normal(size=5), rng.normal(size=5), 0.3
    c, _ = secant_noise_corrected((A @ (w + lr * up) - A @ w) @ up, f(0.0), f(lr), up @ up, u @ u,
                                  SecantNoiseState(f(0), f(0), f(0)), ema=0.0, xp=xp)
    assert float(c) == pytest.approx((up @ A @ up) * (u @ u) / (up @ up), rel=1e-12)


# ------------------------------------------------------------------------------------------------ eigen.py
class _Ops:
    dot = staticmethod(np.dot)
    scale = staticmethod(lambda s, a: s * a)
    axpy = staticmethod(lambda a, s, b: a + s * b)
    select = staticmethod(np.where)


def test_power_iteration_budget_is_exact():
    """E02 (``pass_used >= iters`` -> ``>``): a pass spends at most ``iters`` products (closure calls)."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    M = q @ np.diag(np.linspace(0.0, 1.0, 30)) @ q.T  # gap 1/29: slow, the budget binds
    for iters in (1, 2, 5):
        st = eigen.power_init(rng.normal(size=30), f(np.nan), _Ops, np)
        while not bool(st.done):
            st = eigen.power_step(st, lambda v: M @ v, fresh=np.eye(30)[0], iters=iters, tol=1e-14, ops=_Ops, xp=np)
        assert int(st.used) == iters


def test_an_infinite_product_voids_the_estimate():
    """E03 (``broken`` from NaN only): an inf in one Hessian-vector product (an overflow in a closure call) voids
    the estimate like a NaN does: value NaN, not inf."""
    v0 = np.ones(4)
    bad = eigen.power_step(eigen.power_init(v0, f(np.nan), _Ops, np), lambda v: v * np.inf, fresh=v0 / 2,
                           iters=5, tol=1e-3, ops=_Ops, xp=np)
    assert bool(bad.done) and np.isnan(bad.value)



def _power_pass(M, v0, iters, previous=np.nan, fresh=None):
    """A pass of the core's power iteration on the matrix ``M`` (float64): ``(final state, the iterates each
    product was taken at)``."""
    st = eigen.power_init(v0, f(previous), _Ops, np)
    fresh = np.eye(len(v0))[0] if fresh is None else fresh / np.linalg.norm(fresh)
    seen = []
    while not bool(st.done):
        seen.append(st.v.copy())
        st = eigen.power_step(st, lambda v: M @ v, fresh=fresh, iters=iters, tol=1e-14, ops=_Ops, xp=np)
    return st, seen


def _ritz_on(M, vectors):
    """Rayleigh-Ritz by an explicit orthonormal basis of the vectors' span: its largest Ritz value."""
    basis, _ = np.linalg.qr(np.stack(vectors, axis=1))
    return np.linalg.eigvalsh(basis.T @ M @ basis)[-1]


@pytest.mark.parametrize("iters", [1, 2, 3, 4, 7])
def test_krylov_estimate_is_rayleigh_ritz_on_the_last_iterates(iters):
    """The pass's estimate from its products' scalars alone equals Rayleigh-Ritz on an explicit orthonormal basis
    of the span of its last ``min(iters, KRYLOV_WINDOW)`` iterates (float64, a spectrum with a 1 % gap and a
    near-dominant negative end, where power iteration's quotient is far low), lies between the last Rayleigh
    quotient and the top eigenvalue, and reaches the top exactly once that span is the whole space."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    top = 2.0
    M = q @ np.diag(np.concatenate([[top, 1.98], rng.uniform(-1.9, 1.5, 38)])) @ q.T
    st, seen = _power_pass(M, rng.normal(size=40), iters)
    est = eigen.krylov_estimate(st, np.finfo(np.float64).eps, np)
    ref = _ritz_on(M, seen[-min(int(st.pass_used), eigen.KRYLOV_WINDOW):])  # this pass's (a shifted one after a
    # negative quotient: the estimate is the unshifted operator's all the same)
    assert est == pytest.approx(ref, rel=1e-10)
    assert st.value - 1e-12 <= est <= top + 1e-12
    if iters >= 3:
        assert est > st.value + 0.05  # the quotient is far low here; the span is not
    small = np.diag([3.0, 2.97, 0.5, -2.9])  # 4 unknowns: the window's span is the whole space
    st, _ = _power_pass(small, np.ones(4), eigen.KRYLOV_WINDOW)
    assert st.value < 2.9 and eigen.krylov_estimate(st, np.finfo(np.float64).eps, np) == pytest.approx(3.0, rel=1e-9)


def test_krylov_estimate_after_the_shifted_pass_and_on_failed_or_zero_products():
    """A negative dominant eigenvalue: the estimate is read from the shifted second pass and is the top (algebraic)
    eigenvalue (the second pass's span is the whole space); a non-finite product keeps the estimate NaN; a zero
    product (``M v = 0``) keeps the shift (0: the estimate of the zero matrix)."""
    M = np.diag([-5.0, 1.0, 0.5, -0.5])
    st, _ = _power_pass(M, np.ones(4), eigen.KRYLOV_WINDOW, fresh=np.array([1.0, 2.0, 3.0, 4.0]))
    assert bool(st.second) and int(st.pass_used) == eigen.KRYLOV_WINDOW and st.value < 0.99
    assert eigen.krylov_estimate(st, np.finfo(np.float64).eps, np) == pytest.approx(1.0, rel=1e-9)
    v0 = np.ones(4)
    bad = eigen.power_step(eigen.power_init(v0, f(np.nan), _Ops, np), lambda v: v * np.nan, fresh=v0 / 2,
                           iters=5, tol=1e-3, ops=_Ops, xp=np)
    assert np.isnan(eigen.krylov_estimate(bad, 1e-16, np))
    st, _ = _power_pass(np.zeros((4, 4)), v0, 5)
    assert eigen.krylov_estimate(st, 1e-16, np) == 0.0


def test_krylov_estimate_drops_directions_below_the_products_precision():
    """Products accurate to ``sqrt(eps)`` (finite differences in float32, here a relative error of 3e-4 added to
    each): the estimate stays within that error of the top eigenvalue instead of reading the noise in nearly
    parallel iterates as curvature, and at least the last Rayleigh quotient."""
    rng = np.random.default_rng(11)
    q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    M = q @ np.diag(np.concatenate([[1.0, 0.999], rng.uniform(0, 0.5, 58)])) @ q.T

    def noisy(v):
        z = M @ v
        return z + 3e-4 * np.linalg.norm(z) * rng.normal(size=60) / np.sqrt(60)
    for trial in range(20):
        st = eigen.power_init(q[:, 0] + 0.01 * rng.normal(size=60), f(np.nan), _Ops, np)  # nearly converged
        while not bool(st.done):
            st = eigen.power_step(st, noisy, fresh=np.eye(60)[0], iters=4, tol=0.0, ops=_Ops, xp=np)
        est = eigen.krylov_estimate(st, float(np.finfo(np.float32).eps), np)
        assert st.value <= est <= 1.0 + 3e-3


# ------------------------------------------------------------------------------------------------ mup.py
def test_gamma_depth_counts_weight_tensors_not_two_d_vectors():
    """M06 (``lay != "vector"`` dropped from the default gamma_depth): a 2-d bias in the vector layout (Flax
    attention's [heads, head_dim] biases) is not a layer: L = 2 here, so SGD's gamma = 4 scale is 4^(2/2) = 4 and
    the input layer's lr_mult m_out * 4 = 8 (not 2 * 4^(2/3))."""
    shapes = {"w": ((64, 8), "out_in"), "b": ((2, 32), "vector"), "o": ((10, 64), "out_in")}
    base = {"w": (32, 8), "b": (2, 16), "o": (10, 32)}
    t = core_mup.build_table(shapes, base, optimizer="sgd", gamma=4.0)
    assert t["w"].lr_mult == pytest.approx(8.0, rel=1e-15)


# ------------------------------------------------------------------------------------------------ diagnostics.py
def test_catapult_sharpness_is_filled_forward_at_its_ends():
    """D01 (no forward fill): the start and the end of the spike fall on steps without an estimate; the last
    estimate before each is used (50 before, 20 after)."""
    loss = [2.0, 1.5, 1.0, 4.0, 10.0, 3.0, 0.8, 0.5]
    sharp = [40, 50, np.nan, 30, 20, np.nan, np.nan, 10]
    (c,) = detect_catapults(loss, sharp)
    assert (c.start, c.end) == (2, 6) and (c.sharpness_before, c.sharpness_after) == (50, 20)


def test_no_catapult_when_the_sharpness_is_unchanged():
    """D02 (``after < before`` -> ``<=``): a spike that ends as sharp as it started is not a catapult."""
    assert detect_catapults([2.0, 1.0, 5.0, 0.9], [10, 10, 10, 10]) == []


@pytest.mark.parametrize("n", [1, 2, 3, 12])
def test_arpack_top_eigenpair_matches_a_dense_decomposition(n):
    """The standalone solver's top (algebraic) eigenpair against NumPy's dense decomposition, float64: the dense
    path below 3 unknowns and ARPACK above, on a matrix whose largest-magnitude eigenvalue is negative."""
    rng = np.random.default_rng(n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    vals = np.linspace(-3.0, 1.0, n) if n > 1 else np.array([-2.0])
    A = q @ np.diag(vals) @ q.T
    lam, v = eigen.arpack_top_eigenpair(lambda x: A @ x, n, rng.standard_normal(n), tol=1e-12)
    assert lam == pytest.approx(vals.max(), abs=1e-10)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(A @ v, lam * v, atol=1e-8)


def test_adam_update_unlike_tells_adam_from_bases_that_keep_its_state():
    """Adam's moments and direction after an all-ones gradient and one 100x smaller (x = 1 and 0.01 per entry),
    by hand: Adam's pass (NAdam's numerator factor too); Adamax's |x| second moment, RAdam's unpreconditioned
    direction and an eps_root fail."""
    adam = BaseMethod.adam(0.9, 0.999)
    x, xs = np.array([1.0, 2.0, 0.5]), np.array([0.01, 0.02, 0.005])

    def reading(x, *, nu=None, d=None):
        nu = 0.001 * x * x if nu is None else nu
        return 0.1 * x, nu, (x / (np.sqrt(nu / 0.001) + 1e-8) if d is None else d)
    assert adam_update_unlike(adam, reading(x), reading(xs)) is None
    assert adam_update_unlike(adam, reading(x, d=1.47 * np.sign(x)), reading(xs, d=1.47 * np.sign(xs))) is None
    assert "second moment" in adam_update_unlike(adam, reading(x, nu=np.abs(x)), reading(xs, nu=np.abs(xs)))
    assert "direction changes by 0.01 " in adam_update_unlike(adam, reading(x, d=x), reading(xs, d=xs))
    eps_root = 1e-4
    rooted = [reading(v, d=v / np.sqrt(v * v + eps_root)) for v in (x, xs)]
    assert "direction changes" in adam_update_unlike(adam, *rooted)
    assert adam_update_unlike(adam, reading(x), reading(xs[:2])) is None  # not comparable: not judged
    # the small reading's second moment below float16's smallest normal number / BETAS_RTOL: not judged
    assert adam_update_unlike(adam, reading(x, nu=np.abs(x)), reading(xs, nu=np.abs(xs)), tiny=1.0) is None


def test_adam_betas_seen_reads_one_minus_beta_off_the_first_moments():
    """From zero moments an all-ones gradient leaves ``mu = 1 - b1`` and ``nu = 1 - b2``: the betas come back
    where either ``1 - beta`` is off the declared one by more than BETAS_RTOL (relative), else None; a NaN moment
    (nothing to read) is not judged."""
    adam = BaseMethod.adam(0.9, 0.999)
    assert adam_betas_seen(adam, 0.1, 0.001) is None
    assert adam_betas_seen(adam, 0.1 * (1 + 0.9 * BETAS_RTOL), 0.001 * (1 - 0.9 * BETAS_RTOL)) is None
    b1, b2 = adam_betas_seen(adam, 0.1, 0.05)
    assert b1 == pytest.approx(0.9) and b2 == pytest.approx(0.95)
    b1, b2 = adam_betas_seen(adam, 0.1 * (1 + 1.1 * BETAS_RTOL), 0.001)
    assert b1 == pytest.approx(1 - 0.1 * (1 + 1.1 * BETAS_RTOL))
    assert adam_betas_seen(adam, 0.1, math.nan) is None
    # a factor c on the gradient before Adam (a clip) scales the moments by c and c^2: the declared betas then
    # fit mu^2 / nu, and a second update's mu = (1 - b1^2) c reads them free of c where they do not
    c = 0.2
    assert adam_betas_seen(adam, 0.1 * c, 0.001 * c * c, 0.19 * c) is None
    assert adam_betas_seen(adam, 0.1 * c, 0.001 * c * c) is None
    b1, b2 = adam_betas_seen(adam, 0.1 * c, 0.05 * c * c, 0.19 * c)
    assert b1 == pytest.approx(0.9) and b2 == pytest.approx(0.95)
    b1, b2 = adam_betas_seen(adam, 0.2, 0.05, 0.36)  # no factor: the first moments read as they are
    assert b1 == pytest.approx(0.8) and b2 == pytest.approx(0.95)
    # b1 = 0.8, b2 = 0.996 has the defaults' mu^2 / nu (0.04 / 0.004 = 10): the second update tells them apart,
    # unless the moments are too coarse for its difference (bfloat16's epsilon), where only the ratio is judged
    b1, b2 = adam_betas_seen(adam, 0.2, 0.004, 0.36)
    assert b1 == pytest.approx(0.8) and b2 == pytest.approx(0.996)
    assert adam_betas_seen(adam, 0.2, 0.004, 0.36, mu_eps=2.0 ** -8) is None
