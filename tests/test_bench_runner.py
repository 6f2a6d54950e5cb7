"""Benchmark runner (JSONL append/resume/repair), report generation and the CLI on micro configurations."""
import json
import os

import numpy as np
import pytest

from benchmarks import report, runner
from benchmarks.suites import Experiment

MICRO = Experiment("mlp", "full", (8,), ("constant:lr=0.1", "constant:lr=0.2", "constant:lr=0.4"), 3,
                   full_batch_size=32, eval_size=32, sharpness_every=0)


def _lines(path):
    with open(path, "rb") as fh:
        return fh.read().split(b"\n")


def test_jsonl_truncated_last_line_is_repaired(tmp_path):
    path = str(tmp_path / "results.jsonl")
    for i in range(3):
        runner.append_result(path, {"key": f"k{i}", "x": float("nan"), "y": [1.0, float("inf")]})
    with open(path, "ab") as fh:  # a killed write: half a record, no newline
        fh.write(b'{"key": "k3", "steps": {"loss": [1.0, 2')
    recs = runner.load_results(path)
    assert [r["key"] for r in recs] == ["k0", "k1", "k2"]
    assert recs[0]["x"] is None and recs[0]["y"] == [1.0, None]  # strict JSON: non-finite -> null
    assert open(path, "rb").read().endswith(b"}\n")  # truncated back to the last complete line
    runner.append_result(path, {"key": "k3"})
    assert [r["key"] for r in runner.load_results(path)] == ["k0", "k1", "k2", "k3"]
    assert all(json.loads(line) for line in _lines(path) if line)


def test_jsonl_complete_last_line_without_newline(tmp_path):
    path = str(tmp_path / "results.jsonl")
    with open(path, "w") as fh:
        fh.write('{"key": "a"}\n{"key": "b"}')
    assert [r["key"] for r in runner.load_results(path)] == ["a", "b"]
    runner.append_result(path, {"key": "c"})
    assert [r["key"] for r in runner.load_results(path)] == ["a", "b", "c"]


def test_plan_expands_constant_grid():
    exp = Experiment("mlp", "full", (8, 16), ("constant", "cdat:sigma=1.5"), 3, grid=(0.1, 0.2))
    specs = runner.plan([exp], backends=("torch", "jax"))
    labels = {(s.backend, s.width, s.label) for s in specs}
    assert len(specs) == 2 * 2 * 3 and ("jax", 16, "constant:lr=0.2") in labels
    cdat = next(s for s in specs if s.tuner == "cdat")
    assert dict(cdat.settings)["sigma"] == 1.5 and dict(cdat.settings)["ema"] == 0.9
    assert len({s.key for s in specs}) == len(specs)
    with pytest.raises(ValueError):
        runner.plan([exp], tuners_filter=["nope"])


def test_resume_after_kill_no_duplicates(tmp_path):
    out = str(tmp_path)
    specs = runner.plan([MICRO])
    c = runner.run_all(specs, out, progress=False)
    assert c["ran"] == 3 and c["errors"] == 0
    path = os.path.join(out, runner.RESULTS)
    recs = runner.load_results(path)
    assert [r["status"] for r in recs] == ["ok"] * 3
    r0 = recs[0]
    assert len(r0["steps"]["loss"]) == 3 and set(runner.COLUMNS) <= set(r0["steps"])
    for k in ("final_train_loss", "eval_loss", "eval_accuracy", "mean_step_time", "lr_min", "lr_max"):
        assert k in r0["summary"]
    # kill in the middle of writing the last run: its line is cut short
    raw = open(path, "rb").read()
    cut = raw.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "wb") as fh:
        fh.write(raw[:cut + 40])
    c = runner.run_all(specs, out, progress=False)
    assert c["skipped_done"] == 2 and c["ran"] == 1
    keys = [r["key"] for r in runner.load_results(path)]
    assert sorted(keys) == sorted(s.key for s in specs) and len(keys) == 3
    c = runner.run_all(specs, out, progress=False)  # everything done: nothing runs
    assert c["ran"] == 0 and c["skipped_done"] == 3


def _fake(key, tuner, lr_setting, losses, lrs, width=8, status="ok", base="gd", sharp=None):
    n = len(losses)
    return {"key": key, "task": "resnet", "regime": "full", "width": width, "tuner": tuner,
            "tuner_name": tuner.split(":")[0], "settings": {"lr": lr_setting} if lr_setting else {},
            "base": base, "param": "sp", "backend": "torch", "seed": 0, "max_steps": n, "sharpness_every": 1,
            "data": {}, "model": {}, "status": status,
            "steps": {"loss": losses, "lr": lrs, "numerator": [None] * n, "curvature": [None] * n,
                      "sharpness": sharp or [None] * n, "preconditioned_sharpness": [None] * n,
                      "eos_ratio": [None] * n, "closure_calls": [1] * n, "time": [0.01] * n, "cpu": [0.01] * n},
            "summary": {"final_train_loss": float(np.mean(losses[-5:])) if status == "ok" else None,
                        "diverged": status != "ok", "median_step_time": 0.01 if tuner.startswith("c") and
                        tuner.startswith("constant") else 0.02, "eval_loss": 1.0, "eval_accuracy": 0.5,
                        "lr_max": max(lrs), "lr_final": lrs[-1], "mean_closure_calls": 1.0}}


