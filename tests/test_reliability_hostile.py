"""Hostile input, property-tested: NaN/Inf losses and gradients at random closure calls, zero gradients,
ascent directions, zero and negative curvature, scales 1e-30 ... 1e30, empty and frozen parameters, mixed
dtypes. Each tuner either refuses at construction with a clear error or skips/guards the step; the
parameters are never NaN afterwards (the loss is poisoned only at some calls, never at all of them).

The module counts the bad-input cases it tries and survives and prints the tally at the end
(``hostile input: N cases tried, M survived``).
"""
from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    line = (f"hostile input: {TALLY['tried']} cases tried, {TALLY['survived']} survived "
            f"({', '.join(f'{k}={v}' for k, v in sorted(TALLY.items()) if k not in ('tried', 'survived'))})")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line("\n" + line)
    else:
        print(line)


def _case(kind):
    TALLY["tried"] += 1
    TALLY[kind] += 1


def _survived():
    TALLY["survived"] += 1


FAULTS = ("none", "nan_loss", "inf_loss", "nan_grad", "inf_grad", "zero_grad", "negate")
TUNERS = ("cdat_fd", "cdat_secant", "greedy", "armijo", "polyak", "eos")
BASES = ("sgd", "momentum", "adam")


def make_tuner(name, base, params):
    from curvopt import SharpnessConfig
    from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

    b = {"sgd": lambda: torch.optim.SGD(params, lr=1.0),
         "momentum": lambda: torch.optim.SGD(params, lr=1.0, momentum=0.9, nesterov=True),
         "adam": lambda: torch.optim.Adam(params, lr=0.1)}[base]()
    if name == "cdat_fd":
        return CDAT(b, sigma=2.0, ema=0.9, curvature="fd", sharpness=SharpnessConfig(every=3, first_iters=10))
    if name == "cdat_secant":
        return CDAT(b, sigma=1.0, ema=0.5, curvature="secant")
    if name == "greedy":
        return QuadraticGreedy(b, curvature="fd")
    if name == "armijo":
        # the core's ArmijoRule restarts every search from init_lr after a failed one: its 8 trials must reach
        # the small rates Nesterov momentum at lr 1 needs (2 * 0.5^7), or it never accepts (0.8^7 does not)
        return ArmijoLineSearch(b, c=0.5, max_trials=8)
    if name == "polyak":
        return PolyakStep(b, lr_max=10.0)
    return EdgeOfStability(b, sigma=0.9, sharpness=SharpnessConfig(every=2, first_iters=10, iters=3))


class Problem:
    """``f(w) = scale * sum(a_i w_i^2 + 0.1 w_i^4)``: ``a_i`` of any sign (zero and negative curvature), with
    faults injected at chosen closure calls (the main call or a probe)."""

    def __init__(self, a, scale, dtype, faults):
        self.a = torch.tensor(a, dtype=dtype)
        self.scale = scale
        self.faults = faults  # closure call index -> fault
        self.call = 0
        # per closure call: (loss and gradient finite, and moreover ||g||^2 finite)
        self.finite: list[tuple[bool, bool]] = []

    def closure_for(self, opt, params):
        def closure():
            fault = self.faults.get(self.call, "none")
            self.call += 1
            opt.zero_grad()
            w = torch.cat([p.reshape(-1) for p in params])
            a = self.a[: w.numel()].to(w.dtype)
            loss = self.scale * (a * w ** 2 + 0.1 * w ** 4).sum()
            if fault == "negate":
                loss = -loss
            if fault == "nan_loss":
                loss = loss * float("nan")
            if fault == "inf_loss":
                loss = loss + float("inf")
            loss.backward()
            for p in params:
                if p.grad is None:
                    continue
                if fault == "nan_grad":
                    p.grad.view(-1)[0] = float("nan")
                elif fault == "inf_grad":
                    p.grad.view(-1)[-1] = -float("inf")
                elif fault == "zero_grad":
                    p.grad.zero_()
            grads = [p.grad for p in params if p.grad is not None]
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
            # a finite gradient whose squared norm overflows (|w| ~ 1e8 on the quartic in float32) makes -g^T u
            # non-finite when u = -g (the tuner must skip); behind Adam or momentum u is not -g and g^T u can
            # stay finite (the tuner may take the step)
            self.finite.append((finite, finite and bool(torch.isfinite(
                sum((g.to(torch.promote_types(g.dtype, torch.float32)) ** 2).sum() for g in grads)))))
            return loss
        return closure


def _all_finite(params):
    return all(bool(torch.isfinite(p).all()) for p in params)


