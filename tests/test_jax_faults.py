"""Nothing lost (issue 10, Optax side): NaN/Inf values, gradients and ``value_fn`` outputs injected at random
steps, for every tuner, oracle (fd, exact, secant with ``value_fn``, closure-free secant) and base (SGD, heavy
ball, Adam), through the recommended composition (the ``<tuner>(base, ...)`` conveniences).

After every step: the parameters are finite; a step whose value, gradient or base direction is not finite is
skipped (parameters bit-equal to before, the base's state untouched, ``skipped + 1``); a poisoned probe
(``value_fn`` only) never moves the parameters to a non-finite point and CDAT forgets it; training continues
afterwards; and the state saved at a random step (pickled, and flattened to numpy leaves and rebuilt)
continues bit-identically. The module prints ``jax faults: N attacks tried, M survived``.

Plus the single cases: the README's plain chain ``optax.chain(optax.scale_by_adam(), scale_by_cdat())`` with
one NaN gradient, a ``value_fn`` of shape ``(1,)``, a ``sigma`` schedule crossing 0.
"""
from __future__ import annotations

import math
import pickle
import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curvopt.optax import (armijo, cdat, edge_of_stability, polyak, quadratic_greedy, scale_by_armijo,
                           scale_by_cdat, scale_by_edge_of_stability, scale_by_polyak, scale_by_quadratic_greedy,
                           stats)

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    """Print the tally past pytest's capture."""
    yield
    kinds = {k: v for k, v in sorted(TALLY.items()) if k not in ("tried", "survived")}
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\njax faults: {TALLY['tried']} attacks tried, {TALLY['survived']} survived {kinds}")


def loss(p, a):
    w = p["w"]
    return jnp.sum(a * (w - 1.0) ** 2 + 0.1 * w ** 4) + p["b"] ** 2


P0 = {"w": jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32), "b": jnp.asarray(0.7, jnp.float32)}
A = jnp.asarray([1.0, 3.0, 0.5, 2.0], jnp.float32)
BASES = {"sgd": optax.identity, "heavy_ball": lambda: optax.trace(0.9), "adam": optax.scale_by_adam}
# name -> (factory(base), base, closure-free: the update gets only the gradient, as TrainState.apply_gradients)
CONFIGS = {
    "cdat_fd_adam": (lambda b: cdat(b, curvature="fd"), "adam", False),
    "cdat_exact_heavy_ball": (lambda b: cdat(b, curvature="exact"), "heavy_ball", False),
    "cdat_secant_sgd": (lambda b: cdat(b, curvature="secant"), "sgd", False),
    "cdat_free_adam": (lambda b: cdat(b), "adam", True),
    "greedy_fd_sgd": (lambda b: quadratic_greedy(b, lr_max=10.0), "sgd", False),
    "greedy_free_heavy_ball": (lambda b: quadratic_greedy(b, lr_max=10.0), "heavy_ball", True),
    "polyak_adam": (lambda b: polyak(b, lr_max=1.0), "adam", False),
    "armijo_heavy_ball": (lambda b: armijo(b), "heavy_ball", False),
    # every step: a failed estimate holds the last rate (documented), so with sharpness=2 a run of poisoned
    # estimates leaves a stale rate for 2+ steps while the quartic's curvature moves, and GD diverges
    "eos_sgd": (lambda b: edge_of_stability(b, sigma=0.9, sharpness=1), "sgd", False),
    "cdat_sharp_adam": (lambda b: cdat(b, sharpness=2, base_method="adam"), "adam", False),
}
FAULTS = ("none", "none", "none", "grad_nan", "grad_inf", "value_nan", "value_inf", "fn_nan", "fn_inf")
_STEPS: dict = {}


def _stepper(name):
    """(opt, jitted step) per config, compiled once per session."""
    if name not in _STEPS:
        make, base, free = CONFIGS[name]
        opt = make(BASES[base]())

        def step(p, s, g_poison, v_poison, f_poison):
            v, g = jax.value_and_grad(loss)(p, A)
            g = jax.tree.map(lambda x: x * g_poison, g)
            if free:
                up, s = opt.update(g, s, p)
            else:
                up, s = opt.update(g, s, p, value=v + v_poison, grad=g,
                                   value_fn=lambda q, a, f_poison: loss(q, a) * f_poison, a=A, f_poison=f_poison)
            return optax.apply_updates(p, up), s

        _STEPS[name] = (opt, jax.jit(step))
    return _STEPS[name]


