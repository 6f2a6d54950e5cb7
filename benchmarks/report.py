"""``report.md``, PNG plots and a compact README table from ``results.jsonl``.

One table per task x regime x backend x parameterisation. For every width: the best constant learning rate of
the grid and every tuner, compared **seed by seed** with that constant:

* the best constant is the grid value with the lowest *median* (over seeds) final train loss (mean of the
  last 5 steps in full batch, the paper's criterion; of the last tenth of the steps in mini-batch, where one
  batch's loss is noise), the lower rate on a tie; a run that diverged counts as ``inf``, and a value that
  diverged on any seed ranks behind every value that trained on all of them
  (:func:`benchmarks.best_constant.best_constant`, as the grid's widening);
* a tuner's ratio on a seed is its final train loss ÷ the best constant's on the same seed (< 1: the tuner
  beat the tuned constant); the table shows the **median** over seeds and the **worst** seed (named);
  ``verdict`` is ``win`` only when the median and the worst seed are both below 1, ``loss`` when the median
  is above 1, ``mixed`` otherwise;
* where that constant fits its training set (median final train loss below
  :data:`benchmarks.best_constant.FITTED`, marked :data:`FIT`) train losses that small are noise: the best
  constant is then the grid value best by the eval loss (same rule) and the verdict is on the eval loss, the
  ratio of each seed's eval loss to the best constant's (``eval ÷ best const``, given for every width);
* ``steps to target`` / ``CPU s to target``: the first step at which the training loss is at or below
  1.1 x the best constant's final train loss on the same seed, median over the seeds where that constant did
  not diverge (``—``: the median seed never reached it; a run that diverged never reaches it, whatever its loss
  on the way), and the CPU seconds of the run until then;
* eval loss and accuracy on the held-out split (medians over seeds) beside the train loss; a run without
  one (diverged, failed, or non-finite) counts as the worst (eval loss ``inf``, accuracy 0);
* ``step time ÷ base``: median CPU time per step ÷ that of the bare base optimizer (the constant runs of the
  same width and backend), in the same sweep (CPU time of the process, so other processes on a shared
  machine do not distort it; the JSONL has wall times too);
* ``LR range`` of the learning rate the tuner chose, ``LR max÷final`` its decay factor and ``sharpness ×``
  the last ÷ early sharpness estimate (the first after a tenth of the run; Adam: preconditioned), medians
  over seeds.

Plots per task x regime x backend x parameterisation (every seed, thin lines drawn alike, the legend naming each
tuner once): loss, learning rate and sharpness per step (with the stability threshold ``c/lr`` of the first seed's
rate: 2/lr for GD, 38/lr for Adam on the preconditioned sharpness; no sharpness plot where no run estimated it),
final train and eval loss vs width per tuner (the medians of the tables), learning rate vs width. ``readme_table.md``: one
row per tuner, one column per task x regime x backend x parameterisation, each cell the median ratio over
widths and seeds with the worst (width, seed) in brackets, the widths whose best constant fitted its training set
pooled apart by their eval-loss ratios. There and in the summary table a ratio against a best constant still at an
edge of its grid is marked (:data:`EDGE`), and one of a width whose constant fitted (:data:`FIT`), each with a legend
line.

A run recorded twice (an older runner appended the rerun of a failed run after its error record) counts once, by
its last record; a record without one of :data:`AXES` is skipped with a warning.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict

import numpy as np

from .best_constant import FITTED, best_constant
from .plan import eval_metric
from .plan import final_loss as _final
from .results import LAST, RESULTS, latest_by_key, load_results, write_atomically

__all__ = ["write_report", "analyse", "threshold_coefficient", "TARGET"]

MOMENTUM = 0.9
TARGET = 1.1  # time to target: first step with loss <= TARGET x the best constant's final loss (same seed)
AXES = ("task", "regime", "backend", "param", "width", "tuner", "tuner_name", "seed")  # what a run is grouped by
EDGE = "†"  # marks a ratio against a best constant still at an edge of its grid (report.md's "grid edge")
EDGE_NOTE = (f"{EDGE}: against a best constant still at an edge of its grid, or its only value (where the suite "
             "widens its grids, the widening stopped there); a constant beyond that edge may do better, which would "
             "raise the ratio.")
FIT = "‡"  # marks a width whose best constant fitted its training set (median final train loss < FITTED)
FIT_NOTE = (f"{FIT}: a width whose best constant by train loss fits its training set (median final train loss < "
            f"{FITTED:g}): train losses that small are noise, so there the best constant is the grid value best by "
            "eval loss, and the verdict, and the README table's figure, is the eval loss ÷ that constant's on the "
            "same seed (median, worst seed).")
ORDER = ["constant", "cdat", "greedy", "linesearch", "polyak", "eos", "prodigy", "schedulefree", "dadapt", "sophia"]


def threshold_coefficient(base: str) -> float:
    from curvopt.thresholds import stability_coefficient

    if base == "adam":
        return stability_coefficient("adam", beta1=0.9)
    if base == "momentum":
        return stability_coefficient("heavy_ball", momentum=MOMENTUM)
    return stability_coefficient("gd")


def _arr(rec: dict, col: str) -> np.ndarray:
    vals = rec.get("steps", {}).get(col, [])
    return np.array([np.nan if v is None else v for v in vals], dtype=float)


def _num(x, default=math.nan) -> float:
    return default if x is None else float(x)


def _sharp_col(rec: dict) -> str:
    return "preconditioned_sharpness" if rec.get("base") == "adam" else "sharpness"


def _step_time(rec: dict) -> float:
    """Median CPU seconds per step (robust to other processes on a shared machine); wall time if absent."""
    s = _summary(rec)
    v = s.get("median_step_cpu")
    return _num(v) if v is not None else _num(s.get("median_step_time"))


def _to_target(rec: dict, target: float) -> tuple[float, float]:
    """(updates, CPU seconds) until the mean of the last ``w`` losses, ``w`` the window the final loss averages
    (:func:`benchmarks.results.final_window`: one batch's loss is noise; :data:`LAST` in a summary written before
    it recorded its window, whose final loss was the mean of the last :data:`LAST` losses), first reaches the
    finite ``target``; (inf, inf) if it never does. ``loss[i]`` is the loss after ``i`` updates (0: at the
    initialisation), so the earliest count is ``w - 1``. A run that diverged (or failed) never does: its loss on
    the way to the blow-up is no result (a run that diverged on every seed was the fastest to target)."""
    loss = _arr(rec, "loss")
    if math.isinf(_final(rec)):
        return math.inf, math.inf
    window = max(1, min(int(_summary(rec).get("final_window") or LAST), len(loss)))
    if not len(loss):
        return math.inf, math.inf
    hit = np.nonzero(np.convolve(loss, np.ones(window) / window, "valid") <= target * (1 + 1e-12))[0]
    if not len(hit):
        return math.inf, math.inf
    i = int(hit[0]) + window - 1
    t = np.nan_to_num(_arr(rec, "cpu") if "cpu" in rec.get("steps", {}) else _arr(rec, "time"))
    return float(i), float(t[:i].sum()) if len(t) >= i else math.nan


def _median(xs) -> float:
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(xs)) if xs else math.nan


def _ratio(a: float, b: float) -> float:
    """A run's final loss ``a`` over the best constant's ``b`` on the same seed: ``inf`` when the run diverged or
    failed, 0 when only the constant did (the run won that seed), 1 when both did; NaN (not compared) when the
    constant has no record for the seed or fitted its training set exactly (``b = 0 < a``)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if math.isinf(a) or math.isinf(b):
        return 1.0 if math.isinf(a) and math.isinf(b) else math.inf if math.isinf(a) else 0.0
    if b <= 0:
        return 1.0 if a <= 0 else math.nan
    return a / b


