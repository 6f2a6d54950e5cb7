"""Drop-in recipes (issue 11, Optax side), each a tested example that asserts the learning rates:

* flax ``TrainState.apply_gradients(grads=...)`` unchanged (closure-free: the secant of consecutive gradients;
  the first step is the fd probe ``lr = h``), and a ``TrainState`` subclass whose ``apply_gradients`` passes the
  loss (``value``/``value_fn``: the fd oracle);
* ``nnx.Optimizer.update(model, grads)`` closure-free, and with ``value_fn`` over the ``nnx.Param`` state;
* ``optax.MultiSteps``: optax runs the inner update on every micro-step (with the running mean of the
  gradients) but keeps its state only on the last micro-step of each group, so the tuner's state and learning
  rate advance once per outer step, from the mean gradient;
* ``jax.jit(step, donate_argnums=(0, 1))``: the state's leaves are distinct buffers;
* ``value_fn`` returning ``(loss, aux)``: the aux is dropped;
* ``optax.masked``/``optax.multi_transform``: the tuner sees a masked view and uses the secant;
* ``optax.inject_hyperparams`` of a transform with a jitted ``init``, and of a ``<tuner>(base, ...)`` convenience;
* clipping inside the base (or ``grad=`` the raw gradient), not in front of the convenience.
"""
from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
import pytest
from flax import linen as nn
from flax import nnx
from flax import struct
from flax.training.train_state import TrainState

from curvopt import rules
from curvopt.optax import (BaseMethod, armijo, cdat, edge_of_stability, parameterize, polyak, quadratic_greedy,
                           scale_by_cdat, scale_by_polyak, stats)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


RNG = np.random.default_rng(0)
_M = RNG.normal(size=(5, 5))
A = _M @ _M.T / 5 + np.eye(5)
B = RNG.normal(size=5)


def quad(p):
    w = jnp.concatenate([p["w"], p["b"]])
    return 0.5 * w @ jnp.asarray(A) @ w + jnp.asarray(B) @ w


def _p0():
    return {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray([0.3, -0.7])}


def _flat(t):
    return np.concatenate([np.asarray(t["w"]), np.asarray(t["b"])])


def _rayleigh(g):
    return g @ A @ g / (g @ g)


class LossTrainState(TrainState):
    """A TrainState whose ``apply_gradients`` also hands the loss to the tuner (fd oracle, Polyak, Armijo,
    online sharpness): ``state.apply_gradients(grads=g, value=loss, value_fn=loss_fn, loss_kwargs={"batch":
    batch})``; other keywords replace fields, as flax's ``apply_gradients`` does (``batch_stats=``). ``tx``
    redeclared as what it is, so that type checkers accept ``update``'s keywords."""

    tx: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)

    def apply_gradients(self, *, grads, value=None, value_fn=None, loss_kwargs=None, **kwargs):
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, value=value, value_fn=value_fn,
                                            **(loss_kwargs or {}))
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            opt_state=opt_state, **kwargs)


def test_train_state_apply_gradients_closure_free():
    """The greedy rule from the secant: step 1 probes with h; then lr_t = 1 / rayleigh(g_{t-1}) (exact on a
    quadratic: the secant of the previous step along u_{t-1} = -g_{t-1})."""
    state = TrainState.create(apply_fn=None, params=_p0(), tx=quadratic_greedy(optax.identity()))
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(quad)(s.params)))
    lrs, grads = [], []
    for _ in range(6):
        grads.append(_flat(jax.grad(quad)(state.params)))
        params = state.params
        state = step(state)
        lrs.append(float(stats(state.opt_state)["lr"]))
    h = float(rules.finite_difference_step(np.linalg.norm(_flat(_p0())), np.linalg.norm(grads[0]),
                                           dtype_eps=2.0 ** -23, xp=np))  # at least float32's (secant_probe_eps)
    assert lrs[0] == pytest.approx(h, rel=1e-12) and lrs[0] < 1e-3
    np.testing.assert_allclose(lrs[1:], [1 / _rayleigh(g) for g in grads[:-1]], rtol=1e-6)
    assert int(stats(state.opt_state)["closure_calls"]) == 1 and quad(state.params) < quad(params)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_train_state_adam_closure_free_matches_plain_optax_loop():
    tx = cdat(optax.scale_by_adam())
    state = TrainState.create(apply_fn=None, params=_p0(), tx=tx)
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(quad)(s.params)))
    p, s = _p0(), tx.init(_p0())

    @jax.jit
    def ref(p, s):
        up, s = tx.update(jax.grad(quad)(p), s, p)
        return optax.apply_updates(p, up), s

    for _ in range(5):
        state, (p, s) = step(state), ref(p, s)
        assert float(stats(state.opt_state)["lr"]) == float(stats(s)["lr"])
    assert float(stats(s)["lr"]) > 0.01


