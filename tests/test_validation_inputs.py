"""Bad hyperparameter input, both backends: refused at construction by name (or, for a schedule's value, at the
step that reads it, with nothing moved), never read in a way that changes the rate silently. Found by a field test
that tried every argument with odd values."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from curvopt import BaseMethod, SharpnessConfig, rules
from curvopt.optax import armijo, cdat, edge_of_stability
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability

A = (1.0, 4.0)  # the quadratic 0.5 * (w1^2 + 4 w2^2)


def _torch_steps(opt, w, steps=1):
    a = torch.tensor(A, dtype=w.dtype)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (a * w * w).sum()
        loss.backward()
        return loss
    for _ in range(steps):
        opt.step(closure)
    return float(opt.stats["lr"])


def _optax_lr(tx, p, steps=1):
    loss = lambda q: 0.5 * jnp.sum(jnp.asarray(A, p.dtype) * q * q)  # noqa: E731
    s = tx.init(p)
    for _ in range(steps):
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=v, grad=g, value_fn=loss)
        p = optax.apply_updates(p, u)
    return float(optax.tree_utils.tree_get(s, "lr")), p


@pytest.mark.parametrize("make", [lambda: SharpnessConfig(every=2**63), lambda: SharpnessConfig(iters=1e308),
                                  lambda: SharpnessConfig(first_iters=2**31),
                                  lambda: rules.EdgeOfStabilityRule(coefficient=2.0, free_steps=2**31)])
def test_counts_beyond_int32_are_refused(make):
    """JAX keeps the counts in int32: ``free_steps=2**31`` wrapped negative in Optax (the rates of
    ``free_steps=0``, where PyTorch's were those of 2**31 - 1), ``every=2**63`` overflowed inside jit, and
    ``iters=1e308`` failed in both backends at the first step without naming the argument."""
    with pytest.raises(ValueError, match="must be an integer <= 2147483647"):
        make()


def test_switches_are_booleans():
    """``allow_any_base="False"`` (a string, read by its truth) wrapped an RMSprop; ``warn_ascent=0.5`` was on."""
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="allow_any_base must be True or False"):
        CDAT(torch.optim.RMSprop([w]), allow_any_base="False")
    with pytest.raises(TypeError, match="allow_any_base must be True or False"):
        EdgeOfStability(torch.optim.SGD([w], lr=1.0), allow_any_base="no")
    for make in (cdat, armijo, edge_of_stability):
        with pytest.raises(TypeError, match="warn_ascent must be True or False"):
            make(optax.identity(), warn_ascent="False")
        make(optax.identity(), warn_ascent=np.bool_(True))  # numpy's booleans are booleans
    CDAT(torch.optim.SGD([w], lr=1.0), allow_any_base=np.False_)


def test_base_method_refuses_momentum_its_kind_does_not_have():
    """``BaseMethod("gd", momentum=0.9)`` stepped as plain gradient descent, the momentum dropped."""
    for kwargs in (dict(kind="gd", momentum=0.9), dict(kind="gd", dampening=0.5), dict(kind="adam", momentum=0.9),
                   dict(kind="nesterov", momentum=0.9, dampening=0.1)):
        with pytest.raises(ValueError, match="takes no"):
            BaseMethod(**kwargs)
    assert BaseMethod("heavy_ball", momentum=0.9, dampening=0.1).dampening == 0.1


@pytest.mark.parametrize("bad", [None, "2.0"])
def test_a_schedule_returning_no_number_names_sigma_and_moves_nothing(bad):
    """A ``sigma`` schedule returning None or a string failed deep in the step (``must be real number, not
    NoneType``; in Optax inside the jit trace)."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = CDAT(torch.optim.Adam([w], lr=1.0), sigma=lambda step: bad)
    with pytest.raises(TypeError, match="schedule given as sigma returned"):
        _torch_steps(opt, w)
    assert torch.equal(w.detach(), torch.ones(2, dtype=torch.float64)) and not opt.base.state
    with pytest.raises(TypeError, match="schedule given as sigma returned"):
        _optax_lr(cdat(optax.identity(), base_method="gd", sigma=lambda step: bad), jnp.ones(2))


def test_armijo_keeps_an_lr_max_that_is_zero_in_the_working_precision():
    """``lr_max=1e-50`` is 0 in float32: the first trial ``min(2 * init_lr, 0)`` was not positive and the search
    fell back to ``init_lr`` uncapped (rate 0.41, the parameters moved); the fallback is capped too."""
    w = torch.nn.Parameter(torch.ones(2))
    assert _torch_steps(ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), lr_max=1e-50), w) == 0.0
    assert torch.equal(w.detach(), torch.ones(2))
    lr, p = _optax_lr(armijo(optax.identity(), lr_max=1e-50), jnp.ones(2, jnp.float32))
    assert lr == 0.0 and np.array_equal(np.asarray(p), np.ones(2))
    assert float(rules.armijo_initial_lr(np.float32(0.5), increase_factor=2.0, lr_max=np.float32(0.0),
                                         init_lr=1.0, xp=np)) == 0.0