def _spread(ratios: dict) -> tuple[float, float, object, dict]:
    """``(median, worst, worst seed, compared)`` of per-seed ratios ``{seed: ratio}`` (NaN: not compared, left
    out; worst seed None when none was compared)."""
    known = {s: v for s, v in ratios.items() if not math.isnan(v)}
    worst_seed = max(known, key=lambda s: known[s]) if known else None
    return _median(list(known.values())), known[worst_seed] if known else math.nan, worst_seed, known


def _sharp_growth(rec: dict) -> float:
    """Last ÷ early sharpness estimate, the early one the first estimate made after the first tenth of the run
    (Adam's first steps have a preconditioned sharpness orders of magnitude above the rest of the run); NaN with
    fewer than two such estimates. The column repeats the latest estimate at every step, so an estimate is made
    where the value changes: with estimates sparser than a tenth of the run, the step-0 value repeated past the
    tenth is not one."""
    sh = _arr(rec, _sharp_col(rec))
    made = np.isfinite(sh)
    made[1:] &= sh[1:] != sh[:-1]  # NaN != NaN: the first finite value after a gap counts
    early = np.nonzero(made)[0]
    early = early[early >= len(sh) // 10]
    if len(early) < 2 or sh[early[0]] <= 0:
        return math.nan
    return float(sh[early[-1]] / sh[early[0]])


def _summary(rec: dict) -> dict:
    return rec.get("summary") or {}  # a failed run has none


def _eval_loss(rec: dict) -> float:
    """The eval loss, ``inf`` for the worst (:func:`benchmarks.plan.eval_metric`)."""
    return eval_metric(rec, "eval_loss", math.inf)


def _eval_acc(rec: dict) -> float:
    """The eval accuracy, 0 for the worst (:func:`benchmarks.plan.eval_metric`)."""
    return eval_metric(rec, "eval_accuracy", 0.0)


def _lr_drop(rec: dict) -> float:
    s = _summary(rec)
    hi, fin = _num(s.get("lr_max")), _num(s.get("lr_final"))
    return hi / fin if fin > 0 else math.nan


def _runs(records: list[dict]) -> list[dict]:
    """Each run once, the last record of its key (:func:`benchmarks.results.latest_by_key`), without the records
    that lack one of the :data:`AXES` (an older runner's, or one edited by hand): those are skipped with one
    warning, never fatal, like a damaged line of the results file."""
    runs = latest_by_key(records)
    bad = [k for k, r in runs.items() if any(a not in r for a in AXES)]
    if bad:
        warnings.warn(f"skipping {len(bad)} record(s) without one of {', '.join(AXES)} (e.g. {bad[0]!r}): "
                      "they are left out of the report")
    for k in bad:
        del runs[k]
    return list(runs.values())


def analyse(records: list[dict]) -> dict:
    """Group the runs (:func:`_runs`) and compute every table entry: ``{(task, regime, backend, param): {width:
    info}}``."""
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in _runs(records):  # a failed run counts as diverged (final loss inf), as in the grid's widening
        g = (r["task"], r["regime"], r["backend"], r["param"])
        groups[g][r["width"]][r["tuner"]][r["seed"]] = r
    out: dict = {}
    for g, widths in groups.items():
        out[g] = {}
        for w, by_tuner in sorted(widths.items()):
            consts = {lab: runs for lab, runs in by_tuner.items()
                      if next(iter(runs.values()))["tuner_name"] == "constant"}
            label_of = {float(lab.split("lr=")[-1]): lab for lab in consts}
            seed_finals = {lr: [_final(r) for r in consts[lab].values()] for lr, lab in label_of.items()}
            grid_finals = {lr: _median(fs) for lr, fs in seed_finals.items()}
            # where the constants fit the training set the verdict is on the eval loss: the one to beat is the
            # best by it
            best_lr, fitted = best_constant(seed_finals, {lr: [_eval_loss(r) for r in consts[lab].values()]
                                                          for lr, lab in label_of.items()})
            best_lab = label_of.get(best_lr)
            best = consts.get(best_lab, {})
            best_final = {seed: _final(r) for seed, r in best.items()}
            best_eval = {seed: _eval_loss(r) for seed, r in best.items()}
            base_time = _median([_step_time(r) for runs in consts.values() for r in runs.values()])
            rows = {}
            for lab, runs in by_tuner.items():
                if lab in consts and lab != best_lab:
                    continue
                seeds = sorted(runs)
                finals = {s: _final(runs[s]) for s in seeds}
                med, worst, worst_seed, known = _spread({s: _ratio(finals[s], best_final.get(s, math.nan))
                                                         for s in seeds})
                evals = _spread({s: _ratio(_eval_loss(runs[s]), best_eval.get(s, math.nan)) for s in seeds})
                # a seed whose best constant diverged (or did not run) has no target: left out of the median
                hits = [_to_target(runs[s], TARGET * best_final[s]) for s in seeds
                        if math.isfinite(best_final.get(s, math.nan))]
                # the verdict is on the eval-loss ratios where the best constant fitted its training set
                v_med, v_worst, _, v_known = evals if fitted else (med, worst, worst_seed, known)
                win = bool(v_med < 1 and v_worst < 1 and len(v_known) == len(seeds))
                steps_t = _median([h[0] for h in hits])
                cpu_t = _median([h[1] for h in hits])
                lr = np.concatenate([_arr(r, "lr") for r in runs.values()])
                lr = lr[np.isfinite(lr) & (lr > 0)]
                step_time = _median([_step_time(r) for r in runs.values()])
                rows[lab] = {
                    "label": "constant (best: lr=" + lab.split("lr=")[-1] + ")" if lab == best_lab else lab,
                    "is_best_constant": lab == best_lab,
                    "tuner_name": runs[seeds[0]]["tuner_name"],
                    "seeds": len(seeds), "compared": len(known),
                    "final": _median(list(finals.values())),
                    "ratio": med, "worst_ratio": worst, "worst_seed": worst_seed,
                    "eval_ratio": evals[0], "eval_worst_ratio": evals[1], "eval_worst_seed": evals[2],
                    "verdict": "—" if math.isnan(v_med) else "loss" if v_med > 1 else "win" if win else "mixed",
                    "win": win,
                    "steps_to_target": steps_t if math.isfinite(steps_t) else math.nan,
                    "time_to_target": cpu_t if math.isfinite(cpu_t) else math.nan,
                    "step_time": step_time,
                    "step_ratio": step_time / base_time if base_time > 0 else math.nan,
                    "lr_min": float(lr.min()) if len(lr) else math.nan,
                    "lr_max": float(lr.max()) if len(lr) else math.nan,
                    "lr_drop": _median([_lr_drop(r) for r in runs.values()]),
                    "sharp_growth": _median([_sharp_growth(r) for r in runs.values()]),
                    "eval_loss": _median([_eval_loss(r) for r in runs.values()]),
                    "eval_acc": _median([_eval_acc(r) for r in runs.values()]),
                    "closure_calls": _median([_num(_summary(r).get("mean_closure_calls")) for r in runs.values()]),
                    "runs": [runs[s] for s in seeds],
                }
            grid = sorted(grid_finals)
            out[g][w] = {"best_label": best_lab, "best_final": _median(list(best_final.values())),
                         "best_lr": math.nan if best_lr is None else best_lr, "base_time": base_time, "rows": rows,
                         "grid": grid, "grid_finals": grid_finals, "fitted": fitted,
                         "grid_diverged": {lr: (sum(1 for f in fs if math.isinf(f)), len(fs))
                                           for lr, fs in seed_finals.items()},
                         "best_at_edge": bool(grid) and best_lr in (grid[0], grid[-1])}
    return out


def _diverged_on(counts: tuple[int, int], median: float) -> str:
    """The grid line's mark of a rate that diverged on some seeds, not most (its median is finite, yet it ranks
    behind every rate that diverged on none: :func:`benchmarks.best_constant.best_constant`)."""
    k, n = counts
    return f" (diverged on {k} of {n} seeds)" if k and math.isfinite(median) else ""


def _described(info: dict) -> dict:
    """A record of a width's runs that describes the group (base, steps, data, model): a failed worker's record
    written by a runner before these fields were added to it has only the run's key fields."""
    recs = [r for row in info["rows"].values() for r in row["runs"]]
    return next((r for r in recs if "max_steps" in r), recs[0])


def _seeds(r: dict) -> str:
    """The seeds column: ``n``, or ``compared/n`` when some seed has no ratio (its constant is missing)."""
    return str(r["seeds"]) if r["compared"] == r["seeds"] else f"{r['compared']}/{r['seeds']}"


def _fmt(x, spec=".3g", none="—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return format(x, spec)


def _order(rows: dict) -> list[str]:
    return sorted(rows, key=lambda lab: (ORDER.index(rows[lab]["tuner_name"]) if rows[lab]["tuner_name"] in ORDER
                                         else 99, lab))


def _worst(r: dict) -> str:
    if r["worst_seed"] is None:
        return "—"
    return f"{_fmt(r['worst_ratio'], '.3f')} (seed {r['worst_seed']})"


def _eval_spread(r: dict) -> str:
    """The eval-loss ratio column: median (worst seed), ``1`` for the best constant itself."""
    if r["is_best_constant"]:
        return "1"
    if r["eval_worst_seed"] is None:
        return "—"
    return f"{_fmt(r['eval_ratio'], '.3f')} ({_fmt(r['eval_worst_ratio'], '.3f')}, seed {r['eval_worst_seed']})"


def _mark(info: dict) -> str:
    """The marks of a width's ratios: :data:`EDGE` and :data:`FIT`."""
    return (EDGE if info["best_at_edge"] else "") + (FIT if info["fitted"] else "")


def _notes(infos) -> list[str]:
    """The legend lines of the marks the widths ``infos`` carry, with a blank line before them."""
    infos = list(infos)
    notes = [note for note, key in ((EDGE_NOTE, "best_at_edge"), (FIT_NOTE, "fitted")) if any(i[key] for i in infos)]
    return [""] + notes if notes else []


def group_table(g, widths: dict) -> str:
    """A group's per-width table; :data:`EDGE` marks the ratios of a width whose best constant is still at an edge
    of its grid, :data:`FIT` those of a width whose best constant fitted its training set, where the verdict is
    on the eval loss (legend lines under the table say so)."""
    head = ("| width | tuner | seeds | final train loss | median ÷ best const | worst seed | verdict | "
            "steps to target | CPU s to target | eval loss | eval ÷ best const | eval acc | step time ÷ base | "
            "LR range | LR max÷final | sharpness × |")
    lines = [head, "|" + "---|" * 16]
    for w, info in widths.items():
        mark = _mark(info)
        for lab in _order(info["rows"]):
            r = info["rows"][lab]
            best = r["is_best_constant"]
            lines.append(
                f"| {w} | {r['label']} | {_seeds(r)} | {_fmt(r['final'], '.4g')} | "
                f"{'1' if best else _fmt(r['ratio'], '.3f')}{mark} | {'—' if best else _worst(r)} | "
                f"{'' if best else r['verdict']} | {_fmt(r['steps_to_target'], 'g')} | "
                f"{_fmt(r['time_to_target'], '.1f')} | {_fmt(r['eval_loss'], '.3f')} | {_eval_spread(r)} | "
                f"{_fmt(r['eval_acc'], '.3f')} | {_fmt(r['step_ratio'], '.2f')} | "
                f"{_fmt(r['lr_min'], '.2g')}–{_fmt(r['lr_max'], '.2g')} | "
                f"{_fmt(r['lr_drop'], '.1f')} | {_fmt(r['sharp_growth'], '.2f')} |")
    return "\n".join(lines + _notes(widths.values()))


def summary_table(analysis: dict) -> str:
    """Cross-task table (printed by ``make bench``), marked as :func:`group_table`'s."""
    lines = ["| task | regime | backend | param | width | tuner | seeds | median ÷ best const | worst seed | "
             "verdict | eval loss | eval ÷ best const | steps to target | step time ÷ base |", "|" + "---|" * 14]
    for g in sorted(analysis):
        task, regime, backend, param = g
        for w, info in analysis[g].items():
            mark = _mark(info)
            for lab in _order(info["rows"]):
                r = info["rows"][lab]
                best = r["is_best_constant"]
                lines.append(f"| {task} | {regime} | {backend} | {param} | {w} | {r['label']} | {_seeds(r)} | "
                             f"{'1' if best else _fmt(r['ratio'], '.3f')}{mark} | {'—' if best else _worst(r)} | "
                             f"{'' if best else r['verdict']} | {_fmt(r['eval_loss'], '.3f')} | "
                             f"{_eval_spread(r)} | {_fmt(r['steps_to_target'], 'g')} | "
                             f"{_fmt(r['step_ratio'], '.2f')} |")
    return "\n".join(lines + _notes(info for widths in analysis.values() for info in widths.values()))


def _pooled(vals: list, prefix: str) -> str:
    """``prefix`` and the median of the ratios ``[(ratio, width, seed, at_edge), ...]`` with the worst (width,
    seed) in brackets (:data:`EDGE` when one is against a best constant at its grid's edge); "" when none was
    compared."""
    known = [v for v in vals if not math.isnan(v[0])]
    if not known:
        return ""
    worst = max(known, key=lambda v: v[0])
    partial = f", {len(known)} of {len(vals)} runs compared" if len(known) < len(vals) else ""
    mark = EDGE if any(v[3] for v in known) else ""
    return (f"{prefix}{_fmt(_median([v[0] for v in known]), '.2f')}{mark} ({_fmt(worst[0], '.2f')}, "
            f"w{worst[1]} s{worst[2]}{partial})")


def readme_table(analysis: dict) -> str:
    """One row per tuner, one column per group: the median ratio over widths x seeds with the worst (width, seed);
    the widths whose best constant fitted its training set (:data:`FIT`) pooled apart, by their eval-loss ratios
    (``; ‡ eval ...``, or alone where every width fitted). :data:`EDGE` marks a figure with a ratio against a best
    constant still at an edge of its grid. Legend lines under the table say so; no groups (nothing ran): a line
    that says so."""
    groups = sorted(analysis)
    if not groups:
        return "No run to summarise (every planned run was skipped or none was planned)."
    cells: dict = defaultdict(dict)
    for g in groups:
        per: dict = defaultdict(lambda: {False: [], True: []})  # tuner -> fitted? -> [(ratio, width, seed, edge)]
        for w, info in analysis[g].items():
            if info["best_label"] is None:  # no constant ran at this width (a narrowed sweep): nothing to divide by
                continue
            best = {rec["seed"]: rec for rec in info["rows"][info["best_label"]]["runs"]}
            measure = _eval_loss if info["fitted"] else _final
            for lab, r in info["rows"].items():
                if r["is_best_constant"]:
                    continue
                for rec in r["runs"]:
                    b = best.get(rec["seed"])
                    ratio = math.nan if b is None else _ratio(measure(rec), measure(b))
                    per[lab][info["fitted"]].append((ratio, w, rec["seed"], info["best_at_edge"]))
        for lab, by_fit in per.items():
            parts = [p for p in (_pooled(by_fit[False], ""), _pooled(by_fit[True], f"{FIT} eval ")) if p]
            if parts:
                cells[lab][g] = "; ".join(parts)
    names = sorted(cells, key=lambda lab: (ORDER.index(lab.split(":")[0]) if lab.split(":")[0] in ORDER else 99, lab))
    head = "| tuner | " + " | ".join(f"{t} {r} {b} {p}" for t, r, b, p in groups) + " |"
    lines = [head, "|" + "---|" * (len(groups) + 1)]
    for lab in names:
        lines.append(f"| {lab} | " + " | ".join(cells[lab].get(g, "—") for g in groups) + " |")
    shown = " ".join(cell for row in cells.values() for cell in row.values())
    notes = [note for note, mark in ((EDGE_NOTE, EDGE), (FIT_NOTE, FIT)) if mark in shown]
    lines += [""] + notes if notes else []
    return ("Final train loss ÷ the best constant of the same run (each width's constant grid, listed in report.md), "
            "per seed: "
            "median over widths and seeds, in brackets the worst (width, seed). < 1 beats the tuned constant.\n\n"
            + "\n".join(lines))


# -------------------------------------------------------------------------------------------- plots
def _colors(labels):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]  # distinct for up to 20 curves
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _curve(ax, kind: str, rec: dict, c, label, lw: float) -> None:
    alpha = 0.7
    if kind in ("loss", "lr"):
        y = _arr(rec, kind)
        ax.plot(np.arange(1, len(y) + 1), y, color=c, label=label, lw=lw, alpha=alpha)
        return
    sh = _arr(rec, _sharp_col(rec))
    lr = _arr(rec, "lr")
    steps = np.arange(1, len(sh) + 1)
    every = max(1, int(rec.get("sharpness_every") or 1))
    m = np.isfinite(sh)
    if rec["tuner_name"] != "constant":  # the sharpness is kept between estimates
        m &= ((steps - 1) % every == 0)
    if m.any():
        ax.plot(steps[m], sh[m], "o-", ms=2, color=c, lw=lw * 0.8, label=label, alpha=alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        thr = threshold_coefficient(rec.get("base", "gd")) / lr
    if label and np.isfinite(thr).any() and (m.any() or rec["tuner_name"] == "constant"):
        ax.plot(steps, thr, "--", color=c, lw=0.9, alpha=0.8)


def _plot_group(out_dir: str, g, widths: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, regime, backend, param = g
    stem = f"{task}_{regime}_{backend}_{param}"
    ws = list(widths)
    labels = []
    for info in widths.values():
        for lab in _order(info["rows"]):
            name = info["rows"][lab]["tuner_name"] if info["rows"][lab]["is_best_constant"] else lab
            if name not in labels:
                labels.append(name)
    colors = _colors(labels)
    paths = []

    def curve_fig(kind: str):
        fig, axes = plt.subplots(1, len(ws), figsize=(4.2 * len(ws), 3.4), squeeze=False)
        for ax, w in zip(axes[0], ws):
            info = widths[w]
            for lab in _order(info["rows"]):
                row = info["rows"][lab]
                name = row["tuner_name"] if row["is_best_constant"] else lab
                c = colors[name]
                for k, rec in enumerate(row["runs"]):  # every seed alike (no seed stands for the others)
                    _curve(ax, kind, rec, c, row["label"] if k == 0 else None, 0.9)
            ax.set_title(f"{task} {regime} width {w}")
            ax.set_xlabel("step")
            _log_y(ax)
            if kind == "sharpness":
                coef = threshold_coefficient(_described(widths[w])["base"])
                ax.set_ylabel(("preconditioned sharpness" if coef > 10 else "sharpness") +
                              f" (dashed: {coef:.3g}/lr)")
            else:
                ax.set_ylabel({"loss": "train loss", "lr": "learning rate"}[kind])
        for ax in axes[0]:
            ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        p = os.path.join(out_dir, f"{stem}_{kind}.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        return p

    estimated = any(np.isfinite(_arr(rec, _sharp_col(rec))).any() for info in widths.values()
                    for row in info["rows"].values() for rec in row["runs"])
    for kind in ("loss", "lr") + (("sharpness",) if estimated else ()):
        paths.append(curve_fig(kind))

    # final train and eval loss vs width per tuner (a width whose best constant fitted its training set is judged
    # on the eval loss), best lr vs width
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, field in zip(axes, ("final", "eval_loss")):
        for name in labels:
            xs, ys = [], []
            for w in ws:
                for row in widths[w]["rows"].values():
                    nm = row["tuner_name"] if row["is_best_constant"] else None
                    if nm == name or (nm is None and row["label"] == name):
                        xs.append(w)
                        ys.append(row[field] if math.isfinite(row[field]) else np.nan)
            if xs:
                ax.plot(xs, ys, "o-", color=colors[name], label="constant (best)" if name == "constant" else name)
    paths.append(_finish_width_plot(fig, [(axes[0], "final train loss"), (axes[1], "eval loss")],
                                    f"{task} {regime} {backend} {param}", os.path.join(out_dir,
                                                                                       f"{stem}_final_vs_width.png")))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ws, [widths[w]["best_lr"] for w in ws], "s-", color="k", label="best constant lr")
    for name in labels:
        if name == "constant":
            continue
        xs, ys = [], []
        for w in ws:
            for row in widths[w]["rows"].values():
                if row["label"] == name:
                    lr = np.concatenate([_arr(r, "lr")[-LAST:] for r in row["runs"]])
                    lr = lr[np.isfinite(lr) & (lr > 0)]
                    if len(lr):
                        xs.append(w)
                        ys.append(float(np.exp(np.mean(np.log(lr)))))
        if xs:
            ax.plot(xs, ys, "o--", color=colors[name], label=f"{name} (final lr, geo-mean over seeds)")
    paths.append(_finish_width_plot(fig, [(ax, "learning rate")], f"{task} {regime} {backend} {param}",
                                    os.path.join(out_dir, f"{stem}_lr_vs_width.png")))
    return paths


def _log_y(ax) -> None:
    """A log y axis where the axes hold a positive value (every run of a group may have failed: nothing drawn)."""
    if any(np.any(np.asarray(ln.get_ydata(), dtype=float) > 0) for ln in ax.get_lines()):
        ax.set_yscale("log")


def _finish_width_plot(fig, panels: list, title: str, path: str) -> str:
    """Style the ``[(axes, y label), ...]`` of a figure against the width (titled ``title: <y label> vs width``),
    save it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    for ax, ylabel in panels:
        ax.set_xscale("log", base=2)
        _log_y(ax)
        ax.set_xlabel("width")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {ylabel} vs width", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str, keys: set | None = None, plots: bool = True) -> dict:
    """Write ``out_dir/report.md`` (and the PNGs) from ``out_dir/results.jsonl``; ``keys`` restricts the
    report to those runs (the current plan). Returns ``{"path", "summary", "plots", "analysis",
    "readme_table"}``."""
    recs = list(latest_by_key(load_results(os.path.join(out_dir, RESULTS), repair=False)).values())
    missing = 0
    if keys is not None:
        recs = [r for r in recs if r.get("key") in keys]
        missing = len(set(keys) - {r.get("key") for r in recs})
    analysis = analyse(recs)
    errors = [r for r in recs if r.get("status") == "error"]
    seeds = sorted({r.get("seed") for r in recs if "seed" in r})
    cpu = sum(float(np.nansum(_arr(r, "cpu"))) for r in recs)
    wall = sum(_num(r.get("wall_time"), 0.0) for r in recs)
    md = ["# curvopt benchmark report", "",
          f"{len(recs)} runs from `{RESULTS}`, seeds {seeds}. Every tuner is compared seed by seed with the best "
          f"constant (the grid value with the lowest median final train loss, the lower rate on a tie, a value that "
          f"diverged on any seed ranking behind those that trained on all; by the eval loss where that one fits "
          f"the training set, {FIT}; final = mean "
          f"of the last {LAST} steps in full batch, of the last tenth of the steps in mini-batch): the tables give "
          "the median ratio over seeds and the worst seed; a **win** needs both below 1 on every seed. A run that "
          "diverged or failed counts as diverged on its seed (ratio `diverged`; 0 where only the constant "
          "diverged, 1 where both did); a run without an eval loss or accuracy (diverged, failed, or non-finite) "
          "counts as the worst (eval loss inf, accuracy 0); `seeds` reads `k/n` when n − k seeds had no constant "
          "to compare with (no win then). "
          f"Steps / CPU seconds to target: updates until the train loss, averaged over the final loss's window "
          f"(trailing), first reaches {TARGET} × the best constant's final loss on the same seed (median over the "
          "seeds where that constant did not diverge). Step time ÷ base compares median CPU seconds per step with "
          "the bare base optimizer (the constant runs) in the same sweep. `sharpness ×` is the last ÷ the first "
          "estimate after a tenth of the run (preconditioned for Adam).", "",
          f"Cost of these runs: {cpu / 60:.1f} CPU minutes in training steps, {wall / 60:.1f} minutes of run "
          "wall time in total (model building, compilation and evaluation included; runs in parallel overlap).",
          ""]
    plot_paths: list[str] = []
    for g in sorted(analysis):
        task, regime, backend, param = g
        widths = analysis[g]
        rec0 = _described(next(iter(widths.values())))
        md += [f"## {task} · {'full batch' if regime == 'full' else 'mini-batch'} · {backend} · {param}", "",
               f"base: {rec0['base']}, {rec0['max_steps']} steps, data: {rec0['data']}, model: {rec0['model']}.",
               ""]
        for w, info in widths.items():
            grid = ", ".join(f"{lr:.4g}: {_fmt(f, '.3g')}" + _diverged_on(info["grid_diverged"][lr], f)
                             for lr, f in sorted(info["grid_finals"].items()))
            md.append(f"- width {w}: constant grid (lr: median final loss) {grid}"
                      + (" — **best still at the grid edge**" if info["best_at_edge"] else "")
                      + (f" — **the best constant by train loss fits the training set (final loss < {FITTED:g}): "
                         f"train-loss ratios this small are noise, the best constant and the verdict are by the eval "
                         f"loss** ({FIT})"
                         if info["fitted"] else ""))
        md += ["", group_table(g, widths), ""]
        if plots:
            ps = _plot_group(out_dir, g, widths)
            plot_paths += ps
            md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in ps] + [""]
    if errors:
        md += ["## Failed runs", ""] + [f"- `{r['key']}`: {r.get('error')}" for r in errors] + [""]
    summary = summary_table(analysis)
    compact = readme_table(analysis)
    md[2:2] = ["## Summary", "", compact, ""]
    if missing:  # a sweep stopped early (--report-only on partial results): nothing below is settled
        note = (f"**Incomplete: {missing} of the plan's {len(keys)} runs are not in {RESULTS}** (a sweep that "
                "stopped early?): the best constants, the grid edges and every ratio may change once they have run.")
        md[2:2] = [note, ""]
        summary = note + "\n\n" + summary
        compact = note + "\n\n" + compact  # the table that goes into a README says so too
    path = os.path.join(out_dir, "report.md")
    write_atomically(path, "\n".join(md).encode())
    readme = os.path.join(out_dir, "readme_table.md")
    write_atomically(readme, (compact + "\n").encode())
    return {"path": path, "summary": summary, "plots": plot_paths, "analysis": analysis, "readme_table": readme}
