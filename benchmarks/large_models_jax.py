"""The Optax tuners on models far larger than the benchmark's: compiled memory and step time (docs/performance.md,
"Large models: memory"): ``python -m benchmarks.large_models_jax [--sizes 5M,25M,60M] [--rounds 10]``.

The GELU MLPs of :mod:`benchmarks.large_models` (~5M, ~25M and ~60M float32 parameters, a batch of 8 random
inputs), behind ``optax.scale_by_adam()``: bare ``optax.adam``, CDAT with ``value_fn`` (``fd``) and
closure-free, each with the default numerator and with ``numerator="direction"``; the jitted training step
(gradient, update, ``optax.apply_updates``).

* **Memory**: ``memory_analysis()`` of the compiled step, in units of the parameters' size: the optimizer
  state it keeps, and the step's whole footprint (its arguments, outputs and temporaries, less what outputs
  share with donated arguments) above bare ``optax.adam``'s, with the parameters and the state passed as they
  are and donated (``jax.jit(step, donate_argnums=(0, 1))``, as large models are trained: the new state is
  written over the old). The temporaries alone are not the footprint: the compiled `fd` step at 5M reports 0.02
  parameter sizes of them with the arguments passed as they are and 4.0 donated. Also the bytes the compiled step
  reads and writes per parameter (XLA's cost analysis): the tuner's passes over the parameters, which at this
  batch outweigh the forward and backward pass.
* **Time**: the configurations interleaved step by step in one process, median of ``--rounds`` steps after 2
  warm-up steps ÷ the bare step's (wall clock, ``block_until_ready``).
"""
from __future__ import annotations

import argparse
import time

from benchmarks.large_models import SIZES, interleaved_ratios, size_list

CONFIGS = ("bare", "fd", "closure-free", "fd direction", "closure-free direction")


def _problem(size: str, config: str):
    """(params, state, the training step ``(params, state) -> (params, state)``, not jitted) of ``config`` at
    ``size``."""
    import jax
    import jax.numpy as jnp
    import optax

    from curvopt.optax import BaseMethod, cdat

    width, depth = SIZES[size]
    keys = iter(jax.random.split(jax.random.key(0), depth + 3))
    dims = [width] * (depth + 1) + [10]
    params = [{"w": jax.random.normal(next(keys), (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
              for a, b in zip(dims[:-1], dims[1:])]
    x = jax.random.normal(next(keys), (8, width))
    y = jax.random.randint(next(keys), (8,), 0, 10)

    def loss_fn(p, x, y):
        h = x
        for layer in p[:-1]:
            h = jax.nn.gelu(h @ layer["w"] + layer["b"])
        logits = h @ p[-1]["w"] + p[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if config == "bare":
        opt = optax.adam(1e-3)
    else:
        opt = cdat(optax.scale_by_adam(), base_method=BaseMethod.adam(),
                   numerator="direction" if "direction" in config else None)
    closure = config.startswith("fd")

    def step(params, state):
        value, grads = jax.value_and_grad(loss_fn)(params, x, y)
        extra = {"value": value, "grad": grads, "value_fn": loss_fn, "x": x, "y": y} if closure else {}
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state
    return params, opt.init(params), step


def _bytes(tree) -> int:
    import jax
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def memory(size: str, config: str) -> tuple[float, float, float, float]:
    """(state, footprint, footprint with the arguments donated) of ``config``'s compiled step at ``size``, in
    parameter sizes, and the bytes the step accesses per parameter."""
    import jax

    params, state, step = _problem(size, config)
    footprints, traffic = [], 0.0
    for donate in ((), (0, 1)):
        compiled = jax.jit(step, donate_argnums=donate).lower(params, state).compile()
        m = compiled.memory_analysis()
        footprints.append(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                          - m.alias_size_in_bytes)
        if not donate:
            cost = compiled.cost_analysis()
            traffic = (cost[0] if isinstance(cost, list) else cost).get("bytes accessed", float("nan"))
    size_bytes = _bytes(params)
    count = size_bytes / 4  # float32
    return _bytes(state) / size_bytes, footprints[0] / size_bytes, footprints[1] / size_bytes, traffic / count


def step_times(size: str, rounds: int) -> dict[str, float]:
    """Median wall time of a step of each configuration ÷ the bare step's, interleaved in this process."""
    import jax

    def stepper(params, state, step):
        carry, step = [params, state], jax.jit(step)

        def run() -> None:
            carry[:] = jax.block_until_ready(step(*carry))
        return run
    return interleaved_ratios({c: stepper(*_problem(size, c)) for c in CONFIGS}, rounds, warmup=2,
                              clock=time.perf_counter)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=size_list, default="5M,25M,60M")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-time", action="store_true", help="memory only")
    args = ap.parse_args(argv)
    print("| size | bare: state, footprint / donated | " + " | ".join(f"{c}: state, above bare / donated"
                                                                 for c in CONFIGS[1:]) + " | time ÷ bare: "
          + ", ".join(CONFIGS[1:]) + " | bytes accessed per parameter: " + ", ".join(CONFIGS) + " |")
    print("|---|" + "---|" * (len(CONFIGS) + 2))
    for size in args.sizes:
        mem = [memory(size, c) for c in CONFIGS]
        (_, bare, bare_donated, _), rest = mem[0], mem[1:]
        ratios = None if args.no_time else step_times(size, args.rounds)
        print(f"| {size} | {mem[0][0]:.2f}, {bare:.2f} / {bare_donated:.2f} | "
              + " | ".join(f"{s:.2f}, {t - bare:.2f} / {d - bare_donated:.2f}" for s, t, d, _ in rest) + " | "
              + ("-" if ratios is None else ", ".join(f"{ratios[c]:.2f}" for c in CONFIGS[1:])) + " | "
              + ", ".join(f"{m[3]:.0f}" for m in mem) + " |", flush=True)


if __name__ == "__main__":
    main()
