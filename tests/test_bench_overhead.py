"""The overhead benchmark's floor rows compute what they claim: the torch closure-free floor keeps the base's
trajectory and its inner products, the JAX one measures the secant's curvature (exact on a quadratic)."""
import numpy as np
import pytest
import torch

from benchmarks.overhead import _least_secant_work


def test_closure_free_floor_keeps_the_base_trajectory_and_its_inner_products():
    torch.manual_seed(0)
    a = torch.linspace(0.5, 3.0, 7, dtype=torch.float64)
    ws = [torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        ws[1].copy_(ws[0])
    bases = [torch.optim.Adam([w], lr=0.1) for w in ws]
    memory: dict = {}
    for step in range(4):
        for w, base in zip(ws, bases):
            base.zero_grad()
            (0.5 * (a * w * w).sum()).backward()
        g, w_before = ws[1].grad.clone(), ws[1].detach().clone()
        u_prev = memory.get("u")
        bases[0].step()
        _least_secant_work([ws[1]], bases[1], memory)
        torch.testing.assert_close(ws[1].detach(), ws[0].detach(), rtol=0, atol=1e-15)
        u = ws[1].detach() - w_before
        g_dot_u, g_dot_u_prev, u_sq = memory["dots"]
        assert g_dot_u == pytest.approx(float(g @ u), rel=1e-12)
        assert u_sq == pytest.approx(float(u @ u), rel=1e-12)
        assert g_dot_u_prev == pytest.approx(float(g @ (u if u_prev is None else u_prev)), rel=1e-12)


def test_jax_closure_free_floor_reads_the_curvature_of_a_quadratic():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from benchmarks.overhead_jax import _secant_floor_transform

    a = jnp.linspace(0.5, 3.0, 7)
    params = {"w": jnp.linspace(-1.0, 1.0, 7)}
    tx = _secant_floor_transform()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        u_prev = state[2]["w"]
        grads = {"w": a * params["w"]}
        d_avg_before = state[5]
        updates, state = update(grads, state, params)
        params = {"w": params["w"] + updates["w"]}
    # the third step's secant: the curvature u_prev^T A u_prev along the second step's direction
    d = (state[5] - 0.99 * d_avg_before) / 0.01
    np.testing.assert_allclose(d, jnp.vdot(u_prev, a * u_prev), rtol=1e-3)
    assert float(state[3]) > 0 and jnp.isfinite(updates["w"]).all()
