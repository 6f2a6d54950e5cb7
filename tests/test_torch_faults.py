"""Nothing lost, ever (issue 10, PyTorch): fault injection into every tuner, oracle and base, and the bad inputs
that used to be accepted and misused.

The property test injects, at random closure calls of random steps (the main call, a curvature probe, the
secant's fd fallback, a sharpness product, a line-search trial, the exact oracle's functional loss), an
exception (``RuntimeError`` or ``KeyboardInterrupt``, before the forward pass or after ``backward``) or a
NaN/Inf loss or gradient, for every tuner/oracle around SGD, momentum SGD, Adam and AdamW on a small MLP with
BatchNorm and dropout, and checks after each step:

* an exception propagates and leaves the parameters bit-equal to before the step, the base's state (Adam's
  step counter and moments), the tuner's state, the module buffers and the random generators untouched;
* a non-finite main call is a clean skip (parameters and base state as before, ``skipped`` + 1);
* a non-finite probe leaves finite parameters;
* then training continues, and ``state_dict()`` loaded into a fresh tuner continues bit-identically.

The module counts the attacks it tries and survives; the tally (``torch faults: N attacks tried, M
survived``) appears in pytest's warnings summary.
"""
from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from curvopt import SharpnessConfig
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

TALLY: Counter = Counter()
DT = torch.float64