def _poisons(fault):
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    bad = jnp.float32(jnp.nan if fault.endswith("nan") else jnp.inf)
    return (bad if fault.startswith("grad") else one, bad if fault.startswith("value") else zero,
            bad if fault.startswith("fn") else one)


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) and \
        jax.tree.structure(a) == jax.tree.structure(b)


def _roundtrip(tree):
    """Through pickle and through flatten -> numpy leaves -> unflatten (as a checkpoint library would)."""
    host = pickle.loads(pickle.dumps(jax.device_get(tree)))
    leaves, treedef = jax.tree.flatten(host)
    return jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x)) for x in leaves])


def _attack(name, faults, save_at):
    opt, step = _stepper(name)
    _, _, free = CONFIGS[name]
    p, s = P0, opt.init(P0)
    saved, tail = None, []
    for i, fault in enumerate(faults):
        TALLY["tried"] += 1
        TALLY[fault] += 1
        if i == save_at:
            saved = _roundtrip((p, s))
        if i >= save_at:
            tail.append(fault)
        new_p, new_s = step(p, s, *_poisons(fault))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_p)), (name, i, fault)
        skip = fault.startswith("grad") or (fault.startswith("value") and not free)
        if skip:
            assert _equal(new_p, p), (name, i, fault)                      # parameters bit-equal
            assert _equal(new_s[0], s[0]), (name, i, fault)                # base state untouched
            assert int(new_s[1].stats.skipped) == int(s[1].stats.skipped) + 1
            for field in new_s[1]._fields:
                if field != "stats":
                    assert _equal(getattr(new_s[1], field), getattr(s[1], field)), (name, i, fault, field)
        else:
            assert int(new_s[1].stats.skipped) == int(s[1].stats.skipped), (name, i, fault)
            lr = float(new_s[1].stats.lr)
            assert math.isfinite(lr) and lr >= 0, (name, i, fault, lr)
            if fault.startswith("fn") and name in ("cdat_fd_adam", "cdat_exact_heavy_ball", "greedy_fd_sgd"):
                assert lr == 0.0 and _equal(new_s[1].rule, s[1].rule), (name, i, fault)  # the probe is forgotten
        p, s = new_p, new_s
        TALLY["survived"] += 1
    # training continues: clean steps take steps (momentum may raise the loss for a while: not checked). A
    # heavy-ball momentum left pointing uphill gives lr 0 (the direction is an ascent, counted in ascent_steps)
    # until the gradients it accumulates turn it, which can take more than 6 steps (Armijo: 7 seen): the
    # clean steps go on past 6 only while every one of them is such an ascent step, at most 30
    TALLY["tried"] += 1
    TALLY["continues"] += 1
    before, lrs = p, []
    while len(lrs) < 6 or (max(lrs) == 0 and len(lrs) < 30):
        ascents = int(s[1].ascent_steps)
        p, s = step(p, s, *_poisons("none"))
        lrs.append(float(stats(s)["lr"]))
        assert len(lrs) <= 6 or lrs[-1] > 0 or int(s[1].ascent_steps) == ascents + 1, (name, faults, lrs)
    assert max(lrs) > 0 and not _equal(p, before) and math.isfinite(float(loss(p, A))), (name, faults, lrs)
    TALLY["survived"] += 1
    # the state saved at save_at continues bit-identically
    TALLY["tried"] += 1
    TALLY["roundtrip"] += 1
    q, t = saved
    for fault in tail:
        q, t = step(q, t, *_poisons(fault))
    for _ in lrs:
        q, t = step(q, t, *_poisons("none"))
    assert _equal(q, p) and _equal(t, s), name
    TALLY["survived"] += 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CONFIGS)), faults=st.lists(st.sampled_from(FAULTS), min_size=3, max_size=7),
       save_at=st.integers(0, 2))
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_random_faults_every_tuner_oracle_base(name, faults, save_at):
    _attack(name, faults, save_at)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_fault_once_per_config(name):
    """Each fault at least once for each config (the random test samples)."""
    _attack(name, ["none", "grad_nan", "fn_nan", "value_inf", "grad_inf", "fn_inf", "value_nan", "none"], 1)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(CONFIGS)), faults=st.lists(st.sampled_from(FAULTS), min_size=3, max_size=15),
       save_at=st.integers(0, 2))
