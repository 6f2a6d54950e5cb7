"""Bad inputs, module buffers, schedulers, checkpoints and argument checks of the PyTorch tuners."""
import copy
import math
import sys
import warnings

import pytest
import torch
from torch import nn

from curvopt import SharpnessConfig
from curvopt.stats import STAT_FIELDS
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy, is_probe

DT = torch.float64


def closure_for(opt, f, params, hook=None):
    def closure():
        opt.zero_grad()
        loss = f(*params)
        loss.backward()
        if hook is not None:
            hook()
        return loss
    return closure


def rule_state(opt, w):
    """The tuner's rule state as kept in the state of the first parameter (torch_backend.state)."""
    st = opt.state[w]
    return [st[k].clone() for k in sorted(st) if k in ("curvopt_numerator_avg", "curvopt_denominator_avg",
                                                        "curvopt_avg_weight")]


def adam_problem():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))
    base = torch.optim.Adam([w], lr=1.0)
    return w, base


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_non_finite_step_is_skipped(bad):
    w, base = adam_problem()
    opt = CDAT(base, sigma=2.0, ema=0.9)
    f = lambda v: (v ** 2).sum()  # noqa: E731
    opt.step(closure_for(opt, f, [w]))
    snap = (w.detach().clone(), copy.deepcopy(base.state_dict()), rule_state(opt, w))
    assert len(snap[2]) == 3

    def poison():
        if bad == "inf_grad":
            w.grad[1] = float("inf")

    g = (lambda v: (v ** 2).sum() * float("nan")) if bad == "nan_loss" else f
    with pytest.warns(RuntimeWarning, match="skipped") as rec:
        opt.step(closure_for(opt, g, [w], poison))
    assert len([r for r in rec if issubclass(r.category, RuntimeWarning)]) == 1
    assert torch.equal(w.detach(), snap[0])
    st = base.state_dict()["state"][0]
    assert torch.equal(st["step"], snap[1]["state"][0]["step"])
    assert torch.equal(st["exp_avg"], snap[1]["state"][0]["exp_avg"])
    assert torch.equal(st["exp_avg_sq"], snap[1]["state"][0]["exp_avg_sq"])
    assert all(torch.equal(a, b) for a, b in zip(rule_state(opt, w), snap[2]))
    assert opt.stats["skipped"] == 1 and opt.stats["closure_calls"] == 1
    assert math.isnan(float(opt.stats["lr"]))
    # training continues normally afterwards
    opt.step(closure_for(opt, f, [w]))
    assert opt.stats["skipped"] == 1 and math.isfinite(float(opt.stats["lr"]))


def test_zero_gradient_leaves_parameters():
    for base_fn in (lambda ps: torch.optim.SGD(ps, lr=1.0), lambda ps: torch.optim.Adam(ps, lr=1.0),
                    lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9)):
        w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
        for opt in (CDAT(base_fn([w])), QuadraticGreedy(base_fn([w]), curvature="secant"),
                    PolyakStep(base_fn([w])), ArmijoLineSearch(base_fn([w]))):
            before = w.detach().clone()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                # the one warning expected here: the secant behind SGD (curvopt.config.secant_caveat)
                warnings.filterwarnings("ignore", message="curvopt: the secant curvature")
                for _ in range(2):
                    opt.step(closure_for(opt, lambda v: (v * 0.0).sum() + 1.0, [w]))
            assert torch.equal(w.detach(), before)
            assert all(math.isfinite(float(opt.stats[k])) for k in ("lr", "numerator"))


def test_ascent_direction_zero_and_negative_curvature():
    # ascent: a heavy-ball base after the gradient turned gives -g^T u < 0 -> lr 0, no step, no NaN
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0, momentum=0.9), ema=0.0)
    opt.step(closure_for(opt, lambda v: 10 * v.sum(), [w]))
    before = w.detach().clone()
    opt.step(closure_for(opt, lambda v: -v.sum(), [w]))  # momentum 0.9 * 10 outweighs the new gradient
    assert float(opt.stats["numerator"]) < 0 and float(opt.stats["lr"]) == 0.0
    assert torch.equal(w.detach(), before)
    # zero curvature (a linear loss): no division by zero; lr stays 0 at step 1
    opt = CDAT(torch.optim.SGD([w], lr=1.0))
    opt.step(closure_for(opt, lambda v: v.sum(), [w]))
    assert float(opt.stats["curvature"]) == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(float(opt.stats["lr"]))
    # negative curvature counts by its magnitude: lr = n / |c| for f = -|w|^2/2 + ...
    w2 = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
    opt = QuadraticGreedy(torch.optim.SGD([w2], lr=1.0), curvature="exact",
                          functional_loss=lambda ps: -0.5 * (ps[0] ** 2).sum())
    opt.step(closure_for(opt, lambda v: -0.5 * (v ** 2).sum(), [w2]))
    assert float(opt.stats["curvature"]) == pytest.approx(-5.0)
    assert float(opt.stats["lr"]) == pytest.approx(1.0)  # n = |g|^2 = 5, |c| = 5


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 2)).to(DT)


