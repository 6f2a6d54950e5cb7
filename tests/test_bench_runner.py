"""Benchmark runner: results file (append/resume/repair/damage), plan and grid widening, command-line checks,
the output lock, exit status, report and CLI on micro configurations."""
import ast
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the repository, never installed

from benchmarks import plan as plan_mod  # noqa: E402
from benchmarks import report, results, runner  # noqa: E402
from benchmarks.suites import Experiment  # noqa: E402

MICRO = Experiment("mlp", "full", (8,), ("constant:lr=0.1", "constant:lr=0.2", "constant:lr=0.4"), 3,
                   full_batch_size=32, eval_size=32, sharpness=0)


def _lines(path):
    with open(path, "rb") as fh:
        return fh.read().split(b"\n")


# ------------------------------------------------------------------------------------------ results file
def test_jsonl_truncated_last_line_is_repaired(tmp_path):
    path = str(tmp_path / "results.jsonl")
    for i in range(3):
        results.append_result(path, {"key": f"k{i}", "x": float("nan"), "y": [1.0, float("inf")]})
    with open(path, "ab") as fh:  # a killed write: half a record, no newline
        fh.write(b'{"key": "k3", "steps": {"loss": [1.0, 2')
    recs = results.load_results(path)
    assert [r["key"] for r in recs] == ["k0", "k1", "k2"]
    assert recs[0]["x"] is None and recs[0]["y"] == [1.0, None]  # strict JSON: non-finite -> null
    assert open(path, "rb").read().endswith(b"}\n")  # truncated back to the last complete line
    results.append_result(path, {"key": "k3"})
    assert [r["key"] for r in results.load_results(path)] == ["k0", "k1", "k2", "k3"]
    assert all(json.loads(line) for line in _lines(path) if line)


def test_jsonl_complete_last_line_without_newline(tmp_path):
    path = str(tmp_path / "results.jsonl")
    with open(path, "w") as fh:
        fh.write('{"key": "a"}\n{"key": "b"}')
    assert [r["key"] for r in results.load_results(path)] == ["a", "b"]
    results.append_result(path, {"key": "c"})
    assert [r["key"] for r in results.load_results(path)] == ["a", "b", "c"]


DAMAGE = [b"not json at all", b"[1, 2, 3]", b"42", b'"a string"', b"null", b'{"no_key": 1}', b'{"key": 5}',
          b"\xff\xfe garbage"]


