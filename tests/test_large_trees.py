"""Large models: the runs the backends cut the parameters into (:mod:`curvopt.runs`), the bounded reading of a
gradient's precision (:func:`curvopt.precision.sample_stride`), and the memory of the jitted Optax step on a tree
of several million entries (``memory_analysis()`` of the compiled step)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from curvopt.precision import SAMPLE_ENTRIES, sample_stride
from curvopt.runs import CONCAT_BELOW, cut_into_runs
from curvopt.optax import BaseMethod, cdat


def test_cut_into_runs():
    assert cut_into_runs(range(5), [3, 4, 9, 2, 2], 8) == [[0, 1], [2], [3, 4]]
    assert cut_into_runs([0, 2, 3], [3, 4, 9, 2], 8) == [[0], [2], [3]]  # positions, in order
    assert cut_into_runs([1, 2], [3, 8, 0], 8) == [[1, 2]]  # exactly the limit, and an empty tensor, join
    assert cut_into_runs([], [], 8) == []
    assert CONCAT_BELOW == 1 << 20


def test_sample_stride():
    sizes = (0, 1, SAMPLE_ENTRIES, SAMPLE_ENTRIES + 1, 10 * SAMPLE_ENTRIES)
    assert [sample_stride(n) for n in sizes] == [1, 1, 1, 2, 10]
    n = 5 * SAMPLE_ENTRIES + 3
    assert len(range(0, n, sample_stride(n))) <= SAMPLE_ENTRIES


@pytest.mark.parametrize("cast", ["bfloat16", "float16", None])
def test_both_backends_read_a_large_gradients_precision_from_a_sample(cast):
    """A gradient of 5 * SAMPLE_ENTRIES entries computed in a half dtype (cast up to float32) reads as that dtype
    in both backends (from a sample of it), one computed in float32 as float32 (eps 0)."""
    from jax_backend.oracles import gradient_eps as jax_eps
    from torch_backend.precision import gradient_eps as torch_eps

    g = np.random.default_rng(0).standard_normal(5 * SAMPLE_ENTRIES).astype(np.float32)
    if cast:
        g = torch.from_numpy(g).to(getattr(torch, cast)).float().numpy()
    expected = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, None: 0.0}[cast]
    assert torch_eps([torch.from_numpy(g)]) == expected
    assert float(jax.jit(jax_eps)([jnp.asarray(g), jnp.ones(3)])) == expected


def _mlp(width: int, depth: int):
    keys = jax.random.split(jax.random.key(0), depth + 2)
    params = [{"w": jax.random.normal(keys[i], (width, width)) / width ** 0.5, "b": jnp.zeros(width)}
              for i in range(depth)]
    x = jax.random.normal(keys[-1], (8, width))

    def loss_fn(p, x):
        for layer in p:
            x = jax.nn.gelu(x @ layer["w"] + layer["b"])
        return jnp.mean(x ** 2)
    return params, x, loss_fn


@pytest.mark.parametrize("closure,bound", [(True, 0.5), (False, 4.0)])
@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_large_tree_temporaries(closure, bound):
    """``cdat(optax.scale_by_adam())`` on an MLP of 4 x 2^20 + 4 x 1024 parameters (leaves of exactly
    CONCAT_BELOW entries, the biases in runs of their own), its jitted step's temporaries in parameter sizes:
    with ``value_fn`` 0.38 (0.02 before the masks of a part frozen inside the base,
    :func:`jax_backend.direction.moving_leaves`; 5.0 when every inner product concatenated the whole tree),
    closure-free 3.6 (11.0; 3.0 before the masks: two more leaf-sized temporaries); the bounds leave room for XLA's
    buffer assignment to move."""
    params, x, loss_fn = _mlp(1024, 4)
    opt = cdat(optax.scale_by_adam(), base_method=BaseMethod.adam())

    def step(p, s):
        value, g = jax.value_and_grad(loss_fn)(p, x)
        extra = dict(value=value, grad=g, value_fn=loss_fn, x=x) if closure else {}
        u, s = opt.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    size = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    analysis = jax.jit(step).lower(params, opt.init(params)).compile().memory_analysis()
    assert analysis.temp_size_in_bytes / size < bound
