"""The README's Python blocks, run as written, so the quickstarts stay true as the code changes.

Each block runs verbatim (read from README.md) in a namespace that holds what the README leaves to the reader
(a ``loader``, a flax ``model`` and its ``grads``, a narrow ``base_model`` for μP); the blocks of one section
share it, in order, as a reader would run them. Each test then asserts what the block promises: a positive,
finite learning rate picked by the tuner, and a step of the documented kind.
"""
from __future__ import annotations

import math
import pathlib
import warnings

import jax
import numpy as np
import optax
import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> dict[str, list[str]]:
    """The ```python blocks of the README, grouped by the ``##`` section they are in."""
    out: dict[str, list[str]] = {}
    section = ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```python":
            j = lines.index("```", i + 1)
            out.setdefault(section, []).append("\n".join(lines[i + 1:j]))
            i = j
        i += 1
    return out


BLOCKS = _blocks()


def _run(code: str, ns: dict) -> dict:
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own code
    return ns


def _positive(x) -> float:
    v = float(x)
    assert math.isfinite(v) and v > 0, v
    return v


def test_pytorch_quickstart_with_and_without_a_closure(capsys):
    torch.manual_seed(0)
    loader = [(torch.randn(16, 64), torch.randint(0, 10, (16,))) for _ in range(4)]
    closure_block, closure_free_block = BLOCKS["Quickstart: PyTorch"]
    ns = _run(closure_block, {"loader": loader})
    printed = capsys.readouterr().out.split("\n")
    assert len([p for p in printed if p.strip()]) == len(loader)  # loss, lr, curvature per step
    assert int(ns["opt"].stats["closure_calls"]) == 2  # the main call and the fd probe
    _positive(ns["opt"].stats["lr"])
    _positive(ns["opt"].stats["curvature"])
    ns = _run(closure_free_block, ns)
    opt = ns["opt"]
    assert type(opt.base).__name__ == "AdamW" and int(opt.stats["closure_calls"]) == 0
    _positive(opt.stats["lr"])
    _positive(opt.stats["curvature"])  # the secant of the last two gradients


@pytest.fixture()
def optax_namespace(capsys):
    ns = _run(BLOCKS["Quickstart: Optax"][0], {})
    lr, stats = capsys.readouterr().out.split(" ", 1)
    assert _positive(lr) == pytest.approx(float(optax.tree_utils.tree_get(ns["state"], "lr")))
    assert "curvature" in stats
    return ns


def test_optax_quickstart(optax_namespace):
    ns = optax_namespace
    _positive(ns["stats"](ns["state"])["curvature"])  # with value_fn: the fd oracle
    value = float(ns["loss_fn"](ns["params"], ns["x"], ns["y"]))
    assert value < math.log(10)  # one step from zero weights (loss log 10) went down


def test_flax_train_state_and_nnx_recipes(optax_namespace):
    import flax.linen as nn
    from flax import nnx

    train_state_block, nnx_block, jit_block = BLOCKS["Quickstart: Optax"][1:]
    x, y = optax_namespace["x"], optax_namespace["y"]

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    model = nn.Dense(10)
    params = model.init(jax.random.key(1), x)
    grads = jax.grad(lambda p: xent(model.apply(p, x)))(params)
    ns = _run(train_state_block, {"optax": optax, "model": model, "params": params, "grads": grads})
    assert int(ns["state"].step) == 1
    _positive(optax.tree_utils.tree_get(ns["state"].opt_state, "lr"))  # the first, probing step lr = h
    loss_state = ns["LossTrainState"].create(apply_fn=model.apply, params=params,
                                             tx=ns["cdat"](optax.scale_by_adam(), base_method="adam"))

    def value_fn(p):
        return xent(model.apply(p, x))
    value, grads = jax.value_and_grad(value_fn)(params)
    loss_state = loss_state.apply_gradients(grads=grads, value=value, value_fn=value_fn)
    lr = _positive(optax.tree_utils.tree_get(loss_state.opt_state, "lr"))
    assert lr > 1e-3  # with the loss: the fd oracle's rate from the first step, not the probing step h

    nnx_model = nnx.Linear(64, 10, rngs=nnx.Rngs(0))
    nnx_grads = nnx.grad(lambda m: xent(m(x)))(nnx_model)
    ns = _run(nnx_block, {"nnx": nnx, "optax": optax, "cdat": ns["cdat"], "model": nnx_model, "grads": nnx_grads})
    _positive(optax.tree_utils.tree_get(ns["optimizer"].opt_state, "lr"))

    ns = _run(jit_block, optax_namespace)  # the quickstart's train_step, donating; MultiSteps
    opt = ns["opt"]
    state = opt.init(ns["params"])
    params = ns["params"]
    for _ in range(8):  # two outer steps of four micro-steps
        params, state = ns["train_step"](jax.tree.map(jax.numpy.copy, params), state, x, y)
    assert int(state.gradient_step) == 2
    _positive(optax.tree_utils.tree_get(state.inner_opt_state, "lr"))


@pytest.mark.slow  # among the default suite's longest (it ran 10:49-11:29 of its ~10 minutes)
def test_mup_blocks():
    import flax.linen as nn

    torch_block, jax_block = BLOCKS["μP: transfer learning rates across widths"]

    def mlp(width):
        return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                   torch.nn.ReLU(), torch.nn.Linear(width, 10))
    torch.manual_seed(0)
    ns = _run(torch_block, {"torch": torch, "model": mlp(256), "base_model": mlp(32)})
    groups, opt = ns["groups"], ns["opt"]
    assert sorted({g["lr"] for g in groups}) == [32 / 256, 1.0]  # μP's Adam multipliers: hidden weights 1/width
    model, xb, yb = ns["model"], torch.randn(16, 64), torch.randint(0, 10, (16,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss
    opt.step(closure)
    _positive(opt.stats["lr"])

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(self.width)(x)))
    key = jax.random.key(0)
    x = jax.random.normal(key, (16, 64))
    y = jax.numpy.arange(16) % 10
    model = MLP(256)

    def xent(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    ns = _run(jax_block, {"jax": jax, "optax": optax, "model": model, "base_model": MLP(32), "key": key, "x": x,
                          "params": model.init(key, x), "xent": xent})
    tx, params, loss = ns["tx"], ns["params"], ns["loss"]
    state = tx.init(params)
    value, grads = jax.value_and_grad(loss)(params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # Adam's state reaches the tuner: the default numerator
        updates, state = tx.update(grads, state, params, value=value, value_fn=loss, x=x, y=y)
    _positive(optax.tree_utils.tree_get(state, "lr"))
    assert np.isfinite(float(loss(optax.apply_updates(params, updates), x, y)))


def test_every_python_block_is_run_here():
    """The README's Python blocks are exactly the ones the tests above run (a new block needs a test here)."""
    assert {k: len(v) for k, v in BLOCKS.items()} == {"Quickstart: PyTorch": 2, "Quickstart: Optax": 4,
                                                       "μP: transfer learning rates across widths": 2}
