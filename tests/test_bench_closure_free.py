"""``python -m benchmarks.closure_free dtype``: its patch of the probing step takes effect (the float64 run with a
float64-sized probe is not the library's float64 run) and the library's float64 run is the float32 one."""
import pytest

from benchmarks import closure_free


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
