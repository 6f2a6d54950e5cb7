"""The PyTorch tuners call the core's rule values through ``apply_rule`` (issue 9): the core's guard (a NaN
curvature probe is forgotten, not averaged in), ``sigma`` as a value on the rule (assignable, schedulable)."""
import copy
import math
import warnings

import pytest
import torch

from curvopt.rules import CDATRule
from curvopt.torch import CDAT, CurvatureTuner, EdgeOfStability

DT = torch.float64


def problem():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=DT)
    A = a @ a.T / 6 + 0.1 * torch.eye(6, dtype=DT)
    w0 = torch.randn(6, generator=g, dtype=DT)
    return A, w0


def run(fault_step, fault_call, steps=10, failed=False, **kw):
    """CDAT(fd) on ``f = 1/2 w^T A w + 0.1 sum w^4``; at ``fault_step`` the closure's call ``fault_call`` (0: the
    main call, 1: the fd probe) returns NaN gradients and loss (``failed``: returns inf, or the number given, and no
    gradient, as a closure that catches a solver's failure)."""
    A, w0 = problem()
    w = torch.nn.Parameter(w0.clone())
    opt = CDAT(torch.optim.SGD([w], lr=1.0), sigma=1.5, ema=0.9, curvature="fd", **kw)
    calls = {"step": 0, "call": 0}

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w + 0.1 * (w ** 4).sum()
        if calls["step"] == fault_step and calls["call"] == fault_call:
            if failed:
                calls["call"] += 1
                return torch.tensor(math.inf if failed is True else failed, dtype=DT)
            loss = loss * float("nan")
        calls["call"] += 1
        loss.backward()
        return loss

    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(steps):
            calls["step"], calls["call"] = t, 0
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
    return lrs, w.detach().clone(), opt


def test_nan_curvature_probe_is_forgotten_like_a_skipped_step():
    """A NaN curvature probe at step k gives lr 0 at k and leaves the averages alone: the lr sequence after k
    equals that of a run whose step k was skipped (NaN main loss). The old guard stored the NaN in the
    denominator average and froze the lr for the rest of the run."""
    k = 3
    probe_lrs, probe_w, probe_opt = run(k, 1)
    skip_lrs, skip_w, skip_opt = run(k, 0)
    assert probe_lrs[k] == 0.0 and math.isnan(skip_lrs[k])
    assert probe_lrs[:k] == skip_lrs[:k]
    assert probe_lrs[k + 1:] == skip_lrs[k + 1:]  # bit-identical afterwards
    assert len(set(probe_lrs[k + 1:])) > 3  # not frozen
    assert torch.equal(probe_w, skip_w)
    assert skip_opt.stats["skipped"] == 1 and probe_opt.stats["skipped"] == 0


def test_a_failed_probe_is_a_nan_probe():
    """A probe whose closure returns inf without a backward (a solver that gave up a little way from the
    parameters) left the gradient at the probe missing, read as 0: the fd curvature ``-g^T u / h`` was ~1e8x too
    high and held the rate down for the rest of the run (a field test's neural ODE: 0.0064 -> 6.7e-9). Now it is
    the NaN probe's case: lr 0 at that step and the same run afterwards, bit for bit."""
    k = 3
    nan_lrs, nan_w, _ = run(k, 1)
    failed_lrs, failed_w, _ = run(k, 1, failed=True)
    assert failed_lrs[k] == 0.0 and failed_lrs == nan_lrs and torch.equal(failed_w, nan_w)
    finite_lrs, finite_w, _ = run(k, 1, failed=1.0)  # a finite loss but no backward: no gradient, a failed probe
    assert finite_lrs == nan_lrs and torch.equal(finite_w, nan_w)