def test_random_faults_long(name, faults, save_at):
    _attack(name, faults, save_at)


# ------------------------------------------------------------------------------------------- single cases
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_plain_readme_chain_one_nan_gradient():
    """The README chain without the convenience: the NaN gradient reaches Adam's moments (a plain chain cannot
    stop that), but the tuner never writes NaN into the parameters: it skips every later step. The
    convenience ``cdat(optax.scale_by_adam())`` keeps Adam's state on the skip and training continues."""
    results = {}
    for kind, opt in (("plain", optax.chain(optax.scale_by_adam(), scale_by_cdat())),
                      ("convenience", cdat(optax.scale_by_adam()))):
        p, s = P0, opt.init(P0)

        @jax.jit
        def step(p, s, g_poison):
            v, g = jax.value_and_grad(loss)(p, A)
            g = jax.tree.map(lambda x: x * g_poison, g)
            up, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss, a=A)
            return optax.apply_updates(p, up), s

        lrs = []
        for i in range(8):
            p, s = step(p, s, jnp.float32(jnp.nan if i == 2 else 1.0))
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p)), (kind, i)
            lrs.append(float(stats(s)["lr"]))
        results[kind] = (lrs, int(stats(s)["skipped"]), bool(jnp.all(jnp.isfinite(s[0].mu["w"]))))
    plain, conv = results["plain"], results["convenience"]
    assert plain[1] == 6 and not plain[2]  # moments poisoned: every step from the NaN one on is skipped
    assert conv[1] == 1 and conv[2] and all(lr > 0 for lr in conv[0][3:])  # one skip, then training goes on


@pytest.mark.parametrize("make", [lambda: scale_by_cdat(curvature="fd"), lambda: scale_by_cdat(curvature="exact"),
                                  lambda: scale_by_quadratic_greedy(), lambda: scale_by_polyak(),
                                  lambda: scale_by_armijo(), lambda: scale_by_edge_of_stability(sharpness=2)])
def test_value_fn_and_value_of_shape_1_keep_state_shapes(make):
    opt = optax.chain(optax.identity(), make())
    s0 = opt.init(P0)
    sig = jax.tree.map(lambda x: (x.shape, x.dtype), s0)
    f1 = lambda q, a: jnp.reshape(loss(q, a), (1,))  # noqa: E731

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p, A)
        up, s = opt.update(g, s, p, value=jnp.reshape(v, (1,)), grad=g, value_fn=f1, a=A)
        return optax.apply_updates(p, up), s

    p, s = P0, s0
    for _ in range(3):
        p, s = step(p, s)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), s) == sig
    assert float(stats(s)["lr"]) > 0


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_sigma_schedule_crossing_zero_gives_lr_zero():
    """inject_hyperparams evaluates the schedule and hands a (traced) number; the core's guard clips the
    negative lr to 0. A callable sigma given directly is evaluated by the rule at the tuner's step count."""
    sched = optax.linear_schedule(1.0, -1.0, 4)  # 1, 0.5, 0, -0.5, -1, -1
    for opt in (optax.chain(optax.identity(), optax.inject_hyperparams(scale_by_cdat)(sigma=sched,
                                                                                      curvature="fd")),
                optax.chain(optax.identity(), scale_by_cdat(sigma=sched, curvature="fd"))):
        p, s = P0, opt.init(P0)

        @jax.jit
        def step(p, s):
            v, g = jax.value_and_grad(loss)(p, A)
            up, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss, a=A)
            return optax.apply_updates(p, up), s

        lrs = []
        for _ in range(6):
            p, s = step(p, s)
            lrs.append(float(stats(s)["lr"]))
        assert lrs[0] > 0 and lrs[1] > 0 and lrs[2:] == [0.0] * 4, lrs
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


