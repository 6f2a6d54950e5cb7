"""Independent checks of the PyTorch backend's adapters, each written against a mutation of the backend that the
rest of the suite let pass (named in the test's docstring: "Kills: ...").

Each test checks against an independent reference: torch's own optimizer, a closed form on a quadratic, or a
float64 dense Hessian. float64 throughout unless the test is about low precision.
"""
import copy
import math
import weakref

import pytest
import torch

from curvopt import SharpnessConfig
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, QuadraticGreedy, hessian_top_eigenvalue

DT = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _diverges(make_base, lam, lr, steps=4000):
    """torch's own optimizer on f(w) = lam/2 w^2 at rate lr: True if |w| grows, False if it decays."""
    w = torch.nn.Parameter(torch.ones(1, dtype=DT))
    opt = make_base([w], lr)
    for _ in range(steps):
        opt.zero_grad()
        w.grad = lam * w.detach().clone()
        opt.step()
        x = float(w.detach())
        if not math.isfinite(x) or abs(x) > 1e6:
            return True
    return abs(float(w.detach())) > 1.0


SGD_FAMILY = {
    "gd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "heavy_ball": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "heavy_ball_dampened": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, dampening=0.5),
    "nesterov": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(SGD_FAMILY))
def test_stability_coefficient_is_torchs_own_threshold(name):
    """The coefficient the tuner reads from the base (eos_ratio, EdgeOfStability's rate) is where torch's own
    optimizer turns unstable on a 1-d quadratic: stable at 0.97 c / lam, divergent at 1.03 c / lam.
    Kills: Nesterov read as heavy ball (c 3.8 instead of 1.357), dampening dropped (c 3.8 instead of 7.6)."""
    make = SGD_FAMILY[name]
    w = torch.nn.Parameter(torch.ones(1, dtype=DT))
    c = CDAT(make([w], 1.0)).coefficient
    lam = 3.0
    assert not _diverges(make, lam, 0.97 * c / lam), (name, c)
    assert _diverges(make, lam, 1.03 * c / lam), (name, c)


def test_edge_of_stability_behind_adam_is_38_over_the_dense_preconditioned_sharpness():
    """EdgeOfStability(sigma=1) behind Adam(betas=(0.9, 0.999)) on a quadratic: lr = 38 / lambda_max(P^-1 A), P
    built by hand from Adam's state after its step (float64 dense eigvalsh). Kills: betas swapped in
    base_method (c = 3998)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=DT)
    A = a @ a.T / 6 + 0.5 * torch.eye(6, dtype=DT)
    w = torch.nn.Parameter(torch.randn(6, generator=g, dtype=DT))
    base = torch.optim.Adam([w], lr=1.0, betas=(0.9, 0.999), eps=1e-8)
    opt = EdgeOfStability(base, sigma=1.0, growth=math.inf, loss_cap=math.inf,  # the formula alone, no caps
                          sharpness=SharpnessConfig(every=1, iters=500, first_iters=500, tol=1e-12))
    closure = _quadratic_closure(opt, w, A)

    for t in range(1, 4):
        opt.step(closure)
        v = base.state[w]["exp_avg_sq"]
        P = (1 - 0.9 ** t) * ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        S = torch.diag(P.rsqrt())
        lam = float(torch.linalg.eigvalsh(S @ A @ S)[-1])
        assert float(opt.stats["lr"]) == pytest.approx(38.0 / lam, rel=1e-4)
        assert opt.coefficient == pytest.approx(38.0, rel=1e-12)


def _quadratic_closure(opt, w, A, y=None):
    """torch's closure for ``f(w) = (w - y)^T A (w - y) / 2`` (``y`` 0 when None)."""
    def closure():
        opt.zero_grad()
        r = w if y is None else w - y
        loss = 0.5 * r @ A @ r
        loss.backward()
        return loss
    return closure


def _cdat_on_a_diagonal_quadratic():
    """CDAT (paper start-up, exact curvature) behind SGD on ``diag(1, 4, 9)``: ``(w, opt, closure)``."""
    A = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=DT))
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0), sigma=2.0, ema=0.9, startup="paper", curvature="exact",
               functional_loss=lambda ps: 0.5 * ps[0] @ A @ ps[0])
    return w, opt, _quadratic_closure(opt, w, A)