def test_jsonl_damaged_lines_are_skipped_and_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    raw = b'{"key": "a"}\n' + b"\n".join(DAMAGE) + b'\n{"key": "b"}\n'
    path.write_bytes(raw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        recs = results.load_results(str(path))
    assert [r["key"] for r in recs] == ["a", "b"]
    assert len(w) == len(DAMAGE) and all("kept" in str(x.message) for x in w)
    assert path.read_bytes() == raw  # nothing removed
    results.append_result(str(path), {"key": "c"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [r["key"] for r in results.load_results(str(path))] == ["a", "b", "c"]
    # removing records (retry) keeps the damaged lines byte for byte
    assert results.rewrite_without(str(path), {"b"}) == 1
    assert path.read_bytes() == b'{"key": "a"}\n' + b"\n".join(DAMAGE) + b'\n{"key":"c"}\n'


# --------------------------------------------------------------------------------------------------- plan
def test_plan_groups_constants_first_and_keeps_given_settings():
    exp = Experiment("mlp", "full", (8, 16), ("cdat:sigma=1.5", "constant"), 3, grid=(0.1, 0.2))
    specs = plan_mod.plan([exp], backends=("torch", "jax"), seeds=(0, 1))
    assert len(specs) == 2 * 2 * 2 * 3  # backends x widths x seeds x (2 grid values + cdat)
    labels = {(s.backend, s.width, s.label) for s in specs}
    assert ("jax", 16, "constant:lr=0.2") in labels
    first_group = specs[:6]
    assert [s.tuner for s in first_group] == ["constant"] * 4 + ["cdat"] * 2
    cdat = next(s for s in specs if s.tuner == "cdat")
    assert dict(cdat.settings) == {"sigma": 1.5}  # the library's defaults are not restated
    assert len({s.key for s in specs}) == len(specs)
    assert all(s.from_grid for s in specs if s.tuner == "constant")


def test_plan_names_one_run_by_one_label_whatever_the_settings_order():
    """The same settings written in another order or with spaces are one run with one key (a resume reuses it, the
    report shows one row), and the committed single-setting labels keep their spelling."""
    exp = Experiment("mlp", "full", (8,), ("cdat:sigma=2;ema=0.9", "cdat:ema = 0.9, sigma=2", "cdat:startup=paper"),
                     3, grid=(0.1,))
    specs = plan_mod.plan([exp], backends=("torch",), seeds=(0,))
    assert [s.label for s in specs if s.tuner == "cdat"] == ["cdat:ema=0.9;sigma=2", "cdat:startup=paper"]


def test_plan_runs_an_explicit_constant_on_the_grid_once():
    """``constant:lr=0.2`` (or ``.2``, ``2e-1``) beside the grid that holds 0.2 is the grid's run, not a second run
    of the same learning rate under another label (the report kept one of the two); a value off the grid, or
    without the grid, is its own run as given."""
    exp = Experiment("mlp", "full", (8,), ("constant:lr=.2", "constant", "constant:lr=2e-1", "constant:lr=0.3"), 3,
                     grid=(0.1, 0.2))
    specs = plan_mod.plan([exp], backends=("torch",), seeds=(0,))
    assert [(s.label, s.from_grid) for s in specs] == [
        ("constant:lr=0.1", True), ("constant:lr=0.2", True), ("constant:lr=0.3", False)]
    alone = plan_mod.plan([dataclasses.replace(exp, tuners=("constant:lr=.2",))], backends=("torch",), seeds=(0,))
    assert [(s.label, s.from_grid) for s in alone] == [("constant:lr=.2", False)]


@pytest.mark.parametrize("label,match", [
    ("nope", "unknown tuner"), ("cdat:sigma=abc", "sigma"), ("cdat:bogus=1", "bogus"),
    ("cdat:startup=nope", "startup"), ("cdat:ema=2", "ema"), ("cdat:curvature=magic", "curvature"),
    ("greedy:sigma=1", "sigma"), ("linesearch:c=-1", "c"), ("eos:sharpness=-1", "sharpness"),
    ("constant:lr=-0.1", "lr"), ("constant:lr=0.1;momentum=1", "momentum"), ("prodigy:d0=-1", "d0"),
    ("schedulefree:bogus=1", "bogus"), ("cdat:sigma", "key=value"), ("prodigy:lr=abc", "lr must be a number"),
])
def test_plan_refuses_bad_tuner_settings(label, match):
    with pytest.raises(ValueError, match=match):
        plan_mod.plan([MICRO], tuners=[label])


@pytest.mark.parametrize("label,backends,accepted", [
    ("prodigy:lr=0.5", ("torch",), True), ("prodigy:lr=0.5", ("jax",), False),
    ("prodigy:learning_rate=0.5", ("jax",), True), ("prodigy:learning_rate=0.5", ("torch",), False),
    ("prodigy:lr=0.5", ("torch", "jax"), False), ("prodigy:eps=1e-6", ("torch", "jax"), True),
])
def test_plan_checks_peer_settings_against_every_backend_it_runs(label, backends, accepted):
    """A peer's settings are its implementation's keywords, which differ between the PyTorch package and
    optax.contrib (prodigyopt's lr, optax's learning_rate). They were checked against PyTorch's only: a JAX run
    accepted prodigy:lr, then every run failed with a TypeError (the table said "diverged"), and a JAX learning
    rate could not be set at all. Now each backend the plan runs on checks them before anything runs."""
    if not accepted:
        with pytest.raises(ValueError, match="unknown setting"):
            plan_mod.plan([MICRO], tuners=[label], backends=backends)
        return
    specs = plan_mod.plan([MICRO], tuners=[label], backends=backends)
    assert {s.backend for s in specs} == set(backends)


def _rec(spec, final):
    status = "ok" if np.isfinite(final) else "diverged"
    return {"key": spec.key, "status": status, "summary": {"final_train_loss": final, "diverged": status != "ok"}}


def test_widening_moves_past_the_edge_until_the_best_is_inside():
    exp = Experiment("mlp", "full", (8,), ("constant",), 3, grid=(0.1, 0.2, 0.4), widen=3)
    specs = plan_mod.plan([exp], seeds=(0, 1, 2))
    loss = {0.1: 3.0, 0.2: 2.0, 0.4: 1.0, 0.8: 0.5, 1.131: 0.7}  # best at the top edge, then inside
    recs = {s.key: _rec(s, loss[dict(s.settings)["lr"]]) for s in specs}
    extra = plan_mod.widening(specs, recs)
    assert [dict(s.settings)["lr"] for s in extra] == [0.5657] * 3 and {s.seed for s in extra} == {0, 1, 2}
    loss[0.5657] = 0.6
    recs.update({s.key: _rec(s, 0.6) for s in extra})
    extra2 = plan_mod.widening(specs + extra, recs)
    assert [dict(s.settings)["lr"] for s in extra2] == [0.8] * 3
    recs.update({s.key: _rec(s, loss[0.8]) for s in extra2})
    extra3 = plan_mod.widening(specs + extra + extra2, recs)
    assert [dict(s.settings)["lr"] for s in extra3] == [1.131] * 3
    recs.update({s.key: _rec(s, float("inf") if s.seed == 0 else 0.7) for s in extra3})
    assert plan_mod.widening(specs + extra + extra2 + extra3, recs) == []  # the best (0.8) is inside
    # a median, not a mean: one diverged seed at 0.8 does not move the best
    # the cap: at most `widen` values added
    capped = Experiment("mlp", "full", (8,), ("constant",), 3, grid=(0.1, 0.2, 0.4), widen=1)
    cs = plan_mod.plan([capped])
    r = {s.key: _rec(s, loss[dict(s.settings)["lr"]]) for s in cs}
    e = plan_mod.widening(cs, r)
    r.update({s.key: _rec(s, 0.1) for s in e})
    assert len(e) == 1 and plan_mod.widening(cs + e, r) == []
    # unfinished grid: nothing yet
    assert plan_mod.widening(specs, {}) == []


def test_widening_end_to_end_and_resume(tmp_path):
    exp = Experiment("mlp", "full", (8,), ("constant",), 3, full_batch_size=32, eval_size=32, sharpness=0,
                     grid=(1e-3, 2e-3), widen=2)
    specs = plan_mod.plan([exp])
    c = runner.run_all(specs, str(tmp_path), progress=False)
    assert c["ran"] == 4 and c["widened"] == 2 and c["failed"] == 0  # 3 steps at tiny lrs: best at the top
    recs = results.load_results(str(tmp_path / results.RESULTS))
    assert sorted(r["settings"]["lr"] for r in recs) == [1e-3, 2e-3, 2.828e-3, 4e-3]
    c = runner.run_all(specs, str(tmp_path), progress=False)
    assert c["ran"] == 0 and c["skipped_done"] == 4
    assert plan_mod.widened_keys(specs, {r["key"]: r for r in recs}) == {r["key"] for r in recs[2:]}


# ------------------------------------------------------------------------------------ resume, errors, lock
def test_resume_after_kill_no_duplicates(tmp_path):
    out = str(tmp_path)
    specs = plan_mod.plan([MICRO])
    c = runner.run_all(specs, out, progress=False)
    assert c["ran"] == 3 and c["errors"] == 0 and c["failed"] == 0
    path = os.path.join(out, results.RESULTS)
    recs = results.load_results(path)
    assert [r["status"] for r in recs] == ["ok"] * 3
    r0 = recs[0]
    assert len(r0["steps"]["loss"]) == 3 and set(results.COLUMNS) <= set(r0["steps"])
    for k in ("final_train_loss", "eval_loss", "eval_accuracy", "mean_step_time", "lr_min", "lr_max"):
        assert k in r0["summary"]
    raw = open(path, "rb").read()  # kill in the middle of writing the last run: its line is cut short
    cut = raw.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "wb") as fh:
        fh.write(raw[:cut + 40])
    c = runner.run_all(specs, out, progress=False)
    assert c["skipped_done"] == 2 and c["ran"] == 1
    keys = [r["key"] for r in results.load_results(path)]
    assert sorted(keys) == sorted(s.key for s in specs) and len(keys) == 3
    c = runner.run_all(specs, out, progress=False)  # everything done: nothing runs
    assert c["ran"] == 0 and c["skipped_done"] == 3


def test_a_run_diverging_at_its_last_step_counts_as_diverged():
    """The runner stops a run whose loss is 1000x its first (:func:`benchmarks.results.diverging`); at the last
    step nothing stops it, and it was recorded ``ok`` with a finite final loss (a field test: 7314 from 2.5 at the
    last of 3 steps, final 2445, listed in the constant grid)."""
    cols = {"loss": [2.5, 40.0, 7314.0], "lr": [1.0] * 3, "time": [0.1] * 3, "cpu": [0.1] * 3,
            "closure_calls": [1.0] * 3}
    s = results.summarise(cols, 3, 5.0, 0.5, {})
    assert s["diverged"] and s["final_train_loss"] == math.inf
    cols["loss"][-1] = 900.0  # below the 1000x: a spike that may recover
    s = results.summarise(cols, 3, 5.0, 0.5, {})
    assert not s["diverged"] and math.isfinite(s["final_train_loss"])


def test_a_non_finite_eval_loss_makes_the_accuracy_the_worst_too():
    """README: a run with a non-finite eval loss counts as the worst there (eval loss inf, accuracy 0); its
    accuracy was kept (0.070 beside an eval loss reading "diverged", in a field test)."""
    rec = {"status": "ok", "summary": {"final_train_loss": 2.0, "eval_loss": None, "eval_accuracy": 0.0703}}
    assert plan_mod.eval_metric(rec, "eval_loss", math.inf) == math.inf
    assert plan_mod.eval_metric(rec, "eval_accuracy", 0.0) == 0.0
    rec["summary"]["eval_loss"] = 1.5
    assert plan_mod.eval_metric(rec, "eval_accuracy", 0.0) == 0.0703


def test_retry_errors_reruns_a_failed_widening_run(tmp_path, monkeypatch):
    """``--retry-errors`` reruns a failed run that the grid widening added (before: only the initial plan's keys
    were retried, so the failure stayed, counted as diverged, stopped the widening and moved the best constant)."""
    exp = Experiment("mlp", "full", (8,), ("constant",), 3, grid=(0.1, 0.2, 0.4), widen=3)
    specs = plan_mod.plan([exp], seeds=(0, 1))
    loss = {0.1: 3.0, 0.2: 2.0, 0.4: 1.0, 0.5657: 0.6, 0.8: 0.5, 1.131: 0.7}
    fail = {"lr": 0.8}

    def fake(spec, progress=None):
        lr = dict(spec.settings)["lr"]
        if lr == fail["lr"] and spec.seed == 0:
            return {**runner._worker_error(spec, RuntimeError("died")), "key": spec.key}
        return {**_rec(spec, loss[lr]), "tuner": spec.label, "seed": spec.seed}

    monkeypatch.setattr(runner, "run_one", fake)
    c = runner.run_all(specs, str(tmp_path), progress=False)
    assert (c["errors"], c["widened"]) == (1, 4)  # 0.5657, then 0.8 (failed on seed 0: the widening stops)
    fail["lr"] = None
    c = runner.run_all(specs, str(tmp_path), progress=False, retry_errors=True)
    assert (c["ran"], c["errors"], c["failed"]) == (3, 0, 0)  # 0.8 on seed 0 again, then 1.131 on both seeds
    recs = results.latest_by_key(results.load_results(str(tmp_path / results.RESULTS)))
    assert {r["status"] for r in recs.values()} == {"ok"} and len(recs) == 6 + 6


def test_error_runs_are_recorded_once_and_fail_the_sweep(tmp_path, monkeypatch):
    from benchmarks import train_torch

    real = train_torch.run

    def flaky(spec, progress=None):
        if dict(spec.settings).get("lr") == 0.2:
            raise RuntimeError("injected failure")
        return real(spec, progress)

    monkeypatch.setattr(train_torch, "run", flaky)
    out, specs = str(tmp_path), plan_mod.plan([MICRO])
    c = runner.run_all(specs, out, progress=False)
    assert (c["ran"], c["errors"], c["failed"]) == (3, 1, 1)
    c = runner.run_all(specs, out, progress=False)  # resumed: the error is not run (nor appended) again
    assert (c["ran"], c["errors"], c["failed"]) == (0, 0, 1)
    path = os.path.join(out, results.RESULTS)
    recs = results.load_results(path)
    assert len(recs) == 3 and [r["status"] for r in recs].count("error") == 1
    assert "injected failure" in next(r["error"] for r in recs if r["status"] == "error")
    monkeypatch.setattr(train_torch, "run", real)
    c = runner.run_all(specs, out, progress=False, retry_errors=True)
    assert (c["ran"], c["errors"], c["failed"]) == (1, 0, 0)
    recs = results.load_results(path)
    assert sorted(r["key"] for r in recs) == sorted(s.key for s in specs) and {r["status"] for r in recs} == {"ok"}


def test_report_of_a_group_whose_every_worker_died(tmp_path):
    """A group where every run's worker process died (killed, out of memory) is reported from the failed
    records: they describe the run as a finished one's does (before, the report stopped with KeyError 'base')."""
    specs = plan_mod.plan([MICRO])
    for s in specs:
        results.append_result(str(tmp_path / results.RESULTS), runner._worker_error(s, RuntimeError("died")))
    rep = report.write_report(str(tmp_path), plots=False)
    text = open(tmp_path / "report.md").read()
    assert f"base: {specs[0].base}, {MICRO.steps} steps" in text
    assert rep["analysis"][("mlp", "full", "torch", "sp")][8]["rows"]


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_cli_exit_status_says_whether_a_run_failed(tmp_path, capsys, monkeypatch):
    from benchmarks import train_torch
    from benchmarks.__main__ import main

    base = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "2",
            "--tuners", "constant:lr=0.1", "--backend", "torch", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "ok")]) == 0
    bad = base + ["--out", str(tmp_path / "bad")]
    with monkeypatch.context() as m:
        m.setattr(train_torch, "run", lambda spec, progress=None: 1 / 0)  # every torch run fails at run time
        assert main(bad) == 1
    assert "1 run(s) of this plan failed" in capsys.readouterr().err
    assert main(bad) == 1  # resumed: still failed, nothing appended
    assert len(results.load_results(str(tmp_path / "bad" / results.RESULTS))) == 1
    assert main(bad + ["--report-only"]) == 1  # the rebuilt report of a failed plan fails too
    assert main(base + ["--out", str(tmp_path / "ok")]) == 0
    assert main(base + ["--out", str(tmp_path / "ok"), "--report-only"]) == 0