def test_seeds_that_would_alias_are_refused():
    """The start vectors' generators are seeded from ``seed`` mod 2**63: seeds 2**63 and 2**70 ran seed 0's
    sharpness estimates (a field test); they are refused, and the largest seed kept is distinct from 0's."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="seed must be an integer <= 9223372036854775807"):
        EdgeOfStability(torch.optim.SGD([w], lr=1.0), seed=2 ** 63)

    def first_sharpness(seed):  # one product from the seeded start: its Rayleigh quotient
        v = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = EdgeOfStability(torch.optim.SGD([v], lr=1.0), seed=seed, sharpness=SharpnessConfig(every=1, iters=1))
        _torch_steps(opt, v)
        return float(opt.stats["sharpness"])
    assert first_sharpness(2 ** 63 - 1) != first_sharpness(0)


@pytest.mark.parametrize("tuner", ["cdat", "edge_of_stability"])
def test_a_sigma_schedule_is_called_once_a_step(tuner):
    """The guard read the schedule for its finiteness check and the rule again for its rate: a user's schedule
    ran twice a step (one with a side effect, a counter, logged twice). Both backends, same rates."""
    calls = []

    def schedule(step):
        calls.append(int(step))
        return 1.0 + 0.5 * step
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    make = {"cdat": CDAT, "edge_of_stability": EdgeOfStability}[tuner]
    kw = {"sharpness": 1} if tuner == "edge_of_stability" else {}
    rate = _torch_steps(make(torch.optim.SGD([w], lr=1.0), sigma=schedule, **kw), w, steps=3)
    assert calls == [0, 1, 2]
    calls.clear()
    transform = {"cdat": cdat, "edge_of_stability": edge_of_stability}[tuner]
    jax_rate, _ = _optax_lr(transform(optax.identity(), sigma=schedule, **kw), jnp.ones(2), steps=3)
    assert len(calls) == 3  # not jitted: once per update, with the step count
    assert jax_rate == pytest.approx(rate, rel=1e-4)  # (float32 here)


def test_api_slips_get_errors_that_say_what_to_do():
    """A field test's slips: ``CurvatureTuner(base)`` (exported, the base class) was an AttributeError on 'rule';
    a base handed to a ``scale_by_*`` transform said only "sigma must be a real number"; a convenience could not be
    pickled (``functools.partial(cdat, ...)``: looked up where it is not); one deprecated keyword "are deprecated"."""
    import functools
    import pickle
    import warnings

    from curvopt.optax import polyak, scale_by_cdat, scale_by_polyak
    from curvopt.torch import CurvatureTuner

    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="CurvatureTuner is the tuners' base class; use CDAT"):
        CurvatureTuner(torch.optim.SGD([w], lr=1.0))

    class WithRule(CurvatureTuner):  # a subclass's rule as a class attribute or a property is a rule
        rule = rules.CDATRule()

    class WithProperty(CurvatureTuner):
        rule = property(lambda self: rules.CDATRule())

    for subclass in (WithRule, WithProperty):
        subclass(torch.optim.SGD([w], lr=1.0))
    for transform, name in ((scale_by_cdat, "sigma"), (scale_by_polyak, "f_star")):
        with pytest.raises(ValueError, match=rf"{name} must be a real number, got the transformation .* take no "
                                             r"base; chain one after it, optax.chain\(base"):
            transform(optax.scale_by_adam())
    for convenience in (cdat, polyak):
        again = pickle.loads(pickle.dumps(functools.partial(convenience, lr_max=0.5)))
        assert again.func is convenience
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cdat(optax.identity(), sharpness_every=5)
    assert any("sharpness_every is deprecated" in str(m.message) for m in caught)
