"""The tuners inside ``jax.shard_map`` (``check_vma=True``) on a one-device mesh: what JAX types there is the
same on any mesh, so the trace-time checks are tested in-process (the multi-device runs are in
tests/test_reliability_distributed.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from curvopt.optax import cdat, quadratic_greedy

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 4)), jnp.float32)
Y = jnp.asarray(np.arange(16) % 3)
PARAMS = {"w1": jnp.asarray(RNG.normal(size=(4, 8)), jnp.float32),
          "w2": jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32), "b2": jnp.zeros(3)}


def _trace(tx, loss_fn, pspec, axis, with_loss):
    """Trace one step of ``tx`` inside ``shard_map`` over a one-device mesh with axis ``axis`` (the parameters'
    specs ``pspec``; the state replicated)."""
    mesh = Mesh(np.array(jax.devices()[:1]), (axis,))
    state = tx.init(PARAMS)
    sspec = jax.tree.map(lambda _: P(), state)

    def body(p, s):
        v, g = jax.value_and_grad(loss_fn)(p, X, Y)
        kw = dict(value=v, value_fn=loss_fn, x=X, y=Y) if with_loss else {}
        u, s = tx.update(g, s, p, **kw)
        return optax.apply_updates(p, u), s

    return jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=(pspec, sspec), out_specs=(pspec, sspec)),
                          PARAMS, state)


def _tensor_parallel_loss(p, x, y):  # Megatron-style: w1 split by columns, w2 by rows, the partial logits summed
    logits = jax.lax.psum(jnp.tanh(x @ p["w1"]) @ p["w2"], "model") + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _local_loss(p, x, y):  # the device's own batch
    logits = jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("make", [lambda: cdat(optax.scale_by_adam(), base_method="adam"),
                                  lambda: quadratic_greedy(optax.identity())])
def test_parameters_split_inside_shard_map_are_refused(make, with_loss):
    """Tensor parallelism inside shard_map: each device holds a part of the parameters, and the tuner's inner
    products would be the part's. A field test met JAX's cond type errors, and under check_vma=False each device
    took its own rate (0.31 and 0.27 where one device took 0.75). Now a ValueError at trace time, with the fix."""
    pspec = {"w1": P(None, "model"), "w2": P("model", None), "b2": P()}
    with pytest.raises(ValueError, match=r"split over the shard_map mesh axes \['model'\].*NamedSharding"):
        _trace(make(), _tensor_parallel_loss, pspec, "model", with_loss)


@pytest.mark.parametrize("with_loss", [False, True])
def test_replicated_parameters_pass_inside_shard_map(with_loss):
    """Data parallelism (the parameters replicated, the loss averaged over the batch axis) is not split
    parameters: traced without a complaint."""
    def averaged(p, x, y):
        return jax.lax.pmean(_local_loss(p, x, y), "batch")

    out = _trace(cdat(optax.scale_by_adam(), base_method="adam"), averaged, {k: P() for k in PARAMS}, "batch",
                 with_loss)
    assert jax.tree.structure(out[0]) == jax.tree.structure(PARAMS)