def test_a_failed_probe_voids_the_online_sharpness_estimate():
    """The online sharpness's finite-difference products likewise: a probe returning inf without a backward read
    a sharpness of ~1e7 (true ~30) and the edge rule's rate fell 4e5x; now the estimate is void (NaN) and the rate
    is held."""
    A, w0 = problem()
    out = {}
    for failed in (False, True):
        w = torch.nn.Parameter(w0.clone())
        opt = EdgeOfStability(torch.optim.SGD([w], lr=1.0), sharpness=1)
        calls = {"step": 0, "call": 0}

        def closure():
            calls["call"] += 1
            if failed and calls["step"] == 1 and calls["call"] == 2:  # the second step's (one) product
                return torch.tensor(math.inf, dtype=DT)
            opt.zero_grad()
            loss = 0.5 * w @ A @ w
            loss.backward()
            return loss

        lrs, sharp = [], []
        for t in range(3):
            calls["step"], calls["call"] = t, 0
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
            sharp.append(float(opt.stats["sharpness"]))
        out[failed] = lrs, sharp
    top = float(torch.linalg.eigvalsh(A)[-1])
    (lrs, sharp), (f_lrs, f_sharp) = out[False], out[True]
    assert sharp == pytest.approx([top] * 3, rel=1e-3)
    assert f_sharp[0] == sharp[0] and math.isnan(f_sharp[1]) and f_sharp[2] == pytest.approx(top, rel=1e-3)
    assert f_lrs[1] == f_lrs[0] == lrs[0]  # held, not cut


def test_sigma_is_the_rules_assignable_and_schedulable():
    _, _, opt = run(-1, -1, steps=1)
    assert opt.sigma == 1.5 and opt.rule == CDATRule(sigma=1.5, ema=0.9)
    # a schedule step -> sigma (steps taken before this one): sigma 1.5 on even steps, 0.75 on odd ones
    A, w0 = problem()
    lrs = {}
    for name, sigma in (("const", 1.5), ("sched", lambda t: 1.5 if t % 2 == 0 else 0.75)):
        w = torch.nn.Parameter(w0.clone())
        opt = CDAT(torch.optim.SGD([w], lr=1.0), sigma=sigma, ema=0.0, startup="paper", curvature="exact",
                   functional_loss=lambda ps: 0.5 * ps[0] @ A @ ps[0])

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ A @ w
            loss.backward()
            return loss

        out = []
        for t in range(4):
            g = (A @ w).detach()
            opt.step(closure)
            out.append(float(opt.stats["lr"]) / float(g @ g / (g @ A @ g)))
        lrs[name] = out
    assert lrs["const"] == pytest.approx([1.5] * 4, rel=1e-10)
    assert lrs["sched"] == pytest.approx([1.5, 0.75, 1.5, 0.75], rel=1e-10)
    opt.sigma = 0.5  # assignable: replaces the rule value (validated)
    assert opt.rule.sigma == 0.5
    with pytest.raises(ValueError, match="sigma"):
        opt.sigma = -1.0
    eos = EdgeOfStability(torch.optim.SGD([torch.nn.Parameter(w0.clone())], lr=1.0))
    eos.sigma = 0.7
    assert eos.rule.sigma == 0.7


def test_no_subclass_hooks():
    """The step calls the rule value; tuners define no learning-rate hook for the base class to call back."""
    for cls in CurvatureTuner.__subclasses__():
        assert "_learning_rate" not in vars(cls), cls
    assert not hasattr(CurvatureTuner, "_learning_rate")