def test_lock_refuses_a_second_runner_and_ignores_a_stale_lock(tmp_path, capsys):
    from benchmarks.__main__ import EXIT_LOCKED, main

    out = tmp_path / "o"
    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "2",
            "--tuners", "constant:lr=0.1", "--backend", "torch", "--no-progress", "--out", str(out)]
    with results.OutputLock(str(out)):
        with pytest.raises(results.LockedError, match="another benchmark runner"):
            runner.run_all(plan_mod.plan([MICRO]), str(out), progress=False)
        assert main(argv) == EXIT_LOCKED
        assert "another benchmark runner" in capsys.readouterr().err
        assert not (out / results.RESULTS).exists()
    (out / ".lock").write_text("pid 999999999, started long ago\n")  # left by a killed runner: not held
    assert main(argv) == 0


def test_ctrl_c_ends_with_a_message_and_keeps_the_finished_runs(tmp_path, capsys, monkeypatch):
    """Ctrl-C during a sweep printed a KeyboardInterrupt traceback from deep in autograd; now one line saying what
    is kept and how to resume, exit status 130; the runs finished before it stay in the results file and a
    rerun skips them."""
    from benchmarks.__main__ import EXIT_INTERRUPTED, main

    out = tmp_path / "o"
    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "2",
            "--tuners", "constant:lr=0.1,cdat", "--backend", "torch", "--no-progress", "--out", str(out)]
    real = runner.run_one
    calls = []

    def interrupted_second(spec, *a, **kw):
        calls.append(spec.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, *a, **kw)

    monkeypatch.setattr(runner, "run_one", interrupted_second)
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "resumes" in err and "Traceback" not in err
    kept = results.load_results(str(out / results.RESULTS))
    assert [r["key"] for r in kept] == calls[:1]
    monkeypatch.setattr(runner, "run_one", real)
    assert main(argv) == 0
    assert "1 already done" in capsys.readouterr().out


BAD_ARGS = [
    (["--widths", "0"], "--widths"), (["--widths", "8,x"], "--widths"), (["--tuners", "cdat:sigma=abc"], "sigma"),
    (["--tuners", "cdat:bogus=1"], "bogus"), (["--grid", "-0.1"], "--grid"), (["--grid", "inf"], "--grid"),
    (["--sharpness-every", "-1"], "--sharpness"), (["--sharpness", "-1"], "--sharpness"),
    (["--steps", "0"], "--steps"), (["--seeds", "-1"], "--seeds"), (["--tasks", "foo"], "--tasks"),
    (["--seeds", str(2 ** 64)], "2**64 - 1"),  # passed, then every run failed in torch.manual_seed
    (["--regimes", "half"], "--regimes"), (["--params", "ntk"], "--params"), (["--threads", "0"], "--threads"),
    (["--text", "/nonexistent/file.txt"], "--text"), (["--tuners", "constant:lr=0"], "lr"),
    (["--tuners", "eos:stability_coefficient=0"], "stability_coefficient"),  # was replaced by the default
    (["--report-only"], "--report-only"),  # no results there: was a traceback
    (["--tasks", "resnet", "--data-dir", "/"], "does not load"),  # no CIFAR-10 there: was one failed run per cell
    (["--tasks", "lm", "--widths", "3"], "multiples of 2"),  # 2 heads: was one failed run per cell
    (["--tasks", "mlp", "--text", __file__], "--text feeds the lm task"),  # was ignored without a word
    (["--tasks", "lm", "--data-dir", "/"], "--data-dir feeds the mlp, resnet, vit task"),  # likewise
]


@pytest.mark.parametrize("args,match", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_cli_refuses_bad_command_lines_before_any_run(tmp_path, capsys, args, match):
    from benchmarks.__main__ import main

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["--suite", "smoke", "--out", str(out), "--no-progress"] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err
    assert not out.exists()


def test_cli_refuses_an_out_it_cannot_write_before_any_run(tmp_path, capsys):
    """An --out that cannot be created or written (here under a regular file; a read-only mount alike) is a usage
    error naming it, not a traceback from the runner's lock (exit 1, the status of a failed run)."""
    from benchmarks.__main__ import main

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--suite", "smoke", "--tasks", "mlp", "--out", str(tmp_path / "file" / "o"), "--no-progress"])
    assert e.value.code == 2 and "cannot write the results in" in capsys.readouterr().err


def test_report_only_of_another_plan_keeps_the_report(tmp_path, capsys):
    """``--report-only --out DIR`` without the flags of the run that wrote DIR (the default --suite is smoke, so
    rebuilding ``make bench``'s report that way) rewrote report.md with an empty table and exited 0: refused
    now, the report untouched; with the run's flags it is rebuilt."""
    from benchmarks.__main__ import main

    run = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "2",
           "--tuners", "constant:lr=0.1", "--backend", "torch", "--no-progress", "--out", str(tmp_path)]
    assert main(run) == 0
    report = (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["--report-only", "--no-progress", "--out", str(tmp_path)])
    assert e.value.code == 2 and "belong to this plan" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == report
    assert main(run + ["--report-only"]) == 0 and (tmp_path / "report.md").read_text() == report