RANDOM_FAULTS = dict(
    tuner=st.sampled_from(TUNERS),
    base=st.sampled_from(BASES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    log_scale=st.sampled_from([-30, -10, -3, 0, 3, 10, 30]),
    a=st.lists(st.sampled_from([-1.0, -0.1, 0.0, 0.5, 1.0, 3.0]), min_size=4, max_size=4),
    faults=st.dictionaries(st.integers(0, 40), st.sampled_from(FAULTS[1:]), max_size=8),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_FAULTS)
def test_random_faults_never_leave_nan_parameters(tuner, base, dtype, log_scale, a, faults):
    random_faults(tuner, base, dtype, log_scale, a, faults)


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_FAULTS)
def test_random_faults_never_leave_nan_parameters_many(tuner, base, dtype, log_scale, a, faults):
    random_faults(tuner, base, dtype, log_scale, a, faults)


def random_faults(tuner, base, dtype, log_scale, a, faults):
    _case("random_faults")
    for f in faults.values():
        TALLY["fault:" + f] += 1
    w = nn.Parameter(torch.tensor([1.0, -0.5], dtype=dtype))
    v = nn.Parameter(torch.tensor([[0.3, 2.0]], dtype=dtype))
    params = [w, v]
    scale = 10.0 ** log_scale
    if dtype == torch.float32 and abs(log_scale) >= 30:
        scale = 10.0 ** math.copysign(15, log_scale)  # 1e30 squared overflows float32 in the loss itself
    prob = Problem(a, scale, dtype, faults)
    opt = make_tuner(tuner, base, params)
    closure = prob.closure_for(opt, params)
    must_skip = may_skip = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(8):
            first_call, skipped_before = prob.call, int(opt.stats["skipped"])
            opt.step(closure)
            # the main call's loss can be non-finite by injection, or because an earlier probe lied (a negated
            # trial loss accepted a huge step whose loss overflows): either way the step must be skipped
            finite, norm_finite = prob.finite[first_call]
            must_skip, may_skip = must_skip + (not finite), may_skip + (not norm_finite)
            assert _all_finite(params), (tuner, base, faults, [p.detach() for p in params])
            lr = float(opt.stats["lr"])
            if int(opt.stats["skipped"]) > skipped_before:
                assert math.isnan(lr) and not norm_finite  # a skipped step reports no learning rate
            else:
                assert finite and math.isfinite(lr) and lr >= 0, (tuner, lr)
    assert must_skip <= opt.stats["skipped"] <= may_skip
    _survived()


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_loss_bad_at_every_step_skips_every_step(tuner, bad):
    """The one case where NaN could be blamed on the user: the loss is poisoned at every call. The tuner
    still never writes NaN into the parameters: every step is skipped."""
    _case("always_bad")
    w = nn.Parameter(torch.tensor([1.0, -0.5], dtype=torch.float64))
    prob = Problem([1.0, 1.0], 1.0, torch.float64, {i: bad for i in range(200)})
    opt = make_tuner(tuner, "adam", [w])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(5):
            opt.step(prob.closure_for(opt, [w]))
    assert opt.stats["skipped"] == 5 and torch.equal(w.detach(), torch.tensor([1.0, -0.5], dtype=torch.float64))
    _survived()


@pytest.mark.parametrize("tuner", TUNERS)
def test_frozen_and_gradient_less_parameters_are_left_alone(tuner):
    _case("frozen")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))  # never in the graph: grad stays None
    model[0].weight.requires_grad_(False)  # frozen
    frozen0 = model[0].weight.detach().clone()
    opt = make_tuner(tuner, "momentum", list(model.parameters()) + [unused])
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    first = float(closure().detach())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(6):
            opt.step(closure)
    assert torch.equal(model[0].weight.detach(), frozen0) and torch.equal(unused.detach(), torch.ones(2,
                                                                                                   dtype=torch.float64))
    assert _all_finite(model.parameters())
    if tuner not in ("eos", "polyak"):  # EoS's sigma * 2 / lambda and Polyak's step with f* = 0 below the
        # attainable loss may overshoot by design; the others must decrease the loss
        assert float(closure().detach()) < first
    _survived()


