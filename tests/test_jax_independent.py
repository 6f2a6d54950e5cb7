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
