"""Sharpness and Adam's preconditioned sharpness against the dense Hessian (jax.hessian + eigvalsh) on a
tiny MLP (float64, < 300 parameters)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from curvopt.config import SharpnessConfig
from jax_backend import BaseMethod, cdat, hessian_top_eigenvalue, preconditioner_from_adam_state, stats


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _mlp():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(4, 12)) / 2, "b1": np.zeros(12), "w2": rng.normal(size=(12, 3)) / 3,
              "b2": np.zeros(3)}
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 3))
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return params, jnp.asarray(x), jnp.asarray(y), _loss


def _loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean(jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2, axis=1))


@jax.jit
def _hessian_matrix(params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda v: _loss(unravel(v), x, y))(flat)


def _stepper(opt, loss, x, y):
    @jax.jit
    def step(p, state):
        v, g = jax.value_and_grad(loss)(p, x, y)
        up, state = opt.update(g, state, p, value=v, grad=g, value_fn=loss, x=x, y=y)
        return optax.apply_updates(p, up), state

    return step


def _dense(loss, params, x, y, diag=None):
    H = np.asarray(_hessian_matrix(params, x, y))
    if diag is not None:
        s = 1 / np.sqrt(np.asarray(ravel_pytree(diag)[0]))
        H = s[:, None] * H * s[None, :]
    return np.linalg.eigvalsh(H)[-1]


def test_hessian_top_eigenvalue_matches_dense():
    """ARPACK on exact HVPs: the default tol gives a relative eigenvalue error <= 1e-4 (measured ~1e-15 here:
    ARPACK's tol bounds the Ritz residual, far looser than the error on a well-separated top eigenvalue)."""
    params, x, y, loss = _mlp()
    assert ravel_pytree(params)[0].size < 300
    dense = _dense(loss, params, x, y)
    lam, v = hessian_top_eigenvalue(loss, params, x=x, y=y)
    print("hessian_top_eigenvalue relative error (default tol):", abs(lam - dense) / abs(dense))
    assert lam == pytest.approx(dense, rel=1e-4)
    assert float(optax.tree.norm(v)) == pytest.approx(1.0, rel=1e-12)
    for tol in (1e-2, 1e-4, 1e-8):  # accurate to its tol as a relative error
        lam_t, _ = hessian_top_eigenvalue(loss, params, tol=tol, x=x, y=y)
        assert abs(lam_t - dense) <= tol * abs(dense), (tol, lam_t, dense)
    # a warm start from the eigenvector; keywords value_fn does not take are ignored; (loss, aux) accepted
    lam2, _ = hessian_top_eigenvalue(lambda p, x, y: (loss(p, x, y), {"aux": 1.0}), params, v0=v, tol=1e-9,
                                     x=x, y=y, unrelated=1)
    assert lam2 == pytest.approx(lam, rel=1e-8)


def test_negative_dominant_eigenvalue_gives_top_one():
    A = jnp.diag(jnp.array([1.0, 0.5, -4.0]))
    lam, _ = hessian_top_eigenvalue(lambda w: 0.5 * w @ A @ w, jnp.ones(3), tol=1e-12)
    assert float(lam) == pytest.approx(1.0, rel=1e-8)


@pytest.mark.slow  # among the default suite's longest (it ran 10:49-11:29 of its ~10 minutes)
def test_online_sharpness_and_preconditioned_sharpness_match_dense():
    params, x, y, loss = _mlp()
    opt = cdat(optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8), sigma=1.0,
               sharpness=SharpnessConfig(every=2, first_iters=1000, iters=1000, tol=1e-13),
               base_method=BaseMethod.adam(b1=0.9, b2=0.99, eps=1e-8))
    state = opt.init(params)

    step = _stepper(opt, loss, x, y)

    for i in range(3):  # estimates on steps 1 and 3, at the parameters before the step
        before = params
        params, state = step(params, state)
    s = stats(state)
    P = _adam_P_by_hand(state[0], b1=0.9, b2=0.99, eps=1e-8)
    assert float(s["sharpness"]) == pytest.approx(_dense(loss, before, x, y), rel=1e-6)
    assert float(s["preconditioned_sharpness"]) == pytest.approx(_dense(loss, before, x, y, P), rel=1e-6)
    assert float(s["eos_ratio"]) == pytest.approx(float(s["lr"]) * float(s["preconditioned_sharpness"]) / 38.0,
                                                  rel=1e-12)
    lam_p, _ = hessian_top_eigenvalue(loss, before, preconditioner=P, tol=1e-12, x=x, y=y)
    assert lam_p == pytest.approx(float(s["preconditioned_sharpness"]), rel=1e-6)