def _twin_direction(base, params, grads):
    """u of a copy of ``base`` (same state) stepped once with ``grads``: torch's own optimizer as the reference."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    twin = type(base)(ps)
    twin.load_state_dict(copy.deepcopy(base.state_dict()))
    twin.step()
    return [q.detach() - p.detach() for q, p in zip(ps, params)]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.5),
    lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, dampening=0.3),
    lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=0.5, betas=(0.9, 0.999)),
    lambda ps: torch.optim.Adam(ps, lr=0.5, betas=(0.9, 0.999), amsgrad=True),
], ids=["sgd", "heavy_ball_dampened", "nesterov", "adam", "amsgrad"])
@pytest.mark.parametrize("concat", [False, True], ids=["per_tensor", "concatenated"])
def test_noise_metric_is_the_bases_sensitivity_to_the_gradient(make, concat):
    """The secant noise correction's metric A (u = -A g + c) against torch's own base: stepping a twin with g and
    with g + delta changes u by -A delta (exactly for the SGD family; for Adam to ~1e-2: measured at g = 0 after
    sign-alternating gradients, where Adam's second moment does not react to delta to first order and P moves by
    < 1 % over the step; the metric leaves that reaction out, curvopt.curvature.gradient_weight says why), so
    with no previous direction the noise numerator of the base before the twin's step is 0.5 delta^T A delta =
    -0.5 delta^T (u2 - u1), per tensor and over the concatenated tensors. Kills: Adam's (1 - b1) dropped (a 10x
    metric). (Nesterov's (1 + m(1 - d)) -> (1 + m) is equivalent in torch, which refuses Nesterov with
    dampening.)"""
    from torch_backend.noise import noise_numerator
    from torch_backend.vectors import concatenating

    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(n, dtype=DT)) for n in (30, 20)]
    base = make(ws)
    for _ in range(80):
        for w in ws:
            w.grad = (-1.0) ** _ * (1.0 + 0.1 * torch.randn(w.numel(), dtype=DT))
        base.step()
    g = [torch.zeros(w.numel(), dtype=DT) for w in ws]
    delta = [1e-6 * torch.randn(w.numel(), dtype=DT) for w in ws]
    u1 = _twin_direction(base, ws, g)
    u2 = _twin_direction(base, ws, [x + d for x, d in zip(g, delta)])
    want = -0.5 * sum(float(d @ (b - a)) for d, a, b in zip(delta, u1, u2))
    with concatenating(concat):
        zeros = [torch.zeros_like(w) for w in ws]
        got = float(noise_numerator(base, ws, delta, zeros, zeros, DT))  # D = delta - 0, no previous direction
    assert got == pytest.approx(want, rel=2e-2)


@pytest.mark.parametrize("concat", [False, True], ids=["per_tensor", "concatenated"])
def test_noise_numerator_is_half_the_a_norm_of_the_orthogonal_difference(concat):
    """0.5 ||D_perp||_A^2 with D_perp = D - (D^T A u / u^T A u) u, computed densely, for a uniform metric a != 1
    (plain SGD at lr 0.5, two tensors). Kills: the uniform metric's factor dropped."""
    from torch_backend.noise import noise_numerator
    from torch_backend.vectors import concatenating

    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(4, 3, dtype=DT)), torch.nn.Parameter(torch.zeros(5, dtype=DT))]
    diff = [torch.randn(4, 3, dtype=DT), torch.randn(5, dtype=DT)]
    prev_u = [torch.randn(4, 3, dtype=DT), torch.randn(5, dtype=DT)]
    a = 0.5
    D = torch.cat([x.reshape(-1) for x in diff])
    u = torch.cat([x.reshape(-1) for x in prev_u])
    perp = D - (a * D @ u) / (a * u @ u) * u
    want = 0.5 * a * float(perp @ perp)
    with concatenating(concat):
        got = float(noise_numerator(torch.optim.SGD(params, lr=a), params, diff, [torch.zeros_like(x) for x in diff],
                                    prev_u, DT))
    assert got == pytest.approx(want, rel=1e-10)