def test_report_tables_and_plots(tmp_path):
    steps = list(range(10))
    recs = [
        _fake("a", "constant:lr=0.1", 0.1, [2.0 - 0.1 * i for i in steps], [0.1] * 10),
        _fake("b", "constant:lr=0.2", 0.2, [2.0 - 0.15 * i for i in steps], [0.2] * 10),  # best: 0.95
        _fake("c", "constant:lr=0.4", 0.4, [2.0, 9.0, float("nan")], [0.4] * 3, status="diverged"),
        _fake("d", "cdat", None, [2.0 - 0.18 * i for i in steps], [0.3] * 10, sharp=[1.0 + i for i in steps]),
        _fake("e", "greedy", None, [2.0 - 0.05 * i for i in steps], [1.0 / 2 ** i for i in steps]),
    ]
    for r in recs:
        runner.append_result(str(tmp_path / runner.RESULTS), r)
    rep = report.write_report(str(tmp_path))
    info = rep["analysis"][("resnet", "full", "torch", "sp")][8]
    assert info["best_label"] == "constant:lr=0.2" and info["best_lr"] == 0.2
    best = np.mean([2.0 - 0.15 * i for i in range(5, 10)])
    cd = info["rows"]["cdat"]
    assert cd["ratio"] == pytest.approx(np.mean([2.0 - 0.18 * i for i in range(5, 10)]) / best)
    assert cd["steps_to_target"] == 7  # target 2 - 0.15*7 = 0.95; 2 - 0.18*6 = 0.92 at index 6 -> 7th step
    assert cd["step_ratio"] == pytest.approx(2.0)
    assert info["rows"]["greedy"]["lr_drop"] == pytest.approx(2 ** 9)
    assert np.isnan(info["rows"]["greedy"]["steps_to_target"])
    md = open(rep["path"]).read()
    assert "## resnet · full batch · torch · sp" in md and "÷ best const" in md and "constant (best: lr=0.2)" in md
    assert len(rep["plots"]) == 5 and all(os.path.getsize(p) > 1000 for p in rep["plots"])
    assert "| resnet | full | torch | sp | 8 | cdat |" in rep["summary"]


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
                 "--data-dir"):
        assert flag in out


def test_cli_micro_both_backends(tmp_path, capsys):
    from benchmarks.__main__ import main

    out = str(tmp_path / "o")
    argv = ["--suite", "smoke", "--tasks", "mlp", "--regimes", "full", "--widths", "8", "--steps", "3",
            "--tuners", "constant:lr=0.1,constant:lr=0.2,cdat", "--backend", "both", "--out", out, "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "÷ best const" in text and "report:" in text and "plot:" in text
    recs = runner.load_results(os.path.join(out, runner.RESULTS))
    assert {(r["backend"], r["tuner"]) for r in recs} == {(b, t) for b in ("torch", "jax")
                                                         for t in ("constant:lr=0.1", "constant:lr=0.2", "cdat")}
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    cd = {r["backend"]: r for r in recs if r["tuner"] == "cdat"}
    # both backends start from the same weights on the same data: same first loss, same first lr
    assert cd["torch"]["steps"]["loss"][0] == pytest.approx(cd["jax"]["steps"]["loss"][0], rel=1e-5)
    assert cd["torch"]["steps"]["lr"][0] == pytest.approx(cd["jax"]["steps"]["lr"][0], rel=1e-3)
    assert os.path.exists(os.path.join(out, "report.md"))
    assert os.path.exists(os.path.join(out, "mlp_full_jax_sp_loss.png"))
    assert main(argv) == 0  # resumed: nothing reruns
    assert "0 runs in" in capsys.readouterr().out


def test_mup_axis_torch(tmp_path):
    pytest.importorskip("torch_backend.mup")
    exp = Experiment("mlp", "full", (8, 16), ("constant:lr=0.1", "cdat"), 2, full_batch_size=32, eval_size=32,
                     sharpness_every=0)
    specs = runner.plan([exp], params=("mup",), backends=("torch", "jax"))
    c = runner.run_all(specs, str(tmp_path), progress=False)
    assert c["ran"] == 4 and c["errors"] == 0 and c["unavailable"] == 4  # jax muP rows are skipped
    recs = runner.load_results(os.path.join(str(tmp_path), runner.RESULTS))
    assert {r["param"] for r in recs} == {"mup"} and all(r["status"] == "ok" for r in recs)