def test_train_state_subclass_passes_the_loss():
    """With value_fn the fd oracle gives the greedy lr g^T g / g^T A g from step 1."""
    state = LossTrainState.create(apply_fn=None, params=_p0(), tx=quadratic_greedy(optax.identity()))

    @jax.jit
    def step(s):
        v, g = jax.value_and_grad(quad)(s.params)
        return s.apply_gradients(grads=g, value=v, value_fn=quad), g

    for _ in range(4):
        state, g = step(state)
        g = _flat(g)
        assert float(stats(state.opt_state)["lr"]) == pytest.approx(1 / _rayleigh(g), rel=1e-6)
        assert int(stats(state.opt_state)["closure_calls"]) == 2


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=jnp.float64)(x)
        return nn.Dense(2, param_dtype=jnp.float64)(nn.tanh(x))


class _BatchStatsState(LossTrainState):
    batch_stats: dict


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_train_state_with_batch_stats_keeps_flax_replace_keywords():
    """flax's ImageNet-style ``state.apply_gradients(grads=..., batch_stats=new)`` with a linen BatchNorm: the
    recipe's state stores the step's statistics (the recipe before sent every keyword to ``tx.update``, whose
    ``value_fn`` did not take it, so the statistics stayed at 0 silently), and ``value_fn(params, batch_stats,
    x, y)`` gets its arguments through ``loss_kwargs``: the fd oracle's greedy rate, equal to a run of the plain
    transform fed the same arguments, and the statistics those of a plain flax loop."""
    model = _BatchNormNet()
    x = jnp.asarray(RNG.normal(size=(16, 3))) + 1.0
    y = jnp.asarray(RNG.normal(size=(16, 2)))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss_fn(params, batch_stats, x, y):
        out, new = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
        return jnp.mean((out - y) ** 2), new

    tx = quadratic_greedy(optax.identity())
    state = _BatchStatsState.create(apply_fn=model.apply, params=variables["params"],
                                    batch_stats=variables["batch_stats"], tx=tx)
    params, opt_state, stats_ref = variables["params"], tx.init(variables["params"]), variables["batch_stats"]
    for _ in range(3):
        (v, new), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.batch_stats, x, y)
        state = state.apply_gradients(grads=g, value=v, value_fn=loss_fn, batch_stats=new["batch_stats"],
                                      loss_kwargs={"batch_stats": state.batch_stats, "x": x, "y": y})
        (v, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats_ref, x, y)
        updates, opt_state = tx.update(g, opt_state, params, value=v, value_fn=loss_fn, batch_stats=stats_ref, x=x,
                                       y=y)
        params, stats_ref = optax.apply_updates(params, updates), new["batch_stats"]
        assert float(stats(state.opt_state)["lr"]) == float(stats(opt_state)["lr"]) > 0
        assert int(stats(state.opt_state)["closure_calls"]) == 2
    mean = state.batch_stats["BatchNorm_0"]["mean"]
    assert float(jnp.abs(mean).max()) > 0.1
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.batch_stats, stats_ref))


def _nnx_model():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    x = jnp.asarray(RNG.normal(size=(16, 3)))
    y = jnp.asarray(RNG.normal(size=(16, 2)))
    return model, x, y


def _mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


class _DropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs, param_dtype=jnp.float64)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_nnx_dropout_value_fn_replays_the_mask(x64):
    """The README's nnx recipe with Dropout: ``value_fn`` rebuilds the model from a ``rest`` cloned before the
    forward pass, so every probe draws the forward pass's mask and the greedy rate is the exact
    ``g^T g / g^T H g`` of that mask's loss (with the split's ``rest`` itself, whose rng stream the forward pass
    advances, it was 1e-6 of it)."""
    x = jnp.asarray(RNG.normal(size=(32, 8)))
    y = jnp.asarray(np.arange(32) % 3)
    model = _DropoutNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, quadratic_greedy(optax.identity()), wrt=nnx.Param)

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.clone(rest)  # the rng state as the forward pass below starts from it

        def value_fn(params, x, y):
            return xent(nnx.merge(graphdef, params, rest, copy=True)(x), y)

        g = jax.grad(value_fn)(params, x, y)
        hg = jax.jvp(jax.grad(lambda q: value_fn(q, x, y)), (params,), (g,))[1]
        gg = sum(jnp.vdot(a, a) for a in jax.tree.leaves(g))
        expected = gg / sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(hg)))
        loss, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads, value=loss, value_fn=value_fn, x=x, y=y)
        return expected

    for t in range(3):
        expected = float(train_step(model, optimizer, x, y))
        assert float(stats(optimizer.opt_state)["lr"]) == pytest.approx(expected, rel=1e-5), t


