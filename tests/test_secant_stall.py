"""Closure-free CDAT at a concave start (the double well ``(w^2 - 1)^2`` from ``w = 0.3``, where ``f'' < 0``): the
secant's curvature is negative, without the loss the rule has no step to take (lr 0), and the next step probes
again with the tiny fd step, so the run never leaves the start. The stall is reported once (PyTorch's step; Optax's
``stats`` from then on): before, every repeated probe restarted the 10-step count and nothing was said."""
import warnings

import jax
import jax.numpy as jnp
import optax
import torch

from curvopt.optax import cdat, stats
from curvopt.torch import CDAT

STALL = "still below the tiny probing step"


def test_torch_reports_a_closure_free_stall_at_a_concave_start():
    for make_base in (lambda w: torch.optim.SGD([w], lr=1.0), lambda w: torch.optim.Adam([w], lr=1.0)):
        w = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
        opt = CDAT(make_base(w))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(30):
                opt.zero_grad()
                ((w ** 2 - 1) ** 2).sum().backward()
                opt.step()
        assert abs(float(w) - 0.3) < 1e-6  # the stall itself: closure-free has no step here
        assert sum(STALL in str(m.message) for m in caught) == 1  # once


def test_optax_reports_a_closure_free_stall_at_a_concave_start():
    opt = cdat(optax.identity())  # the base's direction at rate 1 (optax.sgd would negate it: an ascent)
    loss = lambda p: ((p["w"] ** 2 - 1) ** 2).sum()  # noqa: E731

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    def run(w0):
        params = {"w": jnp.array([w0])}
        state, said = opt.init(params), []
        for _ in range(30):
            params, state = step(params, state)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stats(state)
            said.append(any(STALL in str(m.message) for m in caught))
        return float(params["w"][0]), said

    w, said = run(0.3)
    assert abs(w - 0.3) < 1e-2  # float32 probes: tiny steps, never out of the well's top
    assert any(said) and said[-1]
    w, said = run(2.0)  # started where the curvature is positive: converges without a word
    assert not any(said) and abs(w - 1.0) < 1e-3