def test_cli_refuses_overrides_that_merge_two_experiments_into_one_cell(tmp_path, capsys):
    """``--params sp,mup`` on the default suite's ViT runs its 1,024-digit SP experiments in μP too, a second μP
    ViT cell beside the suite's (256 digits): the report would compare one's tuners with the other's best
    constant. Refused. ``--params sp`` alone leaves the μP experiment out (the suite has SP ViTs), where it once
    made it a second SP ViT and was refused too, which broke the study's rerun recipes."""
    from benchmarks.__main__ import main
    from benchmarks.suites import get_suite

    with pytest.raises(SystemExit) as e:
        main(["--suite", "default", "--tasks", "vit", "--params", "sp,mup", "--out", str(tmp_path / "o"), "--list"])
    assert e.value.code == 2 and "share the report cell" in capsys.readouterr().err
    main(["--suite", "default", "--tasks", "vit", "--regimes", "full", "--params", "sp", "--out", str(tmp_path / "o"),
          "--list"])
    keys = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("vit|")]
    assert keys and all("|sp|" in k for k in keys)
    assert {k.split("|")[-1] for k in keys} == {next(e.settings_hash() for e in get_suite("default").experiments
                                                     if e.task == "vit" and e.params == ("sp",))}


def test_settings_hash_knows_the_mup_base_width_and_the_data_directory():
    """A resume reuses a run only with the same hash: μP's base model is the narrowest width (a rerun with
    another narrowest width reused the old μP runs), and a local data directory is part of the data (another
    --data-dir reused the first one's runs); the embedded defaults keep their hash."""
    from benchmarks.suites import Experiment

    sp = Experiment("mlp", "full", (16, 32), ("cdat",), 10)
    mup = dataclasses.replace(sp, params=("mup",))
    assert dataclasses.replace(sp, widths=(32,)).settings_hash() == sp.settings_hash()
    assert dataclasses.replace(mup, widths=(32,)).settings_hash() != mup.settings_hash()
    cifar = dataclasses.replace(sp, image_set="cifar10")
    at = lambda path: dataclasses.replace(cifar, data_dir=path).settings_hash()  # noqa: E731
    assert at("/a") != at("/b")
    # a text file counts by its absolute path: spelled another way it is the same file (each spelling redid
    # every run)
    lm = Experiment("lm", "full", (16,), ("cdat",), 10)
    text = lambda path: dataclasses.replace(lm, text_path=path).settings_hash()  # noqa: E731
    here = os.path.join(os.getcwd(), "corpus.txt")
    assert text("corpus.txt") == text("./corpus.txt") == text(here) == text(here.replace("/corpus", "//corpus"))
    assert text("corpus.txt") != text("/a.txt")
    # only the data a task reads counts: a text file is nothing to an image task, a data directory nothing to
    # the LM or to the digits (each changed every key: a suite rerun with --text added retrained every image run)
    assert dataclasses.replace(sp, text_path="/a.txt").settings_hash() == sp.settings_hash()
    assert dataclasses.replace(sp, data_dir="/a").settings_hash() == sp.settings_hash()
    assert dataclasses.replace(lm, data_dir="/a", image_set="cifar10").settings_hash() == lm.settings_hash()
    # an SP experiment run under --params mup: its μP runs know their base width too (they reused runs of
    # another base model), its SP runs keep their keys
    from benchmarks.plan import plan

    def key_w32(exp, param):
        return next(s.key for s in plan([exp], params=(param,)) if s.width == 32)
    assert key_w32(sp, "mup") != key_w32(dataclasses.replace(sp, widths=(32,)), "mup")
    assert key_w32(sp, "sp") == key_w32(dataclasses.replace(sp, widths=(32,)), "sp")


# --------------------------------------------------------------------------------------- report and CLI
def _fake(key, tuner, lr_setting, losses, lrs, width=8, status="ok", base="gd", sharp=None, seed=0,
          eval_loss=1.0):
    n = len(losses)
    return {"key": key, "task": "resnet", "regime": "full", "width": width, "tuner": tuner,
            "tuner_name": tuner.split(":")[0], "settings": {"lr": lr_setting} if lr_setting else {},
            "base": base, "param": "sp", "backend": "torch", "seed": seed, "max_steps": n, "sharpness_every": 1,
            "data": {}, "model": {}, "status": status,
            "steps": {"loss": losses, "lr": lrs, "numerator": [None] * n, "curvature": [None] * n,
                      "sharpness": sharp or [None] * n, "preconditioned_sharpness": [None] * n,
                      "eos_ratio": [None] * n, "closure_calls": [1] * n, "time": [0.01] * n,
                      "cpu": [0.01 if tuner.startswith("constant") else 0.02] * n},
            "summary": {"final_train_loss": float(np.mean(losses[-5:])) if status == "ok" else None, "final_window": 5,
                        "diverged": status != "ok", "median_step_cpu": 0.01 if tuner.startswith("constant")
                        else 0.02, "eval_loss": eval_loss, "eval_accuracy": 0.5,
                        "lr_max": max(lrs), "lr_final": lrs[-1], "mean_closure_calls": 1.0}}


def test_ctrl_c_while_the_report_is_written_keeps_the_previous_report(tmp_path, monkeypatch):
    """report.md and readme_table.md were rewritten in place: stopped midway they were left cut short. Now each is
    written aside and moved over the old one, which a stop leaves whole (and no stray file)."""
    out = tmp_path / "o"
    out.mkdir()
    for rec in (_fake("a", "constant:lr=0.1", 0.1, [1.0, 0.5], [0.1] * 2), _fake("b", "cdat", None, [1.0, 0.4],
                                                                                [0.3] * 2)):
        results.append_result(str(out / results.RESULTS), rec)
    first = report.write_report(str(out), plots=False)
    before = {name: (out / name).read_bytes() for name in ("report.md", "readme_table.md")}
    assert first["path"] == str(out / "report.md") and b"cdat" in before["report.md"]

    def stopped(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "fsync", stopped)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(str(out), plots=False)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["readme_table.md", "report.md", results.RESULTS]
    monkeypatch.undo()
    # a readme_table.md linked elsewhere is written through the link, and a file keeps its permissions
    target = tmp_path / "docs_table.md"
    target.write_text("old\n")
    (out / "readme_table.md").unlink()
    (out / "readme_table.md").symlink_to(target)
    (out / "report.md").chmod(0o640)  # (not a umask's default)
    report.write_report(str(out), plots=False)
    assert (out / "readme_table.md").is_symlink() and "cdat" in target.read_text()
    assert (out / "report.md").stat().st_mode & 0o777 == 0o640


