"""How far below the best constant learning rate can a *schedule* go on a suite cell?
``python -m benchmarks.schedule_ceiling --task lm --widths 4,8,16 [--results results/default/results.jsonl]``.

A tuner's target "≤ 0.9× the best constant" is out of reach of any learning-rate rule on a task where no
schedule gets there either. This trains the default suite's full-batch cell of ``--task`` (its data, model,
base and horizon: :mod:`benchmarks.suites`, :mod:`benchmarks.tasks`) with the bare base optimizer under simple
schedules of peak ``c × lr*``, ``lr*`` the best constant (the report's rule on ``--results``,
:func:`benchmarks.best_constant.best_constant`, or ``--lr``): the constant itself, a cosine decay to 0, a linear
decay to 0 and a cosine decay after a 25-step linear warm-up, for ``c`` in ``--factors``. Each run's final train
loss (the suite's final window) is divided by the constant's rerun on the same seed; the table gives the median and
the worst over seeds, and the median eval loss. The rows print as they finish; ``--out`` appends them as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Callable

import numpy as np

from . import suites
from . import tasks as tasks_mod
from .best_constant import best_constant as choose
from .plan import eval_metric, final_loss
from .results import final_window, load_results
from .tuners import torch_base

WARMUP = 25


def experiment(task: str) -> suites.Experiment:
    """The default suite's full-batch, SP, PyTorch experiment of ``task``."""
    for exp in suites.get_suite("default").experiments:
        if exp.task == task and exp.regime == "full" and "sp" in exp.params and "torch" in exp.backends:
            return exp
    raise ValueError(f"the default suite has no full-batch PyTorch experiment of task {task!r}")


def best_constant(records: list[dict], exp: suites.Experiment, width: int) -> float:
    """The best constant of ``records`` by the report's rule (:func:`benchmarks.best_constant.best_constant`), each
    seed's run by its last record (a results file resumed after a code change holds a record per code version)."""
    runs: dict[float, dict] = {}
    for r in records:
        if ((r["task"], r["regime"], r["width"], r["tuner_name"], r["param"], r["backend"])
                == (exp.task, exp.regime, width, "constant", "sp", "torch")):
            runs.setdefault(r["settings"]["lr"], {})[r["seed"]] = r
    if not runs:
        raise ValueError(f"no constant runs of {exp.task} full width {width} in the results")
    return choose({lr: [final_loss(r) for r in rs.values()] for lr, rs in runs.items()},
                  {lr: [eval_metric(r, "eval_loss", math.inf) for r in rs.values()] for lr, rs in runs.items()})[0]


def schedules(lr: float, factors: list[float], steps: int) -> dict[str, Callable[[int], float]]:
    """Name -> ``t -> lr_t``: the constant, and per factor ``c`` the cosine, linear and warm-up + cosine decays."""
    def cosine(t: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * t / steps))

    out: dict[str, Callable[[int], float]] = {"constant": lambda t: lr}
    for c in factors:
        out[f"cosine x{c:g}"] = lambda t, c=c: c * lr * cosine(t)
        out[f"linear x{c:g}"] = lambda t, c=c: c * lr * (1 - t / steps)
        out[f"warmup+cosine x{c:g}"] = lambda t, c=c: c * lr * min(1.0, (t + 1) / WARMUP) * cosine(t)
    return out


def train(exp: suites.Experiment, width: int, seed: int, lr_at: Callable[[int], float],
          steps: int) -> tuple[float, float]:
    """Final train loss (the suite's final window) and eval loss of the base optimizer under ``lr_at``."""
    prob = tasks_mod.torch_problem(exp, width, seed)
    model = prob.model
    model.train()
    opt = torch_base(exp.base or tasks_mod.TASKS[exp.task].base, model.parameters(), lr_at(0))
    batches = prob.batches()
    losses = []
    for t in range(steps):
        x, y = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        opt.zero_grad(set_to_none=True)
        loss = prob.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    window = losses[-final_window(exp.regime, steps):]
    final = float(np.mean(window)) if np.all(np.isfinite(window)) else math.inf
    return final, prob.evaluate()[0]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="lm", choices=("lm", "vit", "resnet"))
    ap.add_argument("--widths", default="4,8,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--factors", default="1,2,4", help="peak rates, in units of the best constant")
    ap.add_argument("--results", default="results/default/results.jsonl",
                    help="a results file of the default suite, for the best constant")
    ap.add_argument("--lr", type=float, default=None, help="the best constant (instead of --results)")
    ap.add_argument("--steps", type=int, default=None, help="default: the suite's horizon")
    ap.add_argument("--out", default=None, help="append each run as a JSON line")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    exp = experiment(args.task)
    steps = args.steps or exp.steps
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    factors = [float(c) for c in args.factors.split(",")]
    records = load_results(args.results) if args.lr is None else []
    rows = []
    for width in widths:
        lr = args.lr if args.lr is not None else best_constant(records, exp, width)
        runs = {name: [train(exp, width, seed, fn, steps) for seed in seeds]
                for name, fn in schedules(lr, factors, steps).items()}
        base = [final for final, _ in runs["constant"]]
        print(f"\n{args.task} full, width {width}, best constant {lr:g}, seeds {seeds}, {steps} steps")
        print("| schedule | final train loss / the constant's, median (worst) | eval loss (median) |")
        print("|---|---|---|")
        for name, results in runs.items():
            ratios = [final / b for (final, _), b in zip(results, base)]
            row = dict(task=args.task, width=width, lr=lr, schedule=name, seeds=seeds, steps=steps,
                       ratios=ratios, eval_losses=[ev for _, ev in results])
            rows.append(row)
            print(f"| {name} | {np.median(ratios):.3f} ({max(ratios):.3f}) | "
                  f"{np.median(row['eval_losses']):.3f} |", flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
