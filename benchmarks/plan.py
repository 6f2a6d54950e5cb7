"""The plan of a sweep: every run (experiment x backend x parameterisation x width x tuner x seed), its key,
and the constant grid's automatic widening.

Runs come in groups of (experiment, backend, parameterisation, width): first the constant grid on every
seed, then the tuners. A grid given as the bare ``constant`` label is *widened*: while the best grid value
(:func:`benchmarks.best_constant.best_constant`, the report's) sits at an edge of the grid, one more value, a
grid factor beyond that edge, is run on every seed (at most ``Experiment.widen`` values per group). The widening values
are a function of the results already recorded, so a killed and resumed sweep plans the same runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from . import tasks as tasks_mod
from . import tuners as tuners_mod
from .best_constant import best_constant
from .suites import DEFAULT_GRIDS, Experiment

__all__ = ["RunSpec", "plan", "group_of", "widening", "widened_keys", "fmt_lr", "final_loss"]


@dataclass(frozen=True)
class RunSpec:
    exp: Experiment
    width: int
    label: str  # tuner label as given (with settings), e.g. "constant:lr=0.125" or "cdat:startup=paper"
    tuner: str  # registry name
    settings: tuple  # sorted (key, value) pairs: the settings given (the library's defaults are not restated)
    param: str  # "sp" | "mup"
    backend: str  # "torch" | "jax"
    seed: int
    from_grid: bool = False  # a value of the constant grid (may be widened), not an explicit constant:lr=

    @property
    def base(self) -> str:
        return self.exp.base or tasks_mod.TASKS[self.exp.task].base

    @property
    def key(self) -> str:
        e = self.exp
        return (f"{e.task}|{e.regime}|w{self.width}|{self.label}|{self.param}|{self.backend}|s{self.seed}"
                f"|{self.base}|{e.steps}|{e.settings_hash(self.param)}")


def group_of(spec: RunSpec) -> tuple:
    """Runs sharing one best constant: (experiment, backend, parameterisation, width)."""
    return (spec.exp.task, spec.exp.regime, spec.exp.settings_hash(), spec.exp.grid, spec.backend, spec.param,
            spec.width)


def fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


def _grid(exp: Experiment, base: str) -> tuple[float, ...]:
    return tuple(exp.grid or DEFAULT_GRIDS[base])


def plan(experiments: Iterable[Experiment], *, tuners: Sequence[str] | None = None, backends=None,
         seeds=(0,), params=None) -> list[RunSpec]:
    """Every run of the sweep, grouped (constants first, then tuners, each over the seeds), in a stable order.
    ``tuners``, ``backends``, ``params``: override every experiment's. Tuner labels are parsed and their
    settings checked here (``ValueError`` before anything runs)."""
    specs: list[RunSpec] = []
    checked: dict = {}
    for exp in experiments:
        base = exp.base or tasks_mod.TASKS[exp.task].base
        labels = list(tuners) if tuners else list(exp.tuners)
        parsed = []
        for label in labels:
            name, sets = tuners_mod.parse_tuner(label)
            label = tuners_mod.canonical_label(label)
            ck = (label, base, tuple(backends or exp.backends))
            if ck not in checked:
                checked[ck] = tuners_mod.check_settings(name, sets, base, backends or exp.backends)
            parsed.append((label, name, checked[ck]))
        consts = [p for p in parsed if p[1] == "constant"]
        if any("lr" not in sets for _, _, sets in consts):  # the grid too: an explicit value of it is its run
            in_grid = {float(fmt_lr(lr)) for lr in _grid(exp, base)}
            consts = [p for p in consts if "lr" not in p[2] or float(p[2]["lr"]) not in in_grid]
        others = [p for p in parsed if p[1] != "constant"]
        for backend in backends or exp.backends:
            for param in params or exp.params:
                for width in exp.widths:
                    for seed in seeds:
                        for label, name, sets in consts:
                            if "lr" in sets:
                                specs.append(RunSpec(exp, width, label, name, tuple(sorted(sets.items())), param,
                                                     backend, seed))
                            else:
                                specs += [_constant(exp, width, lr, param, backend, seed) for lr in _grid(exp, base)]
                    for label, name, sets in others:
                        for seed in seeds:
                            specs.append(RunSpec(exp, width, label, name, tuple(sorted(sets.items())), param,
                                                 backend, seed))
    unique: dict = {}
    for s in specs:  # the same run named twice (a label given twice, experiments made equal by overrides)
        unique.setdefault(s.key, s)
    return list(unique.values())


def _constant(exp: Experiment, width: int, lr: float, param: str, backend: str, seed: int) -> RunSpec:
    v = float(fmt_lr(lr))
    return RunSpec(exp, width, f"constant:lr={fmt_lr(v)}", "constant", (("lr", v),), param, backend, seed,
                   from_grid=True)


def final_loss(rec: dict) -> float:
    """A record's final train loss (``inf`` when it diverged or failed)."""
    s = rec.get("summary") or {}
    if rec.get("status") != "ok" or s.get("diverged"):
        return math.inf
    v = s.get("final_train_loss")
    return math.inf if v is None else float(v)