@pytest.mark.slow  # ~15 s each: the default suite was at 10:53 of its ~10 minutes
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_sigma_schedule_not_finite_gives_lr_zero_and_is_forgotten(bad):
    """A schedule's NaN took the step at the growth cap (1.5x the clean run's rate), an inf one near it, with
    no word; now the guard treats them as a non-positive sigma: rate 0, the averages as before, the next step
    as if it had not happened."""
    def run(sched):
        for opt in (optax.chain(optax.identity(), optax.inject_hyperparams(scale_by_cdat)(sigma=sched,
                                                                                          curvature="fd")),
                    optax.chain(optax.identity(), scale_by_cdat(sigma=sched, curvature="fd"))):
            p, s = P0, opt.init(P0)
            lrs = []
            for _ in range(5):
                v, g = jax.value_and_grad(loss)(p, A)
                up, s = jax.jit(lambda p, s, v, g: opt.update(g, s, p, value=v, grad=g, value_fn=loss, a=A))(
                    p, s, v, g)
                p = optax.apply_updates(p, up)
                lrs.append(float(stats(s)["lr"]))
            yield lrs
    for lrs, clean in zip(run(lambda k: jnp.where(k == 2, bad, 1.0)), run(lambda k: 1.0)):
        # after the rate-0 step the parameters and the averages are the clean run's before its third step
        assert lrs[:2] == clean[:2] and lrs[2] == 0.0 and lrs[3] == pytest.approx(clean[2], rel=1e-6), (lrs, clean)


def test_grad_of_another_shape_and_a_loss_not_real_are_refused():
    """A transposed leaf of the same size was taken silently (numerator 2.54 for 4.05), one of another size
    failed inside dot_general; a complex or boolean loss was taken (its imaginary part dropped)."""
    opt = cdat(optax.identity())
    s = opt.init(P0)
    v, g = jax.value_and_grad(loss)(P0, A)
    bad = dict(g, w=g["w"].reshape(2, 2))
    with pytest.raises(ValueError, match=r"grad\['w'\] has shape \(2, 2\), the parameter \(4,\)"):
        opt.update(bad, s, P0, value=v, grad=bad, value_fn=loss, a=A)
    other = polyak(optax.identity())
    for value in (v + 5j, True):
        with pytest.raises(ValueError, match="the loss must be a real number"):
            other.update(g, other.init(P0), P0, value=value, grad=g)
    with pytest.raises(ValueError, match="the loss must be a real number"):
        opt.update(g, s, P0, value=v, grad=g, value_fn=lambda q, a: loss(q, a) + 1j, a=A)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_zero_size_leaf_works_and_complex_parameters_are_refused():
    """A zero-size leaf steps; a complex one is refused by name at ``init``, whatever the base."""
    p = dict(P0, empty=jnp.zeros((0, 3), jnp.float32))
    f = lambda q, a: loss({"w": q["w"], "b": q["b"]}, a) + jnp.sum(q["empty"])  # noqa: E731
    for opt in (cdat(optax.scale_by_adam()), cdat(optax.identity(), sharpness=1), armijo(optax.identity())):
        s = opt.init(p)
        v, g = jax.value_and_grad(f)(p, A)
        up, s = jax.jit(lambda s: opt.update(g, s, p, value=v, grad=g, value_fn=f, a=A))(s)
        assert up["empty"].shape == (0, 3) and float(stats(s)["lr"]) > 0
    with pytest.raises(ValueError, match="complex parameters"):
        scale_by_cdat().init({"w": jnp.ones(3, jnp.complex64)})
    # behind a declared Adam too: the betas check ran first and failed with "float() argument must be ... not
    # 'complex'"; an integer leaf drew a false "b2=0" warning before its refusal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="complex parameters"):
            cdat(optax.scale_by_adam(), base_method="adam").init({"w": jnp.ones(3, jnp.complex64)})
        with pytest.raises(ValueError, match="dtype bool"):
            cdat(optax.scale_by_adam(), base_method="adam").init({"w": jnp.ones(3), "flag": jnp.array(True)})


def test_integer_leaves_are_refused_and_python_floats_accepted():
    """A counter kept in the parameters is refused by name at ``init`` (it failed inside ``update`` with an
    unrelated error); a Python-float leaf works like a 0-d array (it raised ``AttributeError``)."""
    for extra in (jnp.array(0, jnp.int32), jnp.array(True)):
        with pytest.raises(ValueError, match="dtype (int32|bool)"):
            cdat(optax.scale_by_adam()).init(dict(P0, count=extra))
    p = {"w": 1.0, "v": jnp.ones(2)}
    f = lambda q: 2.5 * q["w"] ** 2 + jnp.sum(q["v"] ** 2)  # noqa: E731
    opt = quadratic_greedy(optax.identity())
    s = opt.init(p)
    v, g = jax.value_and_grad(f)(p)
    up, s = opt.update(g, s, p, value=v, value_fn=f)
    gg = g["w"] ** 2 + jnp.sum(g["v"] ** 2)
    expected = gg / (5 * g["w"] ** 2 + 2 * jnp.sum(g["v"] ** 2))  # g^T g / g^T H g, H = diag(5, 2, 2)
    assert float(stats(s)["lr"]) == pytest.approx(float(expected), rel=1e-3)


