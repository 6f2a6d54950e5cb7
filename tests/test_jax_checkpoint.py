"""A restored Optax state is checked against the transformation it is fed to (``jax_backend.tuner.check_state``).

Found in a field test (orbax, flax.serialization, pickle): a state made by another configuration, for parameters of
another dtype or restored without a target reached the update and met an ``AttributeError`` deep inside it, a
``lax.cond`` type error, or ran silently without a part of the tuner (no sharpness estimate, no warning).
"""
from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvopt.optax import cdat, edge_of_stability, polyak, stats


def _problem(dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = jnp.arange(32) % 3
    params = {"w": 0.1 * jax.random.normal(jax.random.key(1), (8, 3)).astype(dtype), "b": jnp.zeros(3, dtype)}

    def loss(p):
        logits = (x @ p["w"].astype(jnp.float32)) + p["b"].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return params, loss


def _update(opt, state, params, loss, with_loss):
    value, grads = jax.value_and_grad(loss)(params)
    kwargs = dict(value=value, value_fn=loss) if with_loss else {}
    return opt.update(grads, state, params, **kwargs)


ADAM = dict(base_method="adam")
MISMATCHES = {  # name -> (the state's maker, the transformation fed it, fed the loss, what the message names)
    "sharpness turned on": (lambda: cdat(optax.scale_by_adam(), **ADAM), lambda: cdat(
        optax.scale_by_adam(), sharpness=2, **ADAM), True, r"state\[1\]\.eigen"),
    "noise correction turned on": (lambda: cdat(optax.scale_by_adam(), noise_correction=False, **ADAM),
                                   lambda: cdat(optax.scale_by_adam(), **ADAM), False, r"state\[1\]\.noise"),
    "another tuner": (lambda: polyak(optax.identity(), lr_max=1.0), lambda: cdat(optax.identity()), True,
                      r"state\[1\]\.rule"),
    "another base": (lambda: cdat(optax.scale_by_adam(), **ADAM), lambda: cdat(optax.scale_by_rms(), **ADAM),
                     False, r"state\[0\]"),
}


@pytest.mark.parametrize("name", sorted(MISMATCHES))
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_state_of_another_configuration_is_refused(name):
    made_by, fed_to, with_loss, where = MISMATCHES[name]
    params, loss = _problem()
    state = made_by().init(params)
    opt = fed_to()
    with pytest.raises(ValueError, match=r"does not fit this transformation \(.*" + where):
        jax.jit(lambda s: _update(opt, s, params, loss, with_loss))(state)
    _update(opt, opt.init(params), params, loss, with_loss)  # its own state runs


@pytest.mark.parametrize("make, with_loss", [(lambda: cdat(optax.scale_by_adam(), **ADAM), False),
                                             (lambda: edge_of_stability(optax.scale_by_adam(), sharpness=2, **ADAM),
                                              True)])
@pytest.mark.slow  # among the default suite's longest (it ran 10:49-11:29 of its ~10 minutes)
def test_a_state_made_for_other_dtypes_is_refused(make, with_loss):
    params32, _ = _problem(jnp.float32)
    params16, loss16 = _problem(jnp.bfloat16)
    opt = make()
    with pytest.raises(ValueError, match=r"is float32, init makes it bfloat16"):
        _update(opt, opt.init(params32), params16, loss16, with_loss)
    _update(opt, opt.init(params16), params16, loss16, with_loss)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_state_restored_without_its_containers_is_refused_and_with_them_resumes():
    params, loss = _problem()
    opt = cdat(optax.scale_by_adam(), **ADAM)
    step = jax.jit(lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(*_update(opt, s, p, loss, True)))
    p, s = params, opt.init(params)
    for _ in range(3):
        p, s = step(p, s)
    raw = flax.serialization.to_state_dict(s)  # what a restore without a target gives: dicts
    with pytest.raises(ValueError, match="does not fit this transformation"):
        step(p, raw)
    restored = flax.serialization.from_state_dict(opt.init(params), jax.tree.map(np.asarray, raw))
    rates = []
    for state in (s, restored):
        q = p
        for _ in range(3):
            q, state = step(q, state)
        rates.append(float(stats(state)["lr"]))
    assert rates[0] == rates[1] > 0


def _three_rates(step, params, states, tuner_of):
    """Each named state's learning rates over three ``step``s from ``params`` (``tuner_of``: the tuner's part of
    the state), and the states they end in."""
    rates, ends = {}, {}
    for name, s in states.items():
        p, rates[name] = params, []
        for _ in range(3):
            p, s = step(p, s)
            rates[name].append(float(tuner_of(s).stats.lr))
        ends[name] = s
    return rates, ends


def test_a_state_made_before_the_replay_check_resumes_without_it():
    """The CDAT/greedy state's ``replay`` field (the first fd probes' check of ``value_fn``) and ``bound`` (the watch
    on ``f_star``) are its last and default to None: a state pickled before they existed (no such fields) loads
    and steps, with the rates of a state that has them, and keeps None (the state's structure does not change
    under ``jit``). Kills: a field placed before others, or required (a pickled old state raised ``TypeError:
    missing ... 'stats'``)."""
    import pickle

    from curvopt.optax import scale_by_quadratic_greedy

    tx = scale_by_quadratic_greedy()
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    loss = lambda p: jnp.sum(jnp.array([3.0, 1.0, 0.2]) * p["w"] ** 2)  # noqa: E731
    state = tx.init(params)
    fields = type(state)._fields[:type(state)._fields.index("replay")]
    old = pickle.loads(pickle.dumps(type(state)(*[getattr(state, f) for f in fields])))
    assert old.replay is None and old.bound is None and state.replay is not None and state.bound is not None

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=v, grad=g, value_fn=loss)
        return optax.apply_updates(p, u), s

    rates, ends = _three_rates(step, params, {"new": state, "old": old}, lambda s: s)
    for name, s in ends.items():
        assert (s.replay is None) == (s.bound is None) == (name == "old")
    assert rates["old"] == rates["new"] and min(rates["new"]) > 0