def eval_metric(rec: dict, field: str, worst: float) -> float:
    """A record's eval metric ``field`` (``eval_loss``, ``eval_accuracy``); ``worst`` where the run diverged or
    failed (its final loss is ``inf``: the runner still evaluates a diverged model, and its finite figure flattered
    the median), the metric is ``null`` (a non-finite value, written as ``null``) or the eval loss is (its accuracy
    counts as the worst too, as the README says); NaN where a finished run's summary has no such field."""
    s = rec.get("summary") or {}
    if math.isinf(final_loss(rec)) or ("eval_loss" in s and s["eval_loss"] is None):  # (the accuracy too)
        return worst
    v = s.get(field)
    if v is not None:
        return float(v)
    return worst if field in s else math.nan


def widening(group_specs: Sequence[RunSpec], records: dict) -> list[RunSpec]:
    """The next constant runs the group needs, or ``[]`` when its grid is settled.

    ``group_specs``: the group's grid runs so far (``from_grid``); ``records``: key -> record. Returns the
    runs (one value, every seed) one grid factor beyond the edge where the best constant sits
    (:func:`benchmarks.best_constant.best_constant`), while fewer than
    ``exp.widen`` values were added; ``[]`` if some run of the grid is not recorded yet or the best is inside.
    """
    grid_specs = [s for s in group_specs if s.from_grid]
    if not grid_specs:
        return []
    exp = grid_specs[0].exp
    base = grid_specs[0].base
    by_lr: dict = {}
    evals: dict = {}
    for s in grid_specs:
        rec = records.get(s.key)
        if rec is None:
            return []
        by_lr.setdefault(dict(s.settings)["lr"], []).append(final_loss(rec))
        evals.setdefault(dict(s.settings)["lr"], []).append(eval_metric(rec, "eval_loss", math.inf))
    lrs = sorted(by_lr)
    initial = sorted({float(fmt_lr(v)) for v in _grid(exp, base)})
    up = sum(1 for lr in lrs if lr > initial[-1])
    down = sum(1 for lr in lrs if lr < initial[0])
    if up + down >= exp.widen or len(lrs) < 2:
        return []
    med = [float(np.median(by_lr[lr])) for lr in lrs]
    lower = initial[0] / exp.grid_factor ** (down + 1)  # powers of the edge: no rounding drift
    if not any(math.isfinite(m) for m in med):
        new = lower  # everything diverged: go down
    else:
        best, _ = best_constant(by_lr, evals)  # the report's best constant, by the same rule
        if lrs[0] < best < lrs[-1]:
            return []
        new = lower if best == lrs[0] else initial[-1] * exp.grid_factor ** (up + 1)
    s0 = grid_specs[0]
    seeds = sorted({s.seed for s in grid_specs})
    return [_constant(exp, s0.width, new, s0.param, s0.backend, seed) for seed in seeds]


def widened_keys(specs: Sequence[RunSpec], records: dict) -> set:
    """The keys the grid widening added to ``specs``, as far as ``records`` (key -> record) got."""
    groups: dict = {}
    for s in specs:
        if s.from_grid:
            groups.setdefault(group_of(s), []).append(s)
    out: set = set()
    for grid in groups.values():
        grid = list(grid)
        while True:
            extra = [s for s in widening(grid, records) if s.key not in out]
            if not extra:
                break
            out |= {s.key for s in extra}
            grid += extra
    return out
