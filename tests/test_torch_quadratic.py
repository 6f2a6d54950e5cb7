"""Exact answers on a quadratic f(w) = 1/2 w^T A w (float64)."""
import copy
import math

import pytest
import torch

from curvopt.torch import CDAT, QuadraticGreedy

DT = torch.float64
# the fd oracle's displacement is h ||u|| = sqrt(eps) ||w|| (the core's finite_difference_step): rounding in
# w + h u leaves about sqrt(eps) = 1.5e-8 relative error on a quadratic
FD_REL = 5e-8


def problem(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    A = a @ a.T / n + 0.1 * torch.eye(n, dtype=DT)
    w = torch.nn.Parameter(torch.randn(n, generator=g, dtype=DT))
    return A, w


BASES = {
    "gd": lambda ps: torch.optim.SGD(ps, lr=1.0),
    "heavy_ball": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1.0),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=2.0, weight_decay=0.1),
}


def base_direction(base, w):
    """u from a twin of the base (same state) stepped once at its own lr, independently of the tuner."""
    w2 = torch.nn.Parameter(w.detach().clone())
    w2.grad = w.grad.detach().clone()
    twin = type(base)([w2])
    twin.load_state_dict(copy.deepcopy(base.state_dict()))  # restores the group settings too
    twin.step()
    return (w2 - w).detach()


def run_and_check(tuner_fn, base_name, rel, steps=4, expected_lr=None, curvature_rel=None):
    A, w = problem()
    base = BASES[base_name]([w])
    opt = tuner_fn(base, A)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    history = []
    for _ in range(steps):
        with torch.enable_grad():
            opt.zero_grad()
            (0.5 * w @ A @ w).backward()
        g = w.grad.detach().clone()
        u = base_direction(base, w)
        w_before = w.detach().clone()
        opt.step(closure)
        num, curv = float(-(g @ u)), float(u @ A @ u)
        history.append((num, curv))
        lr = float(opt.stats["lr"])
        want = expected_lr(history) if expected_lr else num / curv
        assert math.isclose(lr, want, rel_tol=rel), (lr, want)
        assert float(opt.stats["curvature"]) == pytest.approx(curv, rel=curvature_rel or rel)
        assert float(opt.stats["numerator"]) == pytest.approx(num, rel=1e-12)
        torch.testing.assert_close(w.detach(), w_before + lr * u, rtol=1e-12, atol=1e-14)
    return opt


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("oracle,rel", [("fd", FD_REL), ("exact", 1e-10)])
def test_greedy_is_exact_quadratic_minimiser(base_name, oracle, rel):
    def make(base, A):
        return QuadraticGreedy(base, curvature=oracle, functional_loss=(lambda ps: 0.5 * ps[0] @ A @ ps[0])
                               if oracle == "exact" else None)
    run_and_check(make, base_name, rel)


@pytest.mark.parametrize("oracle,rel", [("fd", FD_REL), ("exact", 1e-10)])
def test_cdat_sigma2_is_twice_greedy(oracle, rel):
    def make(base, A):
        return CDAT(base, sigma=2.0, ema=0.0, startup="paper", curvature=oracle,
                    functional_loss=(lambda ps: 0.5 * ps[0] @ A @ ps[0]) if oracle == "exact" else None)
    run_and_check(make, "heavy_ball", rel, expected_lr=lambda h: 2 * h[-1][0] / h[-1][1])


def test_cdat_ema_as_documented():
    """lr_t = sigma * sum ema^(t-s) n_s / sum ema^(t-s) d_s (startup="paper": zero-initialised, no bias
    correction)."""
    beta, sigma = 0.9, 1.5

    def expected(h):
        t = len(h)
        n = sum(beta ** (t - 1 - s) * ns for s, (ns, _) in enumerate(h))
        d = sum(beta ** (t - 1 - s) * ds for s, (_, ds) in enumerate(h))
        return sigma * n / d

    def make(base, A):
        return CDAT(base, sigma=sigma, ema=beta, startup="paper", curvature="exact",
                    functional_loss=lambda ps: 0.5 * ps[0] @ A @ ps[0])
    opt = run_and_check(make, "adam", 1e-10, steps=6, expected_lr=expected)
    assert opt.stats["closure_calls"] == 2  # the main call + the functional evaluation


def test_lr_max_caps():
    def make(base, A):
        return QuadraticGreedy(base, lr_max=1e-3)
    run_and_check(make, "gd", 1e-12, steps=2, expected_lr=lambda h: 1e-3, curvature_rel=1e-8)


def test_secant_is_exact_along_previous_direction():
    """GD on a quadratic: the secant at step t equals u_{t-1}^T A u_{t-1} ||u_t||^2/||u_{t-1}||^2."""
    A, w = problem()
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0), curvature="secant")
    assert opt.curvature == "secant"

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stats["closure_calls"] == 2  # first step: fd fallback
    prev_u = -(A @ w).detach()  # u at step 2 is -g(w_2); previous u recovered below
    for _ in range(3):
        u_prev = opt.state[w]["curvopt_u"].clone()
        u = -(A @ w).detach()
        opt.step(closure)
        expect = float(u_prev @ A @ u_prev) * float(u @ u) / float(u_prev @ u_prev)
        assert float(opt.stats["curvature"]) == pytest.approx(expect, rel=1e-10)
        assert opt.stats["closure_calls"] == 1
    del prev_u


def test_per_group_lr_is_a_relative_multiplier():
    A, w = problem()
    b = torch.nn.Parameter(torch.ones(3, dtype=DT))
    base = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [b], "lr": 0.25}])
    opt = QuadraticGreedy(base, curvature="exact",
                          functional_loss=lambda ps: 0.5 * ps[0] @ A @ ps[0] + 0.5 * (ps[1] ** 2).sum())
    assert opt.param_groups is base.param_groups

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w + 0.5 * (b ** 2).sum()
        loss.backward()
        return loss

    w0, b0 = w.detach().clone(), b.detach().clone()
    gw = (A @ w0)
    opt.step(closure)
    lr = float(opt.stats["lr"])
    torch.testing.assert_close(w.detach(), w0 - lr * 1.0 * gw)
    torch.testing.assert_close(b.detach(), b0 - lr * 0.25 * b0)
    u = torch.cat([-gw, -0.25 * b0])
    Hu = torch.cat([A @ -gw, -0.25 * b0])
    g = torch.cat([gw, b0])
    assert lr == pytest.approx(float(-(g @ u) / (u @ Hu)), rel=1e-10)
