"""JAX rows of the overhead table: ``measure(repeats, steps) -> list[dict]`` (used by
``python -m benchmarks.overhead``; also ``python -m benchmarks.overhead_jax [--repeats N]`` on its own).

Jit-compiled step time of each Optax tuner ÷ the bare base step on the same two tasks as the PyTorch rows
(``benchmarks.overhead``): the small pre-activation ResNet (width 16) on a 128-image batch of scikit-learn's
8x8 digits, and the byte-level transformer LM (width 32, 2 blocks, 2 heads) on 16 blocks of 32 bytes of
``pydoc_data.topics``; flax twins from ``benchmarks.models_flax``, float32.

Both steps are one ``jax.jit`` function: the bare one is ``value_and_grad`` + the base transform + the
learning rate (``optax.chain(base, optax.scale(-lr))``) + ``apply_updates``; the tuned one is
``value_and_grad`` + ``optax.chain(base, tuner).update(..., value=, grad=, value_fn=, x=, y=)`` +
``apply_updates``. Compilation is excluded (warm-up steps); each step is timed to ``block_until_ready``;
base and tuner blocks alternate; the ratio is the median over repeats of (median tuned step ÷ median base
step).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks.timing import step_time_ratio
from curvopt.base import BaseMethod
from curvopt.optax import armijo, cdat, edge_of_stability, polyak, quadratic_greedy

__all__ = ["measure", "CONFIGS", "TASKS"]


def _cnn_task(batch: int = 128):
    from benchmarks.data import load_digits
    from benchmarks.models_flax import build_model, init_variables

    ds = load_digits()
    x, y = jnp.asarray(ds.x_train[:batch]), jnp.asarray(ds.y_train[:batch])
    model = build_model("resnet", ds.input_shape, ds.num_classes, width=16)
    params = init_variables(model, ds.input_shape, seed=0)["params"]

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn, x, y


def _lm_task(batch: int = 16, block: int = 32):
    from benchmarks.data import lm_blocks, load_text_bytes
    from benchmarks.models_flax import build_model, init_variables

    xs, ys = lm_blocks(load_text_bytes(), block, max_blocks=batch)
    x, y = jnp.asarray(xs, jnp.int32), jnp.asarray(ys, jnp.int32)
    model = build_model("lm", (block,), 256, width=32, depth=2, heads=2)
    params = init_variables(model, (block,), seed=0, is_text=True)["params"]

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn, x, y


TASKS = {"cnn": _cnn_task, "lm": _lm_task}
BASES = {
    "adam": (optax.scale_by_adam, BaseMethod.adam()),
    "sgd+momentum": (lambda: optax.trace(decay=0.9), BaseMethod.heavy_ball(0.9)),
}
# (tuner, oracle, base, factory(base transform, base_method) -> transform), as the PyTorch CONFIGS
CONFIGS: list[tuple[str, str, str, Callable[[Any, BaseMethod], Any]]] = [
    ("CDAT", "fd", "adam", lambda b, m: cdat(b, curvature="fd", lr_max=1e-2, base_method=m)),
    ("CDAT", "secant", "adam", lambda b, m: cdat(b, curvature="secant", lr_max=1e-2, base_method=m)),
    ("CDAT", "exact", "adam", lambda b, m: cdat(b, curvature="exact", lr_max=1e-2, base_method=m)),
    ("CDAT", "fd", "sgd+momentum", lambda b, m: cdat(b, curvature="fd", lr_max=1.0, base_method=m)),
    ("CDAT", "secant", "sgd+momentum", lambda b, m: cdat(b, curvature="secant", lr_max=1.0, base_method=m)),
    ("CDAT", "exact", "sgd+momentum", lambda b, m: cdat(b, curvature="exact", lr_max=1.0, base_method=m)),
    ("QuadraticGreedy", "fd (auto)", "adam", lambda b, m: quadratic_greedy(b, lr_max=1e-2, base_method=m)),
    ("PolyakStep", "-", "adam", lambda b, m: polyak(b, lr_max=1e-2, base_method=m)),
    ("ArmijoLineSearch", "-", "adam", lambda b, m: armijo(b, lr_max=1e-2, base_method=m)),
    ("EdgeOfStability", "every 10", "adam", lambda b, m: edge_of_stability(b, lr_max=1e-2, base_method=m)),
    ("CDAT+sharpness", "fd (auto), every 10", "adam",
     lambda b, m: cdat(b, lr_max=1e-2, sharpness=10, base_method=m)),
]


def _stepper(opt: Any, loss_fn: Callable, params: Any, x: Any, y: Any, tuned: bool):
    state = opt.init(params)

    @jax.jit
    def step(p, state):
        value, grad = jax.value_and_grad(loss_fn)(p, x, y)
        if tuned:
            up, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn, x=x, y=y)
        else:
            up, state = opt.update(grad, state, p)
        return optax.apply_updates(p, up), state

    carry = [params, state]

    def run() -> None:
        carry[0], carry[1] = step(*carry)
        jax.block_until_ready(carry[0])

    return run


def measure(repeats: int, steps: int = 10, tasks: tuple[str, ...] = ("cnn", "lm"),
            configs: list | None = None, verbose: bool = False) -> list[dict]:
    """Rows ``{task, tuner, oracle, base, backend: "jax", ratio, base_ms}`` (see the module docstring)."""
    rows = []
    for task in tasks:
        params, loss_fn, x, y = TASKS[task]()
        for tuner, oracle, base_name, factory in configs or CONFIGS:
            make_base, method = BASES[base_name]
            bare = _stepper(optax.chain(make_base(), optax.scale(-1e-3)), loss_fn, params, x, y, tuned=False)
            tuned = _stepper(factory(make_base(), method), loss_fn, params, x, y, tuned=True)
            ratio, tb = step_time_ratio(bare, tuned, repeats=repeats, steps=steps)
            rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name, backend="jax",
                             ratio=ratio, base_ms=1e3 * tb))
            if verbose:
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    rows = measure(args.repeats, args.steps, verbose=True)
    cols = ["task", "tuner", "oracle", "base", "backend", "ratio", "base_ms"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
