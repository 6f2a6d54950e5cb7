"""The Optax tuners called outside ``jax.jit`` (a plain Python loop, an un-jitted ``nnx.Optimizer.update``):
after the first step nothing compiles again, and the rates are the jitted update's. Before, every eager step
compiled its ``lax.cond``/``lax.while_loop`` branches anew (closures made at each update: 2-3 compilations a
step, memory growing ~6 MiB a step in a field test)."""
from __future__ import annotations

import contextlib
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.optax import armijo, cdat, edge_of_stability, polyak, quadratic_greedy
from jax_backend.control import cond, while_loop


@contextlib.contextmanager
def compilations():
    """The names of the computations JAX compiles inside the block."""
    seen: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                seen.append(record.getMessage())

    logger, handler = logging.getLogger("jax"), Handler()
    logger.addHandler(handler)
    with jax.log_compiles(True):
        try:
            yield seen
        finally:
            logger.removeHandler(handler)


def _problem():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k[0], (8, 3)) * 0.1, "b": jnp.zeros(3)}
    x, y = jax.random.normal(k[1], (16, 8)), jax.random.randint(k[2], (16,), 0, 3)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
    return params, loss


_CASES = {
    "cdat closure-free": (lambda: cdat(optax.scale_by_adam(), base_method="adam"), False),
    "cdat value_fn": (lambda: cdat(optax.scale_by_adam(), base_method="adam"), True),
    "cdat sharpness": (lambda: cdat(optax.identity(), sharpness=1), True),
    "greedy": (lambda: quadratic_greedy(optax.identity()), True),
    "armijo": (lambda: armijo(optax.identity()), True),
    "polyak": (lambda: polyak(optax.identity()), True),
    "edge": (lambda: edge_of_stability(optax.identity()), True),
}


def _rates(opt, loss, params, update, steps=5):
    """The rates of ``steps`` steps of ``update(grad, state, params, value, grad)`` and the compilations of each."""
    vg = jax.jit(jax.value_and_grad(loss))
    state, p, rates, compiled = opt.init(params), params, [], []
    for _ in range(steps):
        value, grad = vg(p)
        held = jax.tree.leaves((state, grad, p))  # what the caller still holds (kept alive: their ids stay theirs)
        with compilations() as seen:
            u, state = update(grad, state, p, value, grad)
            p = optax.apply_updates(p, u)
            jax.block_until_ready(p)
        compiled.append(len(seen))
        rates.append(float(optax.tree_utils.tree_get(state, "lr")))
        # each leaf its own array, none the caller's inputs: a jitted step donating the state deletes them
        leaves = jax.tree.leaves(state)
        assert len({id(x) for x in leaves}) == len(leaves) and not {id(x) for x in held} & {id(x) for x in leaves}
    return rates, compiled


@pytest.mark.parametrize("case", [c if c.startswith("cdat ") and "sharpness" not in c else
                                  pytest.param(c, marks=pytest.mark.slow) for c in _CASES])
def test_an_eager_update_compiles_nothing_after_its_first_step_and_gives_the_jitted_rates(case):
    make, with_value_fn = _CASES[case]
    params, loss = _problem()

    def update(g, s, p, value, grad):
        return opt.update(g, s, p, **({"value": value, "grad": grad, "value_fn": loss} if with_value_fn else {}))

    with warnings.catch_warnings(), jax.enable_x64(True):  # (float64: the two programs' roundings apart)
        warnings.simplefilter("ignore")
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        opt = make()
        eager, compiled = _rates(opt, loss, params, update)
        jitted, _ = _rates(opt, loss, params, jax.jit(update))
    assert compiled[2:] == [0] * (len(compiled) - 2), compiled
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)  # (the fd probe amplifies rounding ~1e8x)
    assert all(r > 0 for r in eager)


def test_control_flow_runs_the_branch_taken_on_concrete_values_and_is_jax_s_under_tracing():
    calls = []

    def true_fun(x):
        calls.append("true")
        return x + 1.0

    def false_fun(x):
        calls.append("false")
        return x - 1.0

    assert float(cond(jnp.bool_(True), true_fun, false_fun, jnp.float32(2.0))) == 3.0 and calls == ["true"]
    assert float(jax.jit(lambda p, x: cond(p, true_fun, false_fun, x))(False, 2.0)) == 1.0
    assert sorted(calls[1:]) == ["false", "true"]  # traced: both branches, as lax.cond

    def body(c):
        return c[0] + 1, c[1] * 2.0

    def going(c):
        return c[0] < 5

    assert while_loop(going, body, (jnp.int32(0), jnp.float32(1.0)))[1] == 32.0
    assert jax.jit(lambda n: while_loop(lambda c: c[0] < n, body, (jnp.int32(0), jnp.float32(1.0))))(5)[1] == 32.0
    with compilations() as seen:
        for _ in range(3):
            cond(jnp.bool_(True), lambda x: x * 2.0, lambda x: x, jnp.float32(1.0))  # fresh closures each time
            while_loop(lambda c: c < 3, lambda c: c + 1, jnp.int32(0))
    assert not any("cond" in m or "while" in m for m in seen), seen
    with pytest.raises(TypeError, match="scalar"):  # lax.cond's error, not one element's truth
        cond(jnp.array([True, False]), lambda: 1.0, lambda: 2.0)
