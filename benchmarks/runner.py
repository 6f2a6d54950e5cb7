"""Runs: plan the (experiment x width x tuner x parameterisation x backend x seed) grid, train, record.

Results go to ``DIR/results.jsonl``, one JSON object per finished run, appended with flush + fsync as each
run finishes. A sweep that is killed and restarted skips the runs whose key is already there (status ``ok``
or ``diverged``). A last line cut short by the kill (no trailing newline, unparsable) is dropped and the
file truncated back to the last complete line, so nothing written before is lost or duplicated.

A record holds the run's axes (task, regime, width, tuner label and name, settings, base, parameterisation,
backend, seed), ``steps`` (columnar per-step lists: loss, lr, numerator, curvature, sharpness,
preconditioned_sharpness, eos_ratio, closure_calls, time = wall seconds of the step, cpu = CPU seconds of
this process during the step, which other processes on a shared machine do not inflate) and ``summary``
(final train loss = mean of the last 5 losses, eval loss/accuracy on the held-out split, mean/median step
time, lr range, ...). Non-finite numbers are written as ``null``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from . import tasks as tasks_mod
from . import tuners as tuners_mod
from .suites import DEFAULT_GRIDS, Experiment

__all__ = ["RunSpec", "plan", "load_results", "append_result", "run_one", "run_all", "COLUMNS", "RESULTS"]

RESULTS = "results.jsonl"
COLUMNS = ("loss", "lr", "numerator", "curvature", "sharpness", "preconditioned_sharpness", "eos_ratio",
           "closure_calls", "time", "cpu")
_STAT_COLUMNS = COLUMNS[1:-2]  # what the tuners report
LAST = 5  # final train loss = mean over the last LAST steps (the paper's selection criterion)


@dataclass(frozen=True)
class RunSpec:
    exp: Experiment
    width: int
    label: str  # tuner label as given (with settings), e.g. "constant:lr=0.125" or "cdat"
    tuner: str  # registry name
    settings: tuple  # sorted (key, value) pairs, defaults applied
    param: str  # "sp" | "mup"
    backend: str  # "torch" | "jax"
    seed: int

    @property
    def base(self) -> str:
        return self.exp.base or tasks_mod.TASKS[self.exp.task].base

    @property
    def key(self) -> str:
        e = self.exp
        return (f"{e.task}|{e.regime}|w{self.width}|{self.label}|{self.param}|{self.backend}|s{self.seed}"
                f"|{self.base}|{e.steps}|{e.settings_hash()}")


def _fmt_lr(lr: float) -> str:
    return f"{lr:.4g}"


def plan(experiments: Iterable[Experiment], *, tuners_filter=None, backends=("torch",), seeds=(0,),
         params=("sp",)) -> list[RunSpec]:
    """Every run of the sweep, in a stable order. ``constant`` expands to its lr grid."""
    specs: list[RunSpec] = []
    for exp in experiments:
        base = exp.base or tasks_mod.TASKS[exp.task].base
        labels = list(tuners_filter) if tuners_filter else list(exp.tuners)
        for backend in backends:
            for param in params:
                for seed in seeds:
                    for width in exp.widths:
                        for label in labels:
                            name, sets = tuners_mod.parse_tuner(label)
                            if name == "constant" and "lr" not in sets:
                                lrs = exp.grid or DEFAULT_GRIDS[base]
                                runs = [(f"constant:lr={_fmt_lr(lr)}", {"lr": float(_fmt_lr(lr))}) for lr in lrs]
                            else:
                                runs = [(label, sets)]
                            for lab, s in runs:
                                full = tuners_mod.settings_for(name, s)
                                specs.append(RunSpec(exp, width, lab, name, tuple(sorted(full.items())), param,
                                                     backend, seed))
    return specs


# --------------------------------------------------------------------------------------------- JSONL
def load_results(path: str, repair: bool = True) -> list[dict]:
    """Every complete record in ``path``. A truncated last line (a killed write) is ignored and, with
    ``repair``, cut off the file so the next append starts on a clean line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        raw = fh.read()
    out: list[dict] = []
    good_end = 0
    pos = 0
    for line in raw.split(b"\n"):
        end = pos + len(line) + 1
        complete = end <= len(raw)  # followed by a newline
        if line.strip():
            try:
                out.append(json.loads(line))
                good_end = min(end, len(raw))
            except json.JSONDecodeError:
                if complete:
                    warnings.warn(f"{path}: skipping a corrupt line at byte {pos}")
                    good_end = end
                # else: the truncated tail of a killed write
        elif complete:
            good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    elif repair and raw and not raw.endswith(b"\n"):  # complete JSON but no newline: finish the line
        with open(path, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    return x


def append_result(path: str, record: dict) -> None:
    """Append one record as a line, then flush and fsync (a crash loses at most this line)."""
    line = json.dumps(_clean(record), separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "ab") as fh:
        fh.write(line.encode())
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------ training
def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _summary(cols: dict, steps: int, eval_loss: float, eval_acc: float, extra: dict) -> dict:
    loss = np.array(cols["loss"], dtype=float)
    lr = np.array(cols["lr"], dtype=float)
    t = np.array(cols["time"], dtype=float)
    diverged = len(loss) < steps or not np.all(np.isfinite(loss[-LAST:]))
    lr_ok = lr[np.isfinite(lr) & (lr > 0)]
    timed = t[1:] if len(t) > 2 else t  # first step includes warm-up
    cpu = np.array(cols["cpu"], dtype=float)
    cpu = cpu[1:] if len(cpu) > 2 else cpu
    return {
        "final_train_loss": math.inf if diverged else float(loss[-LAST:].mean()),
        "initial_loss": float(loss[0]) if len(loss) else math.nan,
        "min_train_loss": float(np.nanmin(loss)) if len(loss) and np.isfinite(loss).any() else math.nan,
        "eval_loss": eval_loss, "eval_accuracy": eval_acc,
        "diverged": bool(diverged), "steps_done": int(len(loss)),
        "mean_step_time": float(timed.mean()) if len(timed) else math.nan,
        "median_step_time": float(np.median(timed)) if len(timed) else math.nan,
        "median_step_cpu": float(np.median(cpu)) if len(cpu) else math.nan,
        "mean_step_cpu": float(cpu.mean()) if len(cpu) else math.nan,
        "train_time": float(t.sum()),
        "lr_min": float(lr_ok.min()) if len(lr_ok) else math.nan,
        "lr_max": float(lr_ok.max()) if len(lr_ok) else math.nan,
        "lr_first": float(lr_ok[0]) if len(lr_ok) else math.nan,
        "lr_final": float(np.mean(lr_ok[-LAST:])) if len(lr_ok) else math.nan,
        "mean_closure_calls": float(np.nanmean(np.array(cols["closure_calls"], dtype=float)))
        if len(cols["closure_calls"]) else math.nan,
        **extra,
    }


def _diverging(lv: float, first: float) -> bool:
    """Stop a run once its loss is non-finite or 1000x its first value (a spike below that may recover)."""
    return not math.isfinite(lv) or lv > 1000.0 * max(first, 1e-3)


def _apply_mup_torch(model, spec: RunSpec):
    """μP (Tensor Programs V) relative to the experiment's narrowest width, via ``torch_backend.mup``:
    re-initialises ``model`` in place and returns its param groups (lr = the relative multipliers for the
    tuners, the grid lr times the multipliers for the constant baseline)."""
    import torch

    from torch_backend.mup import parameterize

    base_model = tasks_mod.torch_model(spec.exp, min(spec.exp.widths), spec.seed, param="mup")
    lr = float(dict(spec.settings)["lr"]) if spec.tuner == "constant" else 1.0
    gen = torch.Generator().manual_seed(spec.seed)
    overrides = {"pos_emb": "embedding"} if spec.exp.task in ("vit", "lm") else None  # a raw Parameter
    return parameterize(model, base_model, optimizer="adam" if spec.base == "adam" else "sgd", lr=lr,
                        generator=gen, overrides=overrides)


def run_torch(spec: RunSpec, progress=None) -> dict:
    import torch

    # torch 2.13's oneDNN (mkldnn) convolution backward corrupts the heap on this CPU build when torch runs
    # single-threaded (reproduced with the plain ResNet and a manual loop); the native kernels are used.
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return _run_torch(spec, progress)
    finally:
        torch.backends.mkldnn.enabled = was


def _run_torch(spec: RunSpec, progress=None) -> dict:
    import torch

    exp = spec.exp
    prob = tasks_mod.torch_problem(exp, spec.width, spec.seed, param=spec.param)
    model = prob.model
    model.train()
    params = None
    if spec.param == "mup":
        params = _apply_mup_torch(model, spec)
    opt = tuners_mod.build_torch(spec.tuner, dict(spec.settings), spec.base, model,
                                 sharpness_every=exp.sharpness_every, params=params)
    cols = {c: [] for c in COLUMNS}
    it = prob.batches()
    first = None
    for step in range(exp.steps):
        xb, yb = next(it)

        def closure():
            model.zero_grad(set_to_none=True)
            loss = prob.loss(model(xb), yb)
            loss.backward()
            return loss

        t0, c0 = time.perf_counter(), time.process_time()
        loss = opt.step(closure)
        lv = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        st = tuners_mod.torch_stats(opt)
        first = lv if first is None else first
        cols["loss"].append(lv)
        cols["time"].append(dt)
        cols["cpu"].append(dc)
        for c in _STAT_COLUMNS:
            cols[c].append(_f(st.get(c, 1 if c == "closure_calls" and spec.tuner in ("constant", "prodigy",
                                                                                     "schedulefree") else math.nan)))
        if progress is not None:
            progress.update(1)
        if _diverging(lv, first):
            break
    if spec.tuner == "schedulefree" and hasattr(opt, "eval"):
        opt.eval()
    ev_loss, ev_acc = prob.evaluate()
    return {"steps": cols, "summary": _summary(cols, exp.steps, ev_loss, ev_acc, {"n_params": prob.n_params,
                                                                                 "torch_threads": torch.get_num_threads()})}


_JAX_COMPILED: dict = {}  # (experiment, width, tuner structure) -> compiled step; the grid shares one


def run_jax(spec: RunSpec, progress=None) -> dict:
    import jax
    import optax

    exp = spec.exp
    if spec.param == "mup":
        raise NotImplementedError("muP rows are torch-only in this runner")
    prob = tasks_mod.jax_problem(exp, spec.width, spec.seed)
    kind = tuners_mod.TUNERS[spec.tuner].kind
    if kind == "constant":  # the lr lives in the state: one compilation serves the whole grid
        tx = optax.chain(tuners_mod.optax_direction(spec.base),
                         optax.inject_hyperparams(optax.scale)(step_size=-float(dict(spec.settings)["lr"])))
        cache_key = (exp.settings_hash(), exp.task, exp.regime, spec.width, spec.base, "constant")
    else:
        tx = tuners_mod.build_optax(spec.tuner, dict(spec.settings), spec.base,
                                    sharpness_every=exp.sharpness_every)
        cache_key = None
    loss_fn = prob.loss_fn
    if kind == "curvopt":
        from curvopt.optax import stats as get_stats
    else:
        get_stats = None

    def step_fn(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if kind == "curvopt":
            updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn, batch=batch)
            st = get_stats(state)
        else:
            updates, state = tx.update(grads, state, params)
            st = {}
        return optax.apply_updates(params, updates), state, loss, st

    params = prob.params
    state = tx.init(params)
    it = prob.batches()
    batch = next(it)
    t0 = time.perf_counter()
    compiled = _JAX_COMPILED.get(cache_key) if cache_key else None
    if compiled is None:
        compiled = jax.jit(step_fn).lower(params, state, batch).compile()
        if cache_key:
            _JAX_COMPILED.clear()  # keep only the current experiment's
            _JAX_COMPILED[cache_key] = compiled
    compile_time = time.perf_counter() - t0
    cols = {c: [] for c in COLUMNS}
    first = None
    for step in range(exp.steps):
        if step:
            batch = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        params, state, loss, st = compiled(params, state, batch)
        jax.block_until_ready((params, loss))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        lv = float(loss)
        first = lv if first is None else first
        cols["loss"].append(lv)
        cols["time"].append(dt)
        cols["cpu"].append(dc)
        if kind == "curvopt":
            for c in _STAT_COLUMNS:
                cols[c].append(_f(st.get(c)))
        else:
            cols["lr"].append(float(dict(spec.settings).get("lr", math.nan)) if kind == "constant" else math.nan)
            for c in _STAT_COLUMNS[1:]:
                cols[c].append(1.0 if c == "closure_calls" else math.nan)
        if progress is not None:
            progress.update(1)
        if _diverging(lv, first):
            break
    eval_params = params
    if spec.tuner == "schedulefree":
        eval_params = optax.contrib.schedule_free_eval_params(state, params)
    ev_loss, ev_acc = prob.evaluate(eval_params)
    return {"steps": cols, "summary": _summary(cols, exp.steps, ev_loss, ev_acc,
                                               {"n_params": prob.n_params, "compile_time": compile_time})}


def run_one(spec: RunSpec, progress=None) -> dict:
    """Train one run and return its record (status ``ok``/``diverged``/``error``)."""
    e = spec.exp
    rec = {"key": spec.key, "task": e.task, "regime": e.regime, "width": spec.width, "tuner": spec.label,
           "tuner_name": spec.tuner, "settings": dict(spec.settings), "base": spec.base, "param": spec.param,
           "backend": spec.backend, "seed": spec.seed, "max_steps": e.steps,
           "sharpness_every": e.sharpness_every, "data": {"image_set": e.image_set, "text": e.text_path,
                                                          "full_batch_size": e.full_batch_size,
                                                          "batch_size": e.batch_size, "block_len": e.block_len},
           "model": tasks_mod.model_options(e, spec.param), "started": time.time()}
    try:
        out = run_torch(spec, progress) if spec.backend == "torch" else run_jax(spec, progress)
        rec.update(out)
        rec["status"] = "diverged" if out["summary"]["diverged"] else "ok"
    except tuners_mod.ExtraMissing:
        raise
    except Exception as exc:  # a failing run is recorded, the sweep goes on
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=6)
    rec["wall_time"] = time.time() - rec["started"]
    return rec