@pytest.mark.parametrize("make", [
    lambda b, m: CDAT(b, modules=m, sharpness=2),
    lambda b, m: ArmijoLineSearch(b, modules=m),
    lambda b, m: EdgeOfStability(b, modules=m, sharpness=1),
    lambda b, m: CDAT(b, sharpness=2),
    lambda b, m: ArmijoLineSearch(b),
    lambda b, m: EdgeOfStability(b, sharpness=1),
], ids=["cdat", "armijo", "eos", "cdat-found", "armijo-found", "eos-found"])
def test_probes_leave_buffers_and_rng_alone(make):
    """BatchNorm running statistics after N tuner steps equal those of N bare-base steps on the same batches
    (first BN layer: its input is the data, so the statistics depend on the batches only), every BN layer
    counts exactly N batches, and the random stream ends where the bare run's does; with ``modules=`` and
    without it (the modules found in the first main call). Before, without ``modules=`` every probe counted a
    batch and moved the statistics."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=g, dtype=DT) * 3 + 1, torch.randint(0, 2, (16,), generator=g))
               for _ in range(4)]

    def run(tuned):
        model = bn_model()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = make(base, model) if tuned else base
        torch.manual_seed(123)
        for x, y in batches:
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            if tuned:
                opt.step(closure)
                assert opt.stats["closure_calls"] > 1
            else:
                closure()
                opt.step()
        return model, torch.get_rng_state()

    (tuned, rng_t), (bare, rng_b) = run(True), run(False)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(tuned[0], k), getattr(bare[0], k))
    assert int(tuned[2].num_batches_tracked) == len(batches)
    assert torch.equal(rng_t, rng_b)


def _bn_closure(opt, model, x, y, calls_before=None):
    def closure():
        opt.zero_grad()
        if calls_before is not None:
            calls_before(x)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_modules_found_when_the_first_main_call_raises_midway():
    """Without ``modules=``: a first main call that raises after the first BN layer ran is rolled back (its
    statistics as before the step) and does not fix the modules to what it reached (the tuner looks again at the
    next main call); the hook is gone after each call; later steps count one batch per step in both BN layers;
    a copy of the tuner does not copy the model."""
    model = bn_model()
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=0.1), sharpness=1)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 2, (16,))
    before = [b.clone() for b in model.buffers()]

    def failing():
        opt.zero_grad()
        model[0](x)
        raise KeyError("the data loader broke")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert not nn.modules.module._global_forward_pre_hooks
    for _ in range(3):
        opt.step(_bn_closure(opt, model, x, y))
        assert not nn.modules.module._global_forward_pre_hooks
        assert opt.stats["closure_calls"] > 1
    assert int(model[0].num_batches_tracked) == int(model[2].num_batches_tracked) == 3
    assert copy.deepcopy(opt).probe_guard.__getstate__() == {"modules": None}


def test_two_threads_stepping_at_once_keep_each_others_buffers():
    """Two threads, each training its own BN model with a tuner that finds its modules (no ``modules=``), their
    main calls' forwards run while both are open (two barriers): each thread's hook watches its own
    modules only (a tuner that took the other thread's would restore that model's statistics to a stale copy),
    the hook is gone after both; each BN counts one batch a step, and the first thread's statistics are those of
    the same run alone. (No dropout: torch's default generator is the process's, shared by the threads, and the
    probes' replay of it is not thread-safe.)"""
    import threading

    from curvopt.torch import is_probe

    steps, barrier, errors = 4, threading.Barrier(2, timeout=60), []
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(DT)

    models = [model(), model()]
    alone = model()  # the first thread's run without a second thread
    xs = [torch.randn(16, 5, dtype=DT, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))

    def train(model, x, meet):
        opt = CDAT(torch.optim.SGD(model.parameters(), lr=0.1), sharpness=2)
        closure = _bn_closure(opt, model, x, y)
        for _ in range(steps):
            def met():
                if not meet or is_probe():
                    return closure()
                barrier.wait()  # both main calls open: their forwards run while both watch
                loss = closure()
                barrier.wait()
                return loss
            opt.step(met)

    def run(i):
        try:
            train(models[i], xs[i], True)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not nn.modules.module._global_forward_pre_hooks
    train(alone, xs[0], False)
    for bn in (0, 2):
        assert int(models[0][bn].num_batches_tracked) == int(models[1][bn].num_batches_tracked) == steps
        assert torch.equal(models[0][bn].running_mean, alone[bn].running_mean)
        assert torch.equal(models[0][bn].running_var, alone[bn].running_var)


@pytest.mark.parametrize("tuner", ["cdat", "armijo"])
def test_a_module_the_closure_calls_from_a_later_step_on_is_found_by_the_probes(tuner):
    """An auxiliary head (BN + linear) the loss uses from step 3 on, outside the modules the first main call ran:
    without ``modules=`` the probes (CDAT's fd and power iterations, the line search's trials) find it, restore
    its statistics after each probe, and from the next step on snapshot it with the others: its BN counts one
    batch per step it ran in, its statistics equal those of the run given ``modules=``, and no hook is left
    behind. Before, every probe counted a batch (CDAT 6, Armijo 22 after 6 steps, 3 of them with the head),
    silently."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g, dtype=DT), torch.randn(64, 1, generator=g, dtype=DT)

    def run(given):
        torch.manual_seed(0)
        trunk, head = nn.Linear(5, 8).double(), nn.Linear(8, 1).double()
        aux = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 1)).double()
        base = torch.optim.Adam([*trunk.parameters(), *head.parameters(), *aux.parameters()], lr=1.0)
        kw = {"modules": [trunk, head, aux]} if given else {}
        opt = CDAT(base, sharpness=1, **kw) if tuner == "cdat" else ArmijoLineSearch(base, **kw)
        for step in range(6):
            def closure():
                opt.zero_grad()
                h = torch.tanh(trunk(x))
                loss = (head(h) - y).square().mean()
                if step >= 3:
                    loss = loss + (aux(h) - y).square().mean()
                loss.backward()
                return loss
            opt.step(closure)
            assert not nn.modules.module._global_forward_pre_hooks
        assert opt.stats["closure_calls"] > 1
        return aux[0]

    found, given = run(False), run(True)
    assert int(found.num_batches_tracked) == int(given.num_batches_tracked) == 3
    assert torch.equal(found.running_mean, given.running_mean) and torch.equal(found.running_var, given.running_var)


def test_modules_found_when_a_submodule_runs_before_its_parent():
    """A closure that calls the first BN layer on its own before the whole model (each BN layer runs twice a
    step): without ``modules=`` the statistics after N tuner steps equal those of N bare-base steps, the layer
    that ran first getting its values from before it ran."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 5, generator=g, dtype=DT) + 2, torch.randint(0, 2, (16,), generator=g))
               for _ in range(3)]

    def run(tuned):
        model = bn_model()
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = CDAT(base, sharpness=1) if tuned else base
        for x, y in batches:
            closure = _bn_closure(opt, model, x, y, calls_before=model[0])
            if tuned:
                opt.step(closure)
            else:
                closure()
                opt.step()
        return model

    tuned, bare = run(True), run(False)
    assert int(tuned[0].num_batches_tracked) == 2 * len(batches)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(tuned[0], k), getattr(bare[0], k))