def test_hessian_top_eigenvalue_on_two_parameters_and_grad_left_in_place():
    """n = 2 (the dense branch below ARPACK's size limit): the largest eigenvalue of an indefinite 2x2 quadratic
    (closed form), and ``.grad`` holds the gradient at the parameters afterwards, as documented. Kills: the
    smallest eigenvalue returned for n < 3; ``.grad`` not restored (left None: a following plain
    ``opt.step()`` would silently not move)."""
    A = torch.tensor([[1.0, 2.0], [2.0, -3.0]], dtype=DT)
    w = torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=DT))

    def closure():
        w.grad = None
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    lam, vec = hessian_top_eigenvalue(closure, [w])
    assert float(lam) == pytest.approx(-1 + math.sqrt(8), rel=1e-6)
    assert w.grad is not None
    torch.testing.assert_close(w.grad, A @ w.detach(), rtol=1e-12, atol=1e-14)
    # the same with more parameters (ARPACK)
    A3 = torch.diag(torch.tensor([2.0, -5.0, 1.0, 0.5], dtype=DT))
    w3 = torch.nn.Parameter(torch.ones(4, dtype=DT))

    def closure3():
        w3.grad = None
        loss = 0.5 * w3 @ A3 @ w3
        loss.backward()
        return loss

    lam3, _ = hessian_top_eigenvalue(closure3, [w3])
    assert float(lam3) == pytest.approx(2.0, rel=1e-6)
    torch.testing.assert_close(w3.grad, A3 @ w3.detach())


def test_preconditioned_sharpness_leaves_out_a_parameter_adam_never_stepped():
    """``hessian_top_eigenvalue(preconditioner=adam)`` where Adam manages ``b`` but never stepped it (no state):
    ``b`` is left out (scale 0), so the value is lambda_max(P_w^-1/2 H_ww P_w^-1/2) by dense eigvalsh. Kills: an
    unknown P read as 1 (b's raw curvature mixed in)."""
    torch.manual_seed(3)
    a = torch.randn(7, 7, dtype=DT)
    H = a @ a.T / 7 + 0.1 * torch.eye(7, dtype=DT)
    H[5:, 5:] += 50 * torch.eye(2, dtype=DT)  # b's own curvature dominates if it leaks in
    w = torch.nn.Parameter(torch.randn(5, dtype=DT))
    b = torch.nn.Parameter(torch.randn(2, dtype=DT))
    adam = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(5):  # only w gets gradients
        w.grad = torch.randn(5, dtype=DT)
        b.grad = None
        adam.step()
    assert "exp_avg_sq" not in adam.state.get(b, {})

    def closure():
        w.grad = b.grad = None
        x = torch.cat([w, b])
        loss = 0.5 * x @ H @ x
        loss.backward()
        return loss

    lam, _ = hessian_top_eigenvalue(closure, [w, b], preconditioner=adam, tol=1e-10)
    v = adam.state[w]["exp_avg_sq"]
    t = 5
    P = (1 - 0.9 ** t) * ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    S = torch.diag(P.rsqrt())
    want = float(torch.linalg.eigvalsh(S @ H[:5, :5] @ S)[-1])
    assert float(lam) == pytest.approx(want, rel=1e-5)


def test_computation_eps_ignores_values_that_do_not_depend_on_the_parameters():
    """A batch quantised through bfloat16 outside the parameters' path (data preprocessing) does not make the
    closure a bf16 computation: the fd probe stays sized for float32. Kills: outputs that do not require grad
    counted (the probe ~250x too long, sqrt(eps_bf16 / eps_fp32))."""
    from torch_backend.precision import computation_eps

    model = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    _, eps = computation_eps(lambda: model(x.to(torch.bfloat16).to(torch.float32)).square().mean())
    assert eps == torch.finfo(torch.float32).eps
    _, eps = computation_eps(lambda: model.to(torch.bfloat16)(x.to(torch.bfloat16)).float().square().mean())
    assert eps == torch.finfo(torch.bfloat16).eps


def _quadratic_two_tensors(dtype_w=DT, dtype_b=DT):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=DT)
    A = a @ a.T / 7 + 0.2 * torch.eye(7, dtype=DT)
    w = torch.nn.Parameter(torch.randn(5, generator=g, dtype=DT).to(dtype_w))
    b = torch.nn.Parameter(torch.randn(2, generator=g, dtype=DT).to(dtype_b))
    return A, w, b