def test_cdat_momentum_numerator_by_hand():
    """``CDAT(numerator="momentum")`` behind Adam: with ``sigma = 1, ema = 0`` (paper start-up) the rate is
    ``n / |c|``, so ``lr * |curvature|`` is the rule's numerator; it equals ``g^T D (b1 m_{t-1} + (1 - b1)
    m_{t-1} / (1 - b1^(t-1)))`` computed from Adam's state (float64), and ``-g^T u`` on the first step. Refused
    behind SGD."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    h = a @ a.T / 6 + torch.eye(6, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    targets = [torch.randn(6, dtype=torch.float64) for _ in range(6)]  # a new "batch" each step
    b1 = 0.9
    base = torch.optim.Adam([w], lr=0.5, betas=(b1, 0.999))
    opt = CDAT(base, sigma=1.0, ema=0.0, startup="paper", numerator="momentum", curvature="exact",
               functional_loss=lambda ps: 0.5 * (ps[0] - targets[0]) @ h @ (ps[0] - targets[0]))
    for t, y in enumerate(targets, start=1):
        opt.functional_loss = lambda ps, y=y: 0.5 * (ps[0] - y) @ h @ (ps[0] - y)

        def closure(y=y):
            opt.zero_grad()
            loss = 0.5 * (w - y) @ h @ (w - y)
            loss.backward()
            return loss

        m_prev = base.state[w]["exp_avg"].clone() if t > 1 else torch.zeros(6, dtype=torch.float64)
        g = (h @ (w.detach() - y))
        opt.step(closure)
        st = base.state[w]
        d = 0.5 / ((1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + 1e-8))
        if t == 1:
            want = float(g @ (d * st["exp_avg"]))
        else:
            want = float(g @ (d * (b1 * m_prev + (1 - b1) * m_prev / (1 - b1 ** (t - 1)))))
        got = float(opt.stats["lr"]) * abs(float(opt.stats["curvature"]))
        assert got == pytest.approx(max(want, 0.0), rel=1e-9, abs=1e-12), t
    with pytest.raises(ValueError, match="numerator"):
        CDAT(torch.optim.SGD([w], lr=1.0), numerator="momentum")
    with pytest.raises(ValueError, match="numerator"):
        CDAT(torch.optim.Adam([w], lr=1.0), numerator="batch")


def test_cdat_paired_numerator_by_hand():
    """``CDAT(numerator="paired")`` behind Adam on a quadratic whose target (the "batch") changes every step:
    with ``sigma = 1, ema = 0`` (paper start-up) ``lr * |curvature|`` is the rule's numerator; it equals
    ``-g^T u - (1 - b1) r^T D r / 2`` with ``u``, ``D`` from Adam's state and ``r = g_t - ghat``, ``ghat`` the
    previous batch's gradient at ``w_t`` recomputed by hand from the previous step's gradient, lr and fd probe
    (on a quadratic ``g_probe - g = h H u``: ``ghat = g_{t-1} + lr_{t-1} H u_{t-1} = H (w_t - y_{t-1})``, up to
    the fd rounding, ~1e-8 relative in float64); the tuner's buffer holds it. The first step: ``-g^T u``;
    ``stats["numerator"]`` stays ``-g^T u``. Refused behind SGD and with the secant, the exact oracle or no
    probes."""
    torch.manual_seed(0)
    a = torch.randn(6, 6, dtype=torch.float64)
    h = a @ a.T / 6 + torch.eye(6, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    y0 = 3 * torch.randn(6, dtype=torch.float64)
    targets = [y0 + 0.5 * torch.randn(6, dtype=torch.float64) for _ in range(8)]  # a new "batch" each step
    b1 = 0.9
    base = torch.optim.Adam([w], lr=0.5, betas=(b1, 0.999))
    opt = CDAT(base, sigma=1.0, ema=0.0, startup="paper", numerator="paired", curvature="fd")
    prev = None  # (g_{t-1}, lr_{t-1}, u_{t-1})
    for t, y in enumerate(targets, start=1):
        def closure(y=y):
            opt.zero_grad()
            loss = 0.5 * (w - y) @ h @ (w - y)
            loss.backward()
            return loss

        w_t = w.detach().clone()
        g = h @ (w_t - y)
        opt.step(closure)
        st = base.state[w]
        d = 0.5 / ((1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + 1e-8))
        u = -d * st["exp_avg"]
        direction = float(-g @ u)
        assert float(opt.stats["numerator"]) == pytest.approx(direction, rel=1e-12)
        if prev is None:
            want = direction
        else:
            ghat = prev[0] + prev[1] * (h @ prev[2])
            assert torch.allclose(ghat, h @ (w_t - targets[t - 2]), rtol=1e-12, atol=1e-12)
            r = g - ghat
            want = direction - (1 - b1) / 2 * float(r @ (d * r))
            assert want < 0.99 * direction  # the correction shows on these numbers (1-35 %)
        got = float(opt.stats["lr"]) * abs(float(opt.stats["curvature"]))
        assert got == pytest.approx(max(want, 0.0), rel=1e-6, abs=1e-12), t
        lr = float(opt.stats["lr"])
        # a step with lr = 0 (the correction made the numerator negative) leaves no prediction
        assert st["curvopt_predicted"] == (lr > 0)
        if lr > 0:
            predicted = h @ (w.detach() - y)  # this batch's gradient at the next point, exactly
            assert float((st["curvopt_predicted_grad"] - predicted).norm()) <= 1e-6 * float(predicted.norm())
        prev = (g, lr, u) if lr > 0 else None
    for kw in (dict(curvature="secant"), dict(curvature="exact", functional_loss=lambda ps: ps[0].sum()),
               dict(probes=False)):
        with pytest.raises(ValueError, match="fd curvature oracle"):
            CDAT(torch.optim.Adam([w], lr=1.0), numerator="paired", **kw)
    with pytest.raises(ValueError, match="needs an Adam base"):
        CDAT(torch.optim.SGD([w], lr=1.0), numerator="paired")


def test_cdat_paired_numerator_per_group_beta1():
    """Param groups with their own ``beta1``: the paired correction is each group's ``(1 - b1) r^T D r / 2``
    (its own ``beta1`` and ``D``), summed; with the first group's ``beta1`` for all the rate would be off. The
    prediction ``ghat`` is read from the tuner's buffer before each step (its value is checked by hand in
    :func:`test_cdat_paired_numerator_by_hand`)."""
    torch.manual_seed(1)
    hs = [torch.diag(torch.rand(4, dtype=torch.float64) + 0.5) for _ in range(2)]
    ws = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    betas = (0.9, 0.3)
    base = torch.optim.Adam([{"params": [ws[0]], "betas": (betas[0], 0.999)},
                             {"params": [ws[1]], "betas": (betas[1], 0.999)}], lr=0.3)
    opt = CDAT(base, sigma=1.0, ema=0.0, startup="paper", numerator="paired", curvature="fd")
    checked = 0
    for t in range(1, 9):
        ys = [2 * torch.randn(4, dtype=torch.float64) for _ in range(2)]  # a new "batch" each step

        def closure():
            opt.zero_grad()
            loss = sum(0.5 * (w - y) @ h @ (w - y) for w, y, h in zip(ws, ys, hs))
            loss.backward()
            return loss

        predicted = bool(opt.state[ws[0]].get("curvopt_predicted"))
        ghats = [opt.state[w]["curvopt_predicted_grad"].clone() if predicted else None for w in ws]
        gs = [h @ (w.detach() - y) for w, y, h in zip(ws, ys, hs)]
        opt.step(closure)
        direction = float(opt.stats["numerator"])
        want = direction
        for w, g, ghat, b1 in zip(ws, gs, ghats, betas):
            st = base.state[w]
            d = 0.3 / ((1 - b1 ** t) * ((st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + 1e-8))
            if ghat is not None:
                r = g - ghat
                want -= (1 - b1) / 2 * float(r @ (d * r))
        got = float(opt.stats["lr"]) * abs(float(opt.stats["curvature"]))
        assert got == pytest.approx(max(want, 0.0), rel=1e-6, abs=1e-12), t
        checked += predicted and want > 0
    assert checked >= 3


def test_cdat_paired_numerator_full_batch_is_the_default():
    """In full batch on a convex quadratic the prediction ``ghat = g_{t-1} + lr_{t-1} H u_{t-1}`` is the
    gradient at ``w_t`` (``H u`` exact up to the fd probe's rounding), so ``r`` is rounding: ``|r| / |g| ~
    sqrt(eps) lr ||u|| / ||w|| <~ 1e-8`` in float64 and the correction ``(1 - b1) r^T D r / 2`` is ~1e-16 of
    ``-g^T u``, below the rate's own rounding. The rates equal the default numerator's to 1e-10 (relative), and
    the tuner does keep a prediction every step."""
    torch.manual_seed(0)
    a = torch.randn(8, 8, dtype=torch.float64)
    h = a @ a.T / 8 + 0.1 * torch.eye(8, dtype=torch.float64)
    w_init = torch.randn(8, dtype=torch.float64)
    runs = {}
    for numerator in ("direction", "paired"):
        w = torch.nn.Parameter(w_init.clone())
        opt = CDAT(torch.optim.Adam([w], lr=1.0), numerator=numerator, curvature="fd")

        def closure():
            opt.zero_grad()
            loss = 0.5 * w @ h @ w
            loss.backward()
            return loss

        lrs = []
        for _ in range(40):
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
        runs[numerator] = lrs
        if numerator == "paired":
            assert opt.state[w]["curvopt_predicted"] == 1
    assert min(runs["direction"]) > 0 and max(runs["direction"]) > 2 * min(runs["direction"])
    worst = max(abs(p / d - 1) for p, d in zip(runs["paired"], runs["direction"]))
    assert worst <= 1e-10, worst


def test_cdat_paired_prediction_is_dropped_for_a_parameter_that_sits_out():
    """Two experts on a quadratic, full batch, expert 1 routed every third step: a parameter without a gradient
    this step loses its prediction (its ghat would be two steps old when it is next routed: r^T D r 0.4-2.5
    instead of rounding). In full batch on a quadratic the paired rates then equal the paper numerator's."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = x @ torch.randn(4, dtype=torch.float64)
    runs = {}
    for numerator in ("direction", "paired"):
        torch.manual_seed(1)
        shared, e0, e1 = (torch.nn.Parameter(0.1 * torch.randn(4, dtype=torch.float64)) for _ in range(3))
        opt = CDAT(torch.optim.Adam([shared, e0, e1], lr=1.0), numerator=numerator, curvature="fd")
        lrs = []
        for t in range(15):
            expert = e1 if t % 3 == 2 else e0

            def closure():
                opt.zero_grad()
                loss = ((x @ (shared + expert) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
            idle = e0 if expert is e1 else e1
            assert numerator == "direction" or "curvopt_predicted_grad" not in opt.state[idle]
        runs[numerator] = lrs
    worst = max(abs(p / d - 1) for p, d in zip(runs["paired"], runs["direction"]))
    assert worst <= 1e-8, worst


def test_cdat_paired_numerator_survives_a_state_dict_round_trip():
    """The paired prediction lives in ``state[p]`` (and its flag in the first parameter's state): a run saved
    after 4 mini-batch steps and loaded into a fresh tuner continues with the uninterrupted run's rates, which
    the prediction changes (a run that lost it would take ``-g^T u`` at its next step)."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, 5, dtype=torch.float64)  # 6 batches of 16
    y = torch.randn(6, 16, dtype=torch.float64)
    w_init = torch.randn(5, dtype=torch.float64)

    def make(numerator="paired"):
        w = torch.nn.Parameter(w_init.clone())
        return w, CDAT(torch.optim.Adam([w], lr=1.0), numerator=numerator, curvature="fd")

    def steps(w, opt, batches):
        lrs = []
        for k in batches:
            def closure():
                opt.zero_grad()
                loss = ((torch.tanh(x[k] @ w) - y[k]) ** 2).mean()
                loss.backward()
                return loss
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
        return lrs

    w, opt = make()
    whole = steps(w, opt, range(6))
    w, opt = make()
    first = steps(w, opt, range(4))
    saved, w_saved = opt.state_dict(), w.detach().clone()
    assert saved["state"][0]["curvopt_predicted"] == 1 and "curvopt_predicted_grad" in saved["state"][0]
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(w_saved)
    opt2.load_state_dict(saved)
    rest = steps(w2, opt2, range(4, 6))
    assert first + rest == pytest.approx(whole, rel=1e-12)
    lost = copy.deepcopy(saved)  # the same checkpoint without its prediction: the next rate differs
    lost["state"][0]["curvopt_predicted"] = 0
    w3, opt3 = make()
    with torch.no_grad():
        w3.copy_(w_saved)
    opt3.load_state_dict(lost)
    assert steps(w3, opt3, range(4, 5))[0] != pytest.approx(whole[4], rel=1e-6)


def test_adam_diagonal_by_group_is_the_per_parameter_diagonal():
    """The momentum numerator's flat ``D = lr_group / P`` per param group equals the per-parameter one (float64,
    two groups with their own lr, eps and amsgrad), in runs of at most ``chunk`` entries (a larger parameter
    alone), and is refused (None) once a group's step counts differ."""
    from torch_backend.preconditioning import adam_diagonal_by_group, adam_preconditioner_from_optimizer

    torch.manual_seed(0)
    ps = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    opt = torch.optim.Adam([{"params": ps[:3], "lr": 0.5}, {"params": ps[3:], "lr": 2.0, "eps": 1e-3,
                                                             "amsgrad": True}], betas=(0.8, 0.95))
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    order = [ps[3], ps[0], ps[2], ps[1]]  # positions follow the order asked for, not the groups'
    per = adam_preconditioner_from_optimizer(opt, order)
    for chunk, runs in ((100, [(2.0, [0]), (0.5, [1, 2, 3])]), (12, [(2.0, [0]), (0.5, [1, 2]), (0.5, [3])]),
                        (5, [(2.0, [0]), (0.5, [1]), (0.5, [2]), (0.5, [3])])):
        got = adam_diagonal_by_group(opt, order, torch.float64, chunk)
        assert [(g["lr"], pos) for g, pos, _, _ in got] == runs, chunk
        assert all(count == 3.0 for _, _, count, _ in got)
        for g, pos, _, d in got:
            torch.testing.assert_close(d(), torch.cat([g["lr"] / per[i].reshape(-1) for i in pos]), rtol=1e-15,
                                       atol=0)
    opt.state[ps[1]]["step"] += 1
    assert adam_diagonal_by_group(opt, order, torch.float64, 100) is None


@pytest.mark.parametrize("adamw", [False, True])
def test_momentum_terms_flat_and_per_parameter_paths_agree(monkeypatch, adamw):
    """``_momentum_terms`` sums the same ``g^T D g_in`` (and, under AdamW's decoupled decay, ``g^T D m_t``)
    whether ``D`` comes flat per group or, when step counts differ, per parameter, and whether the gradients
    come concatenated or per parameter (Adam with L2 weight decay: ``g_in = g + wd w``; AdamW: ``g_in = g``)."""
    import torch_backend.tuner as tuner_module

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    base = (torch.optim.AdamW if adamw else torch.optim.Adam)(model.parameters(), lr=1.0, weight_decay=0.1)
    opt = CDAT(base)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    closure()
    params = list(model.parameters())
    grads, w0 = [p.grad for p in params], [p.detach().clone() for p in params]
    keys, sums = opt._momentum_terms(params, grads, w0, torch.cat([g.reshape(-1) for g in grads]))
    assert keys == [(0.9, 3.0, not adamw)] and len(sums) == (2 if adamw else 1)
    monkeypatch.setattr(tuner_module, "adam_diagonal_by_group", lambda *a: None)
    keys_per, sums_per = opt._momentum_terms(params, grads, w0, None)
    assert keys_per == keys
    torch.testing.assert_close(torch.stack(sums), torch.stack(sums_per), rtol=1e-13, atol=0)
    assert all(t != 0 for t in sums)


@pytest.mark.parametrize("swap", [False, True])
def test_momentum_numerator_per_beta1_and_step_count(monkeypatch, swap):
    """Param groups with their own beta1, and one added after two steps (its Adam count lags): the numerator is
    ``-g^T u + sum_i (1 - b1_i) (g_i^T D_i m_{t-1,i} / (1 - b1_i^(t_i - 1)) - g_i^T D_i g_i)`` over the
    parameters, each with its own group's beta1 and count (0 for a count of 1), computed here from Adam's state
    in float64, whichever group comes first."""
    import torch_backend.tuner as tuner_module

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    groups = [{"params": first, "betas": (0.9, 0.999)}, {"params": second[:1], "betas": (0.7, 0.99)}]
    opt = CDAT(torch.optim.Adam(groups[::-1] if swap else groups, lr=0.05))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    for t in range(4):
        if t == 2:
            opt.add_param_group({"params": second[1:], "betas": (0.8, 0.99)})
        opt.step(closure)
    params = [p for g in opt.param_groups for p in g["params"]]
    m_prev = [opt.base.state[p]["exp_avg"].clone() for p in params]
    w_prev = [p.detach().clone() for p in params]
    seen = []
    real = tuner_module.momentum_numerator
    monkeypatch.setattr(tuner_module, "momentum_numerator", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    opt.step(closure)
    lr = float(opt.stats["lr"])
    closure()  # the gradients at w_prev were overwritten: recompute them there
    with torch.no_grad():
        w_new = [p.detach().clone() for p in params]
        for p, w in zip(params, w_prev):
            p.copy_(w)
    closure()
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    want = 0.0
    for p, w1, w0, m in zip(params, w_new, w_prev, m_prev):
        g, st, grp = p.grad, opt.base.state[p], group_of[p]
        b1, b2 = grp["betas"]
        t = float(st["step"])
        u = (w1 - w0) / lr
        d = grp["lr"] / ((1 - b1 ** t) * (torch.sqrt(st["exp_avg_sq"] / (1 - b2 ** t)) + grp["eps"]))
        want += float(-(g * u).sum())
        if t > 1:
            want += (1 - b1) * float((g * d * m).sum() / (1 - b1 ** (t - 1)) - (g * d * g).sum())
    assert {float(opt.base.state[p]["step"]) for p in params} == {5.0, 3.0}
    assert float(seen[-1]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_direction_is_minus_d_times_the_first_moment(weight_decay):
    """What the momentum numerator relies on to skip an inner product: torch's Adam (L2 decay or none) steps by
    exactly ``u = -D m_t`` (``D = lr / P``, the core's preconditioner, ``m_t = exp_avg``), so ``g^T D m_t =
    -g^T u``; AdamW's decoupled decay adds ``-lr wd w0`` (float64, amsgrad off and on)."""
    from torch_backend.preconditioning import adam_preconditioner_from_optimizer

    torch.manual_seed(2)
    for cls, amsgrad in ((torch.optim.Adam, False), (torch.optim.Adam, True), (torch.optim.AdamW, False)):
        ps = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                                  requires_grad=True)]
        opt = cls(ps, lr=0.3, betas=(0.8, 0.95), weight_decay=weight_decay, amsgrad=amsgrad)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn_like(p)
            w0 = [p.detach().clone() for p in ps]
            opt.step()
        u = [p.detach() - w for p, w in zip(ps, w0)]
        expected = [-0.3 * opt.state[p]["exp_avg"] / d for p, d in zip(ps, adam_preconditioner_from_optimizer(opt, ps))]
        if cls is torch.optim.AdamW:
            expected = [e - 0.3 * weight_decay * w for e, w in zip(expected, w0)]
        for a, b in zip(u, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)



def _two_groups(opts, order=(0, 1)):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)) for _ in range(2)]
    return ps, [dict(params=[ps[i]], **opts[i]) for i in order]