def test_report_tables_and_plots(tmp_path):
    steps = list(range(10))
    recs = []
    for seed, scale in ((0, 1.0), (1, 1.1), (2, 0.9)):
        lin = lambda slope: [scale * (2.0 - slope * i) for i in steps]  # noqa: E731
        recs += [
            _fake(f"a{seed}", "constant:lr=0.1", 0.1, lin(0.1), [0.1] * 10, seed=seed),
            _fake(f"b{seed}", "constant:lr=0.2", 0.2, lin(0.15), [0.2] * 10, seed=seed),  # the best
            _fake(f"c{seed}", "constant:lr=0.4", 0.4, [2.0, 9.0, float("nan")], [0.4] * 3, status="diverged",
                  seed=seed),
            _fake(f"e{seed}", "greedy", None, lin(0.05), [1.0 / 2 ** i for i in steps], seed=seed),
        ]
        # cdat: better than the best constant on seeds 0 and 2, worse on seed 1
        cd = lin(0.18) if seed != 1 else lin(0.12)
        recs.append(_fake(f"d{seed}", "cdat", None, cd, [0.3] * 10, sharp=[1.0 + i for i in steps], seed=seed))
    for r in recs:
        results.append_result(str(tmp_path / results.RESULTS), r)
    rep = report.write_report(str(tmp_path))
    info = rep["analysis"][("resnet", "full", "torch", "sp")][8]
    assert info["best_label"] == "constant:lr=0.2" and info["best_lr"] == 0.2
    best = np.mean([2.0 - 0.15 * i for i in range(5, 10)])
    cd = info["rows"]["cdat"]
    ratios = sorted([np.mean([2.0 - 0.18 * i for i in range(5, 10)]) / best] * 2
                    + [np.mean([2.0 - 0.12 * i for i in range(5, 10)]) / best])
    assert cd["ratio"] == pytest.approx(ratios[1]) and cd["worst_ratio"] == pytest.approx(ratios[2])
    assert cd["worst_seed"] == 1 and cd["seeds"] == 3
    assert cd["win"] is False  # the median wins, the worst seed does not
    # target = 1.1 x the best constant's final loss on the same seed (1.045 x scale), reached by the mean of the
    # last 5 losses (the final's window): 2 - 0.18 (i - 2) <= 1.045 after i = 8 updates on seeds 0 and 2; never
    # within the run on seed 1 (2 - 0.12 (i - 2) needs i = 10): median 8
    assert cd["steps_to_target"] == 8
    assert cd["step_ratio"] == pytest.approx(2.0)
    assert info["rows"]["greedy"]["lr_drop"] == pytest.approx(2 ** 9)
    assert np.isnan(info["rows"]["greedy"]["steps_to_target"])
    md = open(rep["path"]).read()
    assert "## resnet · full batch · torch · sp" in md and "median ÷ best const" in md
    assert "constant (best: lr=0.2)" in md and "worst seed" in md
    assert len(rep["plots"]) == 5 and all(os.path.getsize(p) > 1000 for p in rep["plots"])
    assert "| resnet | full | torch | sp | 8 | cdat |" in rep["summary"]
    assert os.path.exists(rep["readme_table"])


def test_report_counts_every_divergence_and_failure(tmp_path):
    """Seed by seed: a tuner that diverged or failed is ``inf`` (a failed run counts as diverged, as in the grid's
    widening); where only the best constant diverged the tuner won that seed (0), where both did it is 1 (they
    were left out, and a tuner diverging with the constant on one seed read as a clean win over the other two);
    a diverged run's missing eval loss counts as ``inf`` (it was dropped from the median); a seed with no
    constant to compare with makes the row ``k/n`` and never a win."""
    steps = list(range(10))
    recs = []
    for seed in (0, 1, 2):
        best_ok = seed != 2
        recs.append(_fake(f"b{seed}", "constant:lr=0.2", 0.2, [2.0 - 0.15 * i for i in steps] if best_ok else
                          [2.0, float("nan")], [0.2] * 10, status="ok" if best_ok else "diverged", seed=seed))
        # (seed 2: every constant diverged; a constant that trained on every seed would be the best)
        recs.append(_fake(f"a{seed}", "constant:lr=0.1", 0.1, [2.0 - 0.05 * i for i in steps] if best_ok else
                          [2.0, float("nan")], [0.1] * 10, status="ok" if best_ok else "diverged", seed=seed))
        good = [2.0 - 0.16 * i for i in steps]
        recs.append(_fake(f"g{seed}", "greedy", None, good if seed != 2 else [2.0, float("nan")], [1.0] * 10,
                          status="ok" if seed != 2 else "diverged", seed=seed, eval_loss=0.3 if seed != 2 else None))
        recs.append(_fake(f"c{seed}", "cdat", None, good, [1.0] * 10, seed=seed))
        if seed == 0:
            recs.append({"key": "p0", "status": "error", "error": "worker: died", "task": "resnet", "regime": "full",
                         "width": 8, "tuner": "polyak", "tuner_name": "polyak", "param": "sp", "backend": "torch",
                         "seed": 0})
        else:
            recs.append(_fake(f"p{seed}", "polyak", None, good, [1.0] * 10, seed=seed))
    for r in recs:
        results.append_result(str(tmp_path / results.RESULTS), r)
    rows = report.write_report(str(tmp_path), plots=False)["analysis"][("resnet", "full", "torch", "sp")][8]["rows"]
    beat = np.mean([2.0 - 0.16 * i for i in range(5, 10)]) / np.mean([2.0 - 0.15 * i for i in range(5, 10)])
    greedy, cdat, polyak = rows["greedy"], rows["cdat"], rows["polyak"]
    assert greedy["ratio"] == pytest.approx(beat) and greedy["worst_ratio"] == 1.0 and greedy["worst_seed"] == 2
    assert greedy["verdict"] == "mixed" and greedy["eval_loss"] == 0.3  # median of 0.3, 0.3, inf
    assert cdat["worst_ratio"] == pytest.approx(beat) and cdat["verdict"] == "win"  # seed 2: 0, the constant died
    assert polyak["worst_ratio"] == np.inf and polyak["worst_seed"] == 0 and not polyak["win"]
    (tmp_path / results.RESULTS).unlink()
    for r in (r for r in recs if r["key"] not in ("a0", "b0")):  # no constant on seed 0: not compared
        results.append_result(str(tmp_path / results.RESULTS), r)
    rep = report.write_report(str(tmp_path), plots=False)
    cdat = rep["analysis"][("resnet", "full", "torch", "sp")][8]["rows"]["cdat"]
    assert (cdat["compared"], cdat["seeds"], cdat["win"]) == (2, 3, False)
    assert "| cdat | 2/3 |" in rep["summary"] and "2 of 3 runs compared" in open(rep["readme_table"]).read()


def test_report_time_to_target_in_mini_batch_reads_the_finals_window(tmp_path):
    """In mini-batch one batch's loss is noise: steps to target compare the trailing mean over the final loss's
    window with the target (a single lucky batch counted as reaching it)."""
    noisy = [2.0 if i % 2 else 0.5 for i in range(20)]  # mean 1.25, every other batch far below
    rec = _fake("n", "cdat", None, noisy, [1.0] * 20)
    rec["summary"]["final_window"] = 4
    assert report._to_target(rec, 1.0) == (np.inf, np.inf)
    assert report._to_target(rec, 1.3)[0] == 3  # the mean of the first 4 losses, 1.25: after 3 updates
    rec["summary"]["final_window"] = 1
    assert report._to_target(rec, 1.0) == (0.0, 0.0)  # the initial loss (0.5): no update needed