@pytest.mark.parametrize("flat", [True, False])
def test_greedy_exact_and_fd_displacement_on_the_per_tensor_path(flat, monkeypatch):
    """Models of >= 2^20 entries (or mixed dtypes) take the per-tensor path (no flat workspace, ``dots`` and
    ``norms`` over lists); forced here with CONCAT_BELOW = 0. Greedy behind Adam on a two-tensor quadratic:
    lr = -g^T u / u^T A u exactly (u from a twin of torch's Adam), and the fd probe moves the parameters by
    h ||u|| = sqrt(eps) ||w|| (the documented displacement). Kills: ``dots`` averaging instead of summing the
    tensors' products (measured lr 4e-8 for 1.65), ``norms`` dropping a tensor (displacement 28 % short)."""
    import torch_backend.vectors as vectors

    if not flat:
        monkeypatch.setattr(vectors, "CONCAT_BELOW", 0)
    A, w, b = _quadratic_two_tensors()
    base = torch.optim.Adam([w, b], lr=0.3)
    opt = QuadraticGreedy(base, curvature="fd")
    assert opt._concat is flat
    moved = []

    def closure():
        opt.zero_grad()
        x = torch.cat([w, b])
        if opt.probing:
            moved.append(torch.cat([w.detach(), b.detach()]))
        loss = 0.5 * x @ A @ x
        loss.backward()
        return loss

    for _ in range(3):
        x0 = torch.cat([w.detach(), b.detach()])
        g = A @ x0
        gw, gb = g[:5], g[5:]
        u = torch.cat(_twin_direction(base, [w, b], [gw, gb]))
        moved.clear()
        opt.step(closure)
        want = float(-(g @ u) / (u @ A @ u))
        assert float(opt.stats["lr"]) == pytest.approx(want, rel=5e-8)
        (probe,) = moved
        assert float((probe - x0).norm()) == pytest.approx(math.sqrt(torch.finfo(DT).eps) * float(x0.norm()),
                                                          rel=1e-6)


def test_least_precise_eps_and_the_probe_of_mixed_precision_parameters():
    """Parameters in bfloat16 and float32: the fd displacement is sized by bfloat16's eps (the coarsest), as
    documented (torch_backend.vectors.least_precise_eps). Kills: the eps of whichever dtype comes last."""
    from torch_backend.vectors import least_precise_eps

    ps = [torch.zeros(3, dtype=torch.float32), torch.zeros(3, dtype=torch.bfloat16),
          torch.zeros(3, dtype=torch.float64)]
    for order in (ps, ps[::-1], ps[1:] + ps[:1]):
        assert least_precise_eps(order) == torch.finfo(torch.bfloat16).eps


def test_single_tensor_dot_of_bf16_accumulates_in_float32():
    """``dot`` of bf16 tensors is read in float32 (the tuners' scalars are at least float32): equal to the
    float64 dot of the same bf16 values to float32 accuracy. Kills: the product accumulated/rounded in bf16."""
    from torch_backend.vectors import dot

    torch.manual_seed(0)
    x = torch.randn(4096).to(torch.bfloat16)
    y = torch.randn(4096).to(torch.bfloat16)
    want = float(x.double() @ y.double())
    got = dot([x], [y])
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-4)


