"""``python -m benchmarks.closure_free dtype``: its patch of the probing step takes effect (the float64 run with a
float64-sized probe is not the library's float64 run) and the library's float64 run is the float32 one;
``baseline``: its curvature readings do not change the run they read."""
import math

import pytest

from benchmarks import closure_free


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
@pytest.mark.filterwarnings("ignore:curvopt. closure-free, the rate is still below")  # the collapsed run's
def test_dtype_table_compares_what_it_says(capsys):
    closure_free.dtype_table([0], steps=100, batches=[32])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "digits MLP":
            rows[cells[2]] = [float(v) for v in cells[3].split(" / ")]  # final train loss
    assert len(rows) == 4, rows
    f32, f64 = rows["closure-free, float32"], rows["closure-free, float64"]
    before = rows["closure-free, float64, float64-sized probe (before)"]
    assert abs(f64[0] / f32[0] - 1) < 0.02
    assert before[0] > 1.5 * f64[0]  # the collapsed run has not left chance level (2.3)


def test_probe_table_patch_sizes_the_first_step():
    """``probe``'s patch takes effect: the closure-free first step, ``h = sqrt(eps) ||w|| / ||u||``, is
    ``sqrt(2^-8 / 2^-23)`` times longer under ``2^-8`` than under the library's float32 floor."""
    import torch

    from curvopt.torch import CDAT

    def first_rate():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = CDAT(torch.optim.Adam(model.parameters(), lr=1e-3))
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        return float(opt.stats["lr"])

    now = first_rate()
    with closure_free._probe_sized_by(lambda eps, xp: xp.maximum(eps, 2.0 ** -8)):
        longer = first_rate()
    assert first_rate() == now  # put back
    assert longer / now == pytest.approx(2.0 ** 7.5, rel=1e-6)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_baseline_readings_leave_the_run_unchanged_and_read_positive_curvatures():
    rows, rates = closure_free.baseline_run(0, steps=41, every=20)
    _, untraced = closure_free.baseline_run(0, steps=41, every=10 ** 6)
    assert rates == untraced  # the probes' parameters and gradients are put back before each step
    assert [r[0] for r in rows] == [20, 40] and all(r[1] == rates[r[0] - 1] for r in rows)
    for _, _, short, long in rows:  # both displacements' secants and fixed-window curvatures: finite and positive
        assert all(math.isfinite(v) and v > 0 for v in short + long)


def test_widths_table_judges_a_fitted_width_on_eval_loss(monkeypatch, capsys):
    """``widths`` runs every width the default suite runs a full-batch cell at, the closure-free default against
    ``fd``, and says which loss it judges by: the eval loss where ``fd``'s median train loss is below the report's
    FITTED (the ViT's wider widths), the train loss elsewhere."""
    from benchmarks import best_constant, minibatch_study

    calls = []

    def fake(task, regime, seed, variant, width=None):
        calls.append((task, width, variant))
        final = (0.5 if width == 4 else best_constant.FITTED / 10) * (2 if variant != "fd" else 1)
        return {"final": final, "eval_loss": 0.4 if variant == "fd" else 0.3}

    monkeypatch.setattr(minibatch_study, "run_variant", fake)
    closure_free.widths_table([0, 1], ["vit"])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[1] for r in rows] == ["4", "8", "16"]
    assert [r[5] for r in rows] == ["train loss", "eval loss (fitted)", "eval loss (fitted)"]
    assert rows[0][3] == "2 / 2" and rows[0][4] == "0.75 / 0.75"
    assert {v for _, _, v in calls} == {"fd", "secant+nc"}  # behind Adam the correction is on, as by default
