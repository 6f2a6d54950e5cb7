"""The side benchmarks (``benchmarks.sharpness_accuracy``, ``benchmarks.overhead``, ``benchmarks.mup_transfer``)
check their command line before anything runs, as ``python -m benchmarks`` does: a bad value is an argparse usage
error (exit status 2) that names what is allowed. And ``benchmarks.mup_transfer --only`` into a folder with results
merges its sections into them instead of erasing the others. No training runs here."""
import json

import pytest

from benchmarks import mup_transfer as mt
from benchmarks import overhead, sharpness_accuracy


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--acts", "relu"], "tanh, gelu"),
    (["--acts", "tanh,relu"], "'relu'"),
    (["--bases", "momentum"], "gd, adam"),
    (["--seeds", "a"], "'a' is not a valid seed"),
    (["--steps", "10"], ">= 11"),
    (["--steps", "0"], ">= 11"),
])
def test_sharpness_accuracy_refuses_bad_arguments_before_running(argv, says, capsys):
    """Before: KeyError / ValueError tracebacks, some only after earlier runs, and with --steps <= 10 a numpy
    error after training (no reference is taken before step 10)."""
    assert says in _usage_error(sharpness_accuracy.main, argv, capsys)


def test_sharpness_accuracy_parses_lists():
    args = sharpness_accuracy.build_parser().parse_args(["--seeds", "3,4", "--acts", "gelu", "--steps", "11"])
    assert args.seeds == (3, 4) and args.acts == ("gelu",) and args.bases == ("gd", "adam") and args.steps == 11


@pytest.mark.parametrize("argv, says", [
    (["--skip", "time,memory,hvps"], "'hvps'"),
    (["--configs", "99"], f"0 to {len(overhead.CONFIGS) - 1}"),
    (["--configs", "abc"], "'abc' is not a valid config row"),
    (["--repeats", "0"], ">= 1"),
    (["--repeats", "-2"], ">= 1"),
    (["--tasks", "cnn,nosuch"], "'nosuch'"),
    (["--baseline", "nosuchrev"], "Needed a single revision"),  # git's own message
])
def test_overhead_refuses_bad_arguments_before_running(argv, says, capsys):
    """Before: a misspelt --skip part was ignored, --configs 99 printed an empty table (exit 0), --configs abc and
    --baseline nosuchrev raised tracebacks (git's message lost), --repeats 0 became 3 and negative ones were
    printed or raised StatisticsError."""
    err = _usage_error(overhead.main, argv, capsys)
    assert says in err, err


def test_overhead_parses_lists():
    args = overhead.build_parser().parse_args(["--skip", "hvp,memory", "--configs", "0,3", "--repeats", "1"])
    assert set(args.skip) == {"hvp", "memory"} and args.configs == (0, 3) and args.repeats == 1
    assert overhead.build_parser().parse_args([]).tasks == ("cnn", "lm")


@pytest.mark.parametrize("argv, says", [
    (["--cdat-steps", "0"], ">= 2"),
    (["--cdat-steps", "-3"], ">= 2"),
    (["--cdat-steps", "x"], "not an integer"),
    (["--seed", "a"], "not a valid seed"),
    (["--seed", "-1"], "0 to 2**64 - 1"),
])
def test_mup_transfer_refuses_bad_numbers_before_running(argv, says, capsys):
    """Before: --cdat-steps 0 raised IndexError in run_cdat after the other experiments had run."""
    assert says in _usage_error(mt.main, ["--quick", *argv], capsys)


# ------------------------------------------------------------------ mup_transfer: results are merged, never erased
P = mt.PRESETS["quick"]


def _settings(**kw) -> dict:
    return {"preset": "quick", "widths": list(P.widths), "seed": 0, "cdat_seeds": list(P.cdat_seeds),
            "variant": "", "cdat_steps": P.cdat_steps, "seconds": 1.0, **kw}


def _cdat_section() -> dict:
    runs = {s: {w: {"final_lr": 0.1 * (1 + s) + w / 1e4, "loss": 0.5, "losses": [1.0, 0.9, 1.2] + [0.5] * 20}
                for w in P.widths} for s in P.cdat_seeds}
    return {par: mt.cdat_summary(runs, P.widths) for par in ("mup", "sp")}


def _gamma_section() -> dict:
    best = {g: 3.0 * g ** 2 for g in P.gammas}
    return {"grid": [1.0, 2.0], "loss": {g: [0.1, 0.2] for g in P.gammas}, "best_lr": best, "slope": 2.0}


def _run(out, ran, res) -> dict:
    """What main does around the experiments of one run: load, merge, write."""
    merged = mt.merge_results(mt.load_results(out), res, ran)
    mt.write_results(out, merged, P)
    return merged


def test_mup_transfer_merges_an_only_run_into_the_results_written_before(tmp_path):
    """Before: ``--only cdat`` then ``--only gamma`` into one --out left results.json with gamma alone and
    results.md without its CDAT section."""
    out = str(tmp_path)
    _run(out, {"cdat"}, {**_settings(cdat_steps=7), "cdat": _cdat_section()})
    _run(out, {"gamma"}, {**_settings(seconds=2.0), "gamma": _gamma_section()})
    res = json.loads((tmp_path / "results.json").read_text())
    assert "cdat" in res and "gamma" in res and res["seconds"] == 3.0
    assert res["cdat_steps"] == 7  # the kept section's horizon, not this run's default
    md = (tmp_path / "results.md").read_text()
    assert "**CDAT (library defaults) on GD** (MLP, 7 steps" in md and "**γ sweep**" in md
    # the numeric keys JSON turned into strings are numbers again, so the report reads a reloaded file
    again = mt.load_results(out)
    assert set(again["cdat"]["mup"]["median_lr"]) == set(P.widths) and set(again["gamma"]["best_lr"]) == set(P.gammas)
    # a rerun of a section replaces it, the others stay
    _run(out, {"cdat"}, {**_settings(variant="nocap"), "cdat": _cdat_section()})
    res = mt.load_results(out)
    assert res["variant"] == "nocap" and res["cdat_steps"] == P.cdat_steps and "gamma" in res
    assert "start-up cap nocap" in (tmp_path / "results.md").read_text()


def test_mup_transfer_refuses_to_merge_sections_of_other_settings(tmp_path, capsys):
    """A kept section measured under other settings than this run's cannot share its report: refused before
    anything runs, and the file is left as it was."""
    old = {**_settings(), "cdat": _cdat_section(), "gamma": _gamma_section()}
    with pytest.raises(ValueError, match="seed"):
        mt.merge_results(old, _settings(seed=5), {"sharpness"})  # the kept gamma was run with seed 0
    mt.merge_results(old, _settings(variant="nocap"), {"gamma"})  # the variant is cdat's alone: merged
    mt.write_results(str(tmp_path), old, P)
    before = (tmp_path / "results.json").read_text()
    err = _usage_error(mt.main, ["--only", "gamma", "--out", str(tmp_path)], capsys)  # default preset, not quick
    assert "preset" in err and "cdat" in err
    assert (tmp_path / "results.json").read_text() == before


def test_mup_transfer_refuses_an_unreadable_results_file(tmp_path, capsys):
    (tmp_path / "results.json").write_text("{not json")
    assert "cannot be read" in _usage_error(mt.main, ["--quick", "--only", "gamma", "--out", str(tmp_path)], capsys)
    assert (tmp_path / "results.json").read_text() == "{not json"