class TallyReport(UserWarning):
    """Carries the attack tally into pytest's warnings summary, which is printed past output capture."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_tally():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only contend
    yield
    torch.set_num_threads(threads)
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(TALLY.items()) if k not in ("tried", "survived"))
    warnings.warn(TallyReport(f"torch faults: {TALLY['tried']} attacks tried, {TALLY['survived']} survived "
                              f"({kinds})"))


BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1.0),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
}
SHARP = SharpnessConfig(every=2, iters=3, first_iters=6)
TUNERS = {
    "cdat_fd": lambda b, m, f: CDAT(b, curvature="fd", modules=m),
    "cdat_fd_sharp": lambda b, m, f: CDAT(b, curvature="fd", sharpness=SHARP, modules=m),
    "cdat_secant": lambda b, m, f: CDAT(b, curvature="secant", modules=m),
    "cdat_exact": lambda b, m, f: CDAT(b, curvature="exact", functional_loss=f, modules=m),
    "greedy_fd": lambda b, m, f: QuadraticGreedy(b, modules=m),
    "armijo": lambda b, m, f: ArmijoLineSearch(b, c=0.5, max_trials=6, modules=m),
    "polyak": lambda b, m, f: PolyakStep(b, lr_max=1.0, modules=m),
    "eos": lambda b, m, f: EdgeOfStability(b, sigma=0.5, sharpness=SHARP, modules=m),
}
RAISES = ("raise_early", "raise_late", "interrupt")
POISONS = ("nan_loss", "inf_loss", "nan_grad", "inf_grad")


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 1)).to(DT)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT)


class Faults:
    """Closure (and functional loss) of one step, with a fault at closure call ``at`` (0 = the main call)."""

    def __init__(self, opt, model, x, y, fault=None, at=-1):
        self.opt, self.model, self.x, self.y = opt, model, x, y
        self.fault, self.at, self.calls = fault, at, 0
        self.fired = False

    def _fault(self):
        k = self.calls
        self.calls += 1
        if k == self.at:
            self.fired = True
            return self.fault
        return None

    def _raise(self, fault):
        if fault == "interrupt":
            raise KeyboardInterrupt("injected")
        raise RuntimeError("injected")

    def closure(self):
        fault = self._fault()
        if fault == "raise_early":
            self._raise(fault)
        self.opt.zero_grad()
        loss = ((self.model(self.x) - self.y) ** 2).mean()
        if fault == "nan_loss":
            loss = loss * float("nan")
        elif fault == "inf_loss":
            loss = loss + float("inf")
        loss.backward()
        for p in self.model.parameters():
            if fault == "nan_grad" and p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
            elif fault == "inf_grad" and p.grad is not None:
                p.grad.view(-1)[-1] = float("inf")
        if fault in ("raise_late", "interrupt"):
            self._raise(fault)
        return loss

    def functional_loss(self, ps):
        """The exact oracle's view of the same loss (one call of the step's call sequence)."""
        fault = self._fault()
        if fault in RAISES:
            self._raise(fault)
        names = [n for n, _ in self.model.named_parameters()]
        out = torch.func.functional_call(self.model, dict(zip(names, ps)), (self.x,))
        loss = ((out - self.y) ** 2).mean()
        return loss * float("nan") if fault in POISONS else loss


class Run:
    def __init__(self, tuner, base):
        self.model, self.x, self.y = model_and_data()
        self.faults = Faults(None, self.model, self.x, self.y)
        self.opt = TUNERS[tuner](BASES[base](list(self.model.parameters())), self.model,
                                 lambda ps: self.faults.functional_loss(ps))
        self.faults.opt = self.opt
        self.scratch = ("curvopt_w0",) if tuner == "cdat_secant" else ("curvopt_w0", "curvopt_u")

    def step(self, fault=None, at=-1):
        f = self.faults
        f.fault, f.at, f.calls, f.fired = fault, at, 0, False
        return self.opt.step(f.closure)

    def snapshot(self):
        sd = copy.deepcopy(self.opt.state_dict())
        for st_ in sd["state"].values():
            for k in self.scratch:
                st_.pop(k, None)
        return dict(params=[p.detach().clone() for p in self.model.parameters()], state=sd,
                    buffers=[b.clone() for b in self.model.buffers()], rng=torch.get_rng_state())


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or torch.equal(torch.nan_to_num(a, 1.5, 2.5, -2.5), torch.nan_to_num(b, 1.5, 2.5, -2.5)))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b))


def without_skipped(sd):
    sd = copy.deepcopy(sd)
    first = sd["state"].get(0, {})
    first.pop("curvopt_skipped", None)
    if not first:
        sd["state"].pop(0, None)
    return sd


def attack(run, fault, at):
    """One faulty step and its checks; returns whether the fault fired."""
    TALLY["tried"] += 1
    TALLY[f"fault:{fault}"] += 1
    before = run.snapshot()
    skipped = run.opt.stats["skipped"]
    raised = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            run.step(fault, at)
        except (RuntimeError, KeyboardInterrupt) as e:
            raised = e
    after = run.snapshot()
    fired = run.faults.fired
    if fired and fault in RAISES:
        TALLY["where:main" if at == 0 else "where:probe"] += 1
        assert raised is not None and "injected" in str(raised), raised
        for k in ("params", "state", "buffers", "rng"):
            assert same(before[k], after[k]), (fault, at, k)
    else:
        assert raised is None, raised
        assert all(bool(torch.isfinite(p).all()) for p in after["params"])
        if fired and at == 0:  # a clean skip
            TALLY["skips"] += 1
            assert run.opt.stats["skipped"] == skipped + 1
            assert same(before["params"], after["params"])
            assert same(without_skipped(before["state"]), without_skipped(after["state"]))
        elif fired:
            TALLY["where:probe"] += 1
    TALLY["survived"] += 1
    return fired


def continue_identically(run, tuner, base, steps=3):
    """The state dict, loaded into a fresh tuner around a copy of the model, continues bit-identically."""
    sd = copy.deepcopy(run.opt.state_dict())
    twin = Run(tuner, base)
    twin.model.load_state_dict(run.model.state_dict())
    twin.opt.load_state_dict(sd)
    rng = torch.get_rng_state()
    lrs = []
    for r in (run, twin):
        torch.set_rng_state(rng)
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(steps):
                r.step()
                out.append(r.opt.stats["lr"])
        lrs.append(out)
    assert all(same(a, b) for a, b in zip(*lrs)), lrs
    for p, q in zip(run.model.parameters(), twin.model.parameters()):
        assert torch.equal(p, q)


FAULT_PLAN = dict(
    tuner=st.sampled_from(sorted(TUNERS)),
    base=st.sampled_from(sorted(BASES)),
    clean_first=st.integers(0, 2),
    plan=st.lists(st.tuples(st.sampled_from(RAISES + POISONS), st.integers(0, 7)), min_size=1, max_size=4),
)


def fault_run(tuner, base, clean_first, plan):
    run = Run(tuner, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(clean_first):
            run.step()
    for fault, at in plan:
        attack(run, fault, at)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            run.step()  # training continues
        assert all(bool(torch.isfinite(p).all()) for p in run.model.parameters())
    continue_identically(run, tuner, base)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**FAULT_PLAN)
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_faults_at_random_calls_lose_nothing(tuner, base, clean_first, plan):
    fault_run(tuner, base, clean_first, plan)


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**FAULT_PLAN)
def test_faults_at_random_calls_lose_nothing_many(tuner, base, clean_first, plan):
    fault_run(tuner, base, clean_first, plan)


@pytest.mark.parametrize("tuner", sorted(TUNERS))
@pytest.mark.parametrize("at", [0, 1, 2])
def test_every_call_of_a_step_can_fail(tuner, at):
    """Deterministic coverage: an exception at the main call, the first and the second probe of a step (on a
    sharpness step for the sharpness tuners), around Adam, on the very first step (Adam's state is created
    lazily there) and on a later one."""
    for clean_first in (0, 2):
        run = Run(tuner, "adam")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(clean_first):
                run.step()
        attack(run, "raise_late", at)
        attack(run, "interrupt", at)
        run.step()
        continue_identically(run, tuner, "adam", steps=2)


# ------------------------------------------------------------------------- inputs accepted and then misused
def _attack(kind):
    TALLY["tried"] += 1
    TALLY[kind] += 1


def test_non_finite_base_direction_is_skipped_cleanly():
    """fp16 Adam: a tiny gradient's second moment underflows to 0 and u = m / (0 + eps) overflows; the step is
    skipped (never w + 0 * inf = NaN) and Adam's state is put back."""
    _attack("nonfinite_u")
    w = nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float16))
    base = torch.optim.Adam([w], lr=1.0, eps=1e-8)
    opt = CDAT(base)
    before = w.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (w.float() * 1e-6).sum()
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure)
    assert torch.equal(w.detach(), before) and opt.stats["skipped"] == 1
    assert "exp_avg" not in opt.state[w]  # Adam's lazy state rolled back with the step
    TALLY["survived"] += 1


