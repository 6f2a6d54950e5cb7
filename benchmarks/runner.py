"""Run a plan: each run once, recorded as it finishes, resumable, one runner per output directory.

:func:`run_all` takes the lock on the output directory (:class:`benchmarks.results.OutputLock`), reads what
is already recorded, and runs the rest group by group (constant grid, its widening, then the tuners; see
:mod:`benchmarks.plan`). A run that raises is recorded with status ``error`` and the sweep goes on; the
returned ``failed`` count covers every run of the plan recorded as an error, in this invocation or an
earlier one, so the command's exit status says whether the whole sweep is sound.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from collections import OrderedDict

from . import tasks as tasks_mod
from . import tuners as tuners_mod
from .plan import RunSpec, group_of, widened_keys, widening
from .results import RESULTS, OutputLock, append_result, latest_by_key, load_results, rewrite_without

__all__ = ["run_one", "run_all", "unavailable_reason"]


def _described_run(spec: RunSpec) -> dict:
    """What a run's record says about the run before any result: its key, cell, tuner, base, steps, data and
    model (the report describes a group from it, a failed worker's run included)."""
    e = spec.exp
    return {"key": spec.key, "task": e.task, "regime": e.regime, "width": spec.width, "tuner": spec.label,
            "tuner_name": spec.tuner, "settings": dict(spec.settings), "base": spec.base, "param": spec.param,
            "backend": spec.backend, "seed": spec.seed, "max_steps": e.steps, "sharpness_every": e.sharpness,
            "from_grid": spec.from_grid,
            "data": {**e.data_read(), "full_batch_size": e.full_batch_size, "batch_size": e.batch_size,
                     "block_len": e.block_len, "eval_size": e.eval_size},
            "model": tasks_mod.model_options(e, spec.param)}


def _worker_error(spec: RunSpec, exc: BaseException) -> dict:
    """The record of a run whose worker process failed it (died, or could not return the result)."""
    return {**_described_run(spec), "status": "error", "error": f"worker: {exc!r}"}


def run_one(spec: RunSpec, progress=None) -> dict:
    """Train one run and return its record (status ``ok``/``diverged``/``error``). Its ``data`` also says how many
    training and eval examples (LM: blocks) the run had: a dataset smaller than the suite's sizes (a short
    ``--text``, a small ``--data-dir``) is used whole."""
    rec = {**_described_run(spec), "started": time.time()}
    try:
        x, _, xe, _ = tasks_mod.train_eval_arrays(spec.exp, spec.seed)
        rec["data"].update(train_examples=len(x), eval_examples=len(xe))
        if spec.backend == "torch":
            from .train_torch import run
        else:
            from .train_jax import run
        out = run(spec, progress)
        rec.update(out)
        rec["status"] = "diverged" if out["summary"]["diverged"] else "ok"
    except Exception as exc:  # a failing run is recorded, the sweep goes on (and the exit status says so)
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=8)
    rec["wall_time"] = time.time() - rec["started"]
    return rec


def unavailable_reason(spec: RunSpec) -> str | None:
    """Why a run cannot run here (an optional package missing, JAX μP), or None."""
    if spec.param == "mup":
        if spec.backend == "jax":
            return "muP rows run on torch only"
        if importlib.util.find_spec("torch_backend.mup") is None:
            return "muP needs torch_backend.mup"
    if spec.backend == "jax" and importlib.util.find_spec("jax") is None:
        return "the jax backend needs jax, optax and flax (pip install -e '.[jax]')"
    return tuners_mod.available(spec.tuner, spec.backend)


