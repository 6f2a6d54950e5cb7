"""The results file ``OUT/results.jsonl``: its records, how they are appended, read back, repaired, and locked.

One JSON object per finished run, appended with flush + fsync as each run finishes, each with a ``key`` (the
run's identity, :attr:`benchmarks.plan.RunSpec.key`) and a ``status`` (``ok``, ``diverged`` or ``error``).
Every run is recorded exactly once: a resumed sweep skips every key already in the file, error runs
included (``--retry-errors`` removes the error records first, then reruns them). A file written by an older
runner may hold a key twice (the rerun of a failed run appended after its error record): the last record of a
key is the run's (:func:`latest_by_key`), for the runner, the report and ``--report-only`` alike.

Damage is skipped and kept, never fatal: a line that is not valid JSON, or valid JSON that is not an object
with a string ``key``, is reported, skipped, and left in the file as it was (a person may want to look at it);
the last line cut short by a kill (no trailing newline) is cut off, so the next append starts on a clean line.

A record holds the run's axes (task, regime, width, tuner label and name, settings, base, parameterisation,
backend, seed), ``steps`` (columnar per-step lists, :data:`COLUMNS`: loss, lr, numerator, curvature,
sharpness, preconditioned_sharpness, eos_ratio, closure_calls, time = wall seconds of the step, cpu = CPU
seconds of this process during the step, which other processes on a shared machine do not inflate) and
``summary`` (:func:`summarise`). Non-finite numbers are written as ``null``.

One runner at a time per output directory: :class:`OutputLock` holds an exclusive ``fcntl.flock`` on
``OUT/.lock`` for the whole sweep. The kernel drops the lock when the process dies (even by SIGKILL), so a
killed runner never leaves a stale lock behind; the pid written in the file only serves the error message.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from typing import Any

import numpy as np

__all__ = ["RESULTS", "COLUMNS", "STAT_COLUMNS", "LAST", "final_window", "load_results", "latest_by_key",
           "append_result", "rewrite_without", "summarise", "OutputLock", "LockedError"]

RESULTS = "results.jsonl"
LOCK = ".lock"
COLUMNS = ("loss", "lr", "numerator", "curvature", "sharpness", "preconditioned_sharpness", "eos_ratio",
           "closure_calls", "time", "cpu")
STAT_COLUMNS = COLUMNS[1:-2]  # what the tuners report each step
LAST = 5  # full batch: final train loss = mean over the last LAST steps (the paper's selection criterion)
MINI_FRACTION = 10  # mini-batch: over the last 1/MINI_FRACTION of the steps (one batch's loss is noise)


def final_window(regime: str, steps: int) -> int:
    """How many last steps the final train loss averages: :data:`LAST` in full batch, a tenth of the run in
    mini-batch (at least :data:`LAST`)."""
    return LAST if regime == "full" else max(LAST, steps // MINI_FRACTION)


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("key"), str)


def load_results(path: str, repair: bool = True) -> list[dict]:
    """Every complete record in ``path`` (see the module docstring for what is skipped). With ``repair``,
    a truncated last line is cut off and a complete last line without a newline gets one."""
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
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                obj = ValueError
            if obj is ValueError and not complete:
                pass  # the truncated tail of a killed write: cut off below
            elif not _is_record(obj):
                what = "not JSON" if obj is ValueError else "JSON but not a record (an object with a 'key')"
                warnings.warn(f"{path}: skipping line at byte {pos}: {what}; the line is kept as it is")
                good_end = min(end, len(raw))
            else:
                out.append(obj)
                good_end = min(end, len(raw))
        elif complete:
            good_end = end
        pos = end
    if repair and good_end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    elif repair and raw and not raw.endswith(b"\n"):  # a complete last line without its newline
        with open(path, "ab") as fh:
            fh.write(b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    return out


def latest_by_key(records: list[dict]) -> dict:
    """``{key: record}``, the last record of each key (a later record of a key is a rerun), keys in the order
    of their first record."""
    return {r["key"]: r for r in records}


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _clean(x.item())
    return x


def append_result(path: str, record: dict) -> None:
    """Append one record as a line, then flush and fsync (a crash loses at most this line)."""
    line = json.dumps(_clean(record), separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "ab") as fh:
        fh.write(line.encode())
        fh.flush()
        os.fsync(fh.fileno())


def rewrite_without(path: str, keys: set) -> int:
    """Atomically rewrite ``path`` without the records whose key is in ``keys`` (every other line, damaged
    ones included, is kept byte for byte). Returns the number of lines removed. Call under the lock."""
    if not keys or not os.path.exists(path):
        return 0
    load_results(path)  # repair a truncated tail first
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    kept, removed = [], 0
    for line in lines:
        try:
            obj = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if _is_record(obj) and obj["key"] in keys:
            removed += 1
        else:
            kept.append(line)
    write_atomically(path, b"\n".join(kept))
    return removed


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path``'s contents by ``data`` in one step: a run stopped midway (Ctrl-C, a full disk) leaves the
    old file whole. A symlink is written through (its target replaced), and the file keeps its permissions."""
    path = os.path.realpath(path)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # one per writer
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------- summary
def diverging(loss: float, first: float) -> bool:
    """Stop a run once its loss is non-finite or 1000x its first value (a spike below that may recover)."""
    return not math.isfinite(loss) or loss > 1000.0 * max(first, 1e-3)


