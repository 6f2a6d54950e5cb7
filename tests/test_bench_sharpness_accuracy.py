"""``python -m benchmarks.sharpness_accuracy`` runs both estimators and measures what it says: its reference is the
top eigenvalue of the operator the tuner estimates (no estimate far above it), and the Rayleigh-quotient patch
changes the estimate the tuner reports."""
import numpy as np
import torch

from benchmarks import sharpness_accuracy as sa
from benchmarks.data import load_digits


def test_both_estimators_run_and_stay_below_the_reference():
    data = load_digits()
    x = torch.tensor(data.x_train[:128].reshape(128, -1))
    y = torch.tensor(data.y_train[:128])
    for base in ("gd", "adam"):
        out = {est: sa.run("tanh", base, 0, est, 31, x, y) for est in sa.ESTIMATORS}
        for est, o in out.items():
            assert len(o["ratios"]) == 3 and np.isfinite(o["loss"])
            assert 0.3 < min(o["ratios"]) and max(o["ratios"]) < 1.02, (base, est, o["ratios"])
        assert out["krylov"]["ratios"] != out["rayleigh"]["ratios"]