@pytest.mark.slow
def test_modules_found_inside_a_compiled_model():
    """``torch.compile(model)`` inlines its BN layers into one graph, whose hooks do not fire; the tuner, given
    no ``modules=``, snapshots the compiled wrapper's whole tree, so the statistics count one batch per step. The
    only warning is torch's about a global hook under ``torch.compile`` (the tuner's, in its first main call and
    in the probes, which look for modules not found before; torch warns at each such call, shown once under the
    default filter), and the compiled forward is not recompiled at every probe (the hook is one function under
    one key)."""
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = bn_model()
    fwd = torch.compile(model, backend="inductor", dynamic=False)
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=0.1), sharpness=1)
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 2, (16,))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(_bn_closure(opt, fwd, x, y))
    assert int(model[0].num_batches_tracked) == int(model[2].num_batches_tracked) == 3
    assert seen and all(str(w.message).startswith("Using `torch.compile(module)` when there are global") for w in seen)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_lr_scheduler_acts_on_the_multiplier():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=DT)
    A = a @ a.T + torch.eye(4, dtype=DT)
    w = nn.Parameter(torch.randn(4, generator=g, dtype=DT))
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0), curvature="exact",
                          functional_loss=lambda ps: 0.5 * ps[0] @ A @ ps[0])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(3):
            grad = (A @ w).detach()
            mult = opt.param_groups[0]["lr"]
            assert mult == pytest.approx(0.5 ** t)
            w0 = w.detach().clone()
            opt.step(closure_for(opt, lambda v: 0.5 * v @ A @ v, [w]))
            sched.step()
            eff = float(opt.stats["lr"]) * mult  # the greedy effective step does not depend on the multiplier
            assert eff == pytest.approx(float(grad @ grad / (grad @ A @ grad)), rel=1e-10)
            torch.testing.assert_close(w.detach(), w0 - eff * grad)


def mlp():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 1)).to(DT)