@pytest.mark.parametrize("make", ["cdat", "polyak"])
def test_an_older_state_resumes_through_the_conveniences(make):
    """The conveniences check the state they are handed too (``with_base_state``): a tuner state made before its
    last fields existed (``replay``, ``bound``, ``zero_rate``: None) resumes there as it does bare (a follow-up field
    test: a pickled ``cdat(...)`` / ``polyak(...)`` state raised "init makes state[1].bound.bound_f_star, which it
    lacks"), with the rates of a fresh state."""
    import pickle

    from curvopt.optax import cdat, polyak

    tx = {"cdat": lambda: cdat(optax.identity(), base_method="gd"),
          "polyak": lambda: polyak(optax.identity(), base_method="gd")}[make]()
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    loss = lambda p: jnp.sum(jnp.array([3.0, 1.0, 0.2]) * p["w"] ** 2)  # noqa: E731
    state = tx.init(params)
    tuner = state[1]
    added = [f for f in type(tuner)._fields if f in ("replay", "bound", "zero_rate")]
    fields = type(tuner)._fields[:type(tuner)._fields.index(added[0])]
    old = pickle.loads(pickle.dumps((state[0], type(tuner)(*[getattr(tuner, f) for f in fields]))))
    assert all(getattr(old[1], f) is None for f in added)

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=v, value_fn=loss)
        return optax.apply_updates(p, u), s

    rates, _ = _three_rates(step, params, {"new": state, "old": old}, lambda s: s[1])
    assert rates["old"] == rates["new"] and min(rates["new"]) > 0


def test_a_rule_state_made_before_the_guards_lagged_minimum_resumes_with_the_first_verdict():
    """CDAT's rule state gained the above-edge guard's lagged lowest gap and first average (``gap_lagged``,
    ``gap_first``) as its last fields, default None: a state pickled before them loads and steps, keeps None (the
    structure does not change under ``jit``) and the guard's first verdict alone (``above_edge_guard``); on these
    three steps, where the progress rule cannot act yet, its rates are a fresh state's."""
    import pickle

    from curvopt.optax import scale_by_cdat
    from curvopt.rules import CDATState

    tx = scale_by_cdat(base_method="gd")
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    loss = lambda p: jnp.sum(jnp.array([3.0, 1.0, 0.2]) * p["w"] ** 2)  # noqa: E731
    state = tx.init(params)
    fields = CDATState._fields[:CDATState._fields.index("gap_lagged")]
    old = pickle.loads(pickle.dumps(state._replace(rule=CDATState(*[getattr(state.rule, f) for f in fields]))))
    assert old.rule.gap_lagged is None and old.rule.gap_first is None and state.rule.gap_lagged is not None

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p, value=v, value_fn=loss)
        return optax.apply_updates(p, u), s

    rates, ends = _three_rates(step, params, {"new": state, "old": old}, lambda s: s)
    assert ends["old"].rule.gap_lagged is None and ends["old"].rule.gap_first is None
    assert float(ends["new"].rule.gap_first) > 0
    assert rates["old"] == rates["new"] and min(rates["new"]) > 0


class _Layer:
    """A layer whose output width is static metadata of its pytree node (an Equinox ``Linear``'s
    ``out_features``): a surgery that widens it changes the tree's structure, not its key paths."""

    def __init__(self, w, out):
        self.w, self.out = w, out


jax.tree_util.register_pytree_with_keys(
    _Layer, lambda m: (((jax.tree_util.GetAttrKey("w"), m.w),), m.out), lambda out, ch: _Layer(ch[0], out))


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_state_for_a_model_changed_since_init_names_the_node_that_changed():
    """A head widened with ``eqx.tree_at`` and the old state kept: the message blamed "other containers, e.g.
    dicts where init makes NamedTuples" (the key paths are the same); it now names the node and its metadata."""
    x = jnp.ones((2, 3))
    old, new = _Layer(jnp.zeros((3, 4)), 4), _Layer(jnp.zeros((3, 5)), 5)
    opt = cdat(optax.scale_by_adam(), **ADAM)
    grads = jax.grad(lambda m: jnp.sum(x @ m.w) ** 2)(new)
    with pytest.raises(ValueError, match=r"does not fit this transformation \(state\[0\]\.mu is PyTreeDef\(CustomNode"
                                         r"\(_Layer\[4\].*init makes PyTreeDef\(CustomNode\(_Layer\[5\].*a model "
                                         r"changed since init"):
        opt.update(grads, opt.init(old), new)
    opt.update(grads, opt.init(new), new)  # its own state runs
