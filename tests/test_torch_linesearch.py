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
    for t in range(15):
        w_before = w.detach().clone()
        value = float(f(w_before))
        loss = opt.step(closure)
        assert float(loss) == pytest.approx(value, rel=1e-14)
        lr = float(opt.stats["lr"])
        slope = -float(opt.stats["numerator"])
        # the main call, on the first three steps the replay check (the closure again at the same point), the trials
        assert opt.stats["closure_calls"] == 1 + (t < 3) + opt.last_trials <= 32
        if opt.last_decrease_error == 0.0:  # accepted: the relaxed Armijo condition holds at the new point
            accepted += 1
            new_value = float(f(w.detach()))
            assert new_value <= (1 + delta) * value + c * lr * slope
        else:  # not accepted (every trial spent, or an ascent direction: no trial): no step
            assert opt.last_trials in (0, 30) and lr == 0.0
            assert torch.equal(w.detach(), w_before)
    assert accepted >= 10 and float(f(w.detach())) < f0


def test_trial_cap_and_nan_trials():
    # a search that accepts nothing takes no step (Optax would take the last trial, possibly far uphill)
    w = torch.nn.Parameter(torch.tensor([1e4, -2e4], dtype=DT))
    f = lambda v: (v ** 2).sum()  # noqa: E731
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), init_lr=1e3, decrease_factor=0.9, max_trials=7)
    before = w.detach().clone()
    opt.step(closure_for(opt, f, w))
    assert opt.last_trials == 7 and opt.stats["closure_calls"] == 9  # main call, replay check, 7 trials
    assert opt.last_decrease_error > 0 and float(opt.stats["lr"]) == 0.0
    assert torch.equal(w.detach(), before)
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


def test_failed_search_takes_no_step_and_the_next_goes_on_from_its_last_trial():
    """Issue 10: a failed search takes no step and the next one continues where it stopped, at its last trial
    times decrease_factor (so an acceptable rate far below the first trial is reached within a few steps
    instead of never, whatever increase_factor: with the defaults 2 and 0.8 and max_trials=3 a search that
    restarted from 2x its last trial climbed for ever and took 1 step of 40), an ascent direction
    (momentum after the gradient turned) takes no step and no trial, and increase_factor=inf with lr_max=inf
    still steps (its first trial is init_lr)."""
    w = torch.nn.Parameter(torch.tensor([1e4, -2e4], dtype=DT))
    f = lambda v: (v ** 2).sum()  # noqa: E731
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), init_lr=1e3, decrease_factor=0.5, max_trials=3)
    before = w.detach().clone()
    firsts = []
    for _ in range(3):  # trials (2e3, 1e3, 5e2), (2.5e2, 1.25e2, 62.5), (31.25, ...) overshoot: no step each time
        log = []
        opt.step(closure_for(opt, f, w, log))
        assert float(opt.stats["lr"]) == 0.0 and torch.equal(w.detach(), before)
        firsts.append(log[-3][0])  # the first of 3 trials (log[0] is the main call, then the replay check once)
    for lr, first in zip((2e3, 2.5e2, 31.25), firsts):
        torch.testing.assert_close(first, before - lr * 2 * before)
    for _ in range(2):  # (3.9, 1.95, 0.98): the third trial is accepted
        opt.step(closure_for(opt, f, w))
    assert float(f(w.detach())) < float(f(before))
    # the defaults' factors with few trials: 2 * 0.8^2 > 1, the old restart from 2x the last trial climbed
    q = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=DT))
    opt = ArmijoLineSearch(torch.optim.SGD([q], lr=1.0), init_lr=10.0, max_trials=3)
    taken = 0
    for _ in range(40):
        opt.step(closure_for(opt, f, q))
        taken += float(opt.stats["lr"]) > 0
    assert taken >= 15 and float(f(q.detach())) < 1e-2 * 10.0
    # ascent: heavy ball after the gradient turned
    v = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    opt = ArmijoLineSearch(torch.optim.SGD([v], lr=1.0, momentum=0.9))
    opt.step(closure_for(opt, lambda t: 10 * t.sum(), v))
    before = v.detach().clone()
    opt.step(closure_for(opt, lambda t: -t.sum(), v))
    assert float(opt.stats["numerator"]) < 0 and float(opt.stats["lr"]) == 0.0 and opt.last_trials == 0
    assert torch.equal(v.detach(), before) and opt.stats["closure_calls"] == 2  # the main call and the replay check
    # increase_factor = inf
    f6, w6 = quartic()
    opt = ArmijoLineSearch(torch.optim.SGD([w6], lr=1.0), increase_factor=math.inf)
    f0 = float(f6(w6.detach()))
    for _ in range(3):
        opt.step(closure_for(opt, f6, w6))
        assert float(opt.stats["lr"]) > 0
    assert float(f6(w6.detach())) < f0


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_trial_sequence_matches_optax():
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    # every search accepts a trial here (on a failed search Optax takes the last trial, curvopt takes no step)
    kw = dict(c=0.3, delta=1e-3, increase_factor=3.0, decrease_factor=0.6, lr_max=5.0, max_trials=15)
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
        assert opt.last_trials == int(info.num_linesearch_steps) and opt.last_decrease_error == 0.0
        assert float(opt.stats["lr"]) == pytest.approx(float(state[1].learning_rate), rel=1e-5)
    np.testing.assert_allclose(w.detach().numpy(), np.asarray(wj), rtol=1e-4, atol=1e-6)


def test_polyak_step():
    f, w = quartic()
    opt = PolyakStep(torch.optim.SGD([w], lr=1.0), f_star=0.0, lr_max=10.0)
    for k in range(5):
        value = float(f(w))
        g = torch.autograd.grad(f(w), w)[0]
        opt.step(closure_for(opt, f, w))
        assert float(opt.stats["lr"]) == pytest.approx(value / float(g @ g), rel=1e-12)
        assert opt.stats["closure_calls"] == (2 if k < 3 else 1)  # the replay check's call on the first 3 steps
