"""The exact oracle through a ``jax.custom_vjp`` op (forward-over-forward cannot trace it: forward-over-reverse
fallback), and ``hessian_top_eigenvalue`` with non-array keyword arguments (Python flags bound statically),
against dense Hessians in float64."""
import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from curvopt.config import SharpnessConfig
from jax_backend import BaseMethod, cdat, hessian_top_eigenvalue, quadratic_greedy, scale_by_cdat, stats
from jax_backend import sharpness as sharpness_module


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@jax.custom_vjp
def _act(x):
    return jnp.tanh(x)


_act.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 4)))
    y = jnp.arange(16) % 2
    params = {"w": jnp.asarray(0.5 * rng.normal(size=(4, 2))), "b": jnp.asarray(0.1 * rng.normal(size=(2,)))}
    return params, x, y


def _loss(p, x, y):  # a custom_vjp activation, then cross-entropy: forward-over-forward cannot trace it
    return optax.softmax_cross_entropy_with_integer_labels(_act(x @ p["w"] + p["b"]), y).mean()


@jax.jit
def _dense_hessian(params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(jax.grad(lambda v: _loss(unravel(v), x, y)))(flat)


@pytest.mark.parametrize("tuner,factor", [
    (lambda: quadratic_greedy(optax.identity(), curvature="exact"), 1.0),
    (lambda: cdat(optax.identity(), sigma=2.0, ema=0.0, startup="paper", curvature="exact"), 2.0),
])
def test_exact_oracle_through_custom_vjp_is_exact(tuner, factor):
    """Gradient descent base (u = -g): the rate is factor * g^T g / g^T H g with H the dense Hessian."""
    params, x, y = _problem()
    opt = tuner()
    st = opt.init(params)

    @jax.jit
    def step(params, st):
        v, g = jax.value_and_grad(_loss)(params, x, y)
        up, st = opt.update(g, st, params, value=v, grad=g, value_fn=_loss, x=x, y=y)
        return optax.apply_updates(params, up), st, g

    for _ in range(3):
        H = np.asarray(_dense_hessian(params, x, y))
        params, st, g = step(params, st)
        gf = np.asarray(ravel_pytree(g)[0])
        expected = factor * (gf @ gf) / abs(gf @ H @ gf)  # the rules divide by |u^T H u|
        s = stats(st)
        assert float(s["lr"]) == pytest.approx(expected, rel=1e-12)
        assert int(s["skipped"]) == 0


def test_exact_oracle_custom_vjp_effects_once():
    """The failed forward-over-forward attempt leaves nothing behind: the loss's debug callback runs as often
    as with a loss the forward-over-forward oracle handles."""
    params, x, y = _problem()
    g, v = jax.grad(_loss)(params, x, y), _loss(params, x, y)
    calls, counts = [], []

    def counted(act):
        def loss(p, x, y):
            jax.debug.callback(lambda: calls.append(1))
            return optax.softmax_cross_entropy_with_integer_labels(act(x @ p["w"] + p["b"]), y).mean()
        return loss

    for act in (_act, jnp.tanh):
        loss = counted(act)
        opt = scale_by_cdat(sigma=1.0, ema=0.0, startup="paper", curvature="exact")
        st = opt.init(params)
        calls.clear()
        jax.jit(lambda st: opt.update(g, st, params, value=v, grad=g, value_fn=loss, x=x, y=y))(st)
        jax.effects_barrier()
        counts.append(len(calls))
    assert counts[0] == counts[1] >= 1


def test_exact_oracle_custom_vjp_eager():
    """Outside jit (no enclosing trace) the fallback gives the exact rate too."""
    params, x, y = _problem()
    g, v = jax.grad(_loss)(params, x, y), _loss(params, x, y)
    opt = scale_by_cdat(sigma=1.0, ema=0.0, startup="paper", curvature="exact")
    _, st = opt.update(g, opt.init(params), params, value=v, grad=g, value_fn=_loss, x=x, y=y)
    H, gf = np.asarray(_dense_hessian(params, x, y)), np.asarray(ravel_pytree(g)[0])
    assert float(stats(st)["lr"]) == pytest.approx((gf @ gf) / abs(gf @ H @ gf), rel=1e-12)


def test_online_sharpness_through_custom_vjp():
    """The online sharpness (forward-over-reverse already: it never had the problem; a guard) handles the
    custom_vjp loss: the dense top eigenvalue."""
    params, x, y = _problem()
    opt = cdat(optax.identity(), curvature="fd",
               sharpness=SharpnessConfig(every=1, first_iters=1000, iters=1000, tol=1e-13))
    st = opt.init(params)
    v, g = jax.value_and_grad(_loss)(params, x, y)
    _, st = jax.jit(lambda st: opt.update(g, st, params, value=v, grad=g, value_fn=_loss, x=x, y=y))(st)
    top = np.linalg.eigvalsh(np.asarray(_dense_hessian(params, x, y)))[-1]
    assert float(stats(st)["sharpness"]) == pytest.approx(top, rel=1e-8)


def _quad_problem():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 5))
    A = a @ a.T / 5 + np.eye(5)
    return jnp.asarray(A), {"w": jnp.asarray(rng.normal(size=(5,)))}


