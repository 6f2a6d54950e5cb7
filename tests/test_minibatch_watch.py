"""CDAT's watch for mini-batch training behind heavy ball and Nesterov (:mod:`curvopt.minibatch_watch`): the core
by hand on numbers, then PyTorch's tuner and the Optax transform on a small classifier: they warn once in mini-batch
training behind momentum and hold the rate from then on, never in full batch or behind other bases."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from curvopt import minibatch_watch as mw
from curvopt.base import BaseMethod
from curvopt.torch import CDAT, QuadraticGreedy
from test_parity import torch_watch  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)


def _feed(values, lr=0.5, numerator=2.0, curvature=3.0, eps=EPS32, hold=True, unit=1.0):
    """The watch over steps whose losses are ``values`` (every step at the same rate, numerator and curvature), in
    float64 through NumPy; the step at which it fired (None), the share it fired at and its memory."""
    watch = mw.MinibatchWatch.start(np.float64(0))
    for t, v in enumerate(values):
        watch = mw.watch_minibatch(watch, np.float64(v), lr, numerator, curvature, eps, hold, unit, np)
        if np.isfinite(watch.watch_fired):
            return t, float(watch.watch_fired), watch
    return None, math.nan, watch


def test_the_model_predicts_the_next_loss_exactly_and_nothing_is_missed():
    """Losses that follow the quadratic model exactly (f' = f - lr n + lr^2 c / 2 = f - 1 + 0.375) are judged
    from the second step on and never missed."""
    values = [100.0 - 0.625 * t for t in range(120)]
    fired, _, watch = _feed(values)
    assert fired is None and watch.watch_judged == 119 and watch.watch_share == 0.0
    assert watch.watch_predicted == pytest.approx(values[-1] - 0.625) and watch.watch_change == 1.0


def test_losses_off_the_model_by_more_than_the_change_fire_at_the_judged_count():
    """Losses alternating 3 apart, each at least 2.375 predicted changes off the prediction: missed each time; the
    watch fires on the step that makes WATCH_STEPS judged steps (the first step is not judged), with a share of 1,
    and keeps that share."""
    values = [50.0 + (1.5 if t % 2 else -1.5) for t in range(200)]  # |f_t - (f_{t-1} - 0.625)| >= 2.375 > 1
    fired, share, watch = _feed(values)
    assert fired == mw.WATCH_STEPS and share == pytest.approx(1.0) and watch.watch_judged == mw.WATCH_STEPS
    assert watch.watch_held == 0.5  # the rate of the step it fired on
    later = mw.watch_minibatch(watch, np.float64(values[-1]), 0.25, 2.0, 3.0, EPS32, True, 1.0, np)
    assert later.watch_fired == watch.watch_fired and later.watch_held == 0.5  # kept


def test_the_rate_is_held_only_once_the_watch_has_fired():
    """Before firing the rule's rate passes unchanged (any size); after, it is at most the held rate, and lower
    rates pass."""
    start = mw.MinibatchWatch.start(np.float64(0))
    assert mw.held_rate(start, np.float64(1e6), 1.0, np) == 1e6
    _, _, fired = _feed([50.0 + (1.5 if t % 2 else -1.5) for t in range(200)])
    assert mw.held_rate(fired, np.float64(3.0), 1.0, np) == 0.5 and mw.held_rate(fired, np.float64(0.1), 1.0, np) == 0.1
    assert mw.held_rate(fired, np.float64(0.0), 1.0, np) == 0.0
    assert "held at most at this step's, 0.5." in mw.minibatch_message(fired)
    # in the direction's units: a scheduler's factor 4 since the watch fired (the effective rate lr * unit) holds
    # the tuner's rate at a quarter; the unit on the step it fires scales what is kept, and the message undoes it
    assert mw.held_rate(fired, np.float64(3.0), 4.0, np) == 0.125
    assert mw.held_rate(fired, np.float64(3.0), math.nan, np) == 0.5  # not known: as it is
    _, _, at_two = _feed([50.0 + (1.5 if t % 2 else -1.5) for t in range(200)], unit=2.0)
    assert at_two.watch_held == 1.0 and mw.held_rate(at_two, np.float64(3.0), 2.0, np) == 0.5
    assert "held at most at this step's, 0.5." in mw.minibatch_message(at_two, 2.0)


def test_the_papers_rule_is_watched_and_not_held():
    """``startup="paper"`` (and the greedy step): the watch fires and holds nothing; the message says so."""
    from curvopt.rules import CDATRule

    assert mw.holds(CDATRule()) and not mw.holds(CDATRule(startup="paper")) and not mw.holds(CDATRule.greedy())
    fired, _, watch = _feed([50.0 + (1.5 if t % 2 else -1.5) for t in range(200)], hold=False)
    assert fired == mw.WATCH_STEPS and np.isnan(watch.watch_held)
    assert mw.held_rate(watch, np.float64(1e6), 1.0, np) == 1e6
    assert "which the paper's rule (startup='paper', the greedy step) does not do" in mw.minibatch_message(watch)


def test_a_miss_share_below_the_threshold_never_fires():
    """One step in five missed (share 0.2 < WATCH_SHARE): never fires."""
    values, f = [], 50.0
    for t in range(400):
        f = f - 0.625 + (3.0 if t % 5 == 0 else 0.0)
        values.append(f)
    fired, _, watch = _feed(values)
    assert fired is None and 0.1 < mw.missed_share(watch, np) < mw.WATCH_SHARE


def test_changes_below_the_losss_rounding_are_not_judged():
    """A predicted change below ROUNDING eps times the largest loss seen (a loss at float32's floor) is not judged:
    losses far off the model there never fire."""
    values = [2.3] + [1e-8 * (1 + t % 2) for t in range(300)]
    fired, _, watch = _feed(values, lr=1e3, numerator=1e-12, curvature=1e-16)
    assert fired is None and watch.watch_judged == 0 and watch.watch_scale == 2.3


@pytest.mark.parametrize("lr, numerator, curvature", [(0.0, 2.0, 3.0), (0.5, -1.0, 3.0), (0.5, 2.0, math.nan)])
def test_a_step_without_a_model_records_no_prediction(lr, numerator, curvature):
    """No step (lr 0), an uphill direction, or a lagged/unknown curvature: nothing predicted, the next step is not
    judged; a non-finite loss judges nothing and forgets the prediction."""
    step = lambda w, *a: mw.watch_minibatch(w, *map(np.float64, a), EPS32, True, 1.0, np)  # noqa: E731
    watch = step(mw.MinibatchWatch.start(np.float64(0)), 10.0, lr, numerator, curvature)
    assert np.isnan(watch.watch_predicted)
    watch = step(watch, 1.0, 0.5, 2.0, 3.0)
    assert watch.watch_judged == 0
    watch = step(watch, math.nan, 0.5, 2.0, 3.0)
    assert watch.watch_judged == 0 and np.isnan(watch.watch_predicted) and watch.watch_scale == 10.0


def test_watched_bases():
    assert mw.watches(BaseMethod.heavy_ball(0.9)) and mw.watches(BaseMethod.nesterov(0.9))
    assert not mw.watches(BaseMethod("gd")) and not mw.watches(BaseMethod("adam")) and not mw.watches(None)
    # a base the core does not know: watched when it has a momentum (RAdam's betas[0], RMSprop's momentum)
    assert mw.watches(None, 0.9) and not mw.watches(None, 0.0)
    assert not mw.watches(BaseMethod("adam"), 0.9)


# ------------------------------------------------------------------------------------------------------ PyTorch
def _train(base: str, batch: int, seed: int = 0, steps: int = 200, tuner=CDAT, closure: bool = True,
           rescale: tuple = (None, 1.0)):
    """A small MLP on a noisy teacher's labels, CDAT with a closure behind ``base``, in batches of ``batch``
    (0: full batch); the watch's warnings, the tuner's rates and the tuner. ``rescale = (t, k)``: every group's lr
    multiplied by ``k`` before step ``t`` (a scheduler's factor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g) + 2.0 * torch.randn(512, 4, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4))
    make = {"heavy_ball": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9),
            "nesterov": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, nesterov=True),
            "sgd": lambda p: torch.optim.SGD(p, lr=1.0), "adam": lambda p: torch.optim.Adam(p, lr=1.0),
            "radam": lambda p: torch.optim.RAdam(p, lr=1.0),
            "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1.0, momentum=0.9),
            "adagrad": lambda p: torch.optim.Adagrad(p, lr=1.0)}[base]
    known = base in ("heavy_ball", "nesterov", "sgd", "adam")
    opt = tuner(make(model.parameters()), **({} if known else {"allow_any_base": True}))
    lrs = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for t in range(steps):
            if t == rescale[0]:
                for group in opt.param_groups:
                    group["lr"] *= rescale[1]
            idx = torch.randint(0, 512, (batch,), generator=g) if batch else slice(None)
            xb, yb = x[idx], y[idx]

            def step_closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if closure:
                opt.step(step_closure)
            else:
                step_closure()
                opt.step()
            lrs.append(float(opt.stats["lr"]))
    return [str(w.message) for w in seen if "quadratic model predicted" in str(w.message)], lrs, opt


@pytest.mark.parametrize("base", ["heavy_ball", "nesterov", "radam", "rmsprop_momentum"])
def test_momentum_in_minibatch_warns_once_and_holds_the_rate(base):
    """Behind heavy ball and Nesterov in batches of 16, one warning, saying what was seen, the held rate and what
    to do; from the step it fired on, every rate at most that step's. The same behind bases the core does not
    know that have a momentum (RAdam, RMSprop with momentum: unwatched, a field test's rates climbed while the
    loss did, 2-29x a tuned constant's)."""
    found, lrs, opt = _train(base, batch=16)
    assert len(found) == 1, found
    assert "mini-batch" in found[0] and "Use Adam or AdamW as the base, or a tuned constant rate" in found[0]
    held = torch_watch(opt).watch_held
    assert f"at most at this step's, {held:.4g}" in found[0]
    fired = lrs.index(held)
    assert fired < len(lrs) - 50 and max(lrs[fired:]) == held
    assert all(math.isfinite(v) for v in lrs)


def test_the_held_rate_follows_a_schedulers_factor():
    """The held rate is kept in the direction's units: after the group rates grow 8x (a warm-up's end) the
    effective rate, the tuner's times the group's, stays at most the one held. In the tuner's own units the
    effective rate climbed 3-6x above it in a field test's warm-up and the loss went back to chance under
    OneCycleLR."""
    found, lrs, opt = _train("heavy_ball", batch=16, steps=160, rescale=(120, 8.0))
    held = torch_watch(opt).watch_held
    assert len(found) == 1 and lrs.index(held) < 120
    assert max(lrs[120:]) * 8.0 <= held * (1 + 1e-12) and max(lrs[120:]) * 8.0 > 0.5 * held


def test_the_greedy_step_in_minibatch_warns_and_is_not_held():
    found, _, opt = _train("heavy_ball", batch=16, tuner=QuadraticGreedy)
    assert len(found) == 1 and "does not do" in found[0]
    watch = torch_watch(opt)
    assert np.isfinite(watch.watch_fired) and np.isnan(watch.watch_held)


@pytest.mark.parametrize("base, batch, tuner, closure", [
    ("heavy_ball", 0, CDAT, True), ("nesterov", 0, CDAT, True), ("heavy_ball", 0, QuadraticGreedy, True),
    ("adam", 16, CDAT, True), ("sgd", 16, CDAT, True), ("heavy_ball", 16, CDAT, False), ("radam", 0, CDAT, True),
    ("adagrad", 16, CDAT, True)])
def test_no_warning_in_full_batch_behind_other_bases_or_without_a_closure(base, batch, tuner, closure):
    """Full batch behind momentum (the model predicts the next loss), mini-batch behind Adam, plain SGD and a
    base without momentum the core does not know (Adagrad: not watched; the held rate was worse there in a field
    test), and closure-free steps (no loss to judge): no warning."""
    found, _, opt = _train(base, batch, tuner=tuner, closure=closure)
    assert found == []
    if batch == 0:  # judged on enough steps to fire (not silent for want of a prediction), missed on few
        watch = torch_watch(opt)
        assert watch.watch_judged >= mw.WATCH_STEPS and mw.missed_share(watch, np) < 0.1
        assert math.isnan(watch.watch_held)


# ---------------------------------------------------------------------------------------------------------- Optax
def _train_optax(batch: int, base_method: str = "heavy_ball", seed: int = 0, steps: int = 200):
    """The same kind of problem in Optax: ``cdat`` behind ``optax.trace(0.9)`` (heavy ball) or
    ``optax.scale_by_adam()`` with ``value_fn`` (the fd oracle); the final state."""
    import jax
    import jax.numpy as jnp
    import optax

    from curvopt.optax import BaseMethod, cdat

    key = jax.random.key(seed)
    kx, ky, kn, kw, kb = jax.random.split(key, 5)
    x = jax.random.normal(kx, (512, 20))
    y = jnp.argmax(x @ jax.random.normal(ky, (20, 4)) + 2.0 * jax.random.normal(kn, (512, 4)), axis=1)
    params = {"w1": jax.random.normal(kw, (20, 32)) / 20 ** 0.5, "b1": jnp.zeros(32),
              "w2": jax.random.normal(kb, (32, 4)) / 32 ** 0.5, "b2": jnp.zeros(4)}

    def loss_fn(p, xb, yb):
        logits = jnp.tanh(xb @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    if base_method == "heavy_ball":
        opt = cdat(optax.trace(decay=0.9), base_method=BaseMethod.heavy_ball(0.9))
    else:
        opt = cdat(optax.scale_by_adam(), base_method="adam")
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        value, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = opt.update(grads, s, p, value=value, grad=grads, value_fn=loss_fn, xb=xb, yb=yb)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, 512, batch) if batch else np.arange(512)
        params, state = step(params, state, x[idx], y[idx])
    return state


def _watch_of(state):
    return next(s.watch for s in state if hasattr(s, "watch"))


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_optax_heavy_ball_in_minibatch_fires_and_stats_warns_once_per_read():
    """Behind ``optax.trace`` in batches of 16 the state's watch fires and ``stats`` says so."""
    from curvopt.optax import stats

    state = _train_optax(batch=16)
    watch = _watch_of(state)
    assert watch.watch_judged >= mw.WATCH_STEPS and np.isfinite(watch.watch_fired)
    last_lr = next(s.stats.lr for s in state if hasattr(s, "watch"))
    assert 0 < last_lr <= watch.watch_held
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        stats(state)
    found = [str(w.message) for w in seen if "quadratic model predicted" in str(w.message)]
    assert len(found) == 1 and "Use Adam or AdamW as the base" in found[0]
    assert f"at most at this step's, {float(watch.watch_held):.4g}" in found[0]


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_optax_full_batch_heavy_ball_does_not_fire_and_adam_has_no_watch():
    from curvopt.optax import stats

    watch = _watch_of(_train_optax(batch=0))
    assert watch.watch_judged >= mw.WATCH_STEPS and np.isnan(watch.watch_fired)
    assert mw.missed_share(watch, np) < 0.1
    state = _train_optax(batch=16, base_method="adam", steps=3)
    assert _watch_of(state) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats(state)