def _adam_momentum_numerator_run(make_base, wd_coupled):
    """Returns (lr * |curvature|, the by-hand momentum numerator) for 5 steps of CDAT(numerator="momentum",
    sigma=1, ema=0, paper start-up) behind ``make_base`` on a quadratic whose target moves every step."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=DT)
    h = a @ a.T / 6 + torch.eye(6, dtype=DT)
    w = torch.nn.Parameter(torch.randn(6, dtype=DT))
    targets = [torch.randn(6, dtype=DT) for _ in range(5)]
    base = make_base([w])
    b1, b2 = base.param_groups[0]["betas"]
    lr_g, wd = base.param_groups[0]["lr"], base.param_groups[0]["weight_decay"]
    opt = CDAT(base, sigma=1.0, ema=0.0, startup="paper", numerator="momentum", curvature="exact",
               functional_loss=lambda ps: ps[0].sum())  # replaced each step below
    out = []
    for t, y in enumerate(targets, start=1):
        opt.functional_loss = lambda ps, y=y: 0.5 * (ps[0] - y) @ h @ (ps[0] - y)

        closure = _quadratic_closure(opt, w, h, y)
        w0 = w.detach().clone()
        g = h @ (w0 - y)
        m_prev = base.state[w]["exp_avg"].clone() if t > 1 else torch.zeros(6, dtype=DT)
        (u,) = _twin_direction(base, [w], [g])
        opt.step(closure)
        st = base.state[w]
        D = lr_g / ((1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + 1e-8))
        g_in = g + wd * w0 if wd_coupled else g
        n = float(-g @ u)
        if t > 1:
            n += (1 - b1) * (float(g @ (D * m_prev)) / (1 - b1 ** (t - 1)) - float(g @ (D * g_in)))
        out.append((float(opt.stats["lr"]) * abs(float(opt.stats["curvature"])), max(n, 0.0)))
    return out


@pytest.mark.parametrize("make_base,coupled", [
    (lambda ps: torch.optim.Adam(ps, lr=0.5, betas=(0.9, 0.999), weight_decay=0.3), True),
    (lambda ps: torch.optim.AdamW(ps, lr=0.5, betas=(0.9, 0.999), weight_decay=0.3), False),
    (lambda ps: torch.optim.Adam(ps, lr=0.5, betas=(0.9, 0.999), weight_decay=0.3, decoupled_weight_decay=True),
     False),
], ids=["adam_l2", "adamw", "adam_decoupled_flag"])
def test_momentum_numerator_by_hand_with_weight_decay(make_base, coupled):
    """The default CDAT numerator behind Adam (``numerator="momentum"``) with weight decay, against the core's
    formula evaluated by hand from torch's Adam state: ``g_in = g + wd w`` under L2 decay, ``g`` under decoupled
    decay (AdamW, or Adam(decoupled_weight_decay=True)), and ``-g^T u`` from a twin of the base. Kills: the
    L2 term dropped from g_in; Adam's decoupled_weight_decay flag read as L2 decay."""
    for k, (got, want) in enumerate(_adam_momentum_numerator_run(make_base, coupled)):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), k


def test_paired_numerator_by_hand_under_an_active_clip():
    """``numerator="paired"`` with ``max_grad_norm`` active on every step: the rule's numerator (lr * |curvature|
    at sigma 1, ema 0, paper start-up) is ``[-(c g)^T u - (1 - b1)/2 c^2 (g - ghat)^T D (g - ghat)] / c`` with c the
    clip factor, u Adam's direction from the clipped gradient (a twin of torch's Adam) and ghat = H (w_t -
    y_{t-1}) (this quadratic's previous batch at the current point). Kills: ghat left unscaled by the clip."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=DT)
    h = a @ a.T / 6 + torch.eye(6, dtype=DT)
    w = torch.nn.Parameter(torch.randn(6, dtype=DT))
    y0 = 3 * torch.randn(6, dtype=DT)
    targets = [y0 + 0.5 * torch.randn(6, dtype=DT) for _ in range(6)]
    b1, max_norm = 0.9, 0.05
    base = torch.optim.Adam([w], lr=0.5, betas=(b1, 0.999))
    opt = CDAT(base, sigma=1.0, ema=0.0, startup="paper", numerator="paired", curvature="fd", max_grad_norm=max_norm)
    prev_y, checked = None, 0
    for t, y in enumerate(targets, start=1):
        closure = _quadratic_closure(opt, w, h, y)
        w_t = w.detach().clone()
        g = h @ (w_t - y)
        c = min(1.0, max_norm / (float(g.norm()) + 1e-6))
        assert c < 1  # the clip is active
        (u,) = _twin_direction(base, [w], [c * g])
        had_prediction = bool(base.state[w].get("curvopt_predicted", False)) if t > 1 else False
        opt.step(closure)
        st = base.state[w]
        D = 0.5 / ((1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + 1e-8))
        n = float(-(c * g) @ u)
        if had_prediction:
            r = g - h @ (w_t - prev_y)
            n -= (1 - b1) / 2 * c * c * float(r @ (D * r))
            checked += 1
        want = max(n / c, 0.0)
        got = float(opt.stats["lr"]) * abs(float(opt.stats["curvature"]))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), t
        prev_y = y
    assert checked >= 3


def test_armijo_delta_relaxes_the_test_by_hand():
    """ArmijoLineSearch(delta=...) on a quadratic behind GD: the accepted rate is the first trial of
    init_lr * increase, * decrease, ... with f(w + lr u) <= (1 + delta) f(w) + c lr g^T u, computed by hand
    (and the relaxation changes the answer here). Kills: delta not passed to the rule."""
    A = torch.diag(torch.tensor([1.0, 10.0], dtype=DT))
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=DT))
    c, delta, inc, dec, init = 0.5, 0.5, 2.0, 0.5, 1.0
    f = lambda x: 0.5 * float(x @ A @ x)  # noqa: E731
    x0 = w.detach().clone()
    g = A @ x0
    u = -g

    def accepted(d):
        lr = init * inc
        for _ in range(30):
            if f(x0 + lr * u) <= (1 + d) * f(x0) + c * lr * float(g @ u):
                return lr
            lr *= dec
        return None

    want = accepted(delta)
    assert want != accepted(0.0)
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), c=c, delta=delta, increase_factor=inc,
                           decrease_factor=dec, init_lr=init, max_trials=30)
    opt.step(_quadratic_closure(opt, w, A))
    assert float(opt.stats["lr"]) == pytest.approx(want, rel=1e-12)


def test_an_in_place_edit_of_the_tuners_state_is_read_by_the_next_step():
    """The step reads its scalar state from host copies while the state tensors are unmodified; an in-place
    edit (``.mul_``, ``.copy_``, a distributed checkpoint loading into the existing tensors) must be seen. Two
    tuners, one edited in place and one given a new tensor of the same value, take the same next rate. Kills:
    the version check of ScalarStore.host dropped (the edit silently ignored)."""
    lrs = []
    for in_place in (True, False):
        w, opt, closure = _cdat_on_a_diagonal_quadratic()
        for _ in range(3):
            opt.step(closure)
        st = opt.state[w]
        key = "curvopt_numerator_avg"
        if in_place:
            st[key].mul_(3.0)
        else:
            st[key] = st[key] * 3.0
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-14)


def test_a_step_that_raises_during_its_commit_keeps_the_rule_state(monkeypatch):
    """A step that raises after the new scalars are written (here: installing the workspace buffers; a
    KeyboardInterrupt can land there too) leaves the tuner's rule state as before the step. Kills: the scalar
    store writing the buffer the state's current views live in."""
    import torch_backend.workspace as workspace

    w, opt, closure = _cdat_on_a_diagonal_quadratic()
    for _ in range(2):
        opt.step(closure)
    before = {k: float(v) for k, v in opt.state[w].items() if k.startswith("curvopt_") and torch.is_tensor(v)
              and v.dim() == 0}
    w_before = w.detach().clone()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace.Workspace, "install", boom)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    after = {k: float(v) for k, v in opt.state[w].items() if k in before}
    assert after == before
    assert torch.equal(w.detach(), w_before)