def test_hessian_top_eigenvalue_python_flag_and_string_kwargs():
    A, p = _quad_problem()
    top = np.linalg.eigvalsh(np.asarray(A))[-1]

    def loss(params, A, train=False, mode="mean", scale=1.0):
        w = params["w"]
        if train:  # a flax-style Python flag
            w = 2.0 * w
        return {"mean": 0.5, "sum": 1.0}[mode] * scale * (w @ A @ w)

    lam, v = hessian_top_eigenvalue(loss, p, A=A, train=True)  # 0.5 * 4 * 2 = 4 A
    assert lam == pytest.approx(4 * top, rel=1e-6)
    lam, _ = hessian_top_eigenvalue(loss, p, A=A, mode="sum")  # 2 A
    assert lam == pytest.approx(2 * top, rel=1e-6)
    lam, _ = hessian_top_eigenvalue(loss, p, A=A, train=True, mode="sum", scale=0.5, unused="ignored")
    assert lam == pytest.approx(4 * top, rel=1e-6)
    lam, _ = hessian_top_eigenvalue(loss, p, A=A, train=False)
    assert lam == pytest.approx(top, rel=1e-6)


def test_hessian_top_eigenvalue_array_kwargs_do_not_recompile():
    """Arrays (also inside pytrees) stay traced: new values of the same shapes reuse the compiled HVP."""
    A, p = _quad_problem()

    def loss(params, batch, train=False):
        w = params["w"] * (2.0 if train else 1.0)
        return 0.5 * w @ batch["A"] @ w * batch["c"]

    hessian_top_eigenvalue(loss, p, batch={"A": A, "c": jnp.asarray(1.0)}, train=True)
    compiled = sharpness_module._compiled_hvp(loss)
    size = compiled._cache_size()
    for c in (2.0, 3.0):
        lam, _ = hessian_top_eigenvalue(loss, p, batch={"A": A * c, "c": jnp.asarray(c)}, train=True)
        assert lam == pytest.approx(4 * c * c * np.linalg.eigvalsh(np.asarray(A))[-1], rel=1e-6)
    assert sharpness_module._compiled_hvp(loss) is compiled and compiled._cache_size() == size


def test_hessian_top_eigenvalue_keeps_no_value_fn_alive():
    """The jitted HVP took ``value_fn`` as a static argument of a module-level ``jax.jit``, whose cache kept every
    function given, and what it closes over, for the life of the process (a field test: each of 20 hyperparameter
    trials' datasets). Now freed with the function, found by identity (two callables that compare equal are two
    functions; a bound method, a new object at each read, is found by its object and function: compiled once), and
    a callable that cannot be held weakly works too (compiled per call)."""
    A, p = _quad_problem()
    top = np.linalg.eigvalsh(np.asarray(A))[-1]

    class Data:
        def __init__(self, A):
            self.A = A

        def loss(self, params):
            return 0.5 * params["w"] @ self.A @ params["w"]

    class Slotted:
        __slots__ = ("A",)

        def __init__(self, A):
            self.A = A

        def __call__(self, params):
            return 0.5 * params["w"] @ self.A @ params["w"]

    class Equal(Data):  # equal to every other Equal: still another function
        def __eq__(self, other):
            return isinstance(other, Equal)

        def __hash__(self):
            return 0

        def __call__(self, params):
            return self.loss(params)

    refs, equal = [], []
    for c in (1.0, 2.0, 3.0):
        data = Data(A * c)
        loss = lambda params, data=data: data.loss(params)  # noqa: E731
        assert hessian_top_eigenvalue(loss, p)[0] == pytest.approx(c * top, rel=1e-6)
        assert hessian_top_eigenvalue(data.loss, p)[0] == pytest.approx(c * top, rel=1e-6)
        assert sharpness_module._compiled_hvp(data.loss) is sharpness_module._compiled_hvp(data.loss)
        assert hessian_top_eigenvalue(Slotted(A * c), p)[0] == pytest.approx(c * top, rel=1e-6)
        equal.append(Equal(A * c))  # (the earlier ones kept alive)
        assert hessian_top_eigenvalue(equal[-1], p)[0] == pytest.approx(c * top, rel=1e-6)
        refs.append(weakref.ref(data))
        del data, loss
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


