"""Independent checks of the Optax backend's adapters, each written against a mutation of the backend that the rest
of the suite let pass (named in the test's docstring)."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.config import SharpnessConfig
from jax_backend import BaseMethod, cdat, scale_by_quadratic_greedy, stats


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_least_precise_eps_and_fd_step_of_mixed_precision_parameters():
    """A tree of float32 and bfloat16 leaves: the fd displacement is sized by bfloat16's eps whatever the leaf
    order, h ||d|| = sqrt(eps_bf16) ||w||. Kills: the eps of the most precise leaf."""
    from jax_backend.direction import least_precise_eps
    from jax_backend.oracles import fd_step

    for tree in ({"a": jnp.ones(3, jnp.float32), "b": jnp.ones(2, jnp.bfloat16)},
                 {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones(2, jnp.float32)}):
        assert least_precise_eps(tree) == float(jnp.finfo(jnp.bfloat16).eps)
        d = jax.tree.map(lambda x: 2 * x, tree)
        h = float(fd_step(tree, d, jnp.float32))
        w_norm, d_norm = math.sqrt(5.0), 2 * math.sqrt(5.0)
        assert h * d_norm == pytest.approx(math.sqrt(float(jnp.finfo(jnp.bfloat16).eps)) * w_norm, rel=1e-6)


def test_a_stationary_point_is_not_counted_as_an_ascent_step():
    """At an exact stationary point (-g^T u = 0: a converged or dead model) the direction is not uphill:
    ``ascent_steps`` stays 0 and ``stats`` does not claim the chain negated the updates. Kills: ``<= 0`` for
    ``< 0``."""
    A = jnp.diag(jnp.array([1.0, 3.0]))
    f = lambda p: 0.5 * p @ A @ p  # noqa: E731
    tx = optax.chain(optax.identity(), scale_by_quadratic_greedy(curvature="exact"))
    w = jnp.zeros(2)
    st = tx.init(w)
    v, g = jax.value_and_grad(f)(w)
    _, st = tx.update(g, st, w, value=v, grad=g, value_fn=f)
    assert int(st[1].ascent_steps) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats(st)


def test_a_failed_preconditioned_estimate_is_retried_at_once():
    """Behind Adam the schedule's retry (``sharpness_due``) watches the preconditioned estimate, the one the rule
    reads: with the plain estimate finite and the preconditioned one NaN, the next step re-estimates although
    it is off the schedule. Kills: the retry watching the plain estimate."""
    from jax_backend.sharpness import EigenMemory, online_sharpness, random_unit

    A = jnp.diag(jnp.array([1.0, 2.0, 5.0]))
    f = lambda p: 0.5 * p @ A @ p  # noqa: E731
    w = jnp.array([1.0, -1.0, 0.5])
    memory = EigenMemory(random_unit(w), random_unit(w, 1))
    P = jnp.array([1.0, 2.0, 4.0])
    last = (jnp.asarray(5.0), jnp.asarray(jnp.nan))
    lam, lam_p, _, used = online_sharpness(f, w, memory, last, steps=jnp.int32(3),
                                           config=SharpnessConfig(every=10, iters=200, first_iters=200, tol=1e-12),
                                           preconditioner=P, dtype=jnp.float64)
    assert int(used) > 0
    assert float(lam_p) == pytest.approx(max(1.0 / 1.0, 2.0 / 2.0, 5.0 / 4.0), rel=1e-6)


def test_paired_prediction_is_dropped_after_a_step_at_rate_zero():
    """``numerator="paired"``: a step at lr = 0 (here a sigma schedule that is 0 on the second step) leaves no
    prediction (documented; PyTorch's ``curvopt_predicted`` is False there too), so the next step's rule
    numerator is ``-g^T u`` (lr * |curvature| at sigma 1, ema 0, paper start-up). Kills: a prediction kept
    after lr = 0 (the next numerator corrected by the noise between two batches at one point)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    H = jnp.asarray(a @ a.T / 6 + np.eye(6))
    targets = [jnp.asarray(3 + 0.5 * rng.normal(size=6)) for _ in range(3)]
    f = lambda p, y: 0.5 * (p - y) @ H @ (p - y)  # noqa: E731
    sigma = lambda count: jnp.where(count == 1, 0.0, 1.0)  # noqa: E731
    tx = cdat(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), base_method=BaseMethod.adam(0.9, 0.999, 1e-8),
              sigma=sigma, ema=0.0, startup="paper", curvature="fd", numerator="paired")
    w = jnp.asarray(rng.normal(size=6))
    st = tx.init(w)
    for t, y in enumerate(targets):
        v, g = jax.value_and_grad(f)(w, y)
        up, st = tx.update(g, st, w, value=v, grad=g, value_fn=f, y=y)
        w = optax.apply_updates(w, up)
        s = st[1].stats
        if t == 1:
            assert float(s.lr) == 0.0
            assert not bool(st[1].paired.predicted)
        if t == 2:
            assert float(s.lr) * abs(float(s.curvature)) == pytest.approx(float(s.numerator), rel=1e-9)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_amsgrad_state_reads_as_adam_with_its_running_maximum():
    """``cdat(optax.scale_by_amsgrad(), base_method="adam")``: the tuner finds Adam's state (no warning, the
    momentum numerator at its default), and its ``P`` is AMSGrad's own ``(1 - b1^t)(sqrt(nu_max) + eps)``: the
    preconditioned sharpness at step 1 against the float64 dense ``lambda_max(P^-1 H)``, and every later rate
    against the momentum numerator by hand. Kills: ``optax.ScaleByAmsgradState`` not recognised, ``nu_max``
    read without undoing its bias correction."""
    from jax.flatten_util import ravel_pytree

    b1, b2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(16, 3))), jnp.asarray(rng.normal(size=(16,)))
    w0 = {"a": jnp.asarray(rng.normal(size=(3, 4)) * 0.5), "b": jnp.asarray(rng.normal(size=(4,)) * 0.5)}

    def loss(w):
        return jnp.mean((jnp.tanh(x @ w["a"]) @ w["b"] - y) ** 2)

    def run(tx, steps):
        @jax.jit
        def step(w, st):
            v, g = jax.value_and_grad(loss)(w)
            up, new = tx.update(g, st, w, value=v, grad=g, value_fn=loss)
            return optax.apply_updates(w, up), new, g

        w, st, out = w0, tx.init(w0), []
        for _ in range(steps):
            w_next, new, g = step(w, st)
            out.append((w, st, new, g))
            w, st = w_next, new
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "no Adam state" nor the numerator's fallback
        run(cdat(optax.scale_by_amsgrad(b1, b2, eps), base_method="adam", curvature="exact"), 3)

    tx = cdat(optax.scale_by_amsgrad(b1, b2, eps), base_method="adam", sigma=2.0, ema=0.0, startup="paper",
              numerator="momentum", curvature="exact", sharpness=SharpnessConfig(1, 500, 500, 1e-12))
    recs = run(tx, 12)
    w, _, after, _ = recs[0]
    flat, unravel = ravel_pytree(w)
    H = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(flat))
    P = (1 - b1) * (np.sqrt(np.asarray(ravel_pytree(after[0].nu_max)[0])) + eps)
    S = 1 / np.sqrt(P)
    lam = np.linalg.eigvalsh(S[:, None] * H * S[None, :])[-1]
    assert float(after[1].stats.preconditioned_sharpness) == pytest.approx(lam, rel=1e-6)
    checked = 0
    for t, (_, before, after, g) in enumerate(recs, start=1):
        s = after[1].stats
        if t == 1 or float(s.lr) == 0:
            continue
        gf, m_prev = ravel_pytree(g)[0], ravel_pytree(before[0].mu)[0]
        D = 1 / ((1 - b1 ** t) * (np.sqrt(ravel_pytree(after[0].nu_max)[0]) + eps))
        n = float(s.numerator) + (1 - b1) * (gf @ (D * m_prev) / (1 - b1 ** (t - 1)) - gf @ (D * gf))
        assert float(s.lr) * abs(float(s.curvature)) / 2 == pytest.approx(float(n), rel=1e-8)
        checked += 1
    assert checked >= 5