def test_armijo_heavy_ball_resumes_after_its_momentum_turns():
    """The case the long random test found: after runs of poisoned ``value_fn`` probes, Armijo behind heavy ball
    is left with a momentum pointing uphill; the first 6 clean steps take lr 0 (each an ascent step) while the
    momentum turns, the 7th trains again. Nothing is lost; it only takes longer than 6 steps."""
    _attack("armijo_heavy_ball", ["none", "fn_nan", "fn_nan", "none", "none", "fn_nan", "fn_nan", "none", "none"], 0)


@pytest.mark.parametrize("make", [lambda: cdat(optax.identity()), lambda: edge_of_stability(optax.identity()),
                                  lambda: armijo(optax.identity())])
def test_a_value_fn_that_is_not_callable_is_named(make):
    """The loss's value handed as value_fn= (a common slip) is said as such by every tuner, not a raw
    'object is not callable' from inside the probe."""
    params = {"w": jnp.ones(3)}
    tx = make()
    with pytest.raises(TypeError, match="value_fn must be callable"):
        tx.update(params, tx.init(params), params, value=jnp.float32(1.0), value_fn=jnp.float32(1.0))


def test_an_injected_sharpness_period_of_zero_keeps_edge_of_stability_estimating():
    """The edge-of-stability rule cannot run without the sharpness: a period injected by inject_hyperparams that
    is set to 0 mid-run is refused outside jit (as sharpness=0 is at construction) and, inside jit, where nothing
    can be refused, estimates every step (it stopped estimating, and the rate froze, silently)."""
    A = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
    f = lambda p: 0.5 * p["w"] @ A @ p["w"]  # noqa: E731
    tx = optax.inject_hyperparams(edge_of_stability)(optax.identity(), sharpness=4)
    params = {"w": jnp.array([1.0, -1.0, 0.5])}
    state = tx.init(params)
    step = jax.jit(lambda g, state, params, v: tx.update(g, state, params, value=v, value_fn=f))
    calls = []
    for i in range(8):
        if i == 3:
            state.hyperparams["sharpness"] = jnp.zeros_like(state.hyperparams["sharpness"])
            with pytest.raises(ValueError, match="needs the online sharpness"):
                tx.update(params, state, params, value=f(params), value_fn=f)
        v, g = jax.value_and_grad(f)(params)
        u, state = step(g, state, params, v)
        params = optax.apply_updates(params, u)
        calls.append(int(stats(state)["closure_calls"]))
    assert calls[3:] == [2] * 5  # the step's own gradient is given: 1 call + 1 power-iteration product


@pytest.mark.slow  # ~11 s
def test_an_injected_sharpness_period_behind_adam_needs_static_args():
    """Behind Adam the edge rule anchors its growth cap at step ``sharpness + 1``; ``inject_hyperparams`` made an
    int ``sharpness=2`` a traced array and the rule took the default period's anchor in its place (rates 2.5x the
    plain transform's, silently). Now the first update says what to pass; with ``static_args`` the rates are the
    plain transform's."""
    A = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
    f = lambda p: 0.5 * p["w"] @ A @ p["w"]  # noqa: E731
    kw = dict(base_method="adam", sharpness=2, sigma=0.25)

    def lrs(tx, steps=6):
        params = {"w": jnp.array([1.0, -1.0, 0.5])}
        state, out = tx.init(params), []
        for _ in range(steps):
            v, g = jax.value_and_grad(f)(params)
            u, state = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v, value_fn=f))(g, state, params, v)
            params = optax.apply_updates(params, u)
            out.append(float(stats(state)["lr"]))
        return out
    with pytest.raises(ValueError, match=r"static_args=\('sharpness',\)"):
        lrs(optax.inject_hyperparams(edge_of_stability, static_args=("base_method",))(optax.scale_by_adam(), **kw))
    injected = optax.inject_hyperparams(edge_of_stability, static_args=("base_method", "sharpness"))
    assert lrs(injected(optax.scale_by_adam(), **kw)) == pytest.approx(
        lrs(edge_of_stability(optax.scale_by_adam(), **kw)), rel=1e-6)