@pytest.mark.parametrize("make", [
    lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.5), curvature="secant", sharpness=3, ema=0.9),
    lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9), curvature="fd", sharpness=4),
    lambda m: ArmijoLineSearch(torch.optim.AdamW(m.parameters(), lr=1.0, weight_decay=0.1)),
    lambda m: EdgeOfStability(torch.optim.Adam(m.parameters(), lr=1.0), sharpness=5),
])
def test_state_dict_round_trip_is_bit_identical(make):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g, dtype=DT), torch.randn(40, 1, generator=g, dtype=DT)

    def closure_of(model, opt):
        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss
        return closure

    model = mlp()
    opt = make(model)
    for _ in range(7):
        opt.step(closure_of(model, opt))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(20):
        opt.step(closure_of(model, opt))

    model2 = mlp()
    model2.load_state_dict(saved_model)
    opt2 = make(model2)
    opt2.load_state_dict(saved_opt)
    for _ in range(20):
        opt2.step(closure_of(model2, opt2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for k in ("lr", "sharpness", "preconditioned_sharpness"):
        a, b = opt.stats[k], opt2.stats[k]
        assert torch.equal(a, b) or (torch.isnan(a) and torch.isnan(b))


@pytest.mark.parametrize("closure_free", [False, True])
@pytest.mark.parametrize("make", [
    lambda m: CDAT(torch.optim.AdamW(m.parameters(), lr=1e-3)),
    lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
])
def test_float32_state_dict_round_trip_is_bit_identical_at_rates_float32_cannot_hold(make, closure_free):
    """A float32 run whose group lr (1e-3, 0.1, a scheduler's halvings) float32 rounds: the tuner keeps the last
    group lr in its state, and the resumed run, which reads it back rounded, took a step of its own (rates 1e-7 to
    3e-6 off the uninterrupted run's) while the running one compared the unrounded value."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)

    def model():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))

    def run(m, opt, sched, steps):
        lrs = []
        for _ in range(steps):
            if closure_free:
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
            else:
                opt.step(closure_for(opt, lambda *_: ((m(x) - y) ** 2).mean(), list(m.parameters())))
            sched.step()
            lrs.append(float(opt.stats["lr"]))
        return lrs

    def fresh():
        m = model()
        opt = make(m)
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

    m, opt, sched = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free SGD-momentum advice
        run(m, opt, sched, 6)
        saved = copy.deepcopy((m.state_dict(), opt.state_dict(), sched.state_dict()))
        expected = run(m, opt, sched, 6)
        m2, opt2, sched2 = fresh()
        m2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        sched2.load_state_dict(saved[2])
        assert run(m2, opt2, sched2, 6) == expected
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_stats_keys_and_types():
    w, base = adam_problem()
    opt = CDAT(base)
    assert set(opt.stats) == set(STAT_FIELDS)
    opt.step(closure_for(opt, lambda v: (v ** 2).sum(), [w]))
    s = opt.stats
    assert set(s) == set(STAT_FIELDS)
    for k in STAT_FIELDS:
        if k in ("skipped", "closure_calls"):
            assert type(s[k]) is int
        else:
            assert isinstance(s[k], torch.Tensor) and s[k].dim() == 0
    assert s["closure_calls"] == 2 and math.isnan(float(s["sharpness"]))


def test_missing_closure_raises_type_error_showing_the_convention():
    w, base = adam_problem()
    opt = PolyakStep(base)  # needs the loss (CDAT steps closure-free since issue 11: tests/test_torch_dropin.py)
    with pytest.raises(TypeError, match=r"loss.backward\(\)"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"call loss.backward\(\) .*before opt.step\(\).*model.double\(\)"):
        CDAT(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)).step()  # closure-free, no gradient
    with pytest.raises(TypeError):
        CDAT(w)  # not an optimizer


@pytest.mark.parametrize("cls,kw,name", [
    (CDAT, {"sigma": 0.0}, "sigma"),
    (CDAT, {"ema": 1.0}, "ema"),
    (CDAT, {"eps": -1.0}, "eps"),
    (CDAT, {"lr_max": 0.0}, "lr_max"),
    (CDAT, {"curvature": "magic"}, "curvature"),
    (CDAT, {"sharpness": -1}, "sharpness"),
    (CDAT, {"sharpness": "3"}, "sharpness"),
    (CDAT, {"sigma": "2.0"}, "sigma"),
    (ArmijoLineSearch, {"max_trials": 3.5}, "max_trials"),
    (CDAT, {"curvature": "exact"}, "functional_loss"),
    (QuadraticGreedy, {"lr_max": -1.0}, "lr_max"),
    (ArmijoLineSearch, {"max_trials": 0}, "max_trials"),
    (ArmijoLineSearch, {"decrease_factor": 1.5}, "decrease_factor"),
    (ArmijoLineSearch, {"c": -0.1}, "c"),
    (PolyakStep, {"lr_max": 0.0}, "lr_max"),
    (PolyakStep, {"f_star": float("nan")}, "f_star"),
    (EdgeOfStability, {"sharpness": 0}, "sharpness"),
    (EdgeOfStability, {"sigma": -1.0}, "sigma"),
    (EdgeOfStability, {"growth": 0.5}, "growth"),
])
def test_bad_hyperparameters_raise_value_error(cls, kw, name):
    w, base = adam_problem()
    with pytest.raises(ValueError, match=name):
        cls(base, **kw)


def test_a_functional_loss_nothing_uses_is_reported():
    """``functional_loss`` serves ``curvature="exact"`` and the online sharpness's products: given to a tuner with
    neither, a warning says it is not used (the fd curvature is not made exact by it); with either, no warning."""
    f = lambda ps: (ps[0] ** 2).sum()  # noqa: E731
    for cls, kw in ((CDAT, {}), (CDAT, {"curvature": "fd"}), (PolyakStep, {})):
        w, base = adam_problem()
        with pytest.warns(RuntimeWarning, match="functional_loss is not used"):
            cls(base, functional_loss=f, **kw)
    for cls, kw in ((CDAT, {"curvature": "exact"}), (CDAT, {"sharpness": 5}), (EdgeOfStability, {})):
        w, base = adam_problem()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls(base, functional_loss=f, **kw)


def test_stability_coefficient_follows_the_bases_betas_unless_given():
    """A scheduler that changes Adam's beta1 (OneCycleLR cycles it) changes the stability coefficient
    ``(2 + 2 b1) / (1 - b1)`` the edge-of-stability rule and ``eos_ratio`` use; a given one stays."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=DT))
    A = torch.diag(torch.linspace(1.0, 3.0, 6, dtype=DT))
    opt = EdgeOfStability(torch.optim.Adam([w], lr=1.0, betas=(0.9, 0.999)), sigma=0.5, sharpness=1,
                          growth=math.inf)  # the rate rises with the coefficient here: uncapped, sigma c / lambda
    fixed = EdgeOfStability(torch.optim.Adam([nn.Parameter(w.detach().clone())], lr=1.0), sharpness=1,
                            stability_coefficient=10.0)
    assert opt.coefficient == pytest.approx(38.0) and fixed.coefficient == 10.0
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, base_momentum=0.85,
                                                max_momentum=0.95)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    for _ in range(3):
        opt.step(closure_for(opt, lambda v: 0.5 * v @ A @ v, [w]))
        b1 = opt.param_groups[0]["betas"][0]
        c = (2 + 2 * b1) / (1 - b1)
        assert opt.rule.coefficient == pytest.approx(c)
        lam = float(opt.stats["preconditioned_sharpness"])
        assert float(opt.stats["lr"]) == pytest.approx(0.5 * c / lam, rel=1e-12)
        sched.step()
    assert opt.param_groups[0]["betas"][0] < 0.95


def test_warns_once_when_the_loss_falls_below_f_star():
    w = nn.Parameter(torch.ones(3, dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0))
    with pytest.warns(RuntimeWarning, match="below f_star=0"):
        opt.step(closure_for(opt, lambda v: (v * v).sum() - 10.0, [w]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(opt, lambda v: (v * v).sum() - 10.0, [w]))
        ok = CDAT(torch.optim.SGD([w], lr=1.0), f_star=-math.inf)
        ok.step(closure_for(ok, lambda v: (v * v).sum() - 10.0, [w]))


def test_edge_of_stability_needs_a_known_coefficient():
    w = nn.Parameter(torch.ones(2, dtype=DT))
    with pytest.raises(ValueError, match="stability_coefficient"):
        EdgeOfStability(torch.optim.RMSprop([w], lr=1.0), allow_any_base=True)
    EdgeOfStability(torch.optim.RMSprop([w], lr=1.0), stability_coefficient=2.0, allow_any_base=True)


@pytest.mark.parametrize("kw,field,value", [
    ({"sharpness_every": 3}, "every", 3), ({"sharpness_iters": 7}, "iters", 7),
    ({"sharpness_first_iters": 9}, "first_iters", 9), ({"sharpness_tol": 1e-5}, "tol", 1e-5)])
def test_deprecated_sharpness_keywords_still_work(kw, field, value):
    w, base = adam_problem()
    with pytest.warns(DeprecationWarning, match=next(iter(kw))):
        opt = CDAT(base, **kw)
    assert getattr(opt.sharpness_config, field) == value
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="sharpness_every"):
        CDAT(adam_problem()[1], sharpness_every=-1)
    with pytest.raises(ValueError, match="not both"):
        CDAT(adam_problem()[1], sharpness=SharpnessConfig(every=2), **kw)


def test_sharpness_setting_and_defaults_come_from_the_core():
    from curvopt.rules import ArmijoRule, CDATRule, EdgeOfStabilityRule, PolyakRule

    w, base = adam_problem()
    assert CDAT(base).sharpness_config == CDATRule.default_sharpness
    assert EdgeOfStability(adam_problem()[1]).sharpness_config == EdgeOfStabilityRule.default_sharpness
    assert CDAT(adam_problem()[1], sharpness=4).sharpness_config == SharpnessConfig(every=4)
    cfg = SharpnessConfig(every=2, iters=3, first_iters=5, tol=1e-4)
    assert ArmijoLineSearch(adam_problem()[1], sharpness=cfg).sharpness_config is cfg
    # behind Adam the defaults are the momentum numerator above the edge (curvopt.rules.default_numerator/_sigma)
    adam_cdat = CDAT(adam_problem()[1])
    assert adam_cdat.rule == CDATRule(sigma=4.0, lagged_growth=2.0) and adam_cdat.numerator == "momentum"
    assert CDAT(adam_problem()[1], numerator="direction").rule == CDATRule(lagged_growth=2.0)
    paper = CDAT(adam_problem()[1], startup="paper")
    assert paper.numerator == "direction" and paper.rule.sigma == 2.0
    assert QuadraticGreedy(adam_problem()[1]).rule == CDATRule.greedy()
    assert ArmijoLineSearch(adam_problem()[1]).rule == ArmijoRule(c=0.5)  # curvopt.rules.default_armijo_c
    assert ArmijoLineSearch(torch.optim.SGD([w], lr=1.0)).rule == ArmijoRule()
    with pytest.warns(RuntimeWarning, match="Polyak step behind adam with the default lr_max=1") as rec:
        assert PolyakStep(adam_problem()[1]).rule == PolyakRule()
    assert rec[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a given lr_max, or a plain SGD base: no warning
        assert PolyakStep(adam_problem()[1], lr_max=1e-3).rule == PolyakRule(lr_max=1e-3)
        PolyakStep(torch.optim.SGD([w], lr=1.0))
    with pytest.warns(RuntimeWarning, match="behind heavy ball"):
        PolyakStep(torch.optim.SGD([w], lr=1.0, momentum=0.9))
    assert CDAT(adam_problem()[1]).curvature == "auto"


def _separable_logistic():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=g, dtype=DT)
    y = (X @ torch.randn(10, generator=g, dtype=DT) > 0).to(DT)
    return lambda w: nn.functional.binary_cross_entropy_with_logits(X @ w, y)


@pytest.mark.parametrize("decay_in", ["base", "loss"])
def test_weight_decay_that_stops_the_rate_is_said_once(decay_in):
    """Separable logistic regression behind SGD(momentum, weight_decay): once the decay outweighs the loss's
    gradient, the update climbs the loss the rate is chosen for, the greedy rate is 0 and stays 0 (the parameters
    never move again). The tuner says so once, naming weight_decay; with the same L2 term in the loss it trains
    and says nothing."""
    f, wd = _separable_logistic(), 1e-3
    w = nn.Parameter(torch.zeros(10, dtype=DT))
    loss_of = f if decay_in == "base" else (lambda w: f(w) + 0.5 * wd * w.square().sum())
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0, momentum=0.9, weight_decay=wd if decay_in == "base" else 0))
    closure = closure_for(opt, loss_of, [w])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        lrs = [float(opt.step(closure) is not None and opt.stats["lr"]) for _ in range(60)]
    said = [str(r.message) for r in rec if "loss rises along" in str(r.message)]
    if decay_in == "base":
        assert lrs[-30:] == [0.0] * 30
        assert len(said) == 1 and "weight_decay" in said[0]
    else:
        assert min(lrs) > 0 and not said


