"""``report.md`` and PNG plots from ``results.jsonl``.

One table per task x regime (x backend x parameterisation): for every width, the best constant learning
rate of the grid (selected by the mean training loss over the last 5 steps, as in the paper) and every
tuner, with

* ``final``: final train loss (mean of the last 5 steps; ``diverged`` when it blew up);
* ``÷ best const``: final train loss ÷ the best constant's (< 1: the tuner beat the tuned constant);
* ``steps to target`` / ``time to target``: first step (and wall seconds) at which the training loss is
  at or below the target = the best constant's final train loss (``—``: never reached);
* ``step time ÷ base``: median CPU time per step ÷ that of the bare base optimizer (the constant runs of
  the same width and backend), measured in the same sweep (CPU time of the process, not wall time, so
  that other processes on a shared machine do not distort the ratio; the JSONL has both);
* ``LR range``: min–max of the learning rate the tuner chose, and ``LR first÷final`` its decay factor;
* ``sharpness ×``: last ÷ first sharpness estimate (Adam: the preconditioned sharpness);
* eval loss / accuracy on the held-out split.

Plots per task x regime x backend x parameterisation: loss vs step, learning rate vs step, sharpness vs step
with the stability threshold ``c/lr`` (2/lr for GD, 38/lr for Adam on the preconditioned sharpness),
final loss vs width per tuner, best learning rate vs width. Values over seeds are averaged.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

from .runner import RESULTS, load_results

__all__ = ["write_report", "analyse", "threshold_coefficient"]

MOMENTUM = 0.9


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


def _final(rec: dict) -> float:
    s = rec.get("summary", {})
    if rec.get("status") == "diverged" or s.get("diverged"):
        return math.inf
    return _num(s.get("final_train_loss"), math.inf)


def _sharp_col(rec: dict) -> str:
    return "preconditioned_sharpness" if rec.get("base") == "adam" else "sharpness"


def _step_time(rec: dict) -> float:
    """Median CPU seconds per step (robust to other processes on a shared machine); wall time if absent."""
    s = rec.get("summary", {})
    v = s.get("median_step_cpu")
    return _num(v) if v is not None else _num(s.get("median_step_time"))


def _steps_to(rec: dict, target: float) -> tuple[float, float]:
    loss = _arr(rec, "loss")
    hit = np.nonzero(loss <= target * (1 + 1e-9))[0]
    if not len(hit):
        return math.nan, math.nan
    t = np.cumsum(np.nan_to_num(_arr(rec, "time")))
    i = int(hit[0])
    return float(i + 1), float(t[i])


def analyse(records: list[dict]) -> dict:
    """Group the runs and compute every table entry. Returns ``{group: {width: {...}}}`` with group =
    (task, regime, backend, param)."""
    by_key = {}
    for r in records:
        by_key[r["key"]] = r  # the last record of a key wins
    groups: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in by_key.values():
        if r.get("status") not in ("ok", "diverged"):
            continue
        g = (r["task"], r["regime"], r["backend"], r["param"])
        groups[g][r["width"]][r["tuner"]].append(r)
    out = {}
    for g, widths in groups.items():
        out[g] = {}
        for w, by_tuner in sorted(widths.items()):
            consts = {lab: runs for lab, runs in by_tuner.items() if runs[0]["tuner_name"] == "constant"}
            best_lab, best_final = None, math.inf
            for lab, runs in consts.items():
                f = float(np.mean([_final(r) for r in runs]))
                if f < best_final or best_lab is None:
                    best_lab, best_final = lab, f
            base_time = (float(np.median([_step_time(r) for runs in consts.values() for r in runs]))
                         if consts else math.nan)
            rows = {}
            for lab, runs in by_tuner.items():
                if lab in consts and lab != best_lab:
                    continue
                finals = [_final(r) for r in runs]
                final = float(np.mean(finals))
                st = [_steps_to(r, best_final) for r in runs] if math.isfinite(best_final) else [(math.nan,) * 2]
                lr = np.concatenate([_arr(r, "lr") for r in runs])
                lr = lr[np.isfinite(lr) & (lr > 0)]
                sh = _arr(runs[0], _sharp_col(runs[0]))
                sh = sh[np.isfinite(sh)]
                s0 = runs[0]["summary"]
                rows[lab] = {
                    "label": "constant (best: lr=" + lab.split("lr=")[-1] + ")" if lab == best_lab else lab,
                    "is_best_constant": lab == best_lab,
                    "tuner_name": runs[0]["tuner_name"],
                    "final": final,
                    "ratio": final / best_final if math.isfinite(best_final) and best_final > 0 else math.nan,
                    "steps_to_target": float(np.nanmean([s[0] for s in st])) if any(
                        math.isfinite(s[0]) for s in st) else math.nan,
                    "time_to_target": float(np.nanmean([s[1] for s in st])) if any(
                        math.isfinite(s[1]) for s in st) else math.nan,
                    "step_time": float(np.mean([_step_time(r) for r in runs])),
                    "step_ratio": float(np.mean([_step_time(r) for r in runs])) / base_time if base_time > 0
                    else math.nan,
                    "lr_min": float(lr.min()) if len(lr) else math.nan,
                    "lr_max": float(lr.max()) if len(lr) else math.nan,
                    "lr_drop": _num(s0.get("lr_max")) / _num(s0.get("lr_final")) if _num(s0.get("lr_final")) > 0
                    else math.nan,
                    "sharp_growth": float(sh[-1] / sh[0]) if len(sh) > 1 and sh[0] > 0 else math.nan,
                    "eval_loss": float(np.mean([_num(r["summary"].get("eval_loss")) for r in runs])),
                    "eval_acc": float(np.mean([_num(r["summary"].get("eval_accuracy")) for r in runs])),
                    "closure_calls": float(np.mean([_num(r["summary"].get("mean_closure_calls")) for r in runs])),
                    "runs": runs,
                }
            out[g][w] = {"best_label": best_lab, "best_final": best_final, "best_lr":
                         float(consts[best_lab][0]["settings"]["lr"]) if best_lab else math.nan,
                         "base_time": base_time, "rows": rows,
                         "grid": sorted(float(runs[0]["settings"]["lr"]) for runs in consts.values()),
                         "grid_finals": {float(runs[0]["settings"]["lr"]): float(np.mean([_final(r) for r in runs]))
                                         for runs in consts.values()}}
    return out


def _fmt(x, spec=".3g", none="—") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return format(x, spec)


def _order(rows: dict) -> list[str]:
    pref = ["constant", "cdat", "greedy", "linesearch", "polyak", "eos", "prodigy", "schedulefree"]
    return sorted(rows, key=lambda lab: (pref.index(rows[lab]["tuner_name"]) if rows[lab]["tuner_name"] in pref
                                         else 99, lab))


def group_table(g, widths: dict) -> str:
    head = ("| width | tuner | final train loss | ÷ best const | steps to target | time to target (s) | "
            "step time ÷ base | LR range | LR max÷final | sharpness × | eval loss | eval acc |")
    lines = [head, "|" + "---|" * 12]
    for w, info in widths.items():
        for lab in _order(info["rows"]):
            r = info["rows"][lab]
            lines.append(
                f"| {w} | {r['label']} | {_fmt(r['final'], '.4g')} | {_fmt(r['ratio'], '.3f')} | "
                f"{_fmt(r['steps_to_target'], '.0f')} | {_fmt(r['time_to_target'], '.2f')} | "
                f"{_fmt(r['step_ratio'], '.2f')} | {_fmt(r['lr_min'], '.2g')}–{_fmt(r['lr_max'], '.2g')} | "
                f"{_fmt(r['lr_drop'], '.1f')} | {_fmt(r['sharp_growth'], '.2f')} | "
                f"{_fmt(r['eval_loss'], '.3f')} | {_fmt(r['eval_acc'], '.3f')} |")
    return "\n".join(lines)


def summary_table(analysis: dict) -> str:
    """Compact cross-task table (printed by ``make bench``)."""
    lines = ["| task | regime | backend | param | width | tuner | ÷ best const | step time ÷ base | "
             "LR max÷final |", "|" + "---|" * 9]
    for g in sorted(analysis):
        task, regime, backend, param = g
        for w, info in analysis[g].items():
            for lab in _order(info["rows"]):
                r = info["rows"][lab]
                lines.append(f"| {task} | {regime} | {backend} | {param} | {w} | {r['label']} | "
                             f"{_fmt(r['ratio'], '.3f')} | {_fmt(r['step_ratio'], '.2f')} | "
                             f"{_fmt(r['lr_drop'], '.1f')} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plots
def _colors(labels):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


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
                rec = row["runs"][0]
                c = colors[name]
                base = rec.get("base", "gd")
                if kind == "loss":
                    y = _arr(rec, "loss")
                    ax.plot(np.arange(1, len(y) + 1), y, color=c, label=row["label"], lw=1.2)
                elif kind == "lr":
                    y = _arr(rec, "lr")
                    ax.plot(np.arange(1, len(y) + 1), y, color=c, label=row["label"], lw=1.2)
                else:
                    sh = _arr(rec, _sharp_col(rec))
                    lr = _arr(rec, "lr")
                    steps = np.arange(1, len(sh) + 1)
                    every = max(1, int(rec.get("sharpness_every") or 1))
                    m = np.isfinite(sh)
                    if rec["tuner_name"] != "constant":  # the sharpness is kept between estimates
                        m &= ((steps - 1) % every == 0)
                    if m.any():
                        ax.plot(steps[m], sh[m], "o-", ms=2.5, color=c, lw=1, label=row["label"])
                    with np.errstate(divide="ignore", invalid="ignore"):
                        thr = threshold_coefficient(base) / lr
                    if np.isfinite(thr).any() and (m.any() or rec["tuner_name"] == "constant"):
                        ax.plot(steps, thr, "--", color=c, lw=0.9, alpha=0.8)
            ax.set_title(f"{task} {regime} width {w}")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            if kind == "sharpness":
                coef = threshold_coefficient(widths[w]["rows"][next(iter(widths[w]["rows"]))]["runs"][0]["base"])
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

    for kind in ("loss", "lr", "sharpness"):
        paths.append(curve_fig(kind))

    # final loss vs width per tuner, best lr vs width
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name in labels:
        xs, ys = [], []
        for w in ws:
            for row in widths[w]["rows"].values():
                nm = row["tuner_name"] if row["is_best_constant"] else None
                if nm == name or (nm is None and row["label"] == name):
                    xs.append(w)
                    ys.append(row["final"] if math.isfinite(row["final"]) else np.nan)
        if xs:
            ax.plot(xs, ys, "o-", color=colors[name], label="constant (best)" if name == "constant" else name)
    paths.append(_finish_width_plot(fig, ax, "final train loss", f"{task} {regime} {backend} {param}: final "
                                    "loss vs width", os.path.join(out_dir, f"{stem}_final_vs_width.png")))

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ws, [widths[w]["best_lr"] for w in ws], "s-", color="k", label="best constant lr")
    for name in labels:
        if name == "constant":
            continue
        xs, ys = [], []
        for w in ws:
            for row in widths[w]["rows"].values():
                if row["label"] == name:
                    lr = _arr(row["runs"][0], "lr")
                    lr = lr[np.isfinite(lr) & (lr > 0)]
                    if len(lr):
                        xs.append(w)
                        ys.append(float(np.exp(np.mean(np.log(lr)))))
        if xs:
            ax.plot(xs, ys, "o--", color=colors[name], label=f"{name} (geo-mean lr)")
    paths.append(_finish_width_plot(fig, ax, "learning rate", f"{task} {regime} {backend} {param}: lr vs width",
                                    os.path.join(out_dir, f"{stem}_lr_vs_width.png")))
    return paths


def _finish_width_plot(fig, ax, ylabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str, keys: set | None = None, plots: bool = True) -> dict:
    """Write ``out_dir/report.md`` (and the PNGs) from ``out_dir/results.jsonl``; ``keys`` restricts the
    report to those runs (the current plan). Returns ``{"path", "summary", "plots", "analysis"}``."""
    recs = load_results(os.path.join(out_dir, RESULTS), repair=False)
    if keys is not None:
        recs = [r for r in recs if r.get("key") in keys]
    analysis = analyse(recs)
    errors = [r for r in recs if r.get("status") == "error"]
    md = ["# curvopt benchmark report", "",
          f"{len(recs)} runs from `{RESULTS}`. Target = the best constant's final train loss (mean of the "
          "last 5 steps); ratios < 1 beat the tuned constant. Step time ÷ base compares median CPU "
          "seconds per step with the bare base optimizer (the constant runs) in the same sweep. `sharpness ×` is last ÷ first "
          "estimate (preconditioned for Adam).", ""]
    plot_paths: list[str] = []
    for g in sorted(analysis):
        task, regime, backend, param = g
        widths = analysis[g]
        rec0 = next(iter(next(iter(widths.values()))["rows"].values()))["runs"][0]
        md += [f"## {task} · {'full batch' if regime == 'full' else 'mini-batch'} · {backend} · {param}", "",
               f"base: {rec0['base']}, {rec0['max_steps']} steps, data: {rec0['data']}, model: {rec0['model']}.",
               ""]
        for w, info in widths.items():
            grid = ", ".join(f"{lr:.3g}: {_fmt(f, '.3g')}" for lr, f in sorted(info["grid_finals"].items()))
            edge = info["grid"] and info["best_lr"] in (info["grid"][0], info["grid"][-1])
            md.append(f"- width {w}: constant grid (lr: final loss) {grid}"
                      + (" — **best at the grid edge: widen the grid**" if edge else ""))
        md += ["", group_table(g, widths), ""]
        if plots:
            ps = _plot_group(out_dir, g, widths)
            plot_paths += ps
            md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in ps] + [""]
    if errors:
        md += ["## Failed runs", ""] + [f"- `{r['key']}`: {r.get('error')}" for r in errors] + [""]
    summary = summary_table(analysis)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(md))
    return {"path": path, "summary": summary, "plots": plot_paths, "analysis": analysis}
