"""The online sharpness against an independent reference along training: ``python -m benchmarks.sharpness_accuracy
[--seeds 0,1,2] [--steps 300] [--acts tanh,gelu] [--bases gd,adam]``.

A digits MLP (64 -> 32 -> 10, float32, the first 512 training digits in one batch) trained by the edge-of-stability
rule (PyTorch, its defaults: an estimate every 10 steps, at most 4 warm-started products after the first 50), the
rule that trusts the estimate most (its rate is ``sigma c / lambda``). At each estimate the tuner's own value
(``stats["sharpness"]``; behind Adam ``stats["preconditioned_sharpness"]``) is divided by the top eigenvalue of the
same operator by exact products (double backward) and ARPACK (:mod:`benchmarks.hessian`). Two estimators, each in a
run of its own (the rate follows the estimate, so the runs part): the library's (:func:`curvopt.eigen.
krylov_estimate`, Rayleigh-Ritz on the pass's last iterates) and the estimate as it was before, the pass's last
Rayleigh quotient (patched here). Printed per estimator, activation and base: the median and the lowest ratio over
the seeds' estimates after the first, the share of estimates more than 5 % low, and the final train loss (median over
seeds). Smooth activations only: on a ReLU network the finite-difference products cross kinks (docs/pytorch.md).
"""
from __future__ import annotations

import argparse
import contextlib
import math
from unittest import mock

import numpy as np
import torch
from torch import nn

from benchmarks.__main__ import _csv, _int_at_least, _one_of, _seed
from benchmarks.data import load_digits
from benchmarks.hessian import top_eigenvalue
from curvopt.torch import EdgeOfStability
from torch_backend import sharpness as torch_sharpness
from torch_backend.preconditioning import preconditioner_scales

ACTS = {"tanh": nn.Tanh, "gelu": nn.GELU}
BASES = {"gd": lambda ps: torch.optim.SGD(ps, lr=1.0), "adam": lambda ps: torch.optim.Adam(ps, lr=1.0)}
ESTIMATORS = ("krylov", "rayleigh")
#: the reference is taken every 10 steps after step 0, so a run needs 11 steps for one estimate / reference ratio
MIN_STEPS = 11


def _estimator(name: str):
    """The library as it is, or with the pass's estimate its last Rayleigh quotient."""
    if name == "krylov":
        return contextlib.nullcontext()
    return mock.patch.object(torch_sharpness, "krylov_estimate", lambda state, eps, xp: state.value)


def run(act: str, base: str, seed: int, estimator: str, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), ACTS[act](), nn.Linear(32, 10))
    params = list(model.parameters())
    opt = EdgeOfStability(BASES[base](params))
    key = "preconditioned_sharpness" if base == "adam" else "sharpness"

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    ratios, loss = [], math.nan
    with _estimator(estimator):
        for t in range(steps):
            # the reference at the point the step estimates at (before it moves), the operator the tuner uses
            due = t % 10 == 0 and t > 0
            if due:
                scales = preconditioner_scales(opt.base, params) if base == "adam" else None
                ref, _ = top_eigenvalue(lambda: nn.functional.cross_entropy(model(x), y), params, scales=scales)
            loss = float(opt.step(closure).detach())
            if due:
                ratios.append(float(opt.stats[key]) / ref)
    return {"ratios": ratios, "loss": loss}


def build_parser() -> argparse.ArgumentParser:
    """The command line, every value checked as it is parsed (a bad one: a usage error, exit status 2)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sharpness_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=_csv(int, "seed", _seed), default=(0, 1, 2), help="comma-separated seeds")
    ap.add_argument("--steps", type=_int_at_least(MIN_STEPS), default=300,
                    help=f"training steps per run (>= {MIN_STEPS}: the first reference is at step 10)")
    ap.add_argument("--acts", type=_csv(str, "activation", _one_of(tuple(ACTS))), default=tuple(ACTS),
                    help=f"comma-separated activations, of {', '.join(ACTS)}")
    ap.add_argument("--bases", type=_csv(str, "base", _one_of(tuple(BASES))), default=tuple(BASES),
                    help=f"comma-separated base optimizers, of {', '.join(BASES)}")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    data = load_digits()
    x = torch.tensor(data.x_train[:512].reshape(512, -1))
    y = torch.tensor(data.y_train[:512])
    print("| activation | base | estimator | estimate / reference: median | lowest | share > 5 % low | highest "
          "| final train loss (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for act in args.acts:
        for base in args.bases:
            for est in ESTIMATORS:
                runs = [run(act, base, s, est, args.steps, x, y) for s in args.seeds]
                r = np.concatenate([o["ratios"] for o in runs])
                print(f"| {act} | {base} | {est} | {np.median(r):.3f} | {r.min():.3f} | {np.mean(r < 0.95):.0%} "
                      f"| {r.max():.3f} | {np.median([o['loss'] for o in runs]):.4g} |", flush=True)


if __name__ == "__main__":
    main()