def test_adam_numerator_in_runs_is_the_single_run_numerator(monkeypatch):
    """Above ``CONCAT_BELOW`` entries the default (momentum) numerator behind Adam forms ``D = lr_group / P`` one
    run of at most ``CONCAT_BELOW`` entries at a time (the whole model at once held 3 parameter-sized copies
    beyond the tuner's buffers behind a 60M-parameter model in a field test). The runs change only the order of
    the sums: CDAT's rates with runs of one parameter and with runs of up to 20 entries agree to rounding, and
    with the flat path's single run to the fd curvature's rounding (the per-tensor path forms the probe
    differently); at most one run's ``D`` exists at a time. Kills: a run left out of the sums, a run's ``D`` over
    another run's entries."""
    import torch_backend.preconditioning as preconditioning
    import torch_backend.vectors as vectors

    def rates(limit):
        if limit is not None:
            monkeypatch.setattr(vectors, "CONCAT_BELOW", limit)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        x, y = torch.randn(32, 6, dtype=DT), torch.randn(32, 3, dtype=DT)
        opt = CDAT(torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(),
                                                                         "lr": 0.5}], lr=1.0))

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        out = []
        for _ in range(8):
            opt.step(closure)
            out.append(float(opt.stats["lr"]))
        return out

    live, most = [], [0]
    diagonal = preconditioning._diagonal

    def watched(*args):
        d = diagonal(*args)
        live[:] = [r for r in live if r() is not None]
        most[0] = max(most[0], len(live) + 1)
        live.append(weakref.ref(d))
        return d
    monkeypatch.setattr(preconditioning, "_diagonal", watched)
    whole = rates(None)
    assert most[0] == 1
    by_limit = {}
    for limit in (0, 20):  # one run per parameter; runs of up to 20 entries (the 30-entry weight alone)
        most[0] = 0
        by_limit[limit] = rates(limit)
        assert by_limit[limit] == pytest.approx(whole, rel=1e-6)
        assert most[0] == 1
    assert by_limit[20] == pytest.approx(by_limit[0], rel=1e-12)