def _worker_init() -> None:
    """A worker of ``--jobs``: one intra-op thread, and it dies with the runner (Linux), even by SIGKILL."""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker exits when the runner's pipe closes
        pass
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def run_all(specs: list[RunSpec], out_dir: str, *, progress: bool = True, log=None,
            retry_errors: bool = False, jobs: int = 1) -> dict:
    """Run every spec not yet recorded in ``out_dir/results.jsonl`` (plus the grid widening); returns counts:
    planned, skipped_done, ran, errors (this invocation), failed (error records of the plan, any invocation),
    unavailable, widened, keys (every key of the plan, widening included). ``jobs > 1`` trains that many runs
    at once in worker processes (only this process writes the file). Raises
    :class:`benchmarks.results.LockedError` if another runner holds ``out_dir``."""
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, RESULTS)
    counts = {"planned": len(specs), "skipped_done": 0, "ran": 0, "errors": 0, "failed": 0, "unavailable": 0,
              "widened": 0}
    with OutputLock(out_dir):
        records = latest_by_key(load_results(path))  # older files may repeat a key: its last record is the run's
        if retry_errors:  # the plan's runs and the widening runs it added before
            planned = {s.key for s in specs} | widened_keys(specs, records)
            again = {k for k, r in records.items() if k in planned and r.get("status") == "error"}
            if again:
                rewrite_without(path, again)
                for k in again:
                    del records[k]
                log(f"retrying {len(again)} failed runs")
        done_before = sum(1 for s in specs if s.key in records)
        if done_before:
            log(f"resuming: {done_before} of {len(specs)} runs already in {path}")
        grids: dict = OrderedDict()
        for s in specs:
            if s.from_grid:
                grids.setdefault(group_of(s), []).append(s)
        bar = tqdm(total=sum(s.exp.steps for s in specs if s.key not in records), desc="benchmarks", unit="step",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        warned: set = set()
        seen: set = set()
        settled: set = set()  # grid runs recorded or unavailable
        todo = deque(specs)

        def after_grid_run(spec: RunSpec) -> None:
            settled.add(spec.key)
            grid = grids[group_of(spec)]
            if not all(s.key in settled for s in grid):
                return
            extra = [s for s in widening(grid, records) if s.key not in seen]
            if extra:
                counts["widened"] += len(extra)
                counts["planned"] += len(extra)
                bar.total += sum(s.exp.steps for s in extra if s.key not in records)
                grid += extra
                todo.extendleft(reversed(extra))

        def recorded(spec: RunSpec, rec: dict) -> None:
            rec["key"] = spec.key  # the plan's: a worker reads the code digest anew (an edit mid-sweep changed it)
            append_result(path, rec)
            records[spec.key] = rec
            counts["ran"] += 1
            if rec["status"] == "error":
                counts["errors"] += 1
                log(f"run {spec.key} failed: {rec['error']}")
            if spec.from_grid:
                after_grid_run(spec)

        def ready(spec: RunSpec) -> bool:
            """False when the spec needs no training (recorded, unavailable); True when it must run."""
            seen.add(spec.key)
            if spec.key in records:
                counts["skipped_done"] += 1
            else:
                why = unavailable_reason(spec)
                if not why:
                    return True
                if why not in warned:
                    log(f"skipping {spec.tuner} ({spec.backend}, {spec.param}): {why}")
                    warned.add(why)
                counts["unavailable"] += 1
                bar.update(spec.exp.steps)
            if spec.from_grid:
                after_grid_run(spec)
            return False

        def label(spec: RunSpec) -> str:
            return f"{spec.exp.task}/{spec.exp.regime} w{spec.width} {spec.label} {spec.backend} s{spec.seed}"

        try:
            if jobs <= 1:
                while todo:
                    spec = todo.popleft()
                    if ready(spec):
                        bar.set_postfix_str(label(spec))
                        before = bar.n
                        rec = run_one(spec, progress=bar)
                        bar.update(spec.exp.steps - (bar.n - before))  # diverged runs stop early
                        recorded(spec, rec)
            else:
                import multiprocessing

                # A worker that dies (the OOM killer, kill -9) breaks the whole pool and fails every run in
                # flight, not only its own: those runs go back to the queue and a new pool takes over; a run in
                # flight at a second break is recorded as failed.
                breaks: dict = {}
                while todo:
                    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init) as pool:
                        running: dict = {}
                        broken = False
                        while (todo and not broken) or running:
                            while todo and not broken and len(running) < jobs:
                                spec = todo.popleft()
                                if ready(spec):
                                    running[pool.submit(run_one, spec)] = spec
                            if not running:
                                continue
                            done, _ = wait(running, return_when=FIRST_COMPLETED)
                            for fut in done:
                                spec = running.pop(fut)
                                try:
                                    rec = fut.result()
                                except BrokenProcessPool as exc:
                                    broken = True
                                    breaks[spec.key] = breaks.get(spec.key, 0) + 1
                                    if breaks[spec.key] < 2:
                                        todo.appendleft(spec)
                                        continue
                                    rec = _worker_error(spec, exc)
                                except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                                    rec = _worker_error(spec, exc)
                                recorded(spec, rec)
                                bar.set_postfix_str(label(spec))
                                bar.update(spec.exp.steps)
        finally:
            bar.close()
        counts["failed"] = sum(1 for k in seen if records.get(k, {}).get("status") == "error")
        counts["keys"] = sorted(seen)
    return counts