@pytest.mark.parametrize("case", ["merge without copy", "closes over the model"])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_nnx_value_fn_writing_to_the_model_says_how_to_rebuild_it(case):
    """With BatchNorm and Dropout, a value_fn built on ``nnx.merge`` without ``copy=True``, or one closing over
    the model, writes to the model's Variables from inside the tuner's jvp: a field test got flax's bare
    ``TraceContextError`` ("Cannot mutate BatchStat from a different trace level"), no hint of the fix. The error
    names the recipe; the recipe itself trains (the rate is finite and positive)."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.bn = nnx.Linear(8, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
            self.drop, self.l2 = nnx.Dropout(0.3, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    x, y = jnp.asarray(RNG.normal(size=(32, 8)), jnp.float32), jnp.asarray(np.arange(32) % 3)
    model = Net(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, cdat(optax.scale_by_adam(), base_method="adam"), wrt=nnx.Param)

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make_step(right):
        @nnx.jit
        def train_step(model, optimizer):
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            rest = nnx.clone(rest)
            if right:
                value_fn = lambda p: xent(nnx.merge(graphdef, p, rest, copy=True)(x))  # noqa: E731
            elif case == "merge without copy":
                value_fn = lambda p: xent(nnx.merge(graphdef, p, rest)(x))  # noqa: E731
            else:
                value_fn = lambda p: xent(model(x))  # noqa: E731
            loss, grads = nnx.value_and_grad(lambda m: xent(m(x)))(model)
            optimizer.update(model, grads, value=loss, value_fn=value_fn)
        return train_step

    with pytest.raises(ValueError, match=r"TraceContextError.*nnx.merge\(graphdef, params, rest, copy=True\)"):
        make_step(right=False)(model, optimizer)
    make_step(right=True)(model, optimizer)
    assert 0 < float(stats(optimizer.opt_state)["lr"]) < math.inf


@pytest.mark.parametrize("with_loss", [False, True])
def test_nnx_optimizer_update(with_loss):
    """nnx.Optimizer.update(model, grads) closure-free, and with value/value_fn over the nnx.Param state
    (``nnx.merge`` inside value_fn); the lrs equal a plain optax loop on the same parameters."""
    model, x, y = _nnx_model()
    tx = quadratic_greedy(optax.identity())
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, params0, rest = nnx.split(model, nnx.Param, ...)

    def value_fn(params, x, y):
        return _mse(nnx.merge(graphdef, params, rest), x, y)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_mse)(model, x, y)
        if with_loss:
            optimizer.update(model, grads, value=loss, value_fn=value_fn, x=x, y=y)
        else:
            optimizer.update(model, grads)
        return loss

    pure = nnx.to_pure_dict(params0)
    f = lambda p: value_fn(_restore(params0, p), x, y)  # noqa: E731
    s = tx.init(pure)

    @jax.jit
    def ref(p, s):
        v, g = jax.value_and_grad(f)(p)
        kw = dict(value=v, value_fn=f) if with_loss else {}
        up, s = tx.update(g, s, p, **kw)
        return optax.apply_updates(p, up), s

    p = pure
    for t in range(5):
        train_step(model, optimizer, x, y)
        p, s = ref(p, s)
        got = float(optax.tree_utils.tree_get(nnx.as_pure(optimizer.opt_state), "lr"))
        assert got == pytest.approx(float(stats(s)["lr"]), rel=1e-9), t
        assert float(stats(optimizer.opt_state)["lr"]) == got  # stats reads the nnx.Optimizer's own state too
        # as arrays (a logger given an nnx OptArray stores its repr), read without flax's deprecated .value
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            assert all(isinstance(v, jax.Array) for v in stats(optimizer.opt_state).values())
        assert got > (0 if with_loss or t > 0 else -1)
    np.testing.assert_allclose(np.asarray(model.kernel[...]), np.asarray(p["kernel"]), rtol=1e-9)


def _restore(template, pure):
    state = nnx.clone(template) if hasattr(nnx, "clone") else template
    nnx.replace_by_pure_dict(state, pure)
    return state


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_multisteps_runs_the_tuner_once_per_outer_step():
    """optax.MultiSteps(k=2): the tuner's lr changes only on every 2nd micro-step, and equals the tuner fed the
    mean of the two micro-batch gradients directly."""
    # two micro-batches, the same pair in every group: the mean gradient is a function of the parameters, so
    # the closure-free secant sees the curvature (with a new batch pair each group it would see the batches'
    # difference divided by the previous lr: the noise the secant does not correct here)
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(rng.normal(size=5)) for _ in range(2)] * 4
    f = lambda p, c: quad(p) + jnp.concatenate([p["w"], p["b"]]) @ c  # noqa: E731
    inner = cdat(optax.scale_by_adam())
    # MultiSteps accumulates in float32 unless told: the probe step's secant (a difference of gradients over
    # a displacement of sqrt(eps) ||w||) needs the gradient to the parameters' precision
    opt = optax.MultiSteps(inner, every_k_schedule=2, accumulator_dtype=jnp.float64)
    p, s = _p0(), opt.init(_p0())
    q, t = _p0(), inner.init(_p0())
    step = jax.jit(lambda p, s, c: opt.update(jax.grad(f)(p, c), s, p))
    ref = jax.jit(lambda q, t, g: inner.update(g, t, q))
    lrs, ref_lrs = [], []
    for i in range(0, 8, 2):
        for c in batches[i:i + 2]:
            up, s = step(p, s, c)
            p = optax.apply_updates(p, up)
            lrs.append(float(stats(s.inner_opt_state)["lr"]))
        g = jax.tree.map(lambda a, b: (a + b) / 2, jax.grad(f)(q, batches[i]), jax.grad(f)(q, batches[i + 1]))
        up, t = ref(q, t, g)
        q = optax.apply_updates(q, up)
        ref_lrs.append(float(stats(t)["lr"]))
    # the state does not move on the first micro-step of a group (optax's running mean of the gradients rounds
    # differently from the reference's (a + b) / 2)
    assert lrs[0] == 0.0 and lrs[2::2] == lrs[1:-1:2]
    np.testing.assert_allclose(lrs[1::2], ref_lrs, rtol=1e-6)
    assert lrs[-1] > 0.01
    np.testing.assert_allclose(_flat(p), _flat(q), rtol=1e-12)


OPTS = {
    "cdat": lambda: cdat(optax.scale_by_adam(), sharpness=2, base_method="adam"),
    "cdat_free": lambda: cdat(optax.scale_by_adam()),
    "cdat_free_noise": lambda: cdat(optax.scale_by_adam(), base_method="adam", noise_correction=True),
    "cdat_heavy_ball": lambda: cdat(optax.trace(0.9), base_method=BaseMethod.heavy_ball(0.9)),  # the watch's state
    "greedy": lambda: quadratic_greedy(optax.trace(0.5), curvature="exact"),
    "polyak": lambda: polyak(optax.identity()),
    "armijo": lambda: armijo(optax.identity()),
    "eos": lambda: edge_of_stability(optax.identity(), sharpness=2),
}


def _buffers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", sorted(OPTS))
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_donate_argnums(name):
    """jax.jit(step, donate_argnums=(0, 1)) as flax's lm1b/wmt/gemma examples: no two leaves of the initial
    state share a buffer (eager or jitted init), and the donated run gives the same lrs."""
    opt = OPTS[name]()
    free = name.startswith("cdat_free")

    def step(p, s):
        v, g = jax.value_and_grad(quad)(p)
        up, s = opt.update(g, s, p) if free else opt.update(g, s, p, value=v, grad=g, value_fn=quad)
        return optax.apply_updates(p, up), s

    runs = {}
    for kind, jit in (("donated", jax.jit(step, donate_argnums=(0, 1))), ("plain", jax.jit(step))):
        for init in (opt.init, jax.jit(opt.init)):
            p = jax.tree.map(jnp.copy, _p0())
            s = init(p)
            ptrs = _buffers((p, s))
            assert len(ptrs) == len(set(ptrs)), f"{name}: leaves share a buffer"
            lrs = []
            for _ in range(4):
                p, s = jit(p, s)
                lrs.append(float(stats(s)["lr"]))
            runs.setdefault(kind, lrs)
            assert lrs == runs[kind]
    # the donated program is compiled differently (buffer reuse changes XLA's fusion of the power iteration)
    np.testing.assert_allclose(runs["donated"], runs["plain"], rtol=1e-8)
    assert max(runs["plain"]) > 0


def test_value_fn_with_aux_drops_the_aux():
    opt = quadratic_greedy(optax.identity())
    p = _p0()
    v, g = jax.value_and_grad(quad)(p)
    with_aux = lambda q: (quad(q), {"logits": jnp.ones(3), "acc": 0.5})  # noqa: E731
    (_, a), (_, b) = (jax.jit(lambda s, f=f: opt.update(g, s, p, value=v, grad=g, value_fn=f))(opt.init(p))
                      for f in (quad, with_aux))
    assert float(stats(a)["lr"]) == float(stats(b)["lr"]) > 0
    # value_fn also computes the gradient when grad is not given
    _, c = jax.jit(lambda s: opt.update(g, s, p, value_fn=with_aux))(opt.init(p))
    assert float(stats(c)["lr"]) == pytest.approx(float(stats(a)["lr"]), rel=1e-12)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_masked_and_multi_transform():
    """Inside optax.masked/multi_transform the tuner sees a masked view of the parameters (optax.MaskedNode
    leaves) and cannot evaluate value_fn there: curvature="auto" picks the secant. The tuner's lrs equal a
    run of the same tuner fed the same gradients of its own leaves. Caveat shown here: the secant assumes that
    only the tuner moved the parameters; in multi_transform the other partition's SGD steps enter it, and right
    after the probe step (lr = h, small) they dominate: the lr starts at 0.03 (the tuned part alone: 0.5-0.7),
    and since a secant step's length grows at most ``lagged_growth`` (1.1x) per step it recovers gradually (0.07
    at step 6, 0.7 at step 12)."""
    labels = {"w": "tuned", "b": "sgd"}
    tx = optax.multi_transform({"tuned": quadratic_greedy(optax.identity()), "sgd": optax.sgd(0.05)}, labels)
    masked = optax.chain(optax.masked(quadratic_greedy(optax.identity()), {"w": True, "b": False}),
                         optax.masked(optax.set_to_zero(), {"w": False, "b": True}))  # b frozen
    lrs = {}
    for opt in (tx, masked):
        p, s = _p0(), opt.init(_p0())

        @jax.jit
        def step(p, s):
            v, g = jax.value_and_grad(quad)(p)
            with pytest.warns(RuntimeWarning, match="value_fn is not used"):  # ignored by the masked tuner
                up, s = opt.update(g, s, p, value=v, grad=g, value_fn=quad)
            return optax.apply_updates(p, up), s, g

        sub = quadratic_greedy(optax.identity())
        t = sub.init({"w": p["w"]})
        for _ in range(6):
            p_before = p
            p, s, g = step(p, s)
            up, t = sub.update({"w": g["w"]}, t, {"w": p_before["w"]})
            # float32: the jitted chain and the eager run round differently (XLA fuses the jitted one)
            assert float(stats(s)["lr"]) == pytest.approx(float(stats(t)["lr"]), rel=1e-6)
        lrs[opt is tx] = float(stats(s)["lr"])
    assert lrs[False] > 1e-3  # masked, b frozen: the secant is the tuned part's own
    assert 0.01 < lrs[True] < 0.2  # multi_transform: b's SGD steps in the secant after the probe (see above)
    with pytest.raises(ValueError, match="masked"):
        bad = optax.masked(scale_by_cdat(curvature="fd"), {"w": True, "b": False})
        bad.update(jax.grad(quad)(_p0()), bad.init(_p0()), _p0(), grad=jax.grad(quad)(_p0()), value_fn=quad)
    with pytest.warns(RuntimeWarning, match="whole loss gap"):  # right if b is frozen, twice the step if not
        part = optax.masked(scale_by_polyak(), {"w": True, "b": False})
        part.update(jax.grad(quad)(_p0()), part.init(_p0()), _p0(), value=quad(_p0()), grad=jax.grad(quad)(_p0()))


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_optax_flatten_around_a_tuner_says_what_to_do():
    """optax.flatten ravels the updates and params it hands the tuner but passes grad= and value_fn= through as
    they are: a clear error (it was JAX's "does not support string indexing" from inside a probe), and the
    closure-free tuner, which needs neither, takes the flat vector and the rates of the unflattened chain."""
    p = _p0()
    v, g = jax.value_and_grad(quad)(p)
    for extra, what in ((dict(value=v, value_fn=quad), "value_fn cannot take"), (dict(grad=g), "grad= must")):
        opt = optax.flatten(quadratic_greedy(optax.identity()))
        with pytest.raises(ValueError, match=what) as e:
            jax.jit(lambda s, extra=extra: opt.update(g, s, p, **extra))(opt.init(p))
        assert "leave optax.flatten out" in str(e.value)
    lrs = []
    for opt in (optax.flatten(cdat(optax.scale_by_adam(), base_method="adam")),
                cdat(optax.scale_by_adam(), base_method="adam")):
        q, s = p, opt.init(p)
        for _ in range(4):
            up, s = jax.jit(opt.update)(jax.grad(quad)(q), s, q)
            q = optax.apply_updates(q, up)
        lrs.append(float(stats(s)["lr"]))
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-5) and lrs[0] > 0
    # a model whose parameters are one vector keeps its value_fn
    one = jnp.arange(1.0, 4.0)
    opt = quadratic_greedy(optax.identity())
    f = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w ** 2)  # noqa: E731
    gw = jax.grad(f)(one)
    _, s = opt.update(gw, opt.init(one), one, value=f(one), value_fn=f)
    assert float(stats(s)["lr"]) == pytest.approx(float(gw @ gw / (gw @ (jnp.arange(1.0, 4.0) * gw))), rel=1e-3)


@pytest.mark.parametrize("wrap", ["lookahead", "sam"])
@pytest.mark.parametrize("make", [lambda: cdat(optax.scale_by_adam(), base_method="adam"),
                                  lambda: quadratic_greedy(optax.identity())])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_wrappers_that_blend_a_reset_state_in_keep_the_tuner_running(make, wrap):
    """optax.lookahead(reset_state=True) and optax.contrib.sam blend a reset state in as (1 - s) * state + s * init,
    which turns the tuner's bool state leaves into int32: the skip's lax.cond between the new state and the old
    raised "cond branches must have equal output types" at the second step. The tuner makes them bool again."""
    tuner = make()
    if wrap == "lookahead":
        opt = optax.lookahead(tuner, sync_period=3, slow_step_size=0.5, reset_state=True)
        p = optax.LookaheadParams.init_synced(_p0())
    else:
        opt = contrib.sam(tuner, optax.sgd(0.05), sync_period=2)
        p = _p0()
    s = opt.init(p)

    @jax.jit
    def step(p, s):
        g = jax.grad(quad)(p.fast if wrap == "lookahead" else p)
        up, s = opt.update(g, s, p)
        return optax.apply_updates(p, up), s

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tuner's own advice (closure-free behind these wrappers)
        losses = [float(quad(p.slow if wrap == "lookahead" else p))]
        for _ in range(8):
            p, s = step(p, s)
            losses.append(float(quad(p.slow if wrap == "lookahead" else p)))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # a state whose bool leaves the blending made int32 steps like the state itself (the blending's arithmetic
    # also turns an inf leaf into NaN, 0 * inf: the wrappers change the tuner's state beyond its dtypes)
    state = tuner.init(_p0())
    blended = jax.tree.map(lambda x: x * 1 if x.dtype == jnp.bool_ else x, state)
    assert any(a.dtype != b.dtype for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(blended)))
    g = jax.grad(quad)(_p0())
    (u1, s1), (u2, s2) = (jax.jit(tuner.update)(g, st, _p0()) for st in (state, blended))
    assert all(bool(jnp.array_equal(a, b, equal_nan=True))
               for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2))))
    assert [x.dtype for x in jax.tree.leaves(s2)] == [x.dtype for x in jax.tree.leaves(state)]


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_misspelled_loss_keyword_warns():
    """update(..., grads=g) or valuefn=loss went silently to the extra arguments (value_fn's, by name), and the
    tuner ran without them: it says so at trace time, unless value_fn takes that name."""
    p = _p0()
    v, g = jax.value_and_grad(quad)(p)
    opt = quadratic_greedy(optax.identity())
    for extra, meant in ((dict(grads=g), "grad="), (dict(valuefn=quad), "value_fn="), (dict(values=v), "value=")):
        with pytest.warns(RuntimeWarning, match=f"did you mean {meant}"):
            jax.jit(lambda s, extra=extra: opt.update(g, s, p, **extra))(opt.init(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a value_fn that takes grads=, and keywords unlike the loss's: no warning
        opt.update(g, opt.init(p), p, value=v, value_fn=lambda q, grads=None: quad(q), grads=g)
        opt.update(g, opt.init(p), p, value=v, value_fn=lambda q, x, y: quad(q), x=1.0, y=2.0)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_inject_hyperparams_jitted_init_and_conveniences():
    """The state's structure does not depend on whether init is jitted; the conveniences can be wrapped."""
    p = _p0()
    for opt in (optax.inject_hyperparams(scale_by_polyak)(f_star=0.0, lr_max=2.0),
                optax.inject_hyperparams(scale_by_cdat)(sigma=1.5, sharpness=2),
                optax.inject_hyperparams(cdat)(optax.scale_by_adam(), sigma=1.5),
                optax.inject_hyperparams(cdat)(optax.scale_by_adam(), base_method="adam", noise_correction=True),
                optax.inject_hyperparams(armijo)(optax.identity(), c=0.1, max_trials=10),
                optax.inject_hyperparams(edge_of_stability)(optax.identity(), sigma=0.5)):
        eager, jitted = opt.init(p), jax.jit(opt.init)(p)
        assert jax.tree.structure(eager) == jax.tree.structure(jitted)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), eager) == jax.tree.map(lambda x: (x.shape, x.dtype),
                                                                                 jitted)
        v, g = jax.value_and_grad(quad)(p)
        chain = optax.chain(optax.identity(), opt) if "inner_state" in eager._fields and \
            not isinstance(eager.inner_state, tuple) else opt
        s = chain.init(p)
        _, s = jax.jit(lambda s: chain.update(g, s, p, value=v, grad=g, value_fn=quad))(s)
        assert float(stats(s)["lr"]) > 0
    # ema=None (the default: by base_method, curvopt.rules.default_ema) is static; a number given is injected
    wrapped = optax.inject_hyperparams(cdat)(optax.scale_by_adam(), sigma=1.5, ema=0.99, base_method="adam")
    s = wrapped.init(p)
    assert {"sigma", "ema", "eps", "lr_max"} <= set(s.hyperparams)  # numeric settings injected


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_base_method_unset_warns_when_the_base_is_visibly_another():
    """Unset, ``base_method`` is gradient descent, whose CDAT sigma/ema and stability coefficient differ from
    Adam's and heavy ball's: the update warns at trace time (once per trace) when it can see another base, and
    stays quiet when the base is declared, when the tuner sees the raw gradient (gradient descent), and where
    only the diagnostics follow the base (the greedy step, CDAT with sigma and ema given, the line search with c
    given, Polyak behind momentum with lr_max given)."""
    import warnings

    from curvopt.optax import scale_by_edge_of_stability, scale_by_quadratic_greedy

    p = {"w": jnp.ones(3)}
    f = lambda q: jnp.sum((q["w"] - 2.0) ** 2)  # noqa: E731
    adam, trace = optax.scale_by_adam, lambda: optax.trace(0.9)
    cases = [  # (transform, expected warnings over two jitted steps, which base the message names)
        (cdat(adam()), 1, "ScaleByAdamState"),
        (cdat(adam(), base_method="adam"), 0, None),
        (cdat(trace()), 1, "TraceState"),
        (cdat(trace(), base_method=BaseMethod.heavy_ball(0.9)), 0, None),
        (cdat(optax.identity()), 0, None),
        (scale_by_cdat(), 0, None),  # first in its chain: the updates are the gradient
        (optax.chain(adam(), scale_by_cdat()), 1, "not the gradient"),
        (optax.chain(adam(), scale_by_cdat(base_method="gd")), 0, None),  # declared
        (optax.chain(adam(), scale_by_cdat(sigma=2.0, ema=0.99)), 0, None),  # the rate does not follow the base
        (optax.chain(adam(), scale_by_quadratic_greedy()), 0, None),
        (optax.chain(trace(), scale_by_edge_of_stability()), 1, "not the gradient"),
        (optax.chain(trace(), scale_by_edge_of_stability(stability_coefficient=38.0)), 0, None),
        # the line search's c and Polyak's lr_max follow the base too (they warned nowhere: c = 0.1 behind Adam)
        (armijo(adam()), 1, "ScaleByAdamState"),
        (armijo(adam(), base_method="adam"), 0, None),
        (armijo(trace()), 1, "TraceState"),
        (armijo(trace(), c=0.5), 0, None),  # c given: only the diagnostics follow the base
        (polyak(adam(), lr_max=1e-3), 1, "ScaleByAdamState"),
        (polyak(trace(), lr_max=1e-3), 0, None),
        (polyak(trace()), 1, "TraceState"),  # the default lr_max = 1 is gradient descent's (a field test)
        (polyak(adam()), 1, "ScaleByAdamState"),
    ]
    for opt, expected, names in cases:
        s = opt.init(p)

        def step(s, opt=opt):
            g = jax.grad(f)(p)
            return opt.update(g, s, p, value=f(p), grad=g, value_fn=f)

        jitted = jax.jit(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                _, s = jitted(s)
        hits = [str(w.message) for w in caught if "base_method" in str(w.message)]
        assert len(hits) == expected, hits
        assert all(names in h for h in hits), hits


def test_clipping_inside_the_base_or_grad_passed_keeps_the_fd_curvature():
    """The README's recipe for clipping: ``clip_by_global_norm`` in front of the convenience hands the clipped
    updates over as the gradient, so the fd probe differences the loss's gradient against the clipped one (the
    greedy rate 1e-9); inside the base, or with ``grad=`` the raw gradient, the rate is the greedy step along
    the clipped direction, ``-g^T u / u^T H u`` (float64, a quadratic)."""
    A = jax.random.normal(jax.random.key(0), (6, 6))
    H = A @ A.T + 0.5 * jnp.eye(6)
    b = jax.random.normal(jax.random.key(1), (6,))
    loss = lambda p: 0.5 * p["w"] @ H @ p["w"] - b @ p["w"] + 3.0  # noqa: E731
    params = {"w": jnp.ones(6)}
    value, g = jax.value_and_grad(loss)(params)
    clip = optax.clip_by_global_norm(0.1)
    u = -clip.update(g, clip.init(params))[0]["w"]
    want = float(-(g["w"] @ u) / (u @ H @ u))
    inside = quadratic_greedy(optax.chain(clip, optax.identity()), curvature="fd")
    before = optax.chain(clip, quadratic_greedy(optax.identity(), curvature="fd"))
    for opt, kw, ok in ((inside, {}, True), (before, {"grad": g}, True), (before, {}, False)):
        _, state = opt.update(g, opt.init(params), params, value=value, value_fn=loss, **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lr = float(stats(state)["lr"])
        assert (lr == pytest.approx(want, rel=1e-6)) == ok, (kw, lr, want)
        # the fd probe's check: the clipped gradient does not predict value_fn's loss at the probe point
        told = [str(w.message) for w in caught if "fd probe point" in str(w.message)]
        assert len(told) == (not ok) and all("a clip chained before the tuner" in m for m in told), told


def test_convenience_given_value_fn_without_value_uses_the_loss():
    """``cdat(base)`` hands the incoming gradient over as ``grad=``; given ``value_fn`` but not ``value``, the
    robust start-up's floor, guard and cap still see the loss (one forward pass computes it), so the rates are
    those of ``value=`` passed too, and of the bare chain (before: the loss stayed unknown, the rate held on the
    edge and 48 % off behind SGD, 1.8x behind Adam, silently)."""
    a = jnp.array([1.0, 4.0, 9.0])
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    loss = lambda p: 0.5 * jnp.sum(a * p["w"] ** 2)  # noqa: E731

    def lrs(opt, pass_value):
        p, s, out = params, opt.init(params), []
        for _ in range(5):
            v, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p, value_fn=loss, **({"value": v} if pass_value else {}))
            p = optax.apply_updates(p, u)
            out.append(float(optax.tree_utils.tree_get(s, "lr")))
        return out

    for base, method in ((optax.identity(), None), (optax.scale_by_adam(), "adam")):
        ref = lrs(cdat(base, base_method=method), True)
        assert all(v > 0 for v in ref)
        np.testing.assert_allclose(lrs(cdat(base, base_method=method), False), ref, rtol=1e-6)
    bare = optax.chain(optax.identity(), scale_by_cdat())
    np.testing.assert_allclose(lrs(bare, False), lrs(cdat(optax.identity()), True), rtol=1e-6)


def _frozen_problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (16, 32)) / 4, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, 10)) / 6, "b2": jnp.zeros(10)}
    x, y = jax.random.normal(k3, (64, 16)), jnp.arange(64) % 10

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], y).mean()
    return params, x, y, loss