@pytest.mark.parametrize("base_cls,match", [(torch.optim.LBFGS, "cannot wrap LBFGS"),
                                            (torch.optim.RMSprop, "allow_any_base|does not know")])
def test_edge_of_stability_refuses_a_base_before_asking_for_its_coefficient(base_cls, match):
    """The first error for a base the tuner cannot wrap is that one, not 'stability_coefficient must be given'
    (which, once given, was followed by the refusal)."""
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=match):
        EdgeOfStability(base_cls([w], lr=1.0))


def test_a_rate_held_at_zero_on_a_falling_loss_is_said_once():
    """CDAT with f_star=-inf at a concave start (a double well at w = 0.1: curvature along the update -3.9) has no
    step to take for ever, the loss falling along the update: the tuner says so once and names f_star."""
    w = nn.Parameter(torch.tensor([0.1], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0), f_star=-math.inf)
    closure = closure_for(opt, lambda w: ((w.square() - 1) ** 2).sum(), [w])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(30):
            opt.step(closure)
    said = [str(r.message) for r in rec if "has been 0 for" in str(r.message)]
    assert float(w) == 0.1
    assert len(said) == 1 and "f_star" in said[0] and "weight_decay" not in said[0]


def test_a_sigma_schedule_crossing_zero_is_named_by_the_rate_zero_warning():
    """A schedule of sigma that crosses 0 clips the rate to 0 (the rule guard) on a loss that falls along the
    update: the warning that follows names sigma among the causes."""
    w = nn.Parameter(torch.arange(1.0, 6.0, dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0), sigma=lambda t: 2.0 - t)
    closure = closure_for(opt, lambda w: w.square().sum(), [w])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(20):
            opt.step(closure)
    said = [str(r.message) for r in rec if "has been 0 for" in str(r.message)]
    assert len(said) == 1 and "schedule of sigma" in said[0]


def test_lr_max_and_polyak_f_star_are_assignable_and_validated():
    """``opt.lr_max = 0.1`` caps the next rates, and PolyakStep's ``opt.f_star`` moves its rate, as ``opt.sigma``
    does (before: accepted as a plain attribute, silently changing nothing); an invalid value is refused."""
    w = nn.Parameter(torch.arange(1.0, 6.0, dtype=DT))
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0))
    closure = closure_for(opt, lambda w: (w.square() * torch.arange(1.0, 6.0, dtype=DT)).sum(), [w])
    opt.step(closure)
    assert float(opt.stats["lr"]) > 0.1
    opt.lr_max = 0.1
    opt.step(closure)
    assert float(opt.stats["lr"]) == 0.1 and opt.rule.lr_max == 0.1
    with pytest.raises(ValueError, match="lr_max"):
        opt.lr_max = -1.0
    with pytest.raises(TypeError, match="QuadraticGreedy's ema cannot be assigned: the greedy rule is CDAT"):
        opt.ema = 0.5
    cdat = CDAT(torch.optim.SGD([w], lr=1.0))
    cdat.ema, cdat.f_star = 0.5, -1.0
    assert (cdat.rule.ema, cdat.rule.f_star) == (0.5, -1.0)
    polyak = PolyakStep(torch.optim.SGD([w], lr=1.0), lr_max=100.0)
    polyak.f_star = -1.0
    loss = float(polyak.step(closure_for(polyak, lambda w: w.square().sum(), [w])))
    assert polyak.rule.f_star == -1.0 and float(polyak.stats["lr"]) == pytest.approx((loss + 1.0) / (4 * loss))