@pytest.mark.parametrize("with_value_fn", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.slow  # among the default suite's longest (it ran 10:49-11:29 of its ~10 minutes)
def test_a_frozen_part_does_not_size_the_finite_difference_step(with_value_fn, base):
    """docs/optax.md's recipe for a frozen part, ``optax.set_to_zero()`` inside the base: a frozen leaf of norm 1e5
    sized the closure-free probing step, a real step, 7.5e4x longer than without it behind Adam (loss 0.54 -> 216,
    103 at step 9; a field test), and the fd probe's displacement likewise. The displacement counts the entries
    the direction moves: the rates are those of the tree without the frozen leaf."""
    rs = np.random.RandomState(0)
    x, y, w = jnp.asarray(rs.randn(16, 5)), jnp.asarray(rs.randn(16, 3)), jnp.asarray(0.3 * rs.randn(5, 3))
    inner = optax.identity() if base == "sgd" else optax.scale_by_adam()
    method = BaseMethod.gd() if base == "sgd" else BaseMethod.adam()

    def loss(p):
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2)

    def run(frozen):
        params = {"w": w} if frozen is None else {"w": w, "frozen": jnp.full((100,), frozen / 10.0)}
        labels = {k: k for k in params}
        tx = cdat(optax.multi_transform({"w": inner, "frozen": optax.set_to_zero()}, labels)
                  if frozen is not None else inner, base_method=method)
        state, rates = tx.init(params), []
        for _ in range(6):
            grads = jax.grad(loss)(params)
            kw = {"value_fn": loss} if with_value_fn else {}
            updates, state = tx.update(grads, state, params, **kw)
            params = optax.apply_updates(params, updates)
            rates.append(float(optax.tree_utils.tree_get(state, "lr")))
        return rates

    alone = run(None)
    assert all(r > 0 for r in alone)
    np.testing.assert_allclose(run(1e5), alone, rtol=1e-6)  # (fd's own rounding differs by ~2e-8)


@pytest.mark.parametrize("freeze", [pytest.param("multi_transform", marks=pytest.mark.slow),
                                    pytest.param("masked_both", marks=pytest.mark.slow), "masked_after_adam"])
@pytest.mark.slow  # among the default suite's longest (it ran 10:49-11:29 of its ~10 minutes)
def test_a_frozen_part_with_a_gradient_leaves_closure_free_adam_rates_alone(freeze):
    """Closure-free CDAT behind Adam on mini-batches (the noise correction on, the momentum numerator): a body
    frozen inside the base, whose gradient is not 0 (it is used by the loss) and 5x the head's, gives the rates of
    the head trained alone (before: 12-60x lower in a field test behind ``multi_transform`` or ``masked`` Adam,
    where the body's gradient counted in the share of the gradient the base saw; about 0 behind
    ``chain(scale_by_adam(), masked(set_to_zero(), body))``, whose moments cover the body, where its noise and
    momentum terms counted too: 150 steps, as the noise's part showed only over ~100)."""
    rs = np.random.RandomState(0)
    x, y = jnp.asarray(rs.randn(128, 4) * 30), jnp.asarray(rs.randn(128, 2))
    body0, head0 = jnp.asarray(rs.randn(4, 8) / 30), jnp.asarray(rs.randn(8, 2) * 0.3)
    batches = [rs.choice(128, 16, replace=False) for _ in range(150)]

    def loss(body, head, idx):
        return jnp.mean((jnp.tanh(x[idx] @ body) @ head - y[idx]) ** 2)

    frozen = {"body": True, "head": False}
    bases = {"multi_transform": optax.multi_transform({"train": optax.scale_by_adam(), "frozen": optax.set_to_zero()},
                                                      {"body": "frozen", "head": "train"}),
             "masked_both": optax.chain(optax.masked(optax.scale_by_adam(), {"body": False, "head": True}),
                                        optax.masked(optax.set_to_zero(), frozen)),
             "masked_after_adam": optax.chain(optax.scale_by_adam(), optax.masked(optax.set_to_zero(), frozen))}

    def run(tx, params, grad_of):
        state, rates, update = tx.init(params), [], jax.jit(tx.update)
        for idx in batches:
            updates, state = update(grad_of(params, idx), state, params)
            params = optax.apply_updates(params, updates)
            rates.append(float(optax.tree_utils.tree_get(state, "lr")))
        return np.array(rates)

    alone = run(cdat(optax.scale_by_adam(), base_method="adam"), head0,
                lambda h, idx: jax.grad(loss, argnums=1)(body0, h, idx))
    both = run(cdat(bases[freeze], base_method="adam"), {"body": body0, "head": head0},
               lambda p, idx: dict(zip(("body", "head"), jax.grad(loss, argnums=(0, 1))(p["body"], p["head"], idx))))
    g = jax.grad(loss, argnums=(0, 1))(body0, head0, batches[0])
    assert float(jnp.linalg.norm(g[0])) > 4 * float(jnp.linalg.norm(g[1]))
    assert (alone[5:] > 0).all()
    np.testing.assert_allclose(both, alone, rtol=1e-9)