#: the power iteration run to convergence (the two runs start it from different random vectors)
_CONVERGED = dict(sharpness_first_iters=400, sharpness_iters=400, sharpness_tol=1e-9)


@pytest.mark.parametrize("make", [
    lambda base: cdat(base, base_method="adam"),
    lambda base: cdat(base, base_method="adam", numerator="momentum", sharpness_every=3, **_CONVERGED),
    lambda base: edge_of_stability(base, base_method="adam", sharpness_every=3, **_CONVERGED),
], ids=["cdat", "cdat_momentum_sharpness", "edge_of_stability"])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_a_base_that_freezes_part_of_the_tree_tunes_the_rest(make):
    """Found in the field: a tuner around ``multi_transform({"train": scale_by_adam(), "frozen": set_to_zero()})``
    (docs/optax.md: tune the whole tree with one tuner, per-part rules inside its base) raised MaskedNode errors:
    the Adam state has no moments for the frozen part. It now tunes the trained part exactly as a tuner over that
    part alone (frozen coordinates: u = 0 and P^-1 = 0), and a base of two Adam groups as one Adam."""
    params, x, y, loss = _frozen_problem()
    labels = {"w1": "frozen", "b1": "frozen", "w2": "train", "b2": "train"}
    frozen = {"w1": params["w1"], "b1": params["b1"]}

    def head_loss(q, x, y):
        return loss({**frozen, **q}, x, y)

    def run(tx, p, f, steps=8):
        @jax.jit
        def step(p, state):
            value, grad = jax.value_and_grad(f)(p, x, y)
            u, state = tx.update(grad, state, p, value=value, grad=grad, value_fn=f, x=x, y=y)
            return optax.apply_updates(p, u), state

        state, lrs, sharp = tx.init(p), [], []
        for _ in range(steps):
            p, state = step(p, state)
            lrs.append(float(stats(state)["lr"]))
            sharp.append(float(stats(state)["preconditioned_sharpness"]))
        return p, np.array(lrs), np.array(sharp)

    split = optax.multi_transform({"train": optax.scale_by_adam(), "frozen": optax.set_to_zero()}, labels)
    p, lrs, sharp = run(make(split), params, loss)
    head = {"w2": params["w2"], "b2": params["b2"]}
    q, want_lrs, want_sharp = run(make(optax.scale_by_adam()), head, head_loss)
    assert np.all(p["w1"] == params["w1"]) and np.all(p["b1"] == params["b1"])
    np.testing.assert_allclose(lrs, want_lrs, rtol=1e-4)
    np.testing.assert_allclose(sharp, want_sharp, rtol=1e-3)  # NaN where not estimated, in both
    assert np.all(lrs > 0)
    np.testing.assert_allclose(p["w2"], q["w2"], rtol=1e-4, atol=1e-6)
    # two Adam groups are one Adam
    groups = optax.multi_transform({"train": optax.scale_by_adam(), "frozen": optax.scale_by_adam()}, labels)
    _, lrs2, _ = run(make(groups), params, loss)
    _, want2, _ = run(make(optax.scale_by_adam()), params, loss)
    np.testing.assert_allclose(lrs2, want2, rtol=1e-4)


