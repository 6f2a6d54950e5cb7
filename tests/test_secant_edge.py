"""Above the edge only with a fresh curvature: on a step whose curvature is the secant's (measured over the
previous step, ``RuleInputs.lagged``) CDAT's rate stays on the edge ``sigma = 2`` even where the loss guard would
allow more (plain GD's default ``sigma = 4``). Checked in the core by hand, and end to end in both backends: the
default GD CDAT with the secant takes the rates of ``sigma = 2`` while the loss does not rise. On such a step
the step's length ``lr ||u||`` grows at most ``lagged_growth`` (1.1) times the previous one (checked by hand, with
the overshoot it prevents)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from curvopt import rules
from curvopt.optax import cdat, stats
from curvopt.torch import CDAT, QuadraticGreedy


def _x(n, c, value, lagged):
    f = np.float64
    return rules.RuleInputs(f(n), f(c), f(value), f(math.nan), 0, lagged)


def test_core_lagged_curvature_keeps_sigma_4_on_the_edge():
    rule = rules.CDATRule(sigma=4.0, ema=0.0)  # ema 0: the rate is sigma * n / c at once
    zero = np.float64(0.0)
    fresh, _ = rules.apply_rule(rule, _x(2.0, 8.0, 1.0, False), rule.init(zero), np)
    lagged, _ = rules.apply_rule(rule, _x(2.0, 8.0, 1.0, True), rule.init(zero), np)
    assert fresh == 4.0 * 2.0 / 8.0
    assert lagged == 2.0 * 2.0 / 8.0
    # an array flag (JAX decides at run time) gives the same
    arr, _ = rules.apply_rule(rule, _x(2.0, 8.0, 1.0, np.bool_(True)), rule.init(zero), np)
    assert arr == lagged
    # a sigma on or below the edge is never touched
    low = rules.CDATRule(sigma=1.5, ema=0.0)
    a, _ = rules.apply_rule(low, _x(2.0, 8.0, 1.0, True), low.init(zero), np)
    assert a == 1.5 * 2.0 / 8.0


def test_core_lagged_step_reach_cap_by_hand():
    """On a lagged step the step's length ``lr ||u||`` grows at most ``lagged_growth`` (1.1) times the previous
    one: ``lr <= lr_prev * min(growth, 1.1 / sqrt(stretch))``, ``stretch = ||u||^2 / ||u_prev||^2``. A fresh
    curvature keeps the growth cap 2 whatever ``stretch`` says."""
    rule = rules.CDATRule(sigma=2.0, ema=0.0)
    zero = np.float64(0.0)
    f = np.float64

    def x(n, c, lagged, stretch):
        return rules.RuleInputs(f(n), f(c), f(math.nan), f(math.nan), 1, lagged, f(stretch))

    lr0, s0 = rules.apply_rule(rule, x(1.0, 4.0, False, 1.0), rule.init(zero), np)
    assert lr0 == 0.5  # 2 * 1 / 4
    # the model asks for 2 * 4 / 1 = 8 (16x): fresh, the growth cap gives 2 * 0.5 whatever the stretch
    fresh, _ = rules.apply_rule(rule, x(4.0, 1.0, False, 4.0), s0, np)
    assert fresh == 1.0
    # lagged, ||u|| doubled (stretch 4): the step's length may grow 1.1x, so lr <= 0.5 * 1.1 / 2
    lagged, s1 = rules.apply_rule(rule, x(4.0, 1.0, True, 4.0), s0, np)
    assert lagged == 0.5 * 1.1 / 2
    assert s1.cdat_lr == lagged
    # lagged, ||u|| halved (stretch 1/4): 1.1 * 2 = 2.2 > 2, the growth cap binds
    shrunk, _ = rules.apply_rule(rule, x(4.0, 1.0, True, 0.25), s0, np)
    assert shrunk == 1.0
    # a lagged rate below the caps is the model's: 2 * 1 / 8 = 0.25
    low, _ = rules.apply_rule(rule, x(1.0, 8.0, True, 4.0), s0, np)
    assert low == 0.25
    # the first step with a rate has no reference: no cap
    first, _ = rules.apply_rule(rule, x(4.0, 1.0, True, 4.0), rule.init(zero), np)
    assert first == 8.0
    # a boolean array flag (JAX's "auto" at run time) gives the same
    arr, _ = rules.apply_rule(rule, x(4.0, 1.0, np.bool_(True), 4.0), s0, np)
    assert arr == lagged


def test_lagged_reach_cap_prevents_the_overshoot_into_a_sharper_region():
    """The failure the reach cap answers (the full-batch ResNet behind SGD: a benign step lands where the
    curvature is far higher, the gradient jumps, and the secant, measured over the benign step, cannot see it).
    GD, one step on a flat stretch (Rayleigh quotient 1, ``||u||^2 = 1``, ``lr_0 = 2`` on its edge), landing on a
    wall with Rayleigh quotient 25 where ``||u||^2 = 25``. The secant's curvature is the flat stretch's
    rescaled (``1 * 25``), so without the cap the rate stays 2: ``lr * 25 = 50``, 25x the wall's edge (its mode
    grows by ``|1 - 50| = 49``, the loss along it ~2400x). With the cap the step's length grows 1.1x:
    ``lr = 2 * 1.1 / 5``, ``lr * 25 = 11`` (the mode grows 10x), and the next secant sees the wall."""
    zero = np.float64(0.0)
    f = np.float64
    wall = 25.0  # the true Rayleigh quotient at the new point

    def second_step(rule):
        _, s = rules.apply_rule(rule, rules.RuleInputs(f(1.0), f(1.0), f(math.nan), f(math.nan), 0), rule.init(zero),
                                np)  # lr_0 = 2 (on the edge of the flat stretch)
        # the new point: u = -g with ||g||^2 = 25; the secant's curvature is the flat Rayleigh quotient (1) * 25
        lr, _ = rules.apply_rule(rule, rules.RuleInputs(f(25.0), f(25.0), f(math.nan), f(math.nan), 1, True,
                                                        f(25.0)), s, np)
        return lr

    uncapped = second_step(rules.CDATRule(sigma=2.0, ema=0.0, lagged_growth=math.inf))
    capped = second_step(rules.CDATRule(sigma=2.0, ema=0.0))
    assert uncapped == 2.0 and abs(1 - uncapped * wall) == 49.0
    assert capped == 2.0 * 1.1 / 5
    assert abs(1 - capped * wall) < 10.0 + 1e-12


A = np.diag([4.0, 1.0, 0.25]) + 0.1
W0 = np.array([1.0, -2.0, 0.5])


def _torch_lrs(**kw):
    w = torch.nn.Parameter(torch.tensor(W0))
    At = torch.tensor(A)
    opt = CDAT(torch.optim.SGD([w], lr=1.0), curvature="secant", **kw)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ At @ w
        loss.backward()
        return loss

    lrs = []
    for _ in range(12):
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
    return lrs


def _jax_lrs(**kw):
    Aj = jnp.asarray(A)
    loss = lambda p: 0.5 * p @ Aj @ p  # noqa: E731
    opt = cdat(optax.identity(), base_method="gd", curvature="secant", **kw)
    p = jnp.asarray(W0)
    s = opt.init(p)
    lrs = []
    for _ in range(12):
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
        p = optax.apply_updates(p, u)
        lrs.append(float(stats(s)["lr"]))
    return lrs


def test_backends_default_gd_with_the_secant_stays_on_the_edge():
    """Step 0 has no secant yet (the fd fallback: above the edge, twice the sigma = 2 rate); from step 1 on the
    default's rates are the edge's (unlagged they would be ~2x): they differ from the sigma = 2 run only through
    step 0's different move and, over the first steps, the lagged steps' reach cap, whose reference is the
    previous rate (step 0's is 2x higher in the default). The loss-bound cap is off here (it binds at step 0,
    and is checked by hand in tests/test_core_rules.py)."""
    t_default, t_edge = _torch_lrs(loss_cap=math.inf), _torch_lrs(sigma=2.0)
    assert t_default[0] == 2 * t_edge[0]
    ratios = np.array(t_default[1:]) / np.array(t_edge[1:])
    assert np.all(ratios < 1.5), ratios
    assert np.all(np.abs(ratios[3:] - 1) < 0.05), ratios
    with jax.enable_x64(True):
        j_default = _jax_lrs(loss_cap=math.inf)
    np.testing.assert_allclose(j_default, t_default, rtol=1e-9)


def test_the_secant_behind_sgd_warns_once_and_not_behind_adam():
    """The secant behind gradient descent or heavy ball is measured to overshoot on networks: both backends say
    so once (torch at the first secant step, JAX when the update is traced); behind Adam nothing is said."""
    import warnings

    from curvopt.base import BaseMethod

    def torch_warnings(base_cls, **kw):
        w = torch.nn.Parameter(torch.tensor(W0))
        opt = CDAT(base_cls([w], lr=1.0, **kw))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                (0.5 * w @ torch.tensor(A) @ w).backward()
                opt.step()  # closure-free: the secant
        return [c for c in caught if "secant curvature" in str(c.message)]

    assert len(torch_warnings(torch.optim.SGD, momentum=0.9)) == 1
    assert len(torch_warnings(torch.optim.SGD)) == 1
    assert torch_warnings(torch.optim.Adam) == []

    def jax_warnings(base, method):
        opt = cdat(base, base_method=method)
        p = jnp.asarray(W0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = jnp.asarray(A) @ p
            jax.jit(lambda s: opt.update(g, s, p))(opt.init(p))
        return [c for c in caught if "secant curvature" in str(c.message)]

    assert len(jax_warnings(optax.trace(0.9), BaseMethod.heavy_ball(0.9))) == 1
    assert jax_warnings(optax.scale_by_adam(), "adam") == []


def test_secant_stretch_by_hand():
    """``||u||^2 / ||u_prev||^2`` in the core, both backends' one source; 1 without a previous direction."""
    assert rules.secant_stretch(np.float64(4.0), np.float64(1.0), np) == 0.25
    assert rules.secant_stretch(np.float64(0.0), np.float64(5.0), np) == 1.0
    assert float(rules.secant_stretch(jnp.float32(2.0), jnp.float32(8.0), jnp)) == 4.0