VALID = {"sigma": 1.25, "ema": 0.5, "eps": 1e-9, "lr_max": 5.0, "f_star": -1.0, "growth": 1.5, "guard": 1.5,
         "guard_sigma": 3.0, "lagged_growth": 1.25, "loss_cap": 2.0, "free_steps": 3, "c": 0.3, "delta": 1e-6,
         "increase_factor": 1.75, "decrease_factor": 0.7, "init_lr": 0.5, "max_trials": 7}


@pytest.mark.parametrize("make", [CDAT, QuadraticGreedy, EdgeOfStability, PolyakStep, ArmijoLineSearch])
def test_every_rule_setting_is_assignable_or_refused(make):
    """Each setting of a tuner's rule, assigned on the tuner, replaces the rule's (validated) or is a
    ``TypeError`` (before: ``opt.growth = 2`` or ``opt.c = 0.3`` set a plain attribute the tuner never read, and
    ``opt.guard = 2.0`` replaced the tuner's probe guard, so the next step raised an ``AttributeError``)."""
    import dataclasses
    w = nn.Parameter(torch.arange(1.0, 6.0, dtype=DT))
    opt = make(torch.optim.SGD([w], lr=1.0), lr_max=10.0)
    closure = closure_for(opt, lambda w: (w.square() * torch.arange(1.0, 6.0, dtype=DT)).sum(), [w])
    fixed = {"startup"} | ({f.name for f in dataclasses.fields(opt.rule)} - {"lr_max"}
                           if make is QuadraticGreedy else set())
    for f in dataclasses.fields(opt.rule):
        if f.name == "coefficient":  # the edge rule's: the base's, read at each step (opt.coefficient)
            continue
        value = getattr(opt.rule, f.name)
        if f.name in fixed:
            with pytest.raises(TypeError, match=f"{f.name} cannot be assigned"):
                setattr(opt, f.name, value)
            continue
        new = VALID[f.name]
        assert new != value
        setattr(opt, f.name, new)
        assert getattr(opt.rule, f.name) == new and getattr(opt, f.name) == new, f.name
        with pytest.raises(ValueError, match=f.name):
            setattr(opt, f.name, math.nan)
    for _ in range(3):
        opt.step(closure)
    assert math.isfinite(float(opt.stats["lr"]))


def test_a_tuner_pickled_by_an_earlier_build_keeps_its_probe_guard():
    """A pickle whose probe guard is under its earlier name ``guard`` (now CDAT's rule setting) loads and steps."""
    w = nn.Parameter(torch.arange(1.0, 6.0, dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0))
    closure = closure_for(opt, lambda w: w.square().sum(), [w])
    opt.step(closure)
    state = opt.__getstate__()
    state["guard"] = state.pop("probe_guard")
    loaded = CDAT.__new__(CDAT)
    loaded.__setstate__(state)
    assert loaded.guard == opt.rule.guard and loaded.probe_guard is not None
    w_before = w.detach().clone()
    loaded.step(closure_for(loaded, lambda w: w.square().sum(), [w]))
    assert float(loaded.stats["lr"]) > 0 and not torch.equal(w, w_before)


def test_probes_replay_pythons_random_module():
    """A closure choosing its loss by ``random.random()`` (teacher forcing by a ratio, the seq2seq habit) gets the
    greedy rate of the loss its main call chose, at every step, and after the step Python's generator is where the
    main call left it (before: the probe drew again, the rate was the mix of two losses' slopes)."""
    import random
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)
    w = nn.Parameter(torch.ones(4, dtype=DT))
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0))
    chosen = []

    def closure():
        opt.zero_grad()
        teacher = random.random() < 0.5
        loss = (w.square() * (a if teacher else a.flip(0) * 10.0)).sum()
        loss.backward()
        return loss

    random.seed(3)
    for _ in range(8):
        state = random.getstate()
        teacher = random.random() < 0.5
        after_main = random.getstate()
        random.setstate(state)
        h = a if teacher else a.flip(0) * 10.0
        g = 2 * h * w.detach()
        exact = float(g @ g / (g @ (2 * h * g)))
        opt.step(closure)
        chosen.append(teacher)
        assert float(opt.stats["lr"]) == pytest.approx(exact, rel=1e-6)
        assert random.getstate() == after_main
    assert 0 < sum(chosen) < len(chosen)


def test_a_skipped_step_leaves_the_generators_where_the_main_call_left_them():
    """A closure that draws its batch from Python's ``random`` or torch's generator: a batch that gives a NaN loss
    (a skipped step) is not drawn again at the next step, and the main calls draw the bare loop's stream (a
    review: put back to before the main call, the poisoned batch came back at every step, each skipped). A step
    that raises puts them back to before it (the step undone), so the closure is not made to raise there."""
    import random
    data = torch.linspace(-1.0, 1.0, 10, dtype=DT)
    w = nn.Parameter(torch.tensor([0.5], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0))
    drawn, step = [], [0]

    def closure():
        opt.zero_grad()
        i = random.randrange(10) if step[0] % 2 else int(torch.randint(10, ()))
        if not is_probe():
            drawn.append(i)
        loss = (w * data[i] - 1.0).square().sum() * (math.nan if i == 7 else 1.0)
        loss.backward()
        return loss

    random.seed(5)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step[0] in range(12):
            opt.step(closure)
    random.seed(5)
    torch.manual_seed(5)
    bare = [random.randrange(10) if k % 2 else int(torch.randint(10, ())) for k in range(12)]
    assert drawn == bare and 7 in drawn and opt.stats["skipped"] >= 1


