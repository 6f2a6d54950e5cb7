"""A closure-free step whose gradient is zero in every entry (``zero_grad(set_to_none=False)`` and no
``backward()``; an Optax update handed zeros) is skipped in both backends: nothing moves, nothing is averaged
in, and the run continues exactly as if the step had not been called. Before, the secant read the previous
step's ``-g^T u`` against the zero gradient as curvature and an Adam base moved on its momentum."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from curvopt.config import has_gradient
from curvopt.optax import cdat, stats
from curvopt.torch import CDAT

X = np.random.default_rng(0).standard_normal((32, 4))
Y = np.sin(X @ np.array([1.0, -2.0, 0.5, 1.5]))
W1 = np.random.default_rng(1).standard_normal((4, 8)) * 0.5
W2 = np.random.default_rng(2).standard_normal((8,)) * 0.5
SKIP_AT = 4  # past the probing step: the rates are the secant's


def test_has_gradient():
    assert has_gradient(np.float64(1e-300))
    assert not has_gradient(np.float64(0.0))
    assert not has_gradient(np.float64(np.nan))


def test_max_abs_reads_every_entry():
    """The gradient's largest entry that the skip decides on (``torch_backend.vectors.max_abs``): the largest
    magnitude over all tensors, NaN if any entry is NaN, inf if any is infinite, 0 with no entries; tensors of
    different dtypes and non-contiguous ones."""
    from torch_backend.vectors import max_abs

    xs = [torch.tensor([[0.5, -0.25], [0.0, 2.0]]), torch.tensor([-7.0, 3.0]), torch.zeros(0)]
    assert float(max_abs(xs)) == 7.0
    assert float(max_abs([xs[0].t(), xs[1][:1]])) == 7.0
    assert float(max_abs([torch.zeros(0)])) == 0.0 and float(max_abs([torch.zeros(3)])) == 0.0
    assert float(max_abs([torch.tensor([1.0], dtype=torch.float16),
                          torch.tensor([-3.0], dtype=torch.bfloat16)])) == 3.0
    assert float(max_abs([torch.tensor([1e-40], dtype=torch.float64)])) == 1e-40
    assert float(max_abs([xs[1], torch.tensor([-float("inf"), 1.0])])) == float("inf")
    assert np.isnan(float(max_abs([torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])))


def _torch_run(skip_at):
    x, y = torch.tensor(X), torch.tensor(Y)
    w1 = torch.nn.Parameter(torch.tensor(W1))
    w2 = torch.nn.Parameter(torch.tensor(W2))
    opt = CDAT(torch.optim.Adam([w1, w2], lr=1.0))
    lrs = []
    for t in range(8):
        if t == skip_at:
            opt.zero_grad(set_to_none=False)  # zeroed, and the loop forgot backward()
            before = ([w1.detach().clone(), w2.detach().clone()], opt.state_dict())
            with pytest.warns(RuntimeWarning, match="every entry of the gradient is zero"):
                opt.step()
            assert torch.equal(w1, before[0][0]) and torch.equal(w2, before[0][1])
            after = opt.state_dict()
            for p in (0, 1):
                for k, v in before[1]["state"][p].items():
                    if k not in ("curvopt_skipped", "curvopt_w0"):  # w0: the step's scratch (its start point)
                        torch.testing.assert_close(torch.as_tensor(after["state"][p][k]), torch.as_tensor(v),
                                                   rtol=0, atol=0, equal_nan=True, msg=k)  # (NaN: not in use)
            assert opt.stats["skipped"] == 1
            continue
        opt.zero_grad()
        loss = ((torch.tanh(x @ w1) @ w2 - y) ** 2).mean()
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        lrs.append(float(opt.stats["lr"]))
    return lrs


def test_torch_closure_free_zero_gradient_is_skipped():
    reference = _torch_run(skip_at=None)
    lrs = _torch_run(skip_at=SKIP_AT)
    assert len(lrs) == len(reference) - 1
    assert lrs == reference[:len(lrs)]
    assert all(lr > 0 for lr in lrs)


def _jax_run(skip_at):
    params = {"w1": jnp.asarray(W1), "w2": jnp.asarray(W2)}
    x, y = jnp.asarray(X), jnp.asarray(Y)
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)  # noqa: E731
    tx = cdat(optax.scale_by_adam(), base_method="adam")
    state = tx.init(params)
    update = jax.jit(tx.update)
    lrs = []
    for t in range(8):
        if t == skip_at:
            updates, new = update(jax.tree.map(jnp.zeros_like, params), state, params)
            assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
            assert int(stats(new)["skipped"]) == 1
            for a, b in zip(jax.tree.leaves(new[0]), jax.tree.leaves(state[0])):  # the base's state kept
                assert np.array_equal(a, b)
            kept = new[1]._replace(stats=state[1].stats)
            for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state[1])):  # the tuner's too, stats aside
                assert np.array_equal(a, b, equal_nan=True)
            state = new
            continue
        updates, state = update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        lrs.append(float(stats(state)["lr"]))
    return lrs


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_jax_closure_free_zero_gradient_is_skipped():
    with jax.enable_x64(True):
        reference = _jax_run(skip_at=None)
        lrs = _jax_run(skip_at=SKIP_AT)
    assert len(lrs) == len(reference) - 1
    assert lrs == reference[:len(lrs)]
    assert all(lr > 0 for lr in lrs)


def test_the_backends_agree_around_the_skip():
    with jax.enable_x64(True):
        jax_lrs = _jax_run(skip_at=SKIP_AT)
    np.testing.assert_allclose(_torch_run(skip_at=SKIP_AT), jax_lrs, rtol=1e-6)


def test_torch_closure_free_after_a_closure_step_has_an_exact_secant():
    """Once a run has taken closure-free steps, a closure (fd) step keeps the secant's memory too: the next
    closure-free step's curvature is the exact secant along the closure step's direction (on a quadratic), not a
    mix of the fd step's direction with the older secant's scalars (3x off), and a closure step that fails leaves
    the memory as it was."""
    a = torch.tensor(np.diag([30.0, 10.0, 1.0]))
    rng = np.random.default_rng(3)
    start = torch.tensor(rng.standard_normal(3))

    def run(plan):
        w = torch.nn.Parameter(start.clone())
        opt = CDAT(torch.optim.SGD([w], lr=1.0))
        out = []
        for kind in plan:
            def closure(fail=kind == "fail"):
                opt.zero_grad()
                loss = 0.5 * w @ a @ w
                loss.backward()
                if fail and opt.probing:
                    raise RuntimeError("probe failed")
                return loss
            u = -(a @ w.detach())  # SGD at group lr 1: the base's direction
            if kind == "fail":
                with pytest.raises(RuntimeError):
                    opt.step(closure)
                continue
            if kind == "closure":
                opt.step(closure)
            else:
                closure()
                opt.step()
            out.append((kind, u, float(opt.stats["curvature"]), float(opt.stats["lr"])))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the secant behind GD's caveat
        steps = run(["free", "free", "closure", "free", "closure", "fail", "free"])
        reference = run(["free", "free", "closure", "free", "closure", "free"])
    for prev, cur in zip(steps, steps[1:]):
        if cur[0] == "free" and prev[0] == "closure":
            u_prev, u = prev[1], cur[1]
            expected = float(u_prev @ a @ u_prev / (u_prev @ u_prev) * (u @ u))
            assert cur[2] == pytest.approx(expected, rel=1e-9)
    assert [s[3] for s in steps] == [s[3] for s in reference]


def test_a_tiny_gradient_is_not_a_missing_one():
    """The check is on the largest entry: a float32 gradient of 1e-26 (a loss scaled far down) has ||g||^2 = 0 in
    float32 but is a gradient: no step is skipped in either backend (they were, as "every entry is zero")."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = CDAT(torch.optim.Adam([w], lr=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad()
            (1e-26 * (w ** 2).sum()).backward()
            opt.step()
    assert opt.stats["skipped"] == 0
    params = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    tx = cdat(optax.scale_by_adam(), base_method="adam")
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(2e-26 * params, state, params)
        params = optax.apply_updates(params, updates)
    assert int(stats(state)["skipped"]) == 0