def test_sharpness_growth_starts_from_the_first_estimate_after_a_tenth_of_the_run():
    """The sharpness column repeats the latest estimate at every step. With estimates every 100 of 500 steps the
    step-0 estimate (Adam's start, ~1e4-1e5 against ~1e2 later) still filled step 50, and the LM rows read
    "sharpness x 0.03" where the sharpness had climbed 10x from step 100 to step 400."""
    def rec(every, values):
        sharp = [values[i // every] for i in range(500)]
        return _fake("s", "cdat", None, [1.0] * 500, [0.1] * 500, sharp=sharp)

    assert report._sharp_growth(rec(100, [3e4, 150.0, 300.0, 800.0, 1500.0])) == pytest.approx(10.0)
    assert report._sharp_growth(rec(50, [3e4] + [100.0 * (i + 1) for i in range(9)])) == pytest.approx(9.0)
    assert math.isnan(report._sharp_growth(rec(500, [3e4])))  # one estimate: no growth to read


def test_report_of_an_incomplete_plan_says_so(tmp_path):
    """--report-only on a sweep that stopped early: the report and the printed summary say how many planned runs
    are missing (before, a partial grid was reported as settled, its best "at the grid edge")."""
    for key, lr in (("a", 0.1), ("b", 0.2)):
        results.append_result(str(tmp_path / results.RESULTS),
                              _fake(key, f"constant:lr={lr}", lr, [2.0 - lr * i for i in range(10)], [lr] * 10))
    rep = report.write_report(str(tmp_path), keys={"a", "b", "c", "d", "e"}, plots=False)
    assert "Incomplete: 3 of the plan's 5 runs" in rep["summary"] and "Incomplete" in open(rep["path"]).read()
    rep = report.write_report(str(tmp_path), keys={"a", "b"}, plots=False)
    assert "Incomplete" not in rep["summary"] + open(rep["path"]).read()


def test_report_of_a_sweep_without_constants(tmp_path):
    """A narrowed sweep (e.g. ``--tuners cdat``) has no constant to divide by: the report is still written,
    with no ratio for those runs."""
    for seed in (0, 1):
        results.append_result(str(tmp_path / results.RESULTS),
                              _fake(f"d{seed}", "cdat", None, [2.0 - 0.1 * i for i in range(10)], [0.3] * 10,
                                    seed=seed))
    rep = report.write_report(str(tmp_path))
    info = rep["analysis"][("resnet", "full", "torch", "sp")][8]
    assert info["best_label"] is None
    assert "| cdat |" not in open(rep["readme_table"]).read()
    assert "## resnet · full batch · torch · sp" in open(rep["path"]).read()


def test_cli_help_documents_every_flag(capsys):
    from benchmarks.__main__ import build_parser

    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--suite", "--out", "--tasks", "--widths", "--tuners", "--backend", "--regimes", "--seeds",
                 "--data-dir", "--sharpness", "--retry-errors", "--no-widen"):
        assert flag in out


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_cli_peers_micro_both_backends(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = str(tmp_path / "o")
    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "3",
            "--tuners", "constant:lr=0.1,prodigy,schedulefree,dadapt,sophia", "--backend", "both", "--out", out,
            "--no-progress"]
    assert main(argv) == 0
    recs = results.load_results(os.path.join(out, results.RESULTS))
    assert {(r["backend"], r["tuner"]) for r in recs} == (
        {(b, t) for b in ("torch", "jax") for t in ("constant:lr=0.1", "prodigy", "schedulefree", "dadapt")}
        | {("torch", "sophia")})  # optax's sophia has no default learning rate: not run
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    assert "sophia has no jax implementation" in capsys.readouterr().err


@pytest.mark.slow  # ~14 s; the fast suite keeps both backends through test_cli_peers_micro_both_backends
def test_cli_micro_both_backends(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = str(tmp_path / "o")
    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "3",
            "--tuners", "constant:lr=0.1,constant:lr=0.2,cdat,cdat:startup=paper", "--backend", "both",
            "--out", out, "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "median ÷ best const" in text and "report:" in text and "plot:" in text
    recs = results.load_results(os.path.join(out, results.RESULTS))
    assert {(r["backend"], r["tuner"]) for r in recs} == {
        (b, t) for b in ("torch", "jax") for t in ("constant:lr=0.1", "constant:lr=0.2", "cdat", "cdat:startup=paper")}
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    cd = {(r["backend"], r["tuner"]): r for r in recs if r["tuner_name"] == "cdat"}
    for label in ("cdat", "cdat:startup=paper"):
        # both backends start from the same weights on the same data: same first loss, same first lr
        t, j = cd[("torch", label)], cd[("jax", label)]
        assert t["steps"]["loss"][0] == pytest.approx(j["steps"]["loss"][0], rel=1e-5)
        assert t["steps"]["lr"][0] == pytest.approx(j["steps"]["lr"][0], rel=1e-3)
    # the default start-up ramps in: its first lr is below the paper rule's
    assert cd[("torch", "cdat")]["steps"]["lr"][0] < cd[("torch", "cdat:startup=paper")]["steps"]["lr"][0]
    assert os.path.exists(os.path.join(out, "report.md"))
    assert os.path.exists(os.path.join(out, "mlp_full_jax_sp_loss.png"))
    assert main(argv) == 0  # resumed: nothing reruns
    assert "0 runs in" in capsys.readouterr().out


def test_mup_axis_torch(tmp_path):
    exp = Experiment("mlp", "full", (8, 16), ("constant:lr=0.1", "cdat"), 2, full_batch_size=32, eval_size=32,
                     sharpness=0)
    specs = plan_mod.plan([exp], params=("mup",), backends=("torch", "jax"))
    c = runner.run_all(specs, str(tmp_path), progress=False)
    assert c["ran"] == 4 and c["errors"] == 0 and c["unavailable"] == 4  # jax muP rows are skipped
    recs = results.load_results(os.path.join(str(tmp_path), results.RESULTS))
    assert {r["param"] for r in recs} == {"mup"} and all(r["status"] == "ok" for r in recs)


# ------------------------------------------------------------------------------------------ structure
def _imports(path: Path) -> set:
    """The benchmarks modules a benchmarks module imports (at any level of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out |= {a.name for a in node.names}
            elif node.module and node.module.startswith("benchmarks."):
                out.add(node.module.split(".")[1])
            elif node.module == "benchmarks":
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
    return out


def test_benchmarks_has_no_import_cycle_and_no_swallowed_import_errors():
    mods = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    graph = {m: _imports(p) & set(mods) for m, p in mods.items()}
    state: dict = {}

    def visit(m, path):
        state[m] = "active"
        for n in graph[m]:
            assert state.get(n) != "active", f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = [n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)]
                assert "ImportError" not in names and "ModuleNotFoundError" not in names, f"{m} swallows imports"


def test_benchmarks_is_not_installed():
    import importlib.util
    import subprocess

    spec = importlib.util.find_spec("benchmarks")
    assert Path(spec.origin).resolve().parent == ROOT / "benchmarks"
    # outside the repository it does not exist: nothing may rely on it being installed
    r = subprocess.run([sys.executable, "-c", "import benchmarks"], cwd="/", capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode != 0 and "No module named 'benchmarks'" in r.stderr


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_parallel_jobs_record_the_same_runs(tmp_path):
    exp = Experiment("mlp", "full", (8,), ("constant", "prodigy"), 3, full_batch_size=32, eval_size=32,
                     sharpness=0, grid=(1e-3, 2e-3), widen=1)
    specs = plan_mod.plan([exp], seeds=(0, 1))
    c = runner.run_all(specs, str(tmp_path / "par"), progress=False, jobs=2)
    s = runner.run_all(specs, str(tmp_path / "seq"), progress=False, jobs=1)
    assert c["ran"] == s["ran"] == 8 and c["widened"] == s["widened"] == 2 and c["failed"] == 0
    par = {r["key"]: r for r in results.load_results(str(tmp_path / "par" / results.RESULTS))}
    seq = {r["key"]: r for r in results.load_results(str(tmp_path / "seq" / results.RESULTS))}
    assert set(par) == set(seq)
    for k in par:  # same numbers whichever process trained them
        assert par[k]["steps"]["loss"] == seq[k]["steps"]["loss"], k


def test_default_suite_design():
    """The structure issue 12 asks of `make bench` (the sizes are documented in benchmarks/suites.py)."""
    from benchmarks.suites import get_suite

    suite = get_suite("default")
    assert len(suite.seeds) >= 3 and suite.jobs == 2
    exps = suite.experiments
    for e in exps:
        assert e.steps >= 500 and e.widen > 0 and e.grid_factor == pytest.approx(2 ** 0.5)
        assert e.grid[1] / e.grid[0] == pytest.approx(2 ** 0.5)
        assert "constant" in e.tuners  # every tuner's ratio is to a constant of the same cell and width
    tuners = {t for e in exps for t in e.tuners}
    assert {"prodigy", "schedulefree", "dadapt", "sophia", "greedy", "linesearch"} <= tuners
    pairs = {(e.task, e.regime) for e in exps}
    assert {("resnet", "full"), ("vit", "full"), ("lm", "full"), ("resnet", "mini"), ("lm", "mini")} <= pairs
    assert any("jax" in e.backends for e in exps) and any("mup" in e.params for e in exps)
    for task in ("resnet", "vit", "lm"):  # full batch at >= 3 widths, CDAT and the constant at each
        widths = {w for e in exps if (e.task, e.regime, e.params) == (task, "full", ("sp",))
                  and {"constant", "cdat"} <= set(e.tuners) for w in e.widths}
        assert len(widths) >= 3, task
    for pair in pairs:  # the paper-exact rule and the two peers beside CDAT in every task/regime pair
        names = {t for e in exps if (e.task, e.regime) == pair and e.backends == ("torch",) for t in e.tuners}
        assert {"cdat", "cdat:startup=paper", "prodigy", "schedulefree"} <= names, pair
    assert max(e.full_batch_size for e in exps if e.task in ("vit", "resnet")) >= 1024
    assert max(e.full_batch_size for e in exps if e.task == "lm") >= 256
    long = get_suite("cpu-long")
    assert all(len(e.widths) >= 2 for e in long.experiments) and len(long.seeds) >= 5


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_runs_unavailable_here_are_not_reported_missing(tmp_path, capsys):
    """A plan with runs that cannot run here (JAX μP rows) reports on the others without calling it incomplete
    (the smoke suite's report said "1 of the plan's 97 runs are not in results.jsonl"); a stopped sweep's
    missing runs still are (test_report_of_an_incomplete_plan_says_so)."""
    from benchmarks.__main__ import main

    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--backend", "both", "--params", "mup",
            "--tuners", "constant:lr=0.1", "--widths", "8,16", "--seeds", "0", "--steps", "2", "--out",
            str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "unavailable" in out and "Incomplete" not in out
    assert main(argv + ["--report-only"]) == 0 and "Incomplete" not in capsys.readouterr().out


def test_settings_hash_reads_the_data_contents(tmp_path):
    """A text file or a data directory edited in place is other data: a resume reused the runs on the old text
    and compared a new tuner's run on the new text with them in one cell (a field test: "win" at 0.60)."""
    from benchmarks.suites import Experiment

    corpus, folder = tmp_path / "corpus.txt", tmp_path / "cifar"
    folder.mkdir()
    corpus.write_text("first text " * 50)
    (folder / "data_batch_1").write_bytes(b"one")
    (folder / "test_batch").write_bytes(b"test")
    lm = Experiment("lm", "full", (16,), ("cdat",), 10, text_path=str(corpus))
    images = Experiment("resnet", "full", (4,), ("cdat",), 10, image_set="cifar10", data_dir=str(folder))
    before = lm.settings_hash(), images.settings_hash()
    assert (lm.settings_hash(), images.settings_hash()) == before  # stable
    corpus.write_text("other text " * 50)
    (folder / "data_batch_1").write_bytes(b"two")
    assert lm.settings_hash() != before[0]
    assert images.settings_hash() != before[1]
    changed = images.settings_hash()
    (folder / "data_batch_2").write_bytes(b"")
    with_second = images.settings_hash()
    assert with_second not in (before[1], changed)
    (folder / "notes.txt").write_bytes(b"not data")  # a file the loader does not read changes nothing
    assert images.settings_hash() == with_second


def test_widths_of_a_cell_split_by_width_keep_one_grid_per_width(tmp_path, capsys):
    """--widths on the default suite, whose full-batch ResNet is one experiment per width (each its own 3-value
    grid) plus the line search's: one experiment at the asked width, with the grid of the suite's nearest width
    and every tuner; before, every per-width experiment was set to the asked width and their grids merged into
    one of near-duplicates (0.177 beside 0.1771), each widened on its own."""
    from benchmarks.__main__ import main
    from benchmarks.suites import at_widths, get_suite

    main(["--suite", "default", "--tasks", "resnet", "--regimes", "full", "--widths", "4", "--seeds", "0",
          "--out", str(tmp_path / "o"), "--list"])
    keys = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resnet|")]
    rates = sorted(float(k.split("|")[3].split("=")[1]) for k in keys if "|constant:lr=" in k)
    assert rates == [0.177, 0.2503, 0.354]  # width 4's grid in the suite, nothing else
    tuners = [k.split("|")[3] for k in keys if "|constant" not in k]
    assert sorted(tuners) == sorted(["cdat", "cdat:startup=paper", "greedy", "prodigy", "schedulefree",
                                     "linesearch"])
    full = [e for e in get_suite("default").experiments if e.task == "resnet" and e.regime == "full"]
    got = at_widths(full, (3, 6))
    assert [e.widths for e in got] == [(3,), (6,)]
    assert got[0].grid == next(e.grid for e in full if e.widths == (4,))  # nearer 4 than 2 (log scale)
    assert got[1].grid == next(e.grid for e in full if e.widths == (8,))
    vit = [e for e in get_suite("default").experiments if e.task == "vit" and e.params == ("sp",)]
    assert len(at_widths(vit, (4,))) == 2  # the JAX row apart
    assert len(at_widths(vit, (4,), ("torch",))) == 1  # run in PyTorch (--backend torch), it joins the cell
    mini = [e for e in get_suite("default").experiments if e.regime == "mini"]
    assert [e.widths for e in at_widths(mini, (4, 32))] == [(4, 32)] * len(mini)  # one experiment each: as asked


def test_a_run_records_the_examples_it_had():
    """A dataset smaller than the experiment's sizes is used whole; the record (and the report, which prints the
    run's data) said the asked sizes only (a field test: full_batch_size 32 recorded for 56 blocks of a short
    --text, eval_size 32 for 6). Now the record's data also holds the counts the run trained and evaluated on."""
    exp = dataclasses.replace(MICRO, full_batch_size=10**6, eval_size=40)
    spec = plan_mod.plan([exp], tuners=["constant:lr=0.1"])[0]
    rec = runner.run_one(spec)
    assert rec["status"] == "ok"
    assert rec["data"]["full_batch_size"] == 10**6 and rec["data"]["eval_size"] == 40
    from benchmarks.tasks import dataset_for
    assert rec["data"]["train_examples"] == len(dataset_for(exp).x_train) < 10**6
    assert rec["data"]["eval_examples"] == 40
    assert rec["data"]["image_set"] == "digits" and rec["data"]["data_dir"] is None and "text" not in rec["data"]


def test_a_run_records_the_data_its_task_reads_by_absolute_path(tmp_path, monkeypatch):
    """The record names the data the task reads, and only that: a CIFAR-10 directory by its absolute path, the LM's
    text file by its absolute path (a field test: two CIFAR-10 copies gave the same record, the --data-dir path
    nowhere in it; an LM record said image_set 'cifar10', an image task's named the --text file; the text path was
    recorded as typed, relative)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    image = dataclasses.replace(MICRO, image_set="cifar10", data_dir="d", text_path="t.txt")
    lm = dataclasses.replace(MICRO, task="lm", image_set="cifar10", data_dir="d", text_path="t.txt")
    assert image.data_read() == {"image_set": "cifar10", "data_dir": str(tmp_path / "d")}
    assert lm.data_read() == {"text": str(tmp_path / "t.txt")}
    assert dataclasses.replace(lm, text_path=None).data_read() == {"text": None}  # the bundled text
    assert dataclasses.replace(image, image_set="digits").data_read() == {"image_set": "digits", "data_dir": None}
    spec = plan_mod.plan([image], tuners=["constant:lr=0.1"])[0]
    assert runner._described_run(spec)["data"]["data_dir"] == str(tmp_path / "d")


def test_the_summary_of_no_runs_says_so():
    """A sweep whose every run was skipped (``--regimes mini --backend jax --params mup``) printed a table whose
    header had two columns and its separator one; now one line says nothing ran."""
    assert report.readme_table(report.analyse([])) == (
        "No run to summarise (every planned run was skipped or none was planned).")
    assert report.readme_table({}).startswith("No run")


def test_a_resume_after_a_code_change_redoes_the_runs(tmp_path, monkeypatch):
    """The run key knew settings and data but not the code: seeds 0 and 1 run before an edit of the library and
    seed 2 after it were pooled in one cell ('resuming: 8 of 12 runs'), silently. The key holds a digest of the
    library's and the training code's sources (not the report's: an edit there changes tables, not runs) and of
    the versions of the packages they run on."""
    from benchmarks import suites

    for pkg in suites.CODE_PACKAGES + ("benchmarks",):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"# {pkg}\n")
    (tmp_path / "benchmarks" / "report.py").write_text("TABLE = 1\n")

    def digest():
        suites.code_digest.cache_clear()
        return suites.code_digest(str(tmp_path))
    first = digest()
    (tmp_path / "benchmarks" / "report.py").write_text("TABLE = 2\n")
    assert digest() == first  # rendering only
    (tmp_path / "curvopt" / "rules.py").write_text("SIGMA = 0.5\n")
    edited = digest()
    assert edited != first
    (tmp_path / "benchmarks" / "runner.py").write_text("STEPS = 1\n")
    assert digest() not in (first, edited)
    suites.code_digest.cache_clear()
    # the run keys follow the digest
    exp = Experiment("mlp", "full", (16,), ("cdat",), 10)
    before = {s.key for s in plan_mod.plan([exp], seeds=(0,))}
    monkeypatch.setattr(suites, "code_digest", lambda: "another")
    after = {s.key for s in plan_mod.plan([exp], seeds=(0,))}
    assert before and not before & after
    # what a run executes counts, not the report, the plan, the command line or the study scripts (an edit there
    # kept --report-only from finding the runs)
    assert "benchmarks/report.py" not in suites.TRAINING_MODULES and "benchmarks/plan.py" not in suites.TRAINING_MODULES
    assert all(os.path.isfile(os.path.join(ROOT, m)) for m in suites.TRAINING_MODULES)


def test_mup_runs_of_a_cell_split_by_width_share_the_narrowest_base(tmp_path, monkeypatch):
    """``--params mup`` on the default suite's LM and ResNet cells (one experiment per width): each width was its
    own μP base, so no run had any width scaling (μP and SP coincide at the base width), unreported."""
    from benchmarks import tasks as tasks_mod
    from benchmarks import train_torch
    from benchmarks.plan import plan
    from benchmarks.suites import at_widths, get_suite

    for task in ("lm", "resnet"):
        cell = [e for e in get_suite("default").experiments if e.task == task and e.regime == "full"]
        narrowest = min(w for e in cell for w in e.widths)
        assert len(cell) > 1 and {e.mup_base_width for e in cell} == {narrowest}
        assert {e.mup_base_width for e in at_widths(cell, (8, 16))} == {min(8, narrowest)}
        assert {e.mup_base_width for e in at_widths(cell, (64,))} == {narrowest}  # not a base of its own
    lm = [e for e in get_suite("default").experiments if e.task == "lm" and e.regime == "full"]
    wide = next(s for s in plan(lm, tuners=["cdat"], params=["mup"]) if s.width == max(lm[-1].widths))
    built = []
    real = tasks_mod.torch_model
    monkeypatch.setattr(tasks_mod, "torch_model", lambda exp, width, *a, **k: built.append(width) or real(
        exp, width, *a, **k))
    train_torch._mup_groups(real(wide.exp, wide.width, 0, param="mup"), wide)
    assert built == [min(e.widths[0] for e in lm)]  # the base model at the narrowest width, not the run's
    # the base width is in the runs' keys: μP runs of another base are other runs
    alone = dataclasses.replace(wide.exp, mup_base=None)
    assert alone.settings_hash("mup") != wide.exp.settings_hash("mup")
    assert alone.settings_hash() == wide.exp.settings_hash()  # SP runs keep their keys


def test_threads_reach_the_workers_whatever_the_environment_says(tmp_path, monkeypatch):
    """``--threads`` set the workers' thread count only where OMP_NUM_THREADS / XLA_FLAGS were unset: a user's
    OMP_NUM_THREADS=2 ran every --jobs worker on 2 threads under --threads 1, unrecorded."""
    from benchmarks.__main__ import main

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2 --intra_op_parallelism_threads=2")
    for _ in range(2):
        main(["--suite", "smoke", "--tasks", "mlp", "--threads", "1", "--out", str(tmp_path / "o"), "--list"])
    assert os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                               "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]


@pytest.mark.parametrize("argv, says", [
    (["--grid", "0.12345,0.12349,0.3"], "0.12345 -> 0.1235"),  # ran as one run at 0.1235
    (["--tuners", "cdat", "--grid", "0.1,0.2"], "no run of this plan uses the constant grid"),
    (["--tuners", "constant:lr=0.3,cdat", "--grid", "0.1"], "no run of this plan uses the constant grid"),
])
def test_a_grid_is_run_as_given_or_refused(argv, says, tmp_path, capsys):
    """``--grid`` values were rounded to 4 significant digits (two values could become one run), and a plan
    without the bare ``constant`` tuner ignored the option, each exiting 0 without a word."""
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--suite", "smoke", "--tasks", "mlp", "--out", str(tmp_path / "o"), "--list", *argv])
    assert e.value.code == 2
    assert says in capsys.readouterr().err
    assert main(["--suite", "smoke", "--tasks", "mlp", "--grid", "0.1235,0.3", "--out", str(tmp_path / "o"),
                 "--list"]) == 0


def test_a_plan_that_cannot_run_here_is_refused(tmp_path, capsys):
    """``--params mup --backend jax`` planned 64 runs, each unavailable (μP rows run on torch only): an empty
    report and exit 0."""
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--suite", "smoke", "--params", "mup", "--backend", "jax", "--out", str(tmp_path / "o"), "--list"])
    assert e.value.code == 2
    assert "no run of this plan can run here: muP rows run on torch only" in capsys.readouterr().err
    assert main(["--suite", "smoke", "--params", "mup", "--backend", "both", "--out", str(tmp_path / "o"),
                 "--list"]) == 0  # the torch rows can


def test_another_thread_count_is_other_runs():
    """``--threads`` changes the reductions' order and so a run's bits (a field test: a float32 MLP's CDAT losses
    6.6e-4 apart between 1 and 2 threads), but was not part of a run's key: a resume with another count reused the
    old runs, silently. It is now, where it is not the default 1 (whose keys stay as they were)."""
    from dataclasses import replace

    from benchmarks.__main__ import build_parser, experiments_from_args

    def keys(*argv):
        args = build_parser().parse_args(["--suite", "smoke", "--tasks", "mlp", *argv])
        return {e.settings_hash() for e in experiments_from_args(args)[1]}

    one, two = keys("--threads", "1"), keys("--threads", "2")
    assert one == keys() and not one & two
    exp = experiments_from_args(build_parser().parse_args(["--suite", "smoke", "--tasks", "mlp"]))[1][0]
    assert replace(exp, threads=1).settings_hash() == exp.settings_hash() != replace(exp, threads=3).settings_hash()