def _digits_mlp(seed):
    """A float64 tanh MLP on 200 digits: (torch model, inputs, labels)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data[:200], dtype=torch.float64) / 16
    y = torch.tensor(digits.target[:200])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)).double()
    return model, x, y


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_closure_free_greedy_behind_adam_trains_in_both_backends():
    """The quadratically greedy step (the paper's rule, no start-up guard) closure-free behind Adam: its curvature
    is the secant's, a step old, and with nothing to cap the step it diverged (loss 2.3 -> 1.9e3-5.6e10 in 60
    steps on seeds 0-2). The step-length cap of secant steps applies to it too: it trains, and both backends
    take the same rates (seed 0)."""
    from curvopt.optax import quadratic_greedy
    for seed in range(3):
        model, x, y = _digits_mlp(seed)
        start = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        opt = QuadraticGreedy(torch.optim.Adam(model.parameters(), lr=1.0))
        losses, lrs = [], []
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            lrs.append(float(opt.stats["lr"]))
        assert max(losses) == losses[0] and losses[-1] < 1e-3 * losses[0], (seed, losses[-1])
        if seed:
            continue

        def loss_fn(p):
            logits = jnp.tanh(xj @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yj).mean()

        tx = quadratic_greedy(optax.scale_by_adam(), base_method="adam")
        with jax.enable_x64(True):
            params = {k: jnp.asarray(v) for k, v in start.items()}
            xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
            state = tx.init(params)
            update = jax.jit(tx.update)
            jax_lrs = []
            for _ in range(20):
                updates, state = update(jax.grad(loss_fn)(params), state, params)
                params = optax.apply_updates(params, updates)
                jax_lrs.append(float(stats(state)["lr"]))
        np.testing.assert_allclose(jax_lrs, lrs[:20], rtol=1e-6)
