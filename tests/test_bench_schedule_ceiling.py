"""benchmarks.schedule_ceiling: the schedules' shapes, the best constant's pick, and a short run end to end."""
import math

import pytest

pytest.importorskip("torch")

from benchmarks import schedule_ceiling as sc  # noqa: E402


def test_schedules_start_peak_and_end_where_they_should():
    fns = sc.schedules(0.1, [2.0], 100)
    assert set(fns) == {"constant", "cosine x2", "linear x2", "warmup+cosine x2"}
    assert fns["constant"](0) == fns["constant"](99) == 0.1
    assert fns["cosine x2"](0) == pytest.approx(0.2) and fns["cosine x2"](50) == pytest.approx(0.1)
    assert fns["linear x2"](0) == pytest.approx(0.2) and fns["linear x2"](75) == pytest.approx(0.05)
    assert fns["warmup+cosine x2"](0) == pytest.approx(0.2 / sc.WARMUP)
    assert fns["warmup+cosine x2"](sc.WARMUP - 1) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 24 / 100)))


def test_best_constant_is_the_lowest_median_over_seeds():
    exp = sc.experiment("lm")

    def rec(lr, seed, loss, width=4):
        return dict(task="lm", regime="full", width=width, tuner_name="constant", param="sp", backend="torch",
                    settings={"lr": lr}, seed=seed, summary={"final_train_loss": loss}, status="ok")
    records = [rec(0.1, 0, 1.0), rec(0.1, 1, 5.0), rec(0.1, 2, 5.0),  # best seed, worse median
               rec(0.2, 0, 2.0), rec(0.2, 1, 2.0), rec(0.2, 2, 2.0), rec(0.4, 0, 0.1, width=8)]
    assert sc.best_constant(records, exp, 4) == 0.2
    # the report's rule: a rate that diverged on a seed ranks behind those that trained on all
    diverged = [rec(0.3, 0, 0.5), rec(0.3, 1, 0.5), dict(rec(0.3, 2, None), status="diverged")]
    assert sc.best_constant(records + diverged, exp, 4) == 0.2
    with pytest.raises(ValueError, match="no constant runs"):
        sc.best_constant(records, exp, 16)


def test_a_short_run_divides_by_the_constants_rerun(tmp_path):
    out = tmp_path / "rows.jsonl"
    rows = sc.main(["--task", "lm", "--widths", "4", "--seeds", "0", "--factors", "1", "--lr", "0.01",
                    "--steps", "6", "--out", str(out)])
    assert [r["schedule"] for r in rows] == ["constant", "cosine x1", "linear x1", "warmup+cosine x1"]
    assert rows[0]["ratios"] == [1.0]
    assert all(0 < r["ratios"][0] < math.inf and math.isfinite(r["eval_losses"][0]) for r in rows)
    assert len(out.read_text().splitlines()) == 4