def _mup_missing() -> str | None:
    try:
        from torch_backend.mup import parameterize  # noqa: F401
    except ImportError as e:
        return f"muP needs torch_backend.mup.parameterize ({e})"
    return None


def run_all(specs: list[RunSpec], out_dir: str, *, progress: bool = True, log=None) -> dict:
    """Run every spec not already finished in ``out_dir/results.jsonl``; returns counts."""
    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS)
    done = {r["key"] for r in load_results(path) if r.get("status") in ("ok", "diverged")}
    todo = [s for s in specs if s.key not in done]
    counts = {"planned": len(specs), "skipped_done": len(specs) - len(todo), "ran": 0, "errors": 0,
              "unavailable": 0}
    if counts["skipped_done"]:
        log(f"resuming: {counts['skipped_done']} of {len(specs)} runs already in {path}")
    warned: set[str] = set()
    total_steps = sum(s.exp.steps for s in todo)
    bar = tqdm(total=total_steps, desc="benchmarks", unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for spec in todo:
        bar.set_postfix_str(f"{spec.exp.task}/{spec.exp.regime} w{spec.width} {spec.label} {spec.backend}")
        why = tuners_mod.available(spec.tuner, spec.backend) if tuners_mod.TUNERS[spec.tuner].kind != "constant" \
            else None
        if spec.param == "mup" and not why:
            why = ("muP rows run on torch only (jax: use jax_backend.mup directly)" if spec.backend == "jax"
                   else _mup_missing())
        if why:
            if why not in warned:
                log(f"skipping {spec.tuner} on {spec.backend}: {why}")
                warned.add(why)
            counts["unavailable"] += 1
            bar.update(spec.exp.steps)
            continue
        before = bar.n
        rec = run_one(spec, progress=bar)
        bar.update(spec.exp.steps - (bar.n - before))  # diverged runs stop early
        append_result(path, rec)
        counts["ran"] += 1
        if rec["status"] == "error":
            counts["errors"] += 1
            log(f"run {spec.key} failed: {rec['error']}")
    bar.close()
    return counts


def spec_dict(spec: RunSpec) -> dict:
    d = asdict(spec.exp)
    d.update(width=spec.width, label=spec.label, param=spec.param, backend=spec.backend, seed=spec.seed)
    return d