def _adam_P_by_hand(state, *, b1, b2, eps):
    """Adam's ``P`` (its update is ``-lr m / P``) from its state, written out: ``(1 - b1^t) (sqrt(nu / (1 - b2^t))
    + eps)``, infinite where ``nu`` is 0 (no gradient yet: such a coordinate has not moved)."""
    t = state.count
    return jax.tree.map(lambda nu: jnp.where(nu > 0, (1 - b1 ** t) * (jnp.sqrt(nu / (1 - b2 ** t)) + eps), jnp.inf),
                        state.nu)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_preconditioned_sharpness_leaves_out_parameters_adam_has_not_moved():
    """Behind a zero-initialised head the first layer's gradients are 0 at step 0, so after Adam's first update
    its ``nu`` is 0 and its ``P`` infinite: ``lambda_max(P^-1 H)`` is the dense top eigenvalue with those
    coordinates left out (float64)."""
    params, x, y, loss = _mlp()
    params = {**params, "w2": jnp.zeros_like(params["w2"]), "b2": jnp.zeros_like(params["b2"])}
    adam = optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-8)
    updates, state = adam.update(jax.grad(loss)(params, x, y), adam.init(params))
    params = optax.apply_updates(params, optax.tree.scale(-1e-2, updates))
    P = _adam_P_by_hand(state, b1=0.9, b2=0.99, eps=1e-8)
    lib = preconditioner_from_adam_state(state, b1=0.9, b2=0.99, eps=1e-8)
    assert all(np.array_equal(np.asarray(P[k]), np.asarray(lib[k])) for k in P)
    assert all(bool(jnp.all(jnp.isinf(P[k]))) for k in ("w1", "b1"))
    assert all(bool(jnp.all(jnp.isfinite(P[k]))) for k in ("w2", "b2"))
    moved = np.isfinite(np.asarray(ravel_pytree(P)[0]))
    H = np.asarray(_hessian_matrix(params, x, y))
    s = 1 / np.sqrt(np.asarray(ravel_pytree(P)[0])[moved])
    want = np.linalg.eigvalsh(s[:, None] * H[np.ix_(moved, moved)] * s[None, :])[-1]
    assert np.abs(H[~moved][:, moved]).max() > 1e-3  # the first layer is curved (with the head) at this point
    lam, _ = hessian_top_eigenvalue(loss, params, preconditioner=P, tol=1e-12, x=x, y=y)
    assert lam == pytest.approx(want, rel=1e-6)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_sharpness_leaves_out_a_part_frozen_inside_the_base():
    """A head frozen by optax.set_to_zero inside the base's multi_transform: the online sharpness is the trained
    part's block of the Hessian (the parts the step moves), as PyTorch drops a frozen group; it was the whole
    tree's (a field test: 4.09 against the body's 1.04, the edge-of-stability rate behind gradient descent 3.9x
    too low). The rates equal a tuner over the body alone with the head fixed."""
    from jax_backend import edge_of_stability

    params, x, y, loss = _mlp()
    labels = {"w1": "train", "b1": "train", "w2": "frozen", "b2": "frozen"}
    tight = SharpnessConfig(every=1, iters=300, first_iters=600, tol=1e-12)
    opt = edge_of_stability(optax.multi_transform({"train": optax.identity(), "frozen": optax.set_to_zero()},
                                                  labels), sharpness=tight)
    head = {k: params[k] for k in ("w2", "b2")}
    body_loss = lambda b, x, y: loss({**b, **head}, x, y)  # noqa: E731
    alone = edge_of_stability(optax.identity(), sharpness=tight)
    p, st = params, opt.init(params)
    b, st_b = {k: params[k] for k in ("w1", "b1")}, alone.init({k: params[k] for k in ("w1", "b1")})
    step, step_b = _stepper(opt, loss, x, y), _stepper(alone, body_loss, x, y)
    flat_mask = np.asarray(ravel_pytree({k: jnp.full_like(v, k in ("w1", "b1")) for k, v in params.items()})[0])
    for _ in range(4):
        H = np.asarray(_hessian_matrix(p, x, y))
        body = flat_mask > 0
        want = np.linalg.eigvalsh(H[np.ix_(body, body)])[-1]
        assert want < 0.9 * np.linalg.eigvalsh(H)[-1]  # the frozen head holds the whole tree's top curvature
        p, st = step(p, st)
        b, st_b = step_b(b, st_b)
        assert float(stats(st)["sharpness"]) == pytest.approx(want, rel=1e-6)
        assert float(stats(st)["lr"]) == pytest.approx(float(stats(st_b)["lr"]), rel=1e-9)
    assert all(np.array_equal(np.asarray(p[k]), np.asarray(params[k])) for k in ("w2", "b2"))


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_sharpness_schedule_and_warm_start():
    params, x, y, loss = _mlp()
    opt = cdat(optax.identity(), sharpness=SharpnessConfig(every=3, iters=4, first_iters=200, tol=1e-3))
    state = opt.init(params)

    step = _stepper(opt, loss, x, y)

    sharp, calls = [], []
    for _ in range(7):
        params, state = step(params, state)
        sharp.append(float(state[1].stats.sharpness))
        calls.append(int(state[1].stats.closure_calls))
    # estimated on steps 1, 4, 7: 2 evaluations (value/grad + JVP) plus the HVPs; kept in between
    assert [c > 2 for c in calls] == [True, False, False, True, False, False, True]
    assert sharp[1] == sharp[0] and sharp[2] == sharp[0] and sharp[3] != sharp[0]
    assert calls[3] - 2 <= 4 and calls[6] - 2 <= 4  # warm starts use at most `iters` products


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_deprecated_sharpness_keywords_still_work():
    params, x, y, loss = _mlp()
    with pytest.warns(DeprecationWarning, match="sharpness="):
        old = cdat(optax.identity(), sharpness_every=3, sharpness_iters=4)
    new = cdat(optax.identity(), sharpness=SharpnessConfig(every=3, iters=4))
    a, b = _stepper(old, loss, x, y), _stepper(new, loss, x, y)
    pa, sa = a(params, old.init(params))
    pb, sb = b(params, new.init(params))
    assert float(stats(sa)["sharpness"]) == float(stats(sb)["sharpness"])
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        cdat(optax.identity(), sharpness=3, sharpness_every=3)
