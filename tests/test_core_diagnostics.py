"""Catapult detection from loss and sharpness histories."""
import numpy as np
import pytest

from curvopt.diagnostics import detect_catapults


def test_catapult_found_with_its_spike_and_flatter_end():
    # loss falls, spikes 10x at steps 3-5 while the sharpness drops from 50 to 10, then recovers below 1.0
    loss = [2.0, 1.5, 1.0, 4.0, 10.0, 3.0, 0.8, 0.5]
    sharp = [40, 45, 50, np.nan, 30, np.nan, 10, 10]  # NaN = no estimate that step (filled forward)
    (c,) = detect_catapults(loss, sharp, spike=2.0)
    assert (c.start, c.peak, c.end) == (2, 4, 6)
    assert c.spike == pytest.approx(10.0)
    assert (c.sharpness_before, c.sharpness_after) == (50, 10)


def test_no_catapult_without_flattening_or_without_recovery():
    loss = [2.0, 1.0, 5.0, 0.9]
    assert detect_catapults(loss, [10, 10, 10, 20]) == []  # sharper afterwards: a spike, not a catapult
    assert detect_catapults([2.0, 1.0, 5.0, 6.0], [10, 10, 5, 5]) == []  # never came back down
    assert detect_catapults([3.0, 2.0, 1.0, 0.5], [1, 2, 3, 4]) == []  # monotone decrease
    assert detect_catapults([1.0, 1.5, 1.2, 0.9], [5, 4, 3, 2]) == []  # rise below the spike factor


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="same length"):
        detect_catapults([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="spike"):
        detect_catapults([1.0, 2.0], [1.0, 1.0], spike=1.0)
