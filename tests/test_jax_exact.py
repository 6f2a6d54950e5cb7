"""Exact answers on quadratics f(w) = 1/2 w^T A w (float64): greedy lr = -g^T u / u^T A u, CDAT sigma=2 twice
that, the EMA as documented; for gradient descent, heavy ball (optax.trace) and Adam bases."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_backend import cdat, quadratic_greedy, scale_by_cdat, stats


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _problem(seed=0, n=6):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    A = a @ a.T / n + np.eye(n)
    w = {"a": rng.normal(size=(n - 2,)), "b": rng.normal(size=(2,))}
    return A, jax.tree_util.tree_map(jnp.asarray, w)


def _flat(tree):
    return jnp.concatenate([tree["a"], tree["b"]])


BASES = {
    "gd": optax.identity,
    "heavy_ball": lambda: optax.trace(decay=0.9),
    "adam": lambda: optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
}


def _run(make_tuner, base_name, A, w, steps=5):
    """Run chain(base, tuner) and an independent copy of the base; return (lrs, expected greedy lrs)."""
    Aj = jnp.asarray(A)
    f = lambda p: 0.5 * _flat(p) @ Aj @ _flat(p)  # noqa: E731
    opt = optax.chain(BASES[base_name](), make_tuner())
    ref = BASES[base_name]()
    st, ref_st = opt.init(w), ref.init(w)

    @jax.jit
    def step(w, st, ref_st):
        v, g = jax.value_and_grad(f)(w)
        d, ref_st = ref.update(g, ref_st, w)
        dd, gg = _flat(d), _flat(g)
        greedy = (gg @ dd) / (dd @ Aj @ dd)
        up, st = opt.update(g, st, w, value=v, grad=g, value_fn=f)
        return optax.apply_updates(w, up), st, ref_st, greedy, (gg @ dd, dd @ Aj @ dd), up, d

    lrs, expected, parts = [], [], []
    for _ in range(steps):
        w, st, ref_st, greedy, nd, up, d = step(w, st, ref_st)
        lr = float(st[1].stats.lr)
        np.testing.assert_allclose(_flat(up), -lr * _flat(d), rtol=1e-13, atol=0)  # updates = -lr d
        lrs.append(lr)
        expected.append(float(greedy))
        parts.append(tuple(map(float, nd)))
    return np.array(lrs), np.array(expected), parts, st


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("oracle,rel", [("exact", 1e-10), ("fd", 5e-8)])  # fd: ~sqrt(eps) relative
def test_greedy_is_exact_line_minimiser(base, oracle, rel):
    A, w = _problem()
    lrs, expected, _, st = _run(lambda: __import__("jax_backend").scale_by_quadratic_greedy(curvature=oracle),
                                base, A, w)
    np.testing.assert_allclose(lrs, expected, rtol=rel)
    s = stats(st)
    assert int(s["closure_calls"]) == 2 and int(s["skipped"]) == 0


@pytest.mark.parametrize("base", list(BASES))
def test_cdat_sigma2_is_twice_greedy(base):
    A, w = _problem(1)
    lrs, expected, _, _ = _run(lambda: scale_by_cdat(sigma=2.0, ema=0.0, startup="paper", curvature="exact"), base, A, w)
    np.testing.assert_allclose(lrs, 2 * expected, rtol=1e-10)


def test_cdat_ema_as_documented():
    """EMA 0.9 without bias correction: step 1 exact, then the ratio of the two raw averages."""
    A, w = _problem(1)
    lrs, _, parts, st = _run(lambda: scale_by_cdat(sigma=2.0, ema=0.9, startup="paper", curvature="exact"), "heavy_ball", A, w)
    num = den = 0.0
    for lr, (n, d) in zip(lrs, parts):
        num, den = 0.9 * num + 0.1 * max(n, 0.0), 0.9 * den + 0.1 * abs(d)
        assert lr == pytest.approx(2 * num / den, rel=1e-10)
    assert float(st[1].rule.numerator_avg) == pytest.approx(num, rel=1e-10)


def test_secant_after_first_step_on_gd_quadratic():
    """Secant: the first step is an fd probe; afterwards, along a fixed direction, it is exact."""
    A = np.diag([1.0, 3.0])
    w = {"a": jnp.array([1.0, 0.0]), "b": jnp.zeros(0)}  # an eigenvector: u stays along e1
    lrs, expected, _, st = _run(lambda: scale_by_cdat(sigma=0.5, ema=0.0, curvature="secant", startup="paper"), "gd", A, w, steps=3)
    np.testing.assert_allclose(lrs, 0.5 * expected, rtol=1e-8)
    assert int(st[1].stats.closure_calls) == 1  # free after the first step


def test_conveniences_are_chains():
    A, w = _problem(2)
    f = lambda p: 0.5 * _flat(p) @ jnp.asarray(A) @ _flat(p)  # noqa: E731
    a, b = cdat(optax.trace(0.5), sigma=1.5), optax.chain(optax.trace(0.5), scale_by_cdat(sigma=1.5))
    sa, sb = a.init(w), b.init(w)
    assert jax.tree_util.tree_structure(sa) == jax.tree_util.tree_structure(sb)

    @jax.jit
    def step(w, sa, sb):
        v, g = jax.value_and_grad(f)(w)
        ua, sa = a.update(g, sa, w, value=v, grad=g, value_fn=f)
        ub, sb = b.update(g, sb, w, value=v, grad=g, value_fn=f)
        return optax.apply_updates(w, ua), sa, sb, ua, ub

    for _ in range(3):
        w, sa, sb, ua, ub = step(w, sa, sb)
        np.testing.assert_array_equal(_flat(ua), _flat(ub))
    g = quadratic_greedy(optax.identity())
    assert isinstance(g.init(w), tuple) and math.isnan(float(g.init(w)[1].stats.numerator))