def test_stats_say_when_no_step_was_taken():
    """A base whose update is NaN from the start (here: a NaN gradient every step) has every step skipped and the
    parameters never move; stats() says so (PyTorch warns at each skipped step), and says nothing once a step
    was taken."""
    params = {"w": jnp.ones(3)}
    tx = cdat(optax.identity())
    state = tx.init(params)
    bad = {"w": jnp.full(3, jnp.nan)}
    for _ in range(3):
        _, state = tx.update(bad, state, params)
    with pytest.warns(RuntimeWarning, match="none of the 3 steps so far was taken"):
        stats(state)
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats(state)


def test_stats_say_when_the_last_step_was_skipped():
    """A skip after taken steps: stats() says so while the last step is a skipped one (PyTorch warns at each), with
    the count, and names the bare chain whose base state the NaN poisoned (every later step skipped, which
    stats() was silent about: a field test); after a taken step it says nothing. Kills: only the all-skipped
    case warned."""
    params = {"w": jnp.ones(3)}
    tx = optax.chain(optax.scale_by_adam(), scale_by_cdat())
    state = tx.init(params)
    for g in (jnp.ones(3), jnp.full(3, jnp.nan), jnp.ones(3)):  # Adam's moments NaN from the 2nd step on
        _, state = tx.update({"w": g}, state, params, value=jnp.float32(1.0), grad={"w": g})
    assert int(stats(state)["skipped"]) == 2
    with pytest.warns(RuntimeWarning, match=r"the last step was skipped \(2 of the 3 steps so far\).*bare chain"):
        stats(state)
    tx = cdat(optax.scale_by_adam())  # keeps Adam's state on the skip: the next step is taken
    state = tx.init(params)
    for g in (jnp.ones(3), jnp.full(3, jnp.nan)):
        u, state = tx.update({"w": g}, state, params, value=jnp.float32(1.0))
        params = optax.apply_updates(params, u)
    with pytest.warns(RuntimeWarning, match=r"the last step was skipped \(1 of the 2"):
        stats(state)
    _, state = tx.update({"w": jnp.ones(3)}, state, params, value=jnp.float32(1.0))
    assert int(stats(state)["skipped"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats(state)


def test_stats_name_a_zero_gradient_among_the_causes_of_a_skip():
    """A closure-free step whose gradient is zero in every entry is skipped, as in PyTorch: stats() named only a
    non-finite loss, gradient or direction (with a poisoned base state that did not happen; a field test, every
    token masked under a summed loss)."""
    params = {"w": jnp.ones(3)}
    tx = cdat(optax.identity())
    state = tx.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in (jnp.arange(1.0, 4.0), jnp.arange(1.0, 4.0), jnp.zeros(3)):
            u, state = tx.update({"w": g}, state, params)
            params = optax.apply_updates(params, u)
    assert int(stats(state)["skipped"]) == 1
    with pytest.warns(RuntimeWarning, match=r"the last step was skipped.*zero in every entry.*If it was not finite"):
        stats(state)


def _dropout_problem():
    """A float64 linear least squares whose forward pass drops half the features with a key, as a dropout layer
    does: ``value_fn`` must get the key the gradient was computed with."""
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(64, 8))), jnp.asarray(rng.normal(size=64))

    def loss(w, x, y, key):
        keep = jax.random.bernoulli(key, 0.5, x.shape)
        return jnp.mean((jnp.where(keep, 2 * x, 0.0) @ w - y) ** 2)

    return loss, x, y


