"""A non-finite Hessian-vector product voids the online sharpness estimate (core power iteration), and the
estimate is retried at the next step (core ``sharpness_due``), in both backends. Before, the pass stopped and kept
the Rayleigh quotient of the products before the bad one: after two products of a power iteration the sharpness
was 40x low and the edge-of-stability rate 40x high until the next scheduled estimate (divergence), and a NaN at
the first product gave lr 0 for the whole period."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from curvopt.config import SharpnessConfig, power_iters, sharpness_due
from curvopt.eigen import power_init, power_step
from curvopt.optax import edge_of_stability, stats
from curvopt.torch import EdgeOfStability

A = np.diag([10.0, 3.0, 1.0, 0.5])  # the quadratic's Hessian: sharpness 10
EVERY = 5


class _NumpyOps:
    dot = staticmethod(lambda a, b: np.dot(a, b))
    scale = staticmethod(lambda s, a: s * a)
    axpy = staticmethod(lambda a, s, b: a + s * b)
    select = staticmethod(lambda pred, a, b: a if pred else b)


def test_core_a_nan_product_voids_the_estimate():
    calls = {"n": 0}

    def matvec(v):
        calls["n"] += 1
        return A @ v * (math.nan if calls["n"] == 2 else 1.0)

    state = power_init(np.ones(4), np.float64(math.nan), _NumpyOps, np)
    while not state.done:
        state = power_step(state, matvec, fresh=np.ones(4) / 2, iters=50, tol=1e-9, ops=_NumpyOps, xp=np)
    assert math.isnan(state.value) and calls["n"] == 2
    # a zero product is an eigenvalue 0, not a failure
    zero = power_step(power_init(np.ones(4), np.float64(math.nan), _NumpyOps, np), lambda v: 0 * v,
                      fresh=np.ones(4) / 2, iters=50, tol=1e-9, ops=_NumpyOps, xp=np)
    assert zero.done and zero.value == 0.0


def test_core_a_failed_estimate_is_due_again_at_once():
    assert sharpness_due(0, EVERY) and not sharpness_due(1, EVERY, 10.0)
    assert sharpness_due(1, EVERY, math.nan) and not sharpness_due(1, 0, math.nan)  # 0: off
    assert bool(sharpness_due(jnp.int32(1), jnp.int32(EVERY), jnp.float32(jnp.nan)))
    assert not bool(sharpness_due(jnp.int32(1), jnp.int32(EVERY), jnp.float32(10.0)))


def _torch_run(nan_step, nan_call=2, steps=3, hessian=A, sharpness=EVERY):
    """(lr, sharpness, closure calls) per step; the ``nan_call``-th closure call of step ``nan_step`` (1: the main
    call) is NaN."""
    w = torch.nn.Parameter(torch.ones(len(hessian), dtype=torch.float64))
    a = torch.tensor(hessian)
    opt = EdgeOfStability(torch.optim.SGD([w], lr=1.0), sharpness=sharpness)
    out = []
    for t in range(steps):
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            loss = 0.5 * w @ a @ w * (math.nan if (t, calls["n"]) == (nan_step, nan_call) else 1.0)
            loss.backward()
            return loss
        opt.step(closure)
        out.append((float(opt.stats["lr"]), float(opt.stats["sharpness"]), int(opt.stats["closure_calls"])))
    return out


def test_torch_edge_of_stability_after_a_nan_product():
    clean = _torch_run(None)
    faulty = _torch_run(0, nan_call=3)  # the main call, then the sharpness's second product
    assert faulty[0][0] == 0.0 and math.isnan(faulty[0][1])
    assert faulty[1][1] == pytest.approx(10.0, rel=1e-3)  # retried at the next step, not five steps later
    assert faulty[1][0] == pytest.approx(clean[0][0], rel=1e-3)
    # a later scheduled estimate fails: NaN that step (the rule keeps its rate), retried at the next
    later = _torch_run(EVERY, steps=EVERY + 2)
    assert math.isnan(later[EVERY][1]) and later[EVERY][0] == later[EVERY - 1][0]
    assert later[EVERY + 1][1] == pytest.approx(10.0, rel=1e-3)


def _jax_run(nan_step, nan_call=2, steps=3, hessian=A, sharpness=EVERY):
    """As :func:`_torch_run`: the ``nan_call``-th loss evaluation of step ``nan_step`` is NaN."""
    count = {"n": 0, "t": 0}

    def flag(_):
        count["n"] += 1
        return np.float32(math.nan if (count["t"], count["n"]) == (nan_step, nan_call) else 1.0)

    def loss(w):
        # float32 out (cast after): XLA may run the callback on a thread of its own, where the caller's
        # enable_x64 context does not hold, and a float64 result comes back as float32 and is refused
        f = jax.pure_callback(flag, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.stop_gradient(w.sum()))
        return 0.5 * w @ jnp.asarray(hessian) @ w * jax.lax.stop_gradient(f).astype(w.dtype)

    opt = edge_of_stability(optax.identity(), base_method="gd", sharpness=sharpness)
    w = jnp.ones(len(hessian))
    state = opt.init(w)

    @jax.jit
    def step(w, state):
        value, grad = jax.value_and_grad(loss)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=loss)
        return optax.apply_updates(w, updates), state

    out = []
    for t in range(steps):
        count["t"], count["n"] = t, 0
        w, state = step(w, state)
        s = stats(state)
        out.append((float(s["lr"]), float(s["sharpness"]), int(s["closure_calls"])))
    return out


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_jax_edge_of_stability_after_a_nan_product():
    with jax.enable_x64(True):
        clean = _jax_run(None)
        faulty = _jax_run(0)  # the main value, then the first product of the sharpness
        later = _jax_run(EVERY, steps=EVERY + 2)
    assert faulty[0][0] == 0.0 and math.isnan(faulty[0][1])
    assert faulty[1][1] == pytest.approx(10.0, rel=1e-3)
    assert faulty[1][0] == pytest.approx(clean[0][0], rel=1e-3)
    assert math.isnan(later[EVERY][1]) and later[EVERY][0] == later[EVERY - 1][0]  # the rule keeps its rate
    assert later[EVERY + 1][1] == pytest.approx(10.0, rel=1e-3)


def test_core_a_retry_gets_the_first_estimates_budget():
    cfg = SharpnessConfig(every=EVERY, iters=4, first_iters=50)
    assert power_iters(cfg, math.nan) == 50 and power_iters(cfg, 10.0) == 4 and power_iters(cfg, math.inf) == 50
    assert int(power_iters(cfg, jnp.float32(jnp.nan))) == 50 and int(power_iters(cfg, jnp.float32(3.0))) == 4
    assert int(power_iters(cfg, torch.tensor(math.nan))) == 50 and int(power_iters(cfg, torch.tensor(3.0))) == 4


def test_a_retry_spends_the_same_products_in_both_backends():
    """A scheduled estimate fails on a Hessian whose top eigenvalues are close (slow power iteration): the retry
    at the next step spends up to ``first_iters`` products in both backends (Optax spent 50 and PyTorch 4 from
    the same stored eigenvector: the rates then differed until the next estimate)."""
    hessian = np.diag(np.linspace(1.0, 1.05, 20))
    cfg = SharpnessConfig(every=EVERY, iters=4, first_iters=50, tol=1e-12)
    torch_run = _torch_run(EVERY, steps=EVERY + 2, hessian=hessian, sharpness=cfg)
    with jax.enable_x64(True):
        jax_run = _jax_run(EVERY, steps=EVERY + 2, hessian=hessian, sharpness=cfg)
    assert torch_run[EVERY + 1][2] == jax_run[EVERY + 1][2] > 1 + cfg.iters  # (their random starts differ)