def summarise(cols: dict, steps: int, eval_loss: float, eval_acc: float, extra: dict, window: int = LAST) -> dict:
    """The ``summary`` of a record: final train loss (mean of the last ``window`` losses, see
    :func:`final_window`; ``inf`` when the run stopped early, ended non-finite or :func:`diverging` at its last
    step, which stops no run), eval loss/accuracy, step
    times (wall and CPU; the first step, which includes warm-up, left out), the lr range (final: mean over
    the same window), closure calls per step."""
    loss = np.array(cols["loss"], dtype=float)
    lr = np.array(cols["lr"], dtype=float)
    t = np.array(cols["time"], dtype=float)
    diverged = len(loss) < steps or not np.all(np.isfinite(loss[-window:])) or diverging(loss[-1], loss[0])
    lr_ok = lr[np.isfinite(lr) & (lr > 0)]
    timed = t[1:] if len(t) > 2 else t
    cpu = np.array(cols["cpu"], dtype=float)
    cpu = cpu[1:] if len(cpu) > 2 else cpu
    calls = np.array(cols["closure_calls"], dtype=float)

    def stat(f, a):
        return float(f(a)) if len(a) else math.nan

    return {
        "final_train_loss": math.inf if diverged else float(loss[-window:].mean()), "final_window": window,
        "initial_loss": stat(lambda a: a[0], loss),
        "min_train_loss": float(np.nanmin(loss)) if np.isfinite(loss).any() else math.nan,
        "eval_loss": eval_loss, "eval_accuracy": eval_acc,
        "diverged": bool(diverged), "steps_done": int(len(loss)),
        "mean_step_time": stat(np.mean, timed), "median_step_time": stat(np.median, timed),
        "median_step_cpu": stat(np.median, cpu), "mean_step_cpu": stat(np.mean, cpu),
        "train_time": float(t.sum()),
        "lr_min": stat(np.min, lr_ok), "lr_max": stat(np.max, lr_ok), "lr_first": stat(lambda a: a[0], lr_ok),
        "lr_final": stat(lambda a: a[-window:].mean(), lr_ok),
        "mean_closure_calls": float(np.nanmean(calls)) if np.isfinite(calls).any() else math.nan,
        **extra,
    }


# ----------------------------------------------------------------------------------------------- lock
class LockedError(RuntimeError):
    """Another runner holds the output directory."""


class OutputLock:
    """``with OutputLock(out_dir):`` — an exclusive, non-blocking ``fcntl.flock`` on ``out_dir/.lock``."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LockedError(
                f"another benchmark runner is writing to {os.path.dirname(self.path)!r} ({holder}); wait for it "
                "to finish or use another --out (a killed runner releases the lock by itself)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