def _rates(make, opts, order, steps=4):
    ps, groups = _two_groups(opts, order)
    opt = make(groups)
    h = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = sum(0.5 * (h * (k + 1) * p * p).sum() for k, p in enumerate(ps))
        loss.backward()
        return loss
    out = []
    for _ in range(steps):
        opt.step(closure)
        out += [float(opt.stats["lr"]), float(opt.stats["eos_ratio"])]
    return out


@pytest.mark.parametrize("make,opts,kind,coefficient", [
    (lambda g: EdgeOfStability(torch.optim.Adam(g, lr=1.0), sigma=0.5),
     [dict(betas=(0.9, 0.999)), dict(betas=(0.0, 0.999))], "adam", 2.0),
    (lambda g: CDAT(torch.optim.SGD(g, lr=1.0)), [dict(momentum=0.0), dict(momentum=0.9)], "heavy_ball", 3.8),
    (lambda g: EdgeOfStability(torch.optim.SGD(g, lr=1.0)), [dict(momentum=0.5), dict(momentum=0.9)],
     "heavy_ball", 3.0)])
def test_groups_with_different_momentum_are_described_whatever_their_order(make, opts, kind, coefficient):
    """Groups with their own momentum or beta1: the first group described the base, so the same optimizer with
    its groups listed in another order had another rule (the edge rule behind Adam with beta1 0.9 and 0: rates 19x
    apart; CDAT's sigma 4 or 2 by which SGD group came first). The group with the smallest stability coefficient
    describes it now (the most restrictive edge; a group with momentum before plain SGD's, whose sigma 4 is the
    boldest default): the rates and the edge ratio are the same in both orders."""
    first, second = _rates(make, opts, (0, 1)), _rates(make, opts, (1, 0))
    assert first == pytest.approx(second, rel=1e-4, nan_ok=True)  # (the power iteration starts elsewhere)
    ps, groups = _two_groups(opts)
    opt = make(groups)
    assert opt.method.kind == kind and opt.coefficient == pytest.approx(coefficient, rel=1e-12)