@pytest.mark.parametrize("retain", [False, True])
def test_a_closure_carrying_an_rnn_state_is_told_the_fix(retain):
    """word_language_model's loop moved into a closure (``loss, hidden = model(x, hidden)`` assigning the outer
    hidden state): the probe backpropagates into the graph the main call built, torch's error (or, with
    ``retain_graph=True``, the in-place version check) is raised with curvopt's explanation naming the carried
    state and the ``is_probe()`` fix (before: torch's bare "backward through the graph a second time", or a
    message blaming a graph kept from outside the closure), and the parameters are as before the step."""
    torch.manual_seed(0)
    rnn, head = nn.GRU(3, 4).to(DT), nn.Linear(4, 3).to(DT)
    opt = CDAT(torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1.0))
    x, y = torch.randn(5, 2, 3, dtype=DT), torch.randn(5, 2, 3, dtype=DT)
    hidden = torch.zeros(1, 2, 4, dtype=DT)

    def closure():
        nonlocal hidden
        opt.zero_grad()
        out, hidden = rnn(x, hidden)
        loss = (head(out) - y).square().mean()
        loss.backward(retain_graph=retain)
        return loss

    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match=r"an RNN's hidden state carried across batches.*is_probe\(\)"):
        opt.step(closure)  # the probe reads the hidden state the main call wrote, and its graph
    assert all(torch.equal(a, p) for a, p in zip(before, opt.param_groups[0]["params"]))


def test_an_assigned_growth_caps_the_next_rates():
    """``opt.growth = 1.1`` holds CDAT's rate to 1.1x per step from the next step on (as Optax's injected
    ``growth`` does), where before the assignment changed nothing."""
    w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0), sigma=1.0)
    closure = closure_for(opt, lambda w: (w.square() * torch.tensor([1.0, 1e-3], dtype=DT)).sum(), [w])
    opt.step(closure)
    opt.growth = 1.1
    lrs = [float(opt.stats["lr"])]
    for _ in range(5):
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
    assert all(b <= 1.1 * a * (1 + 1e-12) for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] > lrs[0]


def test_a_sigma_schedule_returning_a_tensor_runs_as_one_returning_a_number():
    """``sigma=lambda k: 1 + torch.cos(...)`` (a 0-d tensor) gives the rates of the same schedule in Python
    numbers (before: the robust start-up's guard raised a NotImplementedError on a bitwise or)."""
    def run(schedule):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
        x = torch.randn(32, 4, dtype=DT)
        opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0), sigma=schedule)
        closure = closure_for(opt, lambda: (model(x) - x.sum(1, keepdim=True).sin()).square().mean(), [])
        lrs = []
        for _ in range(6):
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
        return lrs

    tensor = run(lambda k: 3.0 + torch.cos(torch.tensor(math.pi * k / 4, dtype=DT)))
    assert tensor == run(lambda k: 3.0 + math.cos(math.pi * k / 4)) and all(v > 0 for v in tensor)


def _warned_here(rec, text):
    """The recorded warnings whose message contains ``text``, each with the file and line it is attributed to."""
    return [(r.filename, r.lineno) for r in rec if text in str(r.message)]


def test_warnings_point_at_the_line_of_the_training_loop():
    """Every warning of a step names the caller's line whatever the path into the tuner: ``opt.step(closure)``
    (through torch's step wrapper), ``scaler.step(opt)`` (through the GradScaler), and the constructor (a
    fixed stacklevel pointed the GradScaler's into torch/utils/_contextlib.py)."""
    here = __file__
    w = nn.Parameter(torch.tensor([0.1], dtype=DT))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt = CDAT(torch.optim.SGD([w], lr=1.0), f_star=-math.inf, sharpness_every=3); ctor_line = _lineno()
        closure = closure_for(opt, lambda w: ((w.square() - 1) ** 2).sum(), [w])
        for _ in range(12):
            opt.step(closure); step_line = _lineno()
    assert _warned_here(rec, "deprecated") == [(here, ctor_line)]
    assert _warned_here(rec, "has been 0 for") == [(here, step_line)]

    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = CDAT(torch.optim.SGD([w], lr=1.0, momentum=0.9))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            scaler.scale(w.square().sum()).backward()
            scaler.step(opt); scaler_line = _lineno()
            scaler.update()
        loss = w.square().sum() * math.nan
        opt.zero_grad(); loss.backward()
        opt.step(); nan_line = _lineno()
    assert _warned_here(rec, "secant curvature") == [(here, scaler_line)]
    assert _warned_here(rec, "step skipped") == [(here, nan_line)]


def _lineno():
    """The caller's line number."""
    return sys._getframe(1).f_lineno


def test_a_run_that_has_converged_is_not_warned_about():
    """At an exact optimum (gradient 0) the rate is 0 and that is right: no zero-rate warning (it fired after 10
    steps); closure-free, the steps are skipped and the skip is said once for the loop's line under Python's
    default filter (the count was in the text, so every step's warning was new)."""
    for make in (lambda p: QuadraticGreedy(torch.optim.SGD(p, lr=1.0)), lambda p: CDAT(torch.optim.Adam(p, lr=1.0))):
        w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=DT))
        opt = make([w])
        closure = closure_for(opt, lambda w: (w - torch.tensor([1.0, 2.0], dtype=DT)).square().sum(), [w])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(15):
                opt.step(closure)
        assert not rec and float(opt.stats["lr"]) == 0.0
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("default")
            for _ in range(15):
                closure()
                opt.step()
        assert len([r for r in rec if "gradient is exactly zero" in str(r.message)]) == 1
        assert opt.stats["skipped"] == 15 and w.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("closure_free", [False, True])