def test_the_sharpness_error_suggests_turning_it_off_only_where_it_can_be():
    """Without ``value_fn`` the online sharpness cannot run; the error suggested ``sharpness=0`` to the
    edge-of-stability rule too, which refuses it."""
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.ones(3)}
    for tx, hint in ((edge_of_stability(optax.identity()), False), (cdat(optax.identity(), sharpness_every=2), True)):
        with pytest.raises(ValueError, match="online sharpness evaluates") as info:
            tx.update(grads, tx.init(params), params, value=jnp.asarray(1.0))
        assert ("sharpness=0" in str(info.value)) == hint


@pytest.mark.slow  # ~8 s; the fast suite keeps nnx through test_readme's recipes
def test_nnx_optimizer_with_mup_multipliers():
    """μP on an nnx model under nnx.Optimizer, the README's μP and nnx recipes together: the multipliers built from
    the nnx.State kept their Param nodes in the state init made, nnx.Optimizer hands the transform bare arrays, and
    the tuner's state check refused every update ("the optimizer state does not fit"). Now it trains, with the
    rates of the same chain on the bare arrays."""
    class Net(nnx.Module):
        def __init__(self, width, rngs):
            self.l1, self.l2 = nnx.Linear(8, width, rngs=rngs), nnx.Linear(width, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    x, y = jnp.asarray(RNG.normal(size=(32, 8)), jnp.float32), jnp.asarray(np.arange(32) % 3)
    model = Net(32, nnx.Rngs(0))
    mup = parameterize(nnx.state(model, nnx.Param), nnx.state(Net(8, nnx.Rngs(0)), nnx.Param))

    def make():
        return cdat(optax.chain(optax.scale_by_adam(), mup.transform), base_method="adam")

    def xent(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)
    tx = make()
    state = tx.init(params)
    optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)
    for _ in range(3):
        grads = jax.grad(lambda p: xent(nnx.merge(graphdef, p)))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        optimizer.update(model, nnx.grad(xent)(model))
        assert 0 < float(stats(optimizer.opt_state)["lr"]) < math.inf
        np.testing.assert_allclose(float(stats(optimizer.opt_state)["lr"]), float(stats(state)["lr"]), rtol=1e-5)
