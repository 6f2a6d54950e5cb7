"""The checks of Optax's own contrib suite (``optax/contrib/_common_test.py``), rewritten for the tuners and fed
``value``/``value_fn`` the way Optax's line-search tests feed its line search:

* extra arguments accepted (and ignored when meant for another member) and no recompilation on the 2nd call;
* convergence on the suite's toy problems (parabola, Rosenbrock, matrix parabola, mixed 1-d/2-d target) where
  the tuner's design allows (see ``CONVERGES``: CDAT's default ``sigma = 2`` is the step "on edge", which
  oscillates forever on an isotropic parabola by design, so the convergence runs use ``sigma = 1``; the
  edge-of-stability rule sits at ``sigma`` times the stability threshold and is run at ``sigma = 0.5``);
* ``optax.inject_hyperparams``: same updates and inner states as the plain optimizer (jitted init);
* dtype preservation (bfloat16, float32): updates in the parameters' dtype;
* ``optax.MultiSteps``: zero updates on the first micro-step;
* state shape/dtype stability under ``lax.cond`` (float16, bfloat16, float32, float64; a value of a confusing
  dtype), and float64 runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from optax._src import test_utils

from curvopt.optax import armijo, cdat, edge_of_stability, polyak, quadratic_greedy

# name -> (factory, settings, fed the loss?)
TUNERS = {
    "cdat": (cdat, dict(sigma=1.0), True),
    "cdat_free": (cdat, dict(sigma=1.0), False),
    "cdat_exact": (cdat, dict(sigma=1.0, curvature="exact"), True),
    "greedy": (quadratic_greedy, dict(lr_max=10.0), True),
    "greedy_free": (quadratic_greedy, dict(lr_max=10.0), False),
    "polyak": (polyak, dict(lr_max=1.0), True),
    "armijo": (armijo, dict(), True),
    "eos": (edge_of_stability, dict(sigma=0.5, sharpness=5), True),
}
BASES = {"sgd": (optax.identity, "gd"), "adam": (optax.scale_by_adam, "adam")}  # (base, its base_method)


def _opt(name, base="sgd", **over):
    make, kw, _ = TUNERS[name]
    transform, method = BASES[base]
    return make(transform(), **dict(kw, base_method=method, **over))


def _kwargs(name, value, obj):
    return dict(value=value, value_fn=obj) if TUNERS[name][2] else {}


def parabola(dtype):
    final = jnp.array([1.0, -1.0, 1.0], dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype), final, lambda p: jnp.sum((p - final) ** 2)


def rosenbrock(dtype):
    return (jnp.array([0.0, 0.0], dtype), jnp.array([1.0, 1.0], dtype),
            lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2)


def matrix_parabola(dtype):
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return jnp.zeros((2, 2), dtype), final, lambda p: jnp.sum((p - final) ** 2)


def mixed(dtype):
    f1, f2 = jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)
    return ((jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2),
            lambda p: jnp.sum((p[0] - f1) ** 2) + jnp.sum((p[1] - f2) ** 2))


TARGETS = {"parabola": parabola, "rosenbrock": rosenbrock, "matrix_parabola": matrix_parabola, "mixed": mixed}
# (tuner, base, target) pairs that do not converge within the budget, and why (the design, not a bug)
NOT_CONVERGING = {
    ("eos", "sgd", "rosenbrock"): "half the stability threshold of the top curvature crawls along the valley "
                                  "floor (lr 1e-3; reaches (0.94, 0.89) in 3000 steps)",
    ("eos", "adam", "rosenbrock"): "the rate on the edge from a sharpness up to 5 steps old diverges: along "
                                   "Adam's sign-like steps Rosenbrock's curvature grows by orders of magnitude "
                                   "between estimates (from the origin with the sharpness every 2-10 steps, from "
                                   "(-1.2, 1) every 5); with it every step it converges",
    ("greedy_free", "sgd", "rosenbrock"): "the closure-free secant is lagged by a step: greedy without an "
                                          "average applies the previous direction's curvature to a direction "
                                          "alternating across/along the valley (lrs 0.4, 0.004, ...); CDAT's "
                                          "averages (cdat_free) converge",
}


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_accepts_extra_args_and_does_not_recompile(name):
    init, _, obj = rosenbrock(jnp.float32)
    opt = _opt(name)

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(obj)(p)
        up, s = opt.update(g, s, p, unexpected_extra_args_your_optimizer_doesnt_expect=1, **_kwargs(name, v, obj))
        return optax.apply_updates(p, up), s

    p, s = init, opt.init(init)
    for _ in range(2):
        p, s = step(p, s)
    p, s = step(init, opt.init(init))
    with test_utils.log_compilations() as logs:
        step(p, s)
    assert not logs, "recompiled on the second call"


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("name", sorted(TUNERS))
def test_converges_on_the_suites_problems(name, base, target):
    if (name, base, target) in NOT_CONVERGING:
        pytest.skip(NOT_CONVERGING[(name, base, target)])
    init, final, obj = TARGETS[target](jnp.float32)
    opt = _opt(name, base)

    def step(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(obj)(p)
        up, s = opt.update(g, s, p, **_kwargs(name, v, obj))
        return (optax.apply_updates(p, up), s), None

    (p, s), _ = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), length=3000))(init, opt.init(init))
    test_utils.assert_trees_all_close(p, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_inject_hyperparams_same_updates_and_state(name):
    make, kw, fed = TUNERS[name]
    factory = lambda **h: make(optax.identity(), **h)  # noqa: E731
    opt, injected = factory(**kw), optax.inject_hyperparams(make)(optax.identity(), **kw)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    obj = lambda p: optax.tree.norm(p, squared=True)  # noqa: E731
    value, grads = jax.value_and_grad(obj)(params)
    extra = dict(value=value, value_fn=obj) if fed else {}
    up, st = jax.jit(lambda s: opt.update(grads, s, params, **extra))(jax.jit(opt.init)(params))
    up_i, st_i = jax.jit(lambda s: injected.update(grads, s, params, **extra))(jax.jit(injected.init)(params))
    test_utils.assert_trees_all_close(up_i, up, rtol=1e-5)
    test_utils.assert_trees_all_close(st_i.inner_state, st, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", sorted(TUNERS))
def test_preserves_dtype(name, dtype):
    opt = _opt(name)
    obj = lambda x: jnp.sum(x ** 2)  # noqa: E731
    params = jnp.array([1.0, 2.0], dtype)
    value, grads = jax.value_and_grad(obj)(params)
    updates, _ = jax.jit(lambda s: opt.update(grads, s, params, **_kwargs(name, value, obj)))(
        jax.jit(opt.init)(params))
    assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", sorted(TUNERS))
def test_multisteps_gradient_accumulation(name, dtype):
    obj = lambda x: jnp.sum(x ** 2)  # noqa: E731
    inner = _opt(name)
    opt = optax.MultiSteps(inner, every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype)
    value, grads = jax.value_and_grad(obj)(params)
    updates, _ = jax.jit(lambda s: opt.update(grads, s, params, **_kwargs(name, value, obj)))(
        jax.jit(opt.init)(params))
    test_utils.assert_trees_all_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", sorted(TUNERS))
def test_state_shape_dtype_stability(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        dtype = jnp.dtype(dtype)
        opt = _opt(name)
        init, _, obj = parabola(dtype)

        @jax.jit
        def step(p, s):
            value, g = jax.value_and_grad(obj)(p)
            value = value.astype(jnp.float16 if dtype != jnp.float16 else jnp.bfloat16)  # confuse the dtype
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            up, s = jax.lax.cond(cond, lambda: opt.update(g, s, p, **_kwargs(name, value, obj)), lambda: (p, s))
            return optax.apply_updates(p, up), s

        p, s = init, opt.init(init)
        for _ in range(2):
            p, new_s = step(p, s)
            assert jax.tree.leaves(p)[0].dtype == dtype
            s = new_s


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_float64_parabola(name):
    with jax.enable_x64(True):
        init, final, obj = parabola(jnp.float64)
        opt = _opt(name)
        step = jax.jit(lambda p, s: (lambda v, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(
            *opt.update(g, s, p, **_kwargs(name, v, obj))))(*jax.value_and_grad(obj)(p)))
        p, s = init, opt.init(init)
        for _ in range(200):
            p, s = step(p, s)
        assert p.dtype == jnp.float64
        test_utils.assert_trees_all_close(p, final, rtol=1e-6, atol=1e-6)
