"""The watch on the loss against the rule's lower bound ``f_star``, which CDAT under its robust start-up, the
edge-of-stability rule and Polyak's step lean on (CDAT's curvature floor ``n^2 / (2 (f - f_star))``, the step caps
``2 (f - f_star) / n``, Polyak's step ``(f - f_star) / n``); the paper's rule and the quadratically greedy step use
none (the rules' ``loss_bound``).

Two ways the bound can be wrong, each said once (:func:`bound_messages`): the loss falls below it (the rules then
treat the loss as past its minimum), or it presses on it from above (:func:`pressing_on_bound`: a loss that goes on
below ``f_star`` creeps toward it while the rate falls toward 0, and never crosses). Both backends keep a
:class:`BoundWatch` and advance it with :func:`watch_bound` on each step that knows its loss; PyTorch warns as the
watch changes, Optax's :func:`jax_backend.stats` from the state it keeps.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = ["BOUND_BELOW_ROUNDING", "BOUND_PRESS_GAP", "BOUND_PRESS_SLOPE", "pressing_on_bound", "BoundWatch",
           "watch_bound", "bound_messages", "BELOW_BOUND_MESSAGE", "BOUND_PRESS_MESSAGE"]

#: how close to ``f_star`` the loss must come, relative to its first distance, with a slope that has not fallen, for
#: the tuners to say that it presses on its bound (:func:`pressing_on_bound`)
BOUND_PRESS_GAP = 1e-8
#: the share of the run's largest slope that the slope then keeps (:func:`pressing_on_bound`)
BOUND_PRESS_SLOPE = 1e-2
#: how far below ``f_star`` the loss may come before the tuners say it is below its bound, relative to the larger of
#: ``|f_star|`` and ``|loss|``: the rounding of a loss at its minimum (a field test: ``f_star`` the exact least-squares
#: minimum, as the docs advise, reached to 1e-17 and said to be below it)
BOUND_BELOW_ROUNDING = 1e-5


def pressing_on_bound(gap: Any, first_gap: Any, slope: Any, peak_slope: Any) -> Any:
    """Whether the loss presses on its lower bound ``f_star`` from above: its distance to it
    ``gap = f - f_star`` came within :data:`BOUND_PRESS_GAP` of the run's first distance while the slope along the
    update ``-g^T u`` stayed above :data:`BOUND_PRESS_SLOPE` of its largest. Where ``f_star`` is the loss's infimum
    the slope falls with the distance (near a minimum of a smooth loss the gradient is of order ``sqrt(gap)``, and
    in cross-entropy's memorisation ``gap`` itself); where the loss goes on below it (a Gaussian negative
    log-likelihood under the default ``f_star=0``) the slope stays and the rules' curvature floor
    ``n^2 / (2 gap)`` and step cap ``2 gap / n``, which lean on the bound, take the rate toward 0: a field test, CDAT
    behind Adam, the loss 2e-6 at step 30 and 5e-19 at step 299, the rate 2e-19, the slope 4.78 throughout, no
    warning (the loss never crossed the bound, and the rate was not 0). A loss with a kink at its minimum (L1) keeps
    its slope too, and is said alike (a field test: Polyak's step on an exact L1 fit, warned at a loss of 2e-8 on
    its way to 5e-16); the message says so."""
    return (0 < gap) & (gap <= BOUND_PRESS_GAP * first_gap) & (slope >= BOUND_PRESS_SLOPE * peak_slope)


BOUND_PRESS_MESSAGE = (
    "{tuner}: the loss {loss:.6g} presses on f_star={f_star:g} from above: it came within {gap:.3g} of it while its "
    "slope along the update did not fall, so the loss probably goes on below f_star (a negative log-likelihood, a "
    "loss with a constant term), and the rate, which leans on f_star as the loss's lower bound (its curvature floor "
    "and step cap, Polyak's step), falls toward 0. Pass the loss's lower bound as f_star (CDAT and the "
    "edge-of-stability rule also take f_star=-inf, which turns those safeguards off). A loss with a kink at its "
    "minimum f_star (an L1 or hinge loss, whose slope does not fall as it nears it) looks the same: there ignore this")


BELOW_BOUND_MESSAGE = (
    "{tuner}: the loss {loss:.6g} is below f_star={f_star:g}, which the rule takes as a lower bound of the loss (its "
    "step cap and curvature floor, Polyak's step, lean on it). Pass the loss's lower bound as f_star (CDAT and the "
    "edge-of-stability rule also take f_star=-inf, which turns those safeguards off)")


class BoundWatch(NamedTuple):
    """The watch's memory (scalars of one float dtype: 0-d arrays in Optax's state, where the field names are
    unique beside the rule's, NumPy or Python floats in PyTorch): the bound ``f_star`` it was last advanced with,
    the loss's first distance to it (NaN before a finite positive one), the largest slope ``-g^T u`` since (0
    before), the first loss found below the bound and the distance at which the loss was first found pressing on it
    (both NaN until then, then kept)."""

    bound_f_star: Any
    bound_first_gap: Any
    bound_peak_slope: Any
    bound_below: Any
    bound_pressed: Any

    @classmethod
    def start(cls, zero: Any) -> "BoundWatch":
        """The memory before any step, from a 0 of the accumulator dtype (a float, a NumPy or JAX scalar)."""
        nan = zero + math.nan
        return cls(nan, nan, zero, nan, nan)


def watch_bound(watch: BoundWatch, value: Any, slope: Any, f_star: Any, xp: Any) -> BoundWatch:
    """``watch`` after a step whose loss is ``value`` (NaN: not known, the watch unchanged but for ``f_star``) and
    slope along the update ``slope = -g^T u``, under the rule's bound ``f_star`` (``-inf``: no bound, nothing to
    watch). The reference distance and slope are taken from the steps with a finite positive distance and a finite
    slope. A bound other than the one the watch was last advanced with (a corrected ``f_star``, injected or set;
    ``loss_cap=inf``, which leaves the edge-of-stability rule none) starts it afresh: what it found was about the
    old bound (a follow-up field test: after ``f_star`` was corrected, Optax kept saying the loss was below the new
    one)."""
    changed = ~xp.isnan(watch.bound_f_star) & (watch.bound_f_star != f_star)
    fresh = BoundWatch.start(watch.bound_peak_slope * 0)
    watch = BoundWatch(*(xp.where(changed, new, kept) for new, kept in zip(fresh, watch)))
    gap = value - f_star
    counted = xp.isfinite(gap) & (gap > 0) & xp.isfinite(slope)
    first = xp.where(counted & xp.isnan(watch.bound_first_gap), gap, watch.bound_first_gap)
    peak = xp.where(counted, xp.maximum(watch.bound_peak_slope, slope), watch.bound_peak_slope)
    slack = BOUND_BELOW_ROUNDING * xp.maximum(abs(xp.where(xp.isfinite(f_star), f_star, 0.0)), abs(value))
    below = xp.where(xp.isnan(watch.bound_below) & (value < f_star - slack), value, watch.bound_below)
    pressing = counted & pressing_on_bound(gap, first, slope, peak)
    pressed = xp.where(xp.isnan(watch.bound_pressed) & pressing, gap, watch.bound_pressed)
    return BoundWatch(xp.full_like(watch.bound_peak_slope, f_star), first, peak, below, pressed)


def bound_messages(watch: BoundWatch, tuner: str, since: BoundWatch | None = None) -> list[str]:
    """The warnings ``watch`` holds (host floats), only those it did not hold ``since`` (a watch before it)."""
    said = []
    f_star = float(watch.bound_f_star)
    below, pressed = float(watch.bound_below), float(watch.bound_pressed)
    if not math.isnan(below) and (since is None or math.isnan(float(since.bound_below))):
        said.append(BELOW_BOUND_MESSAGE.format(tuner=tuner, loss=below, f_star=f_star))
    if not math.isnan(pressed) and (since is None or math.isnan(float(since.bound_pressed))):
        said.append(BOUND_PRESS_MESSAGE.format(tuner=tuner, loss=pressed + f_star, f_star=f_star, gap=pressed))
    return said