def _noisy_quadratic_run(noise_correction: bool, sigma: float | None = None, steps: int = 300):
    """Closure-free CDAT (``sigma``) behind gradient descent on ``f = c/2 ||w||^2`` in 200 dimensions, each
    gradient with fresh unit Gaussian noise: every direction's curvature is ``c``. Returns the late steps' Rayleigh
    quotients ``curvature / ||u||^2`` and rates."""
    dim, c = 200, 2.0
    opt = cdat(optax.identity(), base_method="gd", noise_correction=noise_correction, sigma=sigma)
    w = jnp.full(dim, 3.0)
    s = opt.init(w)

    @jax.jit
    def step(w, s, key):
        up, s = opt.update(c * w + jax.random.normal(key, (dim,)), s, w)
        return optax.apply_updates(w, up), s, jnp.vdot(up, up)

    quotients, lrs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the secant caveat behind gradient descent
        for key in jax.random.split(jax.random.PRNGKey(0), steps):
            w, s, step_sq = step(w, s, key)
            st = stats(s)
            lr = float(st["lr"])
            quotients.append(float(st["curvature"]) * lr ** 2 / float(step_sq))
            lrs.append(lr)
    return np.array(quotients[steps // 2:]), np.array(lrs[steps // 2:])


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_noise_correction_reads_the_true_curvature_under_gradient_noise():
    """The secant of consecutive noisy gradients reads ``c + tr(Sigma) / (lr ||u||^2)``. At ``sigma = 1`` (rate
    ``1 / c``: the iterates stay at the noise floor, where the noise is as large as the gradient's signal) the
    uncorrected quotient is 11x high and the rate collapses (0.05 where ``1 / c = 0.5``); corrected it is 1.2x
    high and the rate 0.41. On the edge (the default sigma, rate ``2 / c``: the iterates random-walk away and the
    signal outgrows the noise) the corrected median quotient is ``c`` to 1% and the rate ``2 / c`` to 2%.
    Kills: the noise metric, the gradient difference, the kept gradient or the averages wired wrong (the parity
    tests compare the backends, this compares the Optax one with the truth)."""
    raw, raw_lrs = _noisy_quadratic_run(False, sigma=1.0)
    floor, floor_lrs = _noisy_quadratic_run(True, sigma=1.0)
    assert np.median(raw) > 5 * 2.0 and np.median(raw_lrs) < 0.1
    assert np.median(floor) < 1.3 * 2.0 and np.median(floor_lrs) > 0.35
    corrected, lrs = _noisy_quadratic_run(True)
    assert np.median(corrected) == pytest.approx(2.0, rel=0.01)
    assert np.median(lrs) == pytest.approx(1.0, rel=0.02)


def test_noise_correction_behind_adam_needs_its_state_before_the_update():
    """Behind Adam the metric is Adam's ``P`` before the update: a plain chain does not hand it over and gets a
    clear error at trace time; the convenience does. Kills: a silent fallback to another ``P``."""
    from jax_backend import scale_by_cdat
    p = jnp.ones(3)
    bad = optax.chain(optax.scale_by_adam(), scale_by_cdat(base_method="adam", numerator="direction",
                                                           noise_correction=True))
    with pytest.raises(ValueError, match="state before its update"):
        bad.update(p, bad.init(p), p, grad=p)
    good = cdat(optax.scale_by_adam(), base_method="adam", noise_correction=True)
    _, s = good.update(p, good.init(p), p)
    assert s[1].noise is not None
    with pytest.raises(TypeError, match="noise_correction"):
        cdat(optax.scale_by_adam(), noise_correction="yes")