@pytest.mark.parametrize("tuner", ["greedy", "cdat"])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_value_fn_that_draws_other_dropout_masks_is_told(tuner):
    """A ``value_fn`` that does not replay the step's randomness (a fresh key split inside it: a field test's greedy
    rate was 1.4e-6 where 2.07 was right, CDAT's 1e-7, silently) misses the step's quadratic model at the first fd
    probes: ``stats`` warns, with the fix. One that gets the gradient's key does not, and its greedy rate is the
    exact one. Kills: the check removed, or one that fires on a replaying value_fn."""
    with jax.enable_x64(True):
        loss, x, y = _dropout_problem()
        fresh = lambda w, x, y, key: loss(w, x, y, jax.random.split(key)[1])  # noqa: E731
        out = {}
        for name, value_fn in (("same key", loss), ("fresh key", fresh)):
            tx = (quadratic_greedy(optax.identity()) if tuner == "greedy"
                  else cdat(optax.scale_by_adam(), base_method="adam"))
            w = jnp.full(8, 0.3)  # (at w = 0 every mask gives the same loss)
            state = tx.init(w)

            @jax.jit
            def step(w, state, key):
                v, g = jax.value_and_grad(loss)(w, x, y, key)
                u, state = tx.update(g, state, w, value=v, grad=g, value_fn=value_fn, x=x, y=y, key=key)
                return optax.apply_updates(w, u), state

            key = jax.random.key(3)
            g = jax.grad(loss)(w, x, y, key)
            hg = jax.jvp(lambda v: jax.grad(loss)(v, x, y, key), (w,), (g,))[1]
            w, state = step(w, state, key)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lr = float(stats(state)["lr"])
            out[name] = (lr, float(g @ g / (g @ hg)), [str(m.message) for m in caught])
    (lr, exact, said), (lr_bad, _, said_bad) = out["same key"], out["fresh key"]
    assert not [m for m in said if "fd probe point" in m], said
    told = [m for m in said_bad if "value_fn's loss at the fd probe point" in m]
    assert len(told) == 1 and "dropout key" in told[0], said_bad
    if tuner == "greedy":
        assert lr == pytest.approx(exact, rel=1e-6)
        assert lr_bad < lr / 100  # what the warning is about


@pytest.mark.parametrize("scale", [11.0, 13.0, 15.0])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_value_fn_that_replays_is_not_told_near_a_fitted_float32_loss(scale):
    """A fresh tuner on a float32 softmax classifier that already fits its batch (cross-entropy 1e-4-1e-6): the loss
    rounds like its logits, not like itself, and a ``value_fn`` that replays missed the quadratic model by up to 16.8
    allowances (a false-alarm field test); the check warns past :data:`curvopt.config.REPLAY_MISS_OPTAX`. Kills: a
    threshold of 1 allowance."""
    labels = jnp.arange(32) % 10
    x = jnp.eye(32, dtype=jnp.float32) + 0.01 * jax.random.normal(jax.random.key(0), (32, 32))
    w = scale * jax.nn.one_hot(labels, 10, dtype=jnp.float32) + 0.1 * jax.random.normal(jax.random.key(1), (32, 10))
    loss = lambda w, x: optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()  # noqa: E731
    for tx in (quadratic_greedy(optax.identity(), curvature="fd"), cdat(optax.scale_by_adam(), base_method="adam")):
        state, p = tx.init(w), w

        @jax.jit
        def step(p, state):
            v, g = jax.value_and_grad(loss)(p, x)
            u, state = tx.update(g, state, p, value=v, grad=g, value_fn=loss, x=x)
            return optax.apply_updates(p, u), state

        for _ in range(4):
            p, state = step(p, state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats(state)
        assert float(loss(w, x)) < 2e-4
        assert not [m for m in caught if "fd probe point" in str(m.message)]


def test_the_replay_check_judges_only_probes_that_move_the_loss_little():
    """The quadratic model is judged only where the probe's first-order change ``h |g^T u|`` is at most
    :data:`curvopt.config.REPLAY_PROBE_SHARE` of the loss: a probe sized for a bf16 forward pass moved a small
    transformer's loss by 77 % of it and missed the model with a value_fn that replays (a false-alarm field test).
    A small probe that misses is told; a large one is not judged; a value_fn whose loss is unknown is not judged.
    Kills: the share rule removed, or applied to every probe."""
    from jax_backend.oracles import replay_check, replay_init

    def missed(h, probe_loss, value=5.08, numerator=3.9, steps=0):
        memory = replay_check(replay_init(jnp.float32), jnp.float32(value), jnp.float32(numerator), jnp.float32(0.0),
                              (None, jnp.float32(h), jnp.float32(probe_loss)), jnp.int32(steps), jnp.float32)
        return bool(memory.missed)

    assert missed(1e-4, 5.08 + 1.0)  # a tiny probe, the loss 1.0 off: another function
    assert not missed(1e-4, 5.08 - 1e-4 * 3.9)  # on the model
    assert not missed(1.0, 50.0)  # the probe moves the loss by 77 %: not judged
    assert not missed(1e-4, 5.08 + 1.0, value=float("nan"))  # no value: nothing to judge
    assert not missed(1e-4, 5.08 + 1.0, steps=3)  # past the first 3 steps
