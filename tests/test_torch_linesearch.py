"""Armijo backtracking: the acceptance condition, the trial cap, and Optax's exact trial sequence."""
import math

import numpy as np
import pytest
import torch

from curvopt.torch import ArmijoLineSearch, PolyakStep

DT = torch.float64


def quartic(n=6, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    A = a @ a.T / n + 0.1 * torch.eye(n, dtype=dtype)
    w = torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype))

    def f(v):
        return 0.5 * v @ A @ v + 0.25 * (v ** 4).sum()
    return f, w


def closure_for(opt, f, w, log=None):
    def closure():
        opt.zero_grad()
        loss = f(w)
        loss.backward()
        if log is not None:
            log.append((w.detach().clone(), float(loss)))
        return loss
    return closure


@pytest.mark.parametrize("c,delta,base", [(1e-4, 0.0, "sgd"), (0.5, 1e-3, "adam"), (0.0, 0.0, "momentum")])
def test_every_accepted_step_satisfies_armijo(c, delta, base):
    f, w = quartic()
    b = {"sgd": lambda: torch.optim.SGD([w], lr=1.0), "adam": lambda: torch.optim.Adam([w], lr=1.0),
         "momentum": lambda: torch.optim.SGD([w], lr=1.0, momentum=0.5)}[base]()
    opt = ArmijoLineSearch(b, c=c, delta=delta, increase_factor=4.0, decrease_factor=0.5, max_trials=30)
    closure = closure_for(opt, f, w)
    f0 = float(f(w.detach()))
    accepted = 0
    for _ in range(15):
        w_before = w.detach().clone()
        value = float(f(w_before))
        loss = opt.step(closure)
        assert float(loss) == pytest.approx(value, rel=1e-14)
        lr = float(opt.stats["lr"])
        slope = -float(opt.stats["numerator"])
        assert opt.stats["closure_calls"] == 1 + opt.last_trials <= 31
        if opt.last_decrease_error == 0.0:  # accepted: the relaxed Armijo condition holds at the new point
            accepted += 1
            new_value = float(f(w.detach()))
            assert new_value <= (1 + delta) * value + c * lr * slope
        else:  # not accepted: only when every trial was spent
            assert opt.last_trials == 30
    assert accepted >= 10 and float(f(w.detach())) < f0


def test_trial_cap_and_nan_trials():
    # an ascent direction (maximize=True base) can never satisfy the condition: the cap is hit
    f, w = quartic()
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0, maximize=True), max_trials=7)
    closure = closure_for(opt, f, w)
    opt.step(closure)
    assert opt.last_trials == 7 and opt.stats["closure_calls"] == 8
    assert opt.last_decrease_error > 0
    # trial losses are NaN beyond |w| > 10: infinite error -> lr 0, parameters unchanged
    w2 = torch.nn.Parameter(torch.tensor([3.0, -2.0], dtype=DT))

    def g(v):
        loss = (v ** 2).sum()
        return torch.where(v.abs().max() > 10, torch.full_like(loss, float("nan")), loss)

    opt2 = ArmijoLineSearch(torch.optim.SGD([w2], lr=100.0), decrease_factor=0.9, max_trials=3)
    before = w2.detach().clone()
    with _no_warning():  # a NaN *trial* is not a skipped step
        opt2.step(closure_for(opt2, g, w2))
    assert math.isinf(opt2.last_decrease_error) and float(opt2.stats["lr"]) == 0.0
    assert torch.equal(w2.detach(), before)


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_trial_sequence_matches_optax():
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    kw = dict(c=0.3, delta=1e-3, increase_factor=3.0, decrease_factor=0.6, lr_max=5.0, max_trials=6)
    f, w = quartic(dtype=torch.float32, seed=1)
    wj = jnp.asarray(w.detach().numpy())
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), **kw)
    closure = closure_for(opt, f, w)
    A_np = None  # the same function in JAX
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=g, dtype=torch.float32)
    A_np = (a @ a.T / 6 + 0.1 * torch.eye(6)).numpy()

    def fj(v):
        return 0.5 * v @ A_np @ v + 0.25 * (v ** 4).sum()

    ls = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=kw["max_trials"] - 1, slope_rtol=kw["c"], rtol=kw["delta"],
        increase_factor=kw["increase_factor"], decrease_factor=kw["decrease_factor"],
        max_learning_rate=kw["lr_max"])
    import jax
    tx = optax.chain(optax.sgd(1.0), ls)
    state = tx.init(wj)
    for _ in range(8):
        value, grad = jax.value_and_grad(fj)(wj)
        updates, state = tx.update(grad, state, wj, value=value, grad=grad, value_fn=fj)
        wj = optax.apply_updates(wj, updates)
        opt.step(closure)
        info = state[1].info
        assert opt.last_trials == int(info.num_linesearch_steps)
        assert float(opt.stats["lr"]) == pytest.approx(float(state[1].learning_rate), rel=1e-5)
    np.testing.assert_allclose(w.detach().numpy(), np.asarray(wj), rtol=1e-4, atol=1e-6)


def test_polyak_step():
    f, w = quartic()
    opt = PolyakStep(torch.optim.SGD([w], lr=1.0), f_star=0.0, lr_max=10.0)
    for _ in range(3):
        value = float(f(w))
        g = torch.autograd.grad(f(w), w)[0]
        opt.step(closure_for(opt, f, w))
        assert float(opt.stats["lr"]) == pytest.approx(value / float(g @ g), rel=1e-12)
        assert opt.stats["closure_calls"] == 1
