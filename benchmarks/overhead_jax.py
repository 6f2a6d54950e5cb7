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

Compile time (``python -m benchmarks.overhead_jax --compile [--repeats N]``, :func:`compile_times`): the whole
jitted training step of the benchmark runner (:mod:`benchmarks.train_jax`: ``value_and_grad``, the transform's
update with ``value``/``grad``/``value_fn``/``batch``, ``apply_updates``) on the default suite's JAX ViT
(width 8) and its full-batch LM (width 4), lowered and compiled from scratch (``jax.clear_caches()``, persistent
compilation cache off) for the bare Adam step (the runner's constant-lr transform) and for CDAT: the library
default with ``value_fn`` (the ``fd`` oracle), closure-free (no ``value_fn``: the secant, with its noise
correction, the default behind Adam, and without it), and with the suite's
online sharpness every 25 steps; and the bare step plus a second gradient at a probe point, the floor of any
``fd`` oracle (the probe's forward and backward pass, no tuner logic); and Adam wrapped in the secant rule's
arithmetic alone, the floor of any closure-free step (:func:`_secant_floor_transform`). The steps alternate within each repeat; the ratio is the median over repeats
of (CDAT's compile time ÷ the bare step's in the same repeat), CPU seconds of the process (``process_time``:
XLA compiles kernels on several threads; wall seconds are also recorded).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from benchmarks.timing import step_time_ratio
from curvopt.base import BaseMethod
from curvopt.optax import armijo, cdat, edge_of_stability, polyak, quadratic_greedy

__all__ = ["measure", "compile_times", "CONFIGS", "TASKS", "COMPILE_TASKS", "COMPILE_CONFIGS"]


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


# ------------------------------------------------------------------------------------------- compile time
def _suite_problem(task: str):
    """``(loss_fn(params, batch), params, batch, experiment)`` of the default suite's JAX ViT (width 8) or its
    full-batch LM (width 4), as :mod:`benchmarks.train_jax` builds them."""
    from benchmarks import suites, tasks

    width = {"vit": 8, "lm": 4}[task]
    exp = next(e for e in suites.DEFAULT.experiments
               if e.task == task and e.regime == "full" and width in e.widths and e.params == ("sp",))
    prob = tasks.jax_problem(exp, width, seed=0)
    return prob.loss_fn, prob.params, next(prob.batches()), exp


def _bare_transform():
    from benchmarks.tuners import optax_direction

    return optax.chain(optax_direction("adam"), optax.inject_hyperparams(optax.scale)(step_size=-1e-3))


def _secant_floor_transform():
    """Adam wrapped in the least a closure-free CDAT update computes, none of its guards: ``n = g^T u``, the
    secant ``d = (g_prev - g)^T u_prev / lr_prev`` (the last step was ``-lr_prev u_prev``), their averages
    (``ema`` 0.99), ``lr = 2 n_avg / d_avg`` where both are positive (else the last rate), ``g`` and ``u`` kept
    for the next step. The floor of the closure-free rows' compile time (no closure-free CDAT compiles less)."""
    from benchmarks.tuners import optax_direction

    base = optax_direction("adam")

    def init(params):
        zero = jnp.zeros([], jnp.float32)
        return (base.init(params), optax.tree.zeros_like(params), optax.tree.zeros_like(params), zero, zero, zero)

    def update(grads, state, params=None):
        base_state, g_prev, u_prev, lr_prev, n_avg, d_avg = state
        u, base_state = base.update(grads, base_state, params)
        n = optax.tree.vdot(grads, u)
        d = optax.tree.vdot(optax.tree.sub(g_prev, grads), u_prev) / jnp.where(lr_prev > 0, lr_prev, 1.0)
        n_avg, d_avg = 0.99 * n_avg + 0.01 * n, 0.99 * d_avg + 0.01 * d
        lr = jnp.where((n_avg > 0) & (d_avg > 0), 2 * n_avg / d_avg, jnp.where(lr_prev > 0, lr_prev, 1e-3))
        return optax.tree.scale(-lr, u), (base_state, grads, u, lr, n_avg, d_avg)

    return optax.GradientTransformation(init, update)


def _cdat_transform(sharpness: int, **settings: Any):
    from benchmarks.tuners import build_optax

    return build_optax("cdat", settings, "adam", sharpness=sharpness)


#: name -> (transform factory (the experiment's sharpness period), whether the update gets value/value_fn,
#: whether the step also takes a second gradient at a probe point)
COMPILE_CONFIGS: dict[str, tuple[Callable[[int], Any], bool, bool]] = {
    "bare Adam": (lambda every: _bare_transform(), False, False),
    "bare Adam + a second gradient (fd floor)": (lambda every: _bare_transform(), False, True),
    "CDAT (fd)": (lambda every: _cdat_transform(0), True, False),
    "CDAT closure-free (secant)": (lambda every: _cdat_transform(0), False, False),
    "CDAT closure-free, noise_correction=False": (lambda every: _cdat_transform(0, noise_correction=False), False,
                                                  False),
    "CDAT (fd) + sharpness": (lambda every: _cdat_transform(every), True, False),
    "closure-free floor (Adam + the secant's arithmetic)": (lambda every: _secant_floor_transform(), False, False),
}
COMPILE_TASKS = ("vit", "lm")


def _compile_seconds(tx: Any, loss_fn: Callable, params: Any, batch: Any, with_loss: bool,
                     second_gradient: bool = False) -> tuple[float, float]:
    """``(CPU seconds, wall seconds)`` to lower and compile the runner's step with ``tx`` from scratch.
    ``second_gradient``: the step also returns ``g(w + 1e-3 u)^T u`` (what any fd probe must compile, with
    no tuner logic)."""
    state = tx.init(params)

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if with_loss:
            updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn, batch=batch)
        else:
            updates, state = tx.update(grads, state, params)
        if second_gradient:
            probe = jax.grad(loss_fn)(optax.tree.add_scale(params, 1e-3, updates), batch)
            loss = loss + 0.0 * optax.tree.vdot(probe, updates)
        return optax.apply_updates(params, updates), state, loss

    jax.clear_caches()
    c0, t0 = time.process_time(), time.perf_counter()
    jax.jit(step).lower(params, state, batch).compile()
    return time.process_time() - c0, time.perf_counter() - t0


def compile_times(repeats: int = 3, tasks: tuple[str, ...] = COMPILE_TASKS, configs: tuple[str, ...] | None = None,
                  verbose: bool = False) -> list[dict]:
    """Rows ``{task, config, cpu_s, wall_s, ratio, wall_ratio}``: medians over ``repeats`` of the compile time
    and of its ratio to the bare step's in the same repeat (see the module docstring)."""
    jax.config.update("jax_enable_compilation_cache", False)
    names = list(configs or COMPILE_CONFIGS)
    if "bare Adam" not in names:
        names.insert(0, "bare Adam")
    rows = []
    for task in tasks:
        loss_fn, params, batch, exp = _suite_problem(task)
        cpu: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(repeats):
            for name in names:
                make, with_loss, second_gradient = COMPILE_CONFIGS[name]
                c, w = _compile_seconds(make(exp.sharpness), loss_fn, params, batch, with_loss, second_gradient)
                cpu[name].append(c)
                wall[name].append(w)
                if verbose:
                    print(f"{task} {name}: {c:.2f} s CPU, {w:.2f} s wall", file=sys.stderr, flush=True)
        for name in names:
            rows.append(dict(
                task=task, config=name, cpu_s=statistics.median(cpu[name]), wall_s=statistics.median(wall[name]),
                ratio=statistics.median(a / b for a, b in zip(cpu[name], cpu["bare Adam"])),
                wall_ratio=statistics.median(a / b for a, b in zip(wall[name], wall["bare Adam"]))))
    return rows


def _table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="JAX rows of the overhead table: the jitted step time of each Optax "
                                 "tuner ÷ the bare base step, or (--compile) the compile time of the benchmark "
                                 "runner's training step; see the module docstring")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (step time), 3 (--compile)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per block (step time)")
    ap.add_argument("--compile", action="store_true",
                    help="compile time of the runner's step instead (bare Adam vs CDAT, ViT and LM; --repeats "
                         "defaults to 3)")
    args = ap.parse_args(argv)
    if args.compile:
        rows = compile_times(args.repeats or 3, verbose=True)
        _table(rows, ["task", "config", "cpu_s", "wall_s", "ratio", "wall_ratio"])
        return
    rows = measure(args.repeats or 5, args.steps, verbose=True)
    _table(rows, ["task", "tuner", "oracle", "base", "backend", "ratio", "base_ms"])


if __name__ == "__main__":
    main()