def test_empty_and_all_frozen_parameter_lists_are_refused_at_construction():
    from curvopt.torch import CDAT, hessian_top_eigenvalue

    _case("empty_params")
    with pytest.raises(ValueError, match="empty"):
        CDAT(torch.optim.SGD([], lr=1.0))
    with pytest.raises(ValueError, match="empty"):
        hessian_top_eigenvalue(lambda: torch.zeros(()), [])
    _survived()
    _case("all_frozen")
    w = nn.Parameter(torch.ones(3), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad"):
        CDAT(torch.optim.SGD([w], lr=1.0))
    _survived()


def test_closure_that_never_calls_backward_is_a_clear_error():
    from curvopt.torch import PolyakStep

    _case("no_backward")
    w = nn.Parameter(torch.ones(3))
    opt = PolyakStep(torch.optim.SGD([w], lr=1.0))
    with pytest.raises(RuntimeError, match="backward"):
        opt.step(lambda: (w ** 2).sum())
    _survived()


@pytest.mark.parametrize("tuner", TUNERS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                    (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_train_like_the_uniform_run(tuner, dtypes):
    """Parameters of different dtypes in one tuner: the accumulators use the widest float (at least float32)
    and the finite-difference step the least precise dtype, so the run tracks the all-float64 run."""
    _case("mixed_dtypes")

    def run(dts):
        a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=dts[0]))
        b = nn.Parameter(torch.tensor([0.5, 3.0], dtype=dts[1]))
        opt = make_tuner(tuner, "sgd", [a, b])

        def closure():
            opt.zero_grad()
            loss = (a.double() ** 2).sum() + 3 * (b.double() ** 2).sum() + 0.1 * (b.double() ** 4).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(6):
                opt.step(closure)
        acc = {k: v.dtype for k, v in opt.stats.items() if isinstance(v, torch.Tensor)}
        return float(closure().detach()), acc, [a, b]

    ref, _, _ = run((torch.float64, torch.float64))
    got, acc, params = run(dtypes)
    assert _all_finite(params)
    assert all(d in (torch.float32, torch.float64) for d in acc.values()), acc
    assert got <= max(2 * ref, ref + 1e-2), (got, ref)
    _survived()


# ------------------------------------------------------------------------------------------------- JAX
JAX_TUNERS = ("cdat_exact", "cdat_fd", "cdat_secant", "polyak", "armijo", "eos")


@pytest.fixture(scope="module")
def jax_steps():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from curvopt.optax import armijo, cdat, edge_of_stability, polyak

    makers = {
        "cdat_exact": lambda: cdat(optax.scale_by_adam(), sigma=2.0, ema=0.9, curvature="exact"),
        "cdat_fd": lambda: cdat(optax.trace(0.9), curvature="fd"),
        "cdat_secant": lambda: cdat(optax.identity(), curvature="secant"),
        "polyak": lambda: polyak(optax.scale_by_adam(), lr_max=10.0),
        "armijo": lambda: armijo(optax.identity()),
        "eos": lambda: edge_of_stability(optax.identity(), sigma=0.9, sharpness=2),
    }

    def loss_fn(w, a, scale, poison):
        return scale * jnp.sum(a * w ** 2 + 0.1 * w ** 4) * poison

    out = {}
    for name, make in makers.items():
        opt = make()

        def step(w, state, a, scale, poison, opt=opt):
            value, grad = jax.value_and_grad(loss_fn)(w, a, scale, poison)
            updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss_fn, a=a,
                                        scale=scale, poison=poison)
            return optax.apply_updates(w, updates), state

        out[name] = (opt, jax.jit(step))
    vg = jax.jit(jax.value_and_grad(loss_fn))

    def skip_bounds(w, *args):
        """``(must skip, may skip)`` at ``w``: a non-finite value or gradient must be skipped; a finite gradient
        whose squared norm overflows float32 may be (``g^T u`` overflows with ``u = -g``; behind Adam or
        momentum ``u`` is not ``-g`` and ``g^T u`` can stay finite, so the step is rightly taken)."""
        value, grad = vg(w, *args)
        must = not (bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad))))
        return must, must or not bool(jnp.isfinite(jnp.sum(grad * grad)))

    out["skip_bounds"] = skip_bounds
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    tuner=st.sampled_from(JAX_TUNERS),
    log_scale=st.sampled_from([-30, -10, 0, 10, 15]),
    a=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 3.0]), min_size=3, max_size=3),
    poison=st.lists(st.sampled_from([1.0, 1.0, 1.0, float("nan"), float("inf"), 0.0, -1.0]), min_size=6,
                    max_size=6),
)
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_jax_random_faults_never_leave_nan_parameters(jax_steps, tuner, log_scale, a, poison):
    """Poison multiplies the loss: NaN/Inf (skipped), 0 (zero gradient), -1 (negated: ascent/negative
    curvature). float32 throughout."""
    import jax.numpy as jnp

    _case("jax_random_faults")
    opt, step = jax_steps[tuner]
    w = jnp.asarray([1.0, -0.5, 2.0], jnp.float32)
    state = opt.init(w)
    must, may = 0, 0
    for p in poison:
        args = (jnp.asarray(a, jnp.float32), jnp.float32(10.0 ** log_scale), jnp.float32(p))
        # skipped: a poisoned loss, or one that overflows after a step taken on a negated (lying) loss
        must_skip, may_skip = jax_steps["skip_bounds"](w, *args)
        must, may = must + must_skip, may + may_skip
        w, state = step(w, state, *args)
        assert bool(jnp.all(jnp.isfinite(w))), (tuner, log_scale, a, poison, w)
        assert state[1].stats.lr.dtype == jnp.float32
    assert must <= int(state[1].stats.skipped) <= may
    _survived()