def test_a_skipped_step_names_what_was_not_finite(closure_free):
    """The skip's warning names the loss, the gradient or the base's update alone, and the usual cause of the last:
    float16 parameters behind Adam (no autocast) had every step skipped with finite losses and gradients, warned
    as a "non-finite loss, gradient or base direction" (a field test)."""
    def messages(dtype, scale):
        w = nn.Parameter(torch.tensor([1e-3, -2e-3], dtype=dtype))  # float16: Adam's second moment underflows
        opt = CDAT(torch.optim.Adam([w], lr=1.0))
        loss_fn = lambda w: w.float().square().sum() * scale  # noqa: E731
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if closure_free:
                opt.zero_grad()
                loss_fn(w).backward()
                opt.step()
            else:
                opt.step(closure_for(opt, loss_fn, [w]))
        assert opt.stats["skipped"] == 1 and w.tolist() == torch.tensor([1e-3, -2e-3], dtype=dtype).tolist()
        return [str(r.message) for r in rec if "step skipped" in str(r.message)]

    (half,) = messages(torch.float16, 1.0)
    known = "the gradient is" if closure_free else "the loss and the gradient are"
    assert f"{known} finite, the base optimizer's update is not" in half and "eps=1e-4" in half
    (nan,) = messages(DT, math.nan)
    assert ("non-finite gradient, step skipped" if closure_free else "non-finite loss") in nan  # closure-free: no loss


@pytest.mark.parametrize("make", [lambda p: CDAT(torch.optim.Adam(p, lr=1.0)),
                                  lambda p: PolyakStep(torch.optim.Adam(p, lr=1.0), lr_max=0.1)])
def test_a_loss_that_presses_on_f_star_from_above_is_reported_once(make):
    """A loss whose minimum (-1) is below the default ``f_star=0``: the rate leans on the bound and the loss creeps
    down to it without crossing, the rate toward 0, silently (a field test's Gaussian NLL: loss 5e-19, rate 2e-19,
    slope 4.78 throughout). Warned once, with the fix; the same loss shifted to its minimum 0 is not warned."""
    def messages(offset):
        w = nn.Parameter(torch.tensor([0.0, 0.5], dtype=DT))
        opt = make([w])
        closure = closure_for(opt, lambda w: (w - torch.tensor([3.0, -1.0], dtype=DT)).square().sum() - offset, [w])
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for _ in range(50):
                opt.step(closure)
        return [str(r.message) for r in rec if "presses on f_star" in str(r.message)]

    (pressed,) = messages(1.0)
    assert "Pass the loss's lower bound as f_star" in pressed and "L1" in pressed
    assert messages(0.0) == []


def test_a_skipped_step_keeps_the_sharpness_estimate_in_the_stats():
    """The stats of a skipped step are NaN but for the sharpness estimates held (as between estimates, and as
    Optax's skip keeps them): a NaN batch made a gap in every sharpness plot; a loaded checkpoint shows the
    stored estimate too."""
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    a = torch.diag(torch.tensor([3.0, 1.0], dtype=DT))
    opt = CDAT(torch.optim.SGD([w], lr=1.0), sharpness=10)
    bad = {"on": False}
    closure = closure_for(opt, lambda w: 0.5 * w @ a @ w * (math.nan if bad["on"] else 1.0), [w])
    opt.step(closure)
    estimate = float(opt.stats["sharpness"])
    assert estimate == pytest.approx(3.0, rel=1e-3)
    bad["on"] = True
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step(closure)
    assert math.isnan(float(opt.stats["lr"])) and float(opt.stats["sharpness"]) == estimate
    fresh = CDAT(torch.optim.SGD([w], lr=1.0), sharpness=10)
    fresh.load_state_dict(opt.state_dict())
    assert float(fresh.stats["sharpness"]) == estimate


@pytest.mark.parametrize("base_kind, moves", [("adamw", True), ("sgd", False)])
def test_a_frozen_parameter_the_base_still_moves_is_reported(base_kind, moves):
    """A layer frozen with ``requires_grad_(False)`` under ``zero_grad(set_to_none=False)`` keeps a zero gradient,
    and AdamW's momentum and weight decay go on moving it: no backward pass differentiates it, so the tuner's
    slope and curvature miss that motion (the greedy rate was 5x the exact one). It warns once; plain SGD
    (no momentum, no decay) does not move it and nothing is said. Kills: the check removed or always quiet."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y = torch.randn(40, 3, dtype=DT), torch.randn(40, 1, dtype=DT)
    base = (torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01) if base_kind == "adamw"
            else torch.optim.SGD(model.parameters(), lr=1.0))
    opt = QuadraticGreedy(base)

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(closure)
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    said = [w for w in seen if "requires_grad=False" in str(w.message)]
    assert len(said) == (1 if moves else 0)
    assert (not torch.equal(model[0].weight, before)) == moves


def test_a_loss_whose_minimum_sits_far_above_f_star_does_not_climb_back():
    """Distillation to soft targets (a field test): cross-entropy to a teacher's softmax at temperature 4 has its
    minimum at the targets' entropy H ~ 2, far above the default ``f_star = 0``. CDAT behind plain SGD (sigma 4
    above the edge) brought the loss to within 0.004 of H and let it climb back to H + 0.18, unwarned: the
    above-edge guard compared the rise with the gap to ``f_star``, mostly the offset H. Held to the recent progress
    (``curvopt.rules.above_edge_guard``), the run ends at H + 0.0006."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x = x - x.mean(0)
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = torch.optim.SGD(teacher.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), torch.tensor(y)).backward()
        opt.step()
    with torch.no_grad():
        targets = torch.softmax(teacher(x) / 4.0, dim=1)
    entropy = float(-(targets * targets.log()).sum(1).mean())
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    tuner = CDAT(torch.optim.SGD(student.parameters(), lr=1.0))

    def closure():
        tuner.zero_grad()
        loss = nn.functional.cross_entropy(student(x), targets)
        loss.backward()
        return loss

    losses = [float(tuner.step(closure).detach()) for _ in range(300)]
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(student(x), targets))
    assert final - entropy < 0.005, (min(losses) - entropy, final - entropy)


def test_a_watch_opened_inside_another_chains_to_it():
    """A tuner stepped from another's closure opens its watch inside the other's: the outer watch still sees every
    module run in its block, the inner one's too (it replaced the outer watcher before), and the hook goes with
    the outer block."""
    from torch_backend.buffers import _watching
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    x = torch.ones(1, 1)
    outer, inner = [], []
    with _watching(outer.append):
        a(x)
        with _watching(inner.append):
            b(x)
        assert nn.modules.module._global_forward_pre_hooks
        a(x)
    assert outer == [a, b, a] and inner == [b]
    assert not nn.modules.module._global_forward_pre_hooks