@pytest.mark.parametrize("given", [True, False], ids=["modules", "found"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_skipped_step_puts_module_buffers_back_and_leaves_the_generator_as_the_main_call_did(given, first):
    """A batch with one NaN feature: the step is skipped, and BatchNorm's statistics (which the main call updated
    with the NaN) are as before the step, as when the closure raises. Before, the running statistics stayed NaN
    for good: the model's eval output was NaN. The generator (which drew the dropout mask) is where the main call
    left it, as in a bare loop (put back to before the step, a random draw that gave the NaN came back at every
    step, each skipped). Without ``modules=`` too, on the step that finds the modules and on a later one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)).double()
    opt = CDAT(torch.optim.Adam(model.parameters(), lr=1.0), modules=model if given else None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 1, generator=gen, dtype=torch.float64)

    def closure_on(inputs):
        def closure():
            opt.zero_grad()
            loss = ((model(inputs) - y) ** 2).mean()
            loss.backward()
            return loss
        return closure

    if not first:
        opt.step(closure_on(x))
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    bad = x.clone()
    bad[0, 0] = math.nan
    copy.deepcopy(model)(bad)  # the main call's draws, on a copy
    after_main = torch.get_rng_state()
    torch.set_rng_state(rng)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(closure_on(bad))
    assert opt.stats["skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(after_main, torch.get_rng_state()) and not torch.equal(rng, after_main)


class _Counting(nn.Module):
    """A forward pass that reassigns its buffers (``self.calls = self.calls + 1``) instead of writing them in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema", torch.zeros(4, dtype=torch.float64))

    def forward(self, x):
        self.calls = self.calls + 1
        self.ema = 0.9 * self.ema + 0.1 * x.detach().mean(0)
        return x - self.ema


@pytest.mark.parametrize("tuner", [CDAT, ArmijoLineSearch])
def test_reassigned_buffers_are_guarded_like_buffers_written_in_place(tuner):
    """The probes and a failed step put back the tensor the module held, not only its values: the reassigned
    buffer advanced once per closure call (6 after 3 CDAT steps) and a failing step left it moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _Counting(), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = tuner(torch.optim.SGD(model.parameters(), lr=0.1), modules=model)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    calls = {"n": 0, "fail_at": None}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("probe failed")
        return loss

    for _ in range(3):
        opt.step(closure)
    assert calls["n"] > 3 and float(model[1].calls) == 3
    before = [b.clone() for b in model.buffers()]
    calls["fail_at"] = calls["n"] + 2  # the step's first probe
    with pytest.raises(RuntimeError, match="probe failed"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


class _History(nn.Module):
    """Keeps a history of its input's mean in a buffer resized in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hist", torch.zeros(0, dtype=torch.float64))

    def forward(self, x):
        n = self.hist.numel()
        self.hist.resize_(n + 1)
        self.hist[n] = x.detach().mean()
        return x


@pytest.mark.parametrize("tuner", [CDAT, ArmijoLineSearch])
def test_a_buffer_resized_in_place_is_put_back_at_its_size(tuner):
    """A buffer the forward resizes in place (``resize_``) holds one entry per step, the main calls' (before: the
    restore after the first probe raised a broadcast error)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _History(), nn.Tanh(), nn.Linear(4, 1)).double()
    opt = tuner(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    means = []

    def closure():
        opt.zero_grad()
        if not opt.probing:
            means.append(float(model[0](x).detach().mean()))
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        assert opt.stats["closure_calls"] > 1
    assert model[1].hist.tolist() == means


@pytest.mark.parametrize("kw,name", [({"sigma": "2.0"}, "sigma"), ({"lr_max": "inf"}, "lr_max"),
                                     ({"ema": "0.9"}, "ema"), ({"curvature": 3}, "curvature"),
                                     ({"seed": 1.5}, "seed"), ({"sharpness": 2.0}, "sharpness")])
def test_strings_and_non_integers_are_refused(kw, name):
    _attack("validation")
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=name):
        CDAT(torch.optim.SGD([w], lr=1.0), **kw)
    opt = ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), max_trials=3.0)
    assert type(opt.rule.max_trials) is int and opt.rule.max_trials == 3  # the converted value is stored
    with pytest.raises(ValueError, match="max_trials"):
        ArmijoLineSearch(torch.optim.SGD([w], lr=1.0), max_trials="3")
    TALLY["survived"] += 1


def test_complex_parameters_are_refused_at_construction():
    _attack("complex")
    w = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        CDAT(torch.optim.SGD([w], lr=1.0))
    opt = CDAT(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0))
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [w]})
    TALLY["survived"] += 1


@pytest.mark.parametrize("tuner", sorted(TUNERS))
def test_zero_size_parameters_work(tuner):
    """An empty parameter (with its empty gradient) changes nothing: the same rates and parameters as without it."""
    _attack("zero_size")
    runs = []
    for with_empty in (True, False):
        model, x, y = model_and_data()
        empty = nn.Parameter(torch.zeros(0, 3, dtype=DT))
        params = list(model.parameters()) + [empty] * with_empty
        faults = Faults(None, model, x, y)
        opt = TUNERS[tuner](torch.optim.Adam(params, lr=0.1), model, faults.functional_loss)
        faults.opt = opt

        def closure():
            loss = faults.closure()
            if with_empty:
                (empty.sum() * 0).backward()  # the empty parameter gets an (empty) gradient
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        lrs = []
        for _ in range(3):
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
        assert int(opt.stats["skipped"]) == 0 and lrs[0] > 0
        assert empty.shape == (0, 3)
        runs.append((lrs, [p.detach() for p in model.parameters()]))
        assert not all(torch.equal(p, b) for p, b in zip(runs[-1][1], before))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    TALLY["survived"] += 1


@pytest.mark.parametrize("make,match", [
    (lambda ps: torch.optim.LBFGS(ps), "LBFGS"),
    (lambda ps: torch.optim.SparseAdam(ps), "SparseAdam"),
    (lambda ps: torch.optim.ASGD(ps), "ASGD"),
    (lambda ps: torch.optim.Rprop(ps), "Rprop"),
    (lambda ps: torch.optim.Adafactor(ps), "Adafactor"),  # min(lr, 1/sqrt(t)): the user's lr cap lost
    (lambda ps: torch.optim.RMSprop(ps), "allow_any_base"),
    (lambda ps: torch.optim.SGD(ps, lr=1.0, maximize=True), "maximize"),
    (lambda ps: torch.optim.Adam(ps, lr=1.0, maximize=True), "maximize"),
])
def test_bases_that_cannot_work_are_refused(make, match):
    _attack("bad_base")
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match) as info:
        CDAT(make([w]))
    if match != "maximize":
        assert "SGD" in str(info.value) and "Adam" in str(info.value)  # names the supported bases
    CDAT(torch.optim.RMSprop([w]), allow_any_base=True)  # the documented opt-in
    for refused in (torch.optim.Rprop, torch.optim.Adafactor):
        with pytest.raises(ValueError, match=refused.__name__):
            CDAT(refused([w]), allow_any_base=True)
    TALLY["survived"] += 1


def test_a_base_whose_optimizer_init_never_ran_is_refused_clearly():
    """An optimizer that wraps another without running ``torch.optim.Optimizer.__init__`` (Opacus's DPOptimizer is
    built so) failed with ``AttributeError: ... '_optimizer_state_dict_post_hooks'`` from inside the tuner, with
    ``allow_any_base=True`` too; now a TypeError says what it is, before anything is changed."""
    class Wrapper(torch.optim.Optimizer):
        def __init__(self, inner):
            self.inner = inner
            self.param_groups, self.state, self.defaults = inner.param_groups, inner.state, inner.defaults

    w = nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([w], lr=1.0)
    for allow in (False, True):
        with pytest.raises(TypeError, match="Optimizer.__init__ never ran .* Opacus's DPOptimizer") as info:
            CDAT(Wrapper(inner), allow_any_base=allow)
        assert "per-example clipping" in str(info.value)
    assert not inner._optimizer_state_dict_post_hooks  # nothing was registered on the wrapped optimizer


def test_parameters_in_place_of_a_base_say_how_to_wrap():
    w = nn.Parameter(torch.ones(3))
    for params in ([w], {"params": [w]}):  # e.g. ZeroRedundancyOptimizer(params, optimizer_class=CDAT)
        with pytest.raises(TypeError, match=r"wraps an optimizer, CDAT\(torch.optim.AdamW"):
            CDAT(params)


def test_noise_correction_behind_a_base_without_a_noise_metric_is_refused():
    """``noise_correction=True`` behind a base whose noise metric the tuner does not know (``allow_any_base``):
    a clear error, not a correction silently left off (closure-free behind RMSprop, Adagrad, NAdam, Lion, Adan and
    Adafactor the uncorrected rate collapsed in batches of 32; docs/pytorch.md). The default (None) and False
    construct; SGD, Adam and AdamW take True."""
    _attack("bad_base")
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="noise_correction=True needs the base's noise metric.*RMSprop"):
        CDAT(torch.optim.RMSprop([w]), allow_any_base=True, noise_correction=True)
    for setting in (None, False):
        CDAT(torch.optim.RMSprop([w]), allow_any_base=True, noise_correction=setting)
    for make in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        CDAT(make([w], lr=1.0), noise_correction=True)
    TALLY["survived"] += 1


def test_sparse_gradients_are_a_clear_error_and_nothing_changes():
    _attack("sparse")
    emb = nn.Embedding(5, 3, sparse=True)
    opt = CDAT(torch.optim.SGD(emb.parameters(), lr=1.0))
    before = emb.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([0, 2])).pow(2).sum()
        loss.backward()
        return loss

    with pytest.raises(NotImplementedError, match="sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight.detach(), before)
    TALLY["survived"] += 1


def test_stats_are_copies():
    _attack("stats_copy")
    run = Run("armijo", "sgd")
    run.step()
    t = run.opt.stats["lr"]
    t += 100
    assert float(run.opt.stats["lr"]) < 100
    sd = run.opt.state_dict()
    run.opt.stats["numerator"].fill_(1e9)
    assert same(sd, run.opt.state_dict())
    TALLY["survived"] += 1


def test_pickle_of_a_tuner_with_modules_and_faults():
    """A tuner pickled right after a failed step works like the original."""
    _attack("pickle_after_fault")
    run = Run("cdat_fd_sharp", "adam")
    run.step()
    attack(run, "raise_late", 1)
    clone_model, clone_opt = pickle.loads(pickle.dumps((run.model, run.opt)))
    assert clone_opt.probe_guard.before.modules[0] is clone_model
    TALLY["survived"] += 1


def test_a_step_under_inference_mode_is_refused_and_leaves_the_tuner_usable():
    """Found in the field: a closure-free step under ``torch.inference_mode()`` raised torch's "Inference tensors
    do not track version counter" and left inference tensors in the tuner's cached buffers, so every later
    normal step raised too. It is now refused before anything runs, and the next step works."""
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = CDAT(torch.optim.SGD([w], lr=1.0))

    def backward():
        opt.zero_grad()
        (w * w).sum().backward()
    backward()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    for _ in range(3):
        backward()
        opt.step()
    assert float((w * w).sum()) < 5.0


@pytest.mark.parametrize("at", [0, 1])
def test_a_step_called_from_its_own_closure_is_refused_and_changes_nothing(at):
    """``opt.step()`` left inside the closure (a slip when a ``backward(); step()`` loop becomes a closure) ran a
    closure-free step inside the running one, at the main call (``at`` 0) or at a probe (1): Adam stepped twice, and
    the rate fell to 1e-9 and stayed near 1e-6 for 30 steps, with a warning that the closure does not replay (a field
    test). It is refused; the step is undone, and the tuner goes on as if it had not been called; a deep copy taken
    in the closure steps too."""
    def run(slip):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        opt = CDAT(torch.optim.Adam(model.parameters(), lr=1.0))
        copies = []

        def closure_of(slipping):
            calls = [0]

            def closure():
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
                if slipping and calls[0] == at:
                    copies.append(copy.deepcopy(opt))
                    opt.step()
                calls[0] += 1
                return loss
            return closure

        if slip:
            with pytest.raises(RuntimeError, match="while a step of it runs"):
                opt.step(closure_of(True))
        for _ in range(4):
            opt.step(closure_of(False))
        return [p.detach().clone() for p in model.parameters()], opt, copies

    clean, opt, _ = run(False)
    after, slipped, copies = run(True)
    assert all(torch.equal(a, b) for a, b in zip(clean, after))
    assert slipped.base.state_dict()["state"][0]["step"] == 4
    copied = copies[0]  # taken while the step ran: it is not left refusing every step
    params = [p for g in copied.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    steps = int(copied.base.state[params[0]].get("step", 0))  # (at a probe, the base's trial step is in the copy)
    copied.step()
    assert copied.base.state[params[0]]["step"] == steps + 1


# --- a step that fails leaves the modules it found and the tuner's watches as before it (stop 69) ----------------

def _aux_run(make, fail_at, *, modules: bool, nan: bool = False):
    """Two steps without an auxiliary BatchNorm, then a step whose closure first calls it and fails at call
    ``fail_at`` (raises, or returns a NaN loss with ``nan``), then that step retried: the aux's buffers before
    the failed step, after it, and after the retry, and the parameters."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    aux = nn.BatchNorm1d(3)
    opt = make(torch.optim.Adam(model.parameters(), lr=1.0), model if modules else None)

    def closure_of(use_aux, fail):
        calls = [0]

        def closure():
            calls[0] += 1
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.cross_entropy(aux(out) if use_aux else out, y)
            if calls[0] == fail and not nan:
                raise RuntimeError("injected")
            (loss * (math.nan if calls[0] == fail else 1.0)).backward()
            return loss * (math.nan if calls[0] == fail else 1.0)
        return closure

    for _ in range(2):
        opt.step(closure_of(False, None))
    before = (aux.running_mean.clone(), int(aux.num_batches_tracked))
    if fail_at is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt.step(closure_of(True, fail_at))
            except RuntimeError:
                pass
    after = (aux.running_mean.clone(), int(aux.num_batches_tracked))
    opt.step(closure_of(True, None))
    return before, after, (aux.running_mean.clone(), int(aux.num_batches_tracked)), list(model.parameters())


AUX_TUNERS = {
    "cdat": lambda b, m: CDAT(b, modules=m),
    "armijo": lambda b, m: ArmijoLineSearch(b, modules=m),
    "polyak": lambda b, m: PolyakStep(b, modules=m),
    "eos": lambda b, m: EdgeOfStability(b, sharpness=1, modules=m),
}


@pytest.mark.parametrize("name", sorted(AUX_TUNERS))
@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_module_first_run_by_a_failing_step_is_put_back(name, fail_at):
    """Its buffers were neither snapshotted before the main call nor restored: the failed step's batch stayed
    counted (num_batches_tracked 0 -> 1) and the retried step counted it again (running_mean 0.03-0.1 off)."""
    make = AUX_TUNERS[name]
    _, _, clean, p_clean = _aux_run(make, None, modules=False)
    before, after, retried, p_retried = _aux_run(make, fail_at, modules=False)
    assert after[1] == before[1] and torch.equal(after[0], before[0])
    assert retried[1] == clean[1] == 1 and torch.equal(retried[0], clean[0])
    assert all(torch.equal(a, b) for a, b in zip(p_clean, p_retried))


def test_a_skipped_step_puts_back_a_module_it_first_ran():
    """A NaN main call on the step that first runs a module outside the ones found: its BatchNorm went 0 -> 1
    while the model's was put back."""
    before, after, _, _ = _aux_run(AUX_TUNERS["cdat"], 1, modules=False, nan=True)
    assert after[1] == before[1] == 0 and torch.equal(after[0], before[0])


def test_modules_given_are_all_the_tuner_keeps_and_modules_found_stay_bounded():
    """``modules=`` names every module kept: a frozen teacher outside them is not snapshotted (its buffers were
    copied twice a step once the probes adopted it); without ``modules=`` a loss module built in the closure at
    every call is not adopted (each call added one, and each step's walk over the modules grew with them: 1.3 ->
    51 ms a step over 3,000 steps in a review)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)).eval().requires_grad_(False)
    for modules in (student, None):
        opt = CDAT(torch.optim.Adam(student.parameters(), lr=1.0), modules=modules)

        def closure():
            opt.zero_grad()
            out = student(x)
            loss = nn.CrossEntropyLoss()(out, y) + nn.MSELoss()(out, teacher(x))
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        kept = {id(m) for root in opt.probe_guard.buffers.modules for m in root.modules()}
        assert id(teacher) not in kept if modules is not None else id(teacher) in kept
        assert len(opt.probe_guard.buffers.modules) == (1 if modules is not None else 2)


def _flaky(closure, fail_on):
    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] == fail_on:
            raise RuntimeError("transient")
        return closure()
    return flaky


@pytest.mark.parametrize("make", [PolyakStep, ArmijoLineSearch], ids=["polyak", "armijo"])
def test_failed_steps_do_not_use_up_the_replay_checks(make):
    """The checks still to run were counted down before the replay call that raised: after 3 failed steps a
    closure that draws a new batch at every call was never told of."""
    torch.manual_seed(0)
    data = iter([(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(200)])
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = make(torch.optim.SGD(model.parameters(), lr=1.0))

    def new_batch_each_call():
        xb, yb = next(data)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            with pytest.raises(RuntimeError, match="transient"):
                opt.step(_flaky(new_batch_each_call, 2))
        for _ in range(3):
            opt.step(new_batch_each_call)
    assert sum("does not replay" in str(w.message) for w in seen) == 1


@pytest.mark.parametrize("make", [ArmijoLineSearch, lambda b: EdgeOfStability(b, sharpness=1)],
                         ids=["armijo", "eos"])
def test_retried_steps_raise_no_false_clip_alarm(make):
    """Each attempt at one batch fed the same gradient norm to the clip watch: after 3 attempts it warned of a
    gradient clip inside the closure that does not exist, and watched no more."""
    torch.manual_seed(0)
    xs, ys = [torch.randn(16, 6) for _ in range(6)], [torch.randint(0, 3, (16,)) for _ in range(6)]
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = make(torch.optim.Adam(model.parameters(), lr=1.0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for x, y in zip(xs, ys):
            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            for _ in range(2):
                with pytest.raises(RuntimeError, match="transient"):
                    opt.step(_flaky(closure, 2))
            opt.step(closure)
    assert not [w for w in seen if "clip" in str(w.message)]
    assert not opt._clip_warned


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_sigma_schedule_not_finite_gives_lr_zero(bad):
    """The core's guard (both backends): a schedule's NaN or inf at a step is no rate there, as a non-positive
    one, and the averages are as if that step had not been judged."""
    def rates(sched):
        torch.manual_seed(0)
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0), sigma=sched)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        out = []
        for _ in range(4):
            opt.step(closure)
            out.append(float(opt.stats["lr"]))
        return out
    clean, hit = rates(lambda k: 1.0), rates(lambda k: bad if k == 2 else 1.0)
    assert hit[:2] == clean[:2] and hit[2] == 0.0 and hit[3] == pytest.approx(clean[2], rel=1e-9), (hit, clean)
