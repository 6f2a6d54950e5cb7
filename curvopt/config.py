"""Settings shared by every tuner in both backends: the online sharpness, the curvature oracle, the dtype of
the tuners' own numbers. Each decision here is made once; the backends ask, they do not decide.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

from .validation import check_choice, check_nonnegative, check_positive_int

__all__ = [
    "CURVATURE_ORACLES",
    "DEFAULT_CURVATURE",
    "SharpnessConfig",
    "SharpnessLike",
    "as_sharpness",
    "LEGACY_SHARPNESS",
    "legacy_sharpness",
    "sharpness_due",
    "power_iters",
    "resolve_curvature",
    "secant_caveat",
    "SECANT_STALL_STEPS",
    "SECANT_STALL_MESSAGE",
    "SECANT_STALL_RECOVERY",
    "SECANT_STALL_DEPTH",
    "SECANT_COLLAPSE_FALL",
    "SECANT_COLLAPSE_MESSAGE",
    "secant_collapsed", "SECANT_COLLAPSE_STEPS", "collapse_run", "collapse_sustained",
    "collapse_peak",
    "secant_stalled",
    "stall_window",
    "in_direction_units",
    "secant_probe_eps",
    "probe_reads_forward",
    "secant_stall_reference",
    "REPROBE_GROWTH",
    "concave_reprobe",
    "probes_along",
    "remember_probe",
    "EXTERNAL_CLIP_STEPS",
    "EXTERNAL_CLIP_MESSAGE",
    "EXTERNAL_CLIP_MESSAGE_CLOSURE",
    "EXTERNAL_CLIP_MESSAGE_OPTAX",
    "OUTSIDE_MOTION_ULPS",
    "moved_outside",
    "REPLAY_CHECKS",
    "REPLAY_MISS_OPTAX",
    "REPLAY_PROBE_SHARE",
    "REPLAY_SHORTER",
    "REPLAY_MESSAGE_OPTAX",
    "OUTSIDE_MOTION_MESSAGE",
    "OUTSIDE_MOTION_MESSAGE_OPTAX",
    "watched_norms", "moved_measurably",
    "external_clip_suspected",
    "GRADIENT_MISSING_MESSAGE",
    "has_gradient",
    "SKIP_MESSAGE",
    "ZERO_GRADIENT_SKIP",
    "skip_message",
    "ZERO_RATE_STEPS",
    "zero_rate_run",
    "numerator_scale",
    "ZeroRateWatch", "watch_zero_rate",
    "zero_rate_message",
    "accumulator_dtype_name",
]

#: How ``u^T H u`` is obtained. ``"fd"``: one extra gradient at ``w + h u``; ``"secant"``: the next step's
#: gradient along the previous direction (free, lagged by one step, needs no loss function); ``"exact"``:
#: automatic differentiation (JAX: forward-over-forward JVP; PyTorch: double backward of a functional loss);
#: ``"auto"``: ``"fd"`` when the step can evaluate the loss (a closure in PyTorch, ``value_fn`` in Optax),
#: ``"secant"`` otherwise (``loss.backward(); opt.step()``, ``TrainState.apply_gradients``).
CURVATURE_ORACLES = ("auto", "fd", "secant", "exact")

#: The default oracle of every curvature tuner, in both backends.
DEFAULT_CURVATURE = "auto"


@dataclass(frozen=True)
class SharpnessConfig:
    """Online top-eigenvalue estimation (``sharpness=`` of every tuner).

    ``every``: estimate on steps 1, 1 + every, 1 + 2 every, ... (0 = never). Each estimate is the warm-started
    power iteration of :mod:`curvopt.eigen` on Hessian-vector products: at most ``iters`` products from the
    previous eigenvector, stopping once the Rayleigh quotient changes by less than ``tol`` (relative), the
    estimate read from the span of the last products (:func:`curvopt.eigen.krylov_estimate`); the first
    estimate (from a pseudo-random start) and the one retrying a failed estimate spend up to ``first_iters``
    (:func:`power_iters`).
    """

    every: int = 0
    iters: int = 4
    first_iters: int = 50
    tol: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", check_positive_int("sharpness.every", self.every, minimum=0))
        object.__setattr__(self, "iters", check_positive_int("sharpness.iters", self.iters))
        object.__setattr__(self, "first_iters", check_positive_int("sharpness.first_iters", self.first_iters))
        object.__setattr__(self, "tol", check_nonnegative("sharpness.tol", self.tol))

    @property
    def enabled(self) -> bool:
        return self.every > 0


SharpnessLike = Union[SharpnessConfig, int, None]


def as_sharpness(value: SharpnessLike, default: SharpnessConfig | None = None) -> SharpnessConfig:
    """The ``sharpness=`` argument: a :class:`SharpnessConfig`, an int ``k`` (every k steps, other settings
    default; 0 = off), or ``None`` (the rule's default, ``default``; off when that is None too)."""
    if value is None:
        return default if default is not None else SharpnessConfig()
    if isinstance(value, SharpnessConfig):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"sharpness must be a SharpnessConfig, an int (estimate every k steps) or None, "
                         f"got {value!r}")
    return SharpnessConfig(every=value)


#: the 0.1 keywords ``sharpness=`` replaces (deprecated for one release) -> their :class:`SharpnessConfig` fields
LEGACY_SHARPNESS = {"sharpness_every": "every", "sharpness_iters": "iters",
                    "sharpness_first_iters": "first_iters", "sharpness_tol": "tol"}


def legacy_sharpness(value: Any, legacy: dict, tuner: str, warn: Callable[..., None]) -> dict:
    """The :class:`SharpnessConfig` fields the deprecated ``sharpness_*`` keywords set (``legacy``: keyword ->
    value, None where not given); empty when none is given. Otherwise ``warn(message, DeprecationWarning)`` (the
    backend's warning), then a ``ValueError`` if ``sharpness=`` (``value``) is given too. An unknown keyword is a
    ``TypeError``, as Python's own for a function that does not take it."""
    unknown = set(legacy) - set(LEGACY_SHARPNESS)
    if unknown:
        raise TypeError(f"{tuner}() got unexpected keyword argument(s) {sorted(unknown)}")
    given = {k: v for k, v in legacy.items() if v is not None}
    if not given:
        return {}
    warn(f"{tuner}: {', '.join(sorted(given))} {'is' if len(given) == 1 else 'are'} deprecated and will be removed "
         "in the next release; pass "
         "sharpness=SharpnessConfig(every=..., iters=..., first_iters=..., tol=...) (or sharpness=k: estimate "
         "every k steps)", DeprecationWarning)
    if value is not None:
        raise ValueError(f"{tuner}: pass either sharpness= or the deprecated {sorted(given)}, not both")
    return {LEGACY_SHARPNESS[k]: v for k, v in given.items()}


def sharpness_due(count: Any, every: Any, last: Any = 0.0) -> Any:
    """Whether this step estimates the sharpness: steps 1, 1 + every, ... where ``count`` is the number of
    steps taken *before* this one (Python ints, or traced integers: ``every`` may be an abstract value under
    ``optax.inject_hyperparams``), and every step after one whose estimate failed: ``last``, the current
    estimate of the sharpness the rule reads, is not finite (a NaN product voids an estimate,
    :func:`curvopt.eigen.power_step`: it is retried at once, not a period later)."""
    if isinstance(count, int) and isinstance(every, int):
        return every > 0 and (count % every == 0 or not math.isfinite(float(last)))
    return (every > 0) & ((count % (every + (every <= 0)) == 0) | ~_isfinite(last))


def power_iters(config: SharpnessConfig, last: Any, xp: Any = None) -> Any:
    """The products one estimate may spend: ``first_iters`` while ``last``, the estimate the rule reads, is not
    finite (before the first estimate, from a pseudo-random start, and when retrying a failed one: the stored
    eigenvector is then at least an estimate old), else ``iters``. ``last``: a 0-d array of the array namespace
    ``xp`` (traced), or, without ``xp``, anything ``float()`` reads (a host scalar, a 0-d tensor)."""
    if xp is None:
        return config.iters if math.isfinite(float(last)) else config.first_iters
    return xp.where(_isfinite(last), config.iters, config.first_iters)


def _isfinite(x: Any) -> Any:
    """``isfinite`` of a host or traced scalar without importing an array library here."""
    return (x == x) & (abs(x) != float("inf"))


def resolve_curvature(curvature: str, has_loss_fn: bool) -> str:
    """The oracle a step uses: ``"auto"`` is ``"fd"`` with a loss function (closure / ``value_fn``), else
    ``"secant"``. ``"fd"`` and ``"exact"`` without one raise ``ValueError``."""
    check_choice("curvature", curvature, CURVATURE_ORACLES)
    if curvature == "auto":
        return "fd" if has_loss_fn else "secant"
    if curvature in ("fd", "exact") and not has_loss_fn:
        raise ValueError(
            f'curvature="{curvature}" evaluates the loss at a probe point, so the step needs the loss: a closure '
            "in PyTorch (opt.step(closure)), value_fn in Optax. Without one use curvature=\"secant\" (or \"auto\"), "
            "which needs only consecutive gradients.")
    return curvature


def secant_caveat(method: Any) -> Optional[str]:
    """The warning a tuner gives (once) when its curvature is the secant's behind ``method`` (a
    :class:`curvopt.base.BaseMethod`, None for a base the core does not know), or None. Behind gradient descent
    and heavy ball the secant, a step old, trains the benchmark's full-batch ResNet with the lagged steps' cap on
    the step's length (:class:`curvopt.rules.CDATRule`) but not its mini-batch one (measured at width 4, seeds
    0-2, 500 steps; the fd oracle is ahead in both)."""
    if method is None or method.preconditioned:
        return None
    return ("curvopt: the secant curvature (closure-free steps, probes=False or curvature=\"secant\") behind gradient "
            "descent or heavy ball is a step old: on the benchmark's full-batch ResNet it trains (closure-free final "
            "train loss: heavy ball 1e-8-3e-8, like the fd oracle's; plain GD 0.022-0.029, fd 0.0012-0.0026), but "
            "in mini-batch, where it also sees the gradient noise, heavy ball did not train (2.4-2.8; fd 1.1-1.8) "
            "and plain GD ended 1.7-13x above fd (0.39-0.48; fd 0.03-0.28). Pass a closure (PyTorch) or value_fn "
            "(Optax) for the fd oracle, or use an Adam base (there the closure-free rates train the benchmark's LM "
            "to within 5% of fd's loss).")


#: secant steps after the closure-free probing step before :func:`secant_stalled` judges the rate (a window)
SECANT_STALL_STEPS = 10
#: how much a closure-free rate still below its probe must have grown over a judgement window of
#: :data:`SECANT_STALL_STEPS` steps for :func:`secant_stalled` to wait another window instead of judging it
SECANT_STALL_RECOVERY = 2.0
#: how far below its probe a closure-free rate must be for :func:`secant_stalled` to call it a stall: the
#: collapse keeps the rate orders of magnitude below (a small MLP in batches of 16: 150x), while a rate on the edge
#: can sit a little below a probe that is not tiny where the gradient is small against the weights (a field test's
#: tanh MLP fitting a curve in full batch behind momentum SGD, 0.6x the probe and climbing slowly, was warned of)
SECANT_STALL_DEPTH = 10.0
SECANT_STALL_MESSAGE = (
    "curvopt: closure-free, the rate is still below the tiny probing step it started from (lr = h, the fd step), "
    f"more than {SECANT_STALL_DEPTH:g}x, {SECANT_STALL_STEPS} steps later, and not climbing toward it (less than "
    f"{SECANT_STALL_RECOVERY:g}x over the last {SECANT_STALL_STEPS}). Either the secant of consecutive gradients "
    "is dominated by their noise (small mini-batches, dropout): it overestimates the curvature by about the noise's variance divided by the "
    "previous rate, so a small rate keeps itself small (measured: a small MLP at batch 16 of 512 stayed at 1e-7 "
    "where the fd oracle chose 0.2); or the curvature along the update was not positive at the start and the "
    "probes that follow (each twice the last) are still short of where it turns positive; or other parameters of "
    "the model moved between the steps (another optimizer on the rest of the model, a GAN's other network), "
    "whose motion the secant reads as curvature. "
    "Pass a closure (PyTorch) or value_fn (Optax) for the fd oracle, or use larger batches. The secant's noise "
    "correction (noise_correction=, on by default for CDAT behind Adam) removes the noise's bias: it trained two "
    "small MLPs where the uncorrected secant stalled, batches of 32 and 128 of 512, though its rate may take more "
    "steps to pass the probing step; behind SGD it is opt-in (noise_correction=True; its rate collapsed late on the "
    "benchmark's mini-batch ResNet: watch the rate).")


#: how many times below its peak a closure-free rate held by the noise correction's floor must fall before
#: :func:`secant_collapsed` says so
SECANT_COLLAPSE_FALL = 100.0
#: how many consecutive secant steps the rate must stay collapsed (:func:`collapse_run`) before the tuners say so
SECANT_COLLAPSE_STEPS = 20
SECANT_COLLAPSE_MESSAGE = (
    f"curvopt: closure-free, the rate has stayed more than {SECANT_COLLAPSE_FALL:g}x below its peak for "
    f"{SECANT_COLLAPSE_STEPS} steps while the "
    "secant's curvature is dominated by the gradient noise (the noise correction's estimate leaves less than a "
    "tenth of the secant, and the corrected curvature sits at its floor, an overestimate): the smaller the rate, "
    "the more noise per unit step, and the rate keeps falling. Measured: a GRU character LM behind AdamW in "
    "batches of 32, rate 0.048 at step 200, 3e-4 at 1,500 and 1e-5 at 3,000, its loss stalled at 1.65 where CDAT "
    "with a closure reached 1.47-1.49 at 2,000 (like a cosine-decayed AdamW); the benchmark's mini-batch ResNet "
    "behind momentum SGD with noise_correction=True, rate 0.95 -> 3e-25 (seed 0). For "
    "long mini-batch runs pass a closure "
    "(PyTorch) or value_fn (Optax) for the fd oracle, or use larger batches.")


def secant_collapsed(rate: Any, peak: Any, dominated: Any) -> Any:
    """Whether a closure-free run's rate has collapsed: it is :data:`SECANT_COLLAPSE_FALL` times below ``peak``, the
    largest rate of its secant steps since the last probing step, while the noise dominates its curvature
    (``dominated``: :func:`curvopt.curvature.noise_dominated`, so only where the noise correction runs). Both rates in
    :func:`in_direction_units` (a scheduler's factor, which the tuner's rate cancels, cancels here too). The rate of a
    run that trains falls too (the benchmark's mini-batch LM: 3-6x from its peak by step 500); the GRU LM of
    :data:`SECANT_COLLAPSE_MESSAGE` fell 100x by steps 1,231-1,479 (seeds 0-2, warned there) and kept falling. Not
    every collapse is the noise's: the mini-batch ResNet behind momentum SGD with the correction fell 160x to 4e24x
    (seeds 0-2), warned on seed 0, where the floor held the curvature; on the others it did not. No warning on the
    benchmark's mini-batch and full-batch LM and full-batch ViT (closure-free behind Adam, seeds 0-2), on
    ``benchmarks.closure_free``'s two MLPs (batches of 16-512, 400 steps, seeds 0-2: 24 runs) or on a fine-tuning
    field test (6 seeds)."""
    return dominated & (rate * SECANT_COLLAPSE_FALL < peak)


def collapse_run(run: Any, collapsed: Any, probing: Any, moved: Any, xp: Any) -> Any:
    """The count of consecutive secant steps that moved at which the rate was collapsed (``collapsed``:
    :func:`secant_collapsed`), after a closure-free step: 0 again at a probing step (a new peak) or a step that moved
    and was not collapsed, unchanged at one that did not move, and kept once it reaches
    :data:`SECANT_COLLAPSE_STEPS`, from when the tuners say so (:func:`collapse_sustained`). One collapsed step is
    not a collapse: a loss spike took a 5,000-step closure-free run behind AdamW in batches of 64 (a field test, a
    digits MLP, train loss 1e-4) from its peak rate 0.030 to 9.7e-5, more than 100x below, for 3 steps, and it
    climbed back to 0.033 (warned on 4 of 5 such runs); the collapses of :data:`SECANT_COLLAPSE_MESSAGE` last
    thousands of steps."""
    sustained = collapse_sustained(run)
    counted = xp.where(moved, xp.where(collapsed, run + 1, 0), run)
    return xp.where(sustained, run, xp.where(probing, 0, counted))


def collapse_sustained(run: Any) -> Any:
    """Whether a :func:`collapse_run` count says the rate has collapsed."""
    return run >= SECANT_COLLAPSE_STEPS


def collapse_peak(rate: Any, peak: Any, probing: Any, moved: Any, xp: Any) -> Any:
    """The peak :func:`secant_collapsed` judges a rate against, after a closure-free step at ``rate`` (in
    :func:`in_direction_units`): 0 again at a probing step (a new peak from each probe, a concave start's too), the
    larger of the two where the step ``moved`` (a secant step at a rate above 0), else ``peak`` unchanged."""
    return xp.where(probing, 0.0, xp.where(moved, xp.maximum(peak, rate), peak))


#: float32's machine epsilon: the closure-free probing step is sized by at least it (:func:`secant_probe_eps`), and
#: the stall judgement by at most it (:func:`secant_stall_reference`)
SECANT_PROBE_EPS = 2.0 ** -23


def secant_probe_eps(dtype_eps: Any, xp: Any) -> Any:
    """The machine epsilon that sizes a closure-free run's probing step ``h``
    (:func:`curvopt.rules.finite_difference_step`): the one of the parameters and, where
    :func:`probe_reads_forward`, the forward pass, but at least float32's (:data:`SECANT_PROBE_EPS`). An fd probe
    differences two gradients of one batch, so rounding is its only error and the dtype's ``sqrt(eps)`` balances it;
    the probing step's secant differences gradients of consecutive steps, in mini-batch training of different
    batches, so it must also resolve their noise, which over a float64-sized displacement (``1.5e-8 ||w||``) swamps
    the curvature. Measured (``python -m benchmarks.closure_free dtype``: two small MLPs behind Adam, batches of 32
    and 128 of 512, noise correction on, seeds 0-2): with float64's step no float64 run trained (chance-level loss,
    rate 1e-6-1e-5 after 200 steps); sized by float32's epsilon the float64 runs end where the float32 runs do
    (final train loss within 2 %, 11 of 12 runs to 3 digits). In full batch the longer probe costs nothing that
    matters: the secant's curvature is then accurate to about ``sqrt(2^-23)`` (3e-4) relative instead of 1e-8."""
    return xp.maximum(dtype_eps, SECANT_PROBE_EPS)


def probe_reads_forward(noise_corrected: bool) -> bool:
    """Whether a closure-free probing step is sized for the precision the forward pass computed in (read from the
    gradient: a bfloat16 autocast, a flax module's ``dtype=bfloat16``) as well as for the parameters' dtype
    (:func:`secant_probe_eps`'s ``dtype_eps``): only where the secant's noise correction is off
    (:func:`curvopt.curvature.noise_correction_on`). Without it the secant over a float32-sized probe reads the
    forward's rounding as curvature (a GELU MLP under a bfloat16 autocast: curvature 34 where float32 reads 92, the
    next rate 2.7x float32's; sized for bfloat16 within 25 %). With it that rounding is noise the correction
    removes, and a probe sized for bfloat16 (6 % of ``||w||``) spans a segment over which the gradient's drift
    across the direction, which the correction reads as noise too, holds its curvature at the floor, and the
    larger steps that follow keep it there: behind Adam under a bfloat16 autocast (two small MLPs of
    ``benchmarks.closure_free``, batches of 32, 128 and 512 of 512, 200 steps, seeds 0-2) the last rates were
    1.3-7x float32's, the held-out loss up to 8.7x (Gaussian problem, batches of 128: 0.71-1.29 against 0.15) and
    the digits' train loss in batches of 32 0.064-0.117 against 0.017-0.037; with float32's probe the runs end
    where float32's do (that train loss 0.020-0.031, the Gaussian runs to 3 digits; in full batch not on every seed:
    docs/precision.md). A probe below the parameters'
    own resolution would be rounded away, so their dtype always counts."""
    return not noise_corrected


def secant_stall_reference(probe_lr: Any, dtype_eps: Any, xp: Any) -> Any:
    """The rate that :func:`secant_stalled` judges a closure-free run's secant rate against: its probing step
    ``probe_lr`` (``h``, sized by the machine epsilon ``dtype_eps`` of the parameters and the forward pass:
    :func:`curvopt.rules.finite_difference_step`), as a float32 computation would size it where the one behind the
    gradients is coarser. The judgement is whether the rate ever left the *tiny* step it started from; under a
    bfloat16 autocast ``h`` moves the parameters by ``sqrt(2^-8)``, 6 % of ``||w||``, which is a rate that trains:
    measured on a small CNN behind Adam (closure-free, seeds 0-2), the rate fell to 0.16-0.3 of that probe and
    climbed at the secant's growth cap, still below it 10 steps later, and the run trained further in 40 steps
    than the float32 run, which no judgement flagged."""
    ratio = SECANT_PROBE_EPS / dtype_eps
    return probe_lr * xp.where(ratio < 1.0, ratio, 1.0) ** 0.5


def in_direction_units(rate: Any, unit: Any, xp: Any) -> Any:
    """A rate in the units the watches compare rates of different steps in: times the direction's unit
    (:attr:`curvopt.rules.RuleInputs.unit`: the group rate a scheduler sets, a clip's factor, which CDAT's rate
    cancels) where that is a positive number, else as it is. The stall and collapse watches (:func:`secant_stalled`,
    :func:`secant_collapsed`) and the mini-batch watch's held rate (:func:`curvopt.minibatch_watch.held_rate`) keep
    their rates so. In the tuner's own units a warm-up of the group rate after the probe lowered a rate that trained
    against the probe by the warm-up's factor (a field test's `LambdaLR` warm-up from 0.1 to 1 over 20 steps behind
    AdamW warned of a stall on 3 of 3 seeds), and the held rate rose by it (below)."""
    known = (unit > 0) & xp.isfinite(unit)
    return rate * xp.where(known, unit, 1.0)


def secant_stalled(lr: Any, probe_lr: Any, steps_in_window: Any, window_lr: Any) -> tuple[Any, Any, Any]:
    """``(judged, stalled, recovering)`` (host scalars or traced arrays): a closure-free run's secant rate ``lr`` is
    judged :data:`SECANT_STALL_STEPS` steps into a window that starts at its probing step, at a step that moved
    (``lr > 0``: a rate of 0 is the rule declining an ascent or concave direction, which the next step probes
    again, as after Adam's momentum carried a run past a minimum; not the small rate the noise keeps small),
    against ``probe_lr``, that step's :func:`secant_stall_reference` (the backends judge once per probe, at the
    first such step from then, and keep the first probe of a run of probes, so that probes repeated after steps of
    rate 0 do not postpone the judgement for ever), and has stalled when it is still more than
    :data:`SECANT_STALL_DEPTH` times below it: the collapse the tuners warn about (:data:`SECANT_STALL_MESSAGE`). A
    rate that trains is far above a float32-sized probe by then, or on its way there: a rate that far below the
    probe but at least :data:`SECANT_STALL_RECOVERY` times
    ``window_lr``, the window's first rate after its probe (NaN: none yet), is ``recovering``, not judged, and the
    backends start a new window at this step from this rate. Fine-tuning a pretrained MLP behind AdamW in batches
    of 32, the first secant after the probe read the batches' noise and fell 13x and 230x below it on 2 of 6 seeds,
    then climbed 1.1-2x per step past it by step 16 and trained like the other seeds: judged at step 10, both
    warned of a stall. A rate that keeps itself small (the collapse) stays within a factor of 2 over a window. All
    rates in :func:`in_direction_units`, each with its own step's unit."""
    due = (steps_in_window >= SECANT_STALL_STEPS) & (lr > 0)
    below = lr * SECANT_STALL_DEPTH < probe_lr
    recovering = due & below & (lr >= SECANT_STALL_RECOVERY * window_lr)
    judged = due & ~recovering
    return judged, judged & below, recovering


def stall_window(lr: Any, step: Any, start: Any, window_lr: Any, recovering: Any, xp: Any) -> tuple[Any, Any]:
    """``(start, window_lr)`` of the judgement window after a closure-free secant step at rate ``lr`` (in stall
    units) that :func:`secant_stalled` did not judge: a new window from this step and rate where ``recovering``;
    else the window's first rate is this one where it has none yet (NaN) and the step moved."""
    first = (window_lr != window_lr) & (lr > 0)
    return xp.where(recovering, step, start), xp.where(recovering | first, lr, window_lr)


#: the factor by which a closure-free step at a concave start probes farther than the previous probe
REPROBE_GROWTH = 2.0


def concave_reprobe(lr: Any, numerator: Any, curvature: Any, last_probe: Any, lr_max: Any, xp: Any
                    ) -> tuple[Any, Any]:
    """``(rate, reprobe)`` of a closure-free secant step. Where the rule took no step (``lr = 0``) because the
    secant's curvature is not positive along a descent direction (``numerator = -g^T u > 0``): a concave start,
    where without the loss the rule has no step to take. The step then probes again, at :data:`REPROBE_GROWTH`
    times the last probe ``last_probe``, so that the next secant spans a longer segment (probing again at the fd
    step ``h`` never left the start of a double well), at most the rule's ``lr_max`` (along a direction where the
    loss is linear the probes would otherwise grow for ever). ``last_probe`` is NaN when the rule has moved since
    the last probe (then ``lr``, as elsewhere). A zero rate for another reason (an ascent direction:
    ``numerator <= 0``) is never grown."""
    reprobe = (lr == 0) & (numerator > 0) & (curvature <= 0) & xp.isfinite(last_probe)
    grown = REPROBE_GROWTH * xp.where(reprobe, last_probe, 0.0)
    return xp.where(reprobe, xp.where(grown < lr_max, grown, lr_max), lr), reprobe


def probes_along(numerator: Any) -> Any:
    """Whether a closure-free step that has no secant takes its probing step ``h`` along the update: only along a
    descent direction (``numerator = -g^T u > 0``). Along an ascent direction (a base that negates its update:
    ``optax.sgd`` inside the tuner) it takes no step (rate 0, the rule's state untouched) and probes at the next
    descent step: probing regardless climbed by ``h`` every other step (a field test, ``cdat(optax.sgd(0.1))``
    closure-free: the loss 2.43 -> 2.61 over 200 steps, where with ``value_fn`` the rate stays 0)."""
    return numerator > 0


def remember_probe(last_probe: Any, lr: Any, probing: Any, xp: Any) -> Any:
    """The ``last_probe`` :func:`concave_reprobe` reads, after a closure-free step at rate ``lr``: this rate at a
    probing step, NaN once a step moves (``lr > 0``), else unchanged (a step that took no step keeps it)."""
    return xp.where(probing, lr, xp.where(lr > 0, float("nan"), last_probe))


#: consecutive secant steps whose gradients all have one norm (to :data:`EXTERNAL_CLIP_RTOL`) before
#: :func:`external_clip_suspected` says so
EXTERNAL_CLIP_STEPS = 3
EXTERNAL_CLIP_RTOL = 1e-5
#: the case the norm watch cannot tell from a clip (a field test: an L1 fit of a parameter tensor warned)
_CONSTANT_NORM_LOSS = ("Without any clip, a loss whose gradient has the same norm wherever it is taken (an L1 or "
                       "pinball loss on the parameters themselves: a gradient of signs) looks the same; ignore this "
                       "warning then.")
#: the clip the advice to remove it must not reach (a field test: Poisson batches of ~2 examples under Opacus)
_PER_EXAMPLE_CLIP = ("Per-example clipping for differential privacy (Opacus, optax.contrib's "
                     "differentially_private_aggregate) can make the same mark (batches of about one example): "
                     "keep it, as privacy needs it, and read curvopt's docs/limits.md on it, where the closure-free "
                     "rates are wrong. ")
EXTERNAL_CLIP_MESSAGE = (
    "curvopt: the gradients handed to the closure-free step have had the same norm on the last "
    f"{EXTERNAL_CLIP_STEPS} steps (to {EXTERNAL_CLIP_RTOL:g}): an active gradient clip outside the tuner "
    "(torch.nn.utils.clip_grad_norm_ before opt.step(), Hugging Face's max_grad_norm, "
    "Lightning's gradient_clip_val or self.clip_gradients). It changes each step's gradient by a factor of its "
    "own, and the secant curvature, the difference of consecutive gradients, is then wrong (measured on a "
    "quadratic: the greedy rate 1e8-1e19x too high; CDAT's loss 12 instead of 2e-13). Remove that clip and clip "
    "with the tuner's max_grad_norm= alone, which divides its factor back out (Hugging Face: max_grad_norm=0 in "
    "TrainingArguments; Lightning: gradient_clip_val=None, no self.clip_gradients). "
    + _PER_EXAMPLE_CLIP + _CONSTANT_NORM_LOSS)
EXTERNAL_CLIP_MESSAGE_CLOSURE = (
    "curvopt: the gradients the closure computed have had the same norm on the last "
    f"{EXTERNAL_CLIP_STEPS} steps (to {EXTERNAL_CLIP_RTOL:g}): an active gradient clip inside the closure "
    "(torch.nn.utils.clip_grad_norm_ after backward, Lightning's gradient_clip_val or self.clip_gradients). The "
    "tuner then reads the clipped gradient as the loss's: the slope -g^T u is too small by the clip's factor, so "
    "Polyak's rate is too large by it (a field test: pinned at lr_max), the line search's test is too lenient and "
    "the sharpness's gradient differences are wrong. Remove that clip and clip with the tuner's max_grad_norm= "
    "alone, which clips the update with the main call's factor and gives the rules the loss's own slope. "
    + _CONSTANT_NORM_LOSS)
EXTERNAL_CLIP_MESSAGE_OPTAX = (
    "curvopt: the gradients handed to the closure-free step have had the same norm on the last "
    f"{EXTERNAL_CLIP_STEPS} steps (to {EXTERNAL_CLIP_RTOL:g}): a norm clip chained before the tuner "
    "(optax.chain(optax.clip_by_global_norm(c), cdat(...)), e.g. as a TrainState's or nnx.Optimizer's tx). It "
    "changes each step's gradient by a factor of its own, and the secant curvature, the difference of "
    "consecutive gradients, is then wrong (measured on a digits MLP: GD's loss to 6.5e4, Adam stuck near "
    "chance). Put the clip inside the base: cdat(optax.chain(optax.clip_by_global_norm(c), optax.scale_by_adam()), "
    "base_method='adam'). " + _PER_EXAMPLE_CLIP + _CONSTANT_NORM_LOSS)


def moved_measurably(lr: float, numerator: float, loss: float) -> bool:
    """Whether a step at rate ``lr`` moved the parameters enough for :func:`watched_norms` to count the next
    gradient: ``lr > 0`` and, where the loss is known (finite), its first-order change ``lr |g^T u|``
    (``numerator = -g^T u``) above :data:`EXTERNAL_CLIP_RTOL` of ``|loss|``. A step below that leaves the next
    gradient's norm within the watch's tolerance of this one's (a field test: Polyak with an ``f_star`` the run
    reaches, its rates falling 7.9e-5, 2e-10, 1.5e-15 as the loss settled on it, read as a clip inside the
    closure). Host floats."""
    if not lr > 0:
        return False
    return not math.isfinite(loss) or lr * abs(numerator) > EXTERNAL_CLIP_RTOL * abs(loss)


def watched_norms(norms: Any, norm: Any, counted: Any, xp: Any) -> Any:
    """The window of the last :data:`EXTERNAL_CLIP_STEPS` gradient norms of consecutive watched steps
    (closure-free secant steps; in PyTorch also closure steps without ``fd`` probes, whose replay check would
    catch a clip; an array, oldest first, 0 for a step not seen; start from zeros) after a step whose gradient has
    norm ``norm``: shifted in when the step counts (``counted``: it follows a step that moved the parameters;
    a probe's tiny step leaves the gradient nearly as it was, a step at rate 0 exactly, the same batch then
    giving the same norm), else left as it was: such a step says nothing either way (cleared, the window of a
    clip in front of the greedy rule behind heavy ball, whose rate swung between 0 and 1e9-1e14 while the loss
    went to 1e14, never filled, and nothing warned: a field test)."""
    shifted = xp.concatenate([norms[1:], xp.reshape(norm, (1,)).astype(norms.dtype)])
    return xp.where(counted, shifted, norms)


def external_clip_suspected(norms: Any, xp: Any) -> Any:
    """Whether the window of :func:`watched_norms` says that an active norm clip outside the tuner produced
    them: all positive and finite and equal to :data:`EXTERNAL_CLIP_RTOL` relative. ``clip_grad_norm_`` scales
    to ``max_norm * n / (n + 1e-6)``, one value to ~1e-6, ``optax.clip_by_global_norm`` to ``max_norm``;
    consecutive true gradients after steps that moved the parameters differ by far more. Written entry by entry
    (the window is short): under ``jax.jit`` each reduction (``max``, ``min``, ``all``) is an XLA:CPU kernel of
    its own, compiled with every step; the elementwise form is one."""
    values = [norms[i] for i in range(len(norms))]
    top, low = functools.reduce(xp.maximum, values), functools.reduce(xp.minimum, values)
    valid = functools.reduce(operator.and_, [xp.isfinite(v) & (v > 0) for v in values])
    return valid & (top - low <= EXTERNAL_CLIP_RTOL * top)


#: how many roundings of the least precise parameter dtype ``||w||^2`` may differ by between the tuner's record of
#: the parameters it left and the next step's reading (:func:`moved_outside`): XLA may fuse the loop's ``params +
#: updates`` into a multiply-add, which rounds an entry differently by 1 ulp (measured: 0.5 eps of ||w||^2 in
#: float32), and a norm over two copies of the same values in other layouts may sum in another order
OUTSIDE_MOTION_ULPS = 16


def moved_outside(found: Any, left: Any, eps: Any, xp: Any) -> Any:
    """Whether the parameters a closure-free step starts from are not those the tuner's last step left, which the
    secant assumes: their squared norm ``found`` differs from the one recorded then, ``left``, by more than
    :data:`OUTSIDE_MOTION_ULPS` roundings ``eps`` relative (the least precise parameter dtype's; 0: exact). False
    where either is not finite (NaN or inf: not recorded)."""
    known = xp.isfinite(found) & xp.isfinite(left)
    return known & (abs(found - left) > OUTSIDE_MOTION_ULPS * eps * abs(left))


#: the closure checks of a tuner's first steps: fd probes against the main call's quadratic model
#: (:func:`curvopt.curvature.replay_mismatch`; Optax: ``value_fn`` at the probe against ``value`` and ``grad``), or
#: (PyTorch's line search) replays at the unchanged parameters before a search; and as many checks of
#: functional_loss against the main call
REPLAY_CHECKS = 3
#: Optax's check (:func:`jax_backend.oracles.replay_check`) warns at a miss of this many allowances of
#: :func:`curvopt.curvature.replay_mismatch`; PyTorch's, at 1, then calls the closure again at the unchanged
#: parameters to tell the causes apart, which Optax's cannot inside ``jit``. A float32 loss fitted near 0 rounds like
#: the terms it cancels (cross-entropy: its logits), not like itself: a value_fn that replays missed by up to 16.8
#: allowances at the loss's own scale in a field test (Optax's check allows the rounding of a loss of at least 1),
#: where one that drew other dropout masks missed by 18-176 on a step (68-176 at the worst of the first 3)
REPLAY_MISS_OPTAX = 20.0
#: neither backend judges the quadratic model at a probe whose first-order change ``h |g^T u|`` exceeds this share
#: of the loss (:func:`curvopt.curvature.replay_judged`): the model's own error is not small then (field tests: a
#: probe sized for a bf16 forward pass on a small transformer moved the loss by 77 % of it in Optax, 40-60 % in
#: PyTorch, and missed the model by 1.7-3.2 allowances with a loss that replays; 1 % before, in Optax alone: at 1 %
#: PyTorch's check would not judge the float32 probes of its test's loss far from quadratic, 1.4 % of it); PyTorch's
#: check still calls the closure again at the unchanged parameters where such a probe misses, and tells a closure
#: that does not replay
REPLAY_PROBE_SHARE = 0.1
#: where PyTorch's check finds a closure that replays at the unchanged parameters but misses the quadratic model at
#: the fd probe, it probes once more at this fraction of the probe's step, its model through that probe's own
#: gradient, before it says that the gradient does not predict the loss: a loss merely far from quadratic over the
#: probe's step fits it there (the model's error falls with the cube of the step, the allowance with the step),
#: while a gradient changed inside the closure (a clip, a rescaling hook) misses by as many allowances at any step
#: (the benchmark's full-batch ViT at width 4, seed 2: told at 1.06 allowances, with a closure that replays)
REPLAY_SHORTER = 0.25

#: the warning when the parameters a closure-free (secant) step starts from are not those the tuner's last step
#: left (:func:`moved_outside`; PyTorch: the state's ``curvopt_exit_sq``, :data:`torch_backend.state.EXIT_SQ`)
OUTSIDE_MOTION_MESSAGE = (
    "curvopt: the parameters changed between two steps outside the optimizer (e.g. a weight clamp or "
    "renormalisation after opt.step(), weight decay applied by hand, a Lookahead wrapper around the tuner, weights "
    "reloaded without the optimizer, or an optimizer state loaded beside weights of another step). The "
    "closure-free secant curvature assumes that only the tuner's step moved them, so its learning rates are "
    "unreliable from here on (field tests: a clamp cut the greedy rule's median "
    "rate from 39 % to 1.5 % of the exact greedy rate; after 6 of 7 Lookahead syncs CDAT's curvature came out "
    "negative). Pass a closure, opt.step(closure), with probes on (the default, not probes=False or "
    "curvature='secant'): the curvature is then measured at the parameters as they are; or move the change into "
    "the base optimizer (weight decay: its weight_decay=).")

OUTSIDE_MOTION_MESSAGE_OPTAX = (
    "curvopt: the parameters a closure-free step started from were not those the tuner's last step left (e.g. "
    "optax.apply_every or a schedule, scale or add_decayed_weights chained after the tuner, optax.lookahead's sync, "
    "optax.contrib.schedule_free around the tuner, a projection or clamp of the parameters in the train step, "
    "parameters restored without the optimizer state). "
    "The closure-free secant curvature assumes that only the tuner's step moved them, so its learning rates are "
    "unreliable. Pass value_fn= (the curvature is then measured at the parameters as they are); schedule sigma "
    "with optax.inject_hyperparams rather than chaining a schedule after the tuner; move a change of the update "
    "into the base, the tuner's first argument (weight decay: cdat(optax.chain(optax.scale_by_adam(), "
    "optax.add_decayed_weights(wd)), base_method='adam') is AdamW); accumulate with optax.MultiSteps rather than "
    "optax.apply_every.")

#: Optax's warning (:func:`jax_backend.stats`) when one of the first :data:`REPLAY_CHECKS` fd probes missed the
#: step's quadratic model (:func:`curvopt.curvature.replay_mismatch`); PyTorch's tells the causes apart by calling
#: the closure again at the unchanged parameters
REPLAY_MESSAGE_OPTAX = (
    f"curvopt: on one of the first {REPLAY_CHECKS} steps, value_fn's loss at the fd probe point (a tiny step h "
    "along the update) was not what the step's value and gradient predict there: value_fn does not compute the "
    "loss whose value= and grad= the step passes, and the fd curvature, and the rate, can be off by orders of "
    "magnitude (a field test: the greedy rate 1.4e-6 where 2.07 was right). Usually randomness value_fn does not "
    "replay: a dropout key other than the one the gradient was computed with (pass that key to value_fn through "
    "update, e.g. update(..., value_fn=loss_fn, rng=key), under a name value_fn takes, and do not split a fresh "
    "key inside it); a batch other than the gradient's (the last micro-batch's under accumulation); a term in "
    "the gradient that value_fn lacks; a clip chained before the tuner, whose clipped updates it takes for the "
    "gradient (pass grad= the raw gradient, or clip inside the base). Otherwise the loss is far from quadratic "
    "over the probe's step (the first steps of a small model behind Adam), which needs no fix.")

#: the other cause of a skipped closure-free step (:func:`has_gradient`), as Optax's ``stats`` names it beside
#: :data:`SKIP_MESSAGE` (its state does not keep which of the two it was)
ZERO_GRADIENT_SKIP = ("the gradient was zero in every entry (a summed loss whose every target is ignored, a hinge "
                      "loss with every margin met, a gradient never computed)")
#: what a skipped step is (PyTorch warns at each; Optax's ``stats`` when no step so far was taken, or the last)
SKIP_MESSAGE = ("non-finite loss, gradient or base direction, step skipped (parameters, base state and tuner "
                "state unchanged)")


def skip_message(loss_finite: bool | None, gradient_finite: bool) -> str:
    """:data:`SKIP_MESSAGE` naming what was not finite, where the backend has read it: the loss (None: not known,
    a closure-free step), else the gradient, else the base's update alone, whose usual cause is named (a field
    test: float16 parameters behind Adam, no autocast, every step skipped with finite losses and gradients)."""
    known = "the loss and the gradient are" if loss_finite else "the gradient is"
    if loss_finite is False:
        what = "non-finite loss"
    elif not gradient_finite:
        what = "non-finite gradient" + (" (the loss is finite)" if loss_finite else "")
    else:
        what = (f"non-finite base direction: {known} finite, the base optimizer's update is not (behind Adam with "
                "float16 parameters eps=1e-8 rounds to 0 and 0/0 is NaN: keep float32 parameters under "
                "torch.autocast, or pass eps=1e-4)")
    return what + SKIP_MESSAGE[SKIP_MESSAGE.index(", step skipped"):]


#: consecutive steps at rate 0 before the tuners warn (:func:`zero_rate_run`)
ZERO_RATE_STEPS = 10
#: how many machine epsilons of the loss a decrease must exceed to show in it, for :func:`zero_rate_run` (a mean
#: over a batch is rounded by more than one: least squares at its minimum in float64 had steps promising 4x one)
ZERO_RATE_ROUNDING = 64.0


def zero_rate_run(run: Any, lr: Any, numerator: Any, scale: Any, eps: Any, loss: Any, last_rate: Any, xp: Any
                  ) -> Any:
    """The count of consecutive steps, this one included, at learning rate 0 with a numerator ``-g^T u`` that is
    not negligible. A healthy run never has :data:`ZERO_RATE_STEPS` of them: the parameters have not
    moved, and behind gradient descent or heavy ball the next step sees the same inputs, so the run does not end.
    From then on the tuners warn (:func:`zero_rate_message`). A run that has converged is at rate 0 rightly, and
    its numerator is negligible: within ``eps`` (the parameters' machine epsilon) times ``scale`` (the magnitude
    of the run's first numerator, :func:`numerator_scale`), its sign rounding's; or, with the ``loss`` known (NaN:
    not), the decrease it promises at the last rate the rule took (``last_rate``, NaN before one) is within
    :data:`ZERO_RATE_ROUNDING` times ``eps`` of the loss, below what the loss can show (a field test, the line
    search behind heavy ball in full batch: the digits to a loss of 2e-17 in float64 with numerators of -6e-23, or
    1e-9 in float32, warned on 7 of 7 runs; least squares to its minimum 0.465 in float64, numerators of 4e-15,
    warned). A numerator of exactly 0 is a stationary point along the update."""
    size = abs(numerator)
    negligible = ((numerator == 0) | (size <= eps * scale)
                  | (size * last_rate <= ZERO_RATE_ROUNDING * eps * abs(loss)))
    return xp.where((lr == 0) & ~negligible, run + 1, 0 * run)


def numerator_scale(scale: Any, numerator: Any, xp: Any) -> Any:
    """The reference :func:`zero_rate_run` measures numerators against: the magnitude of the first finite nonzero
    numerator since the tuner started (NaN before). Not the run's largest, which a divergence would inflate so
    that the numerators of the run it leaves behind read as negligible."""
    fresh = xp.isnan(scale) & xp.isfinite(numerator) & (numerator != 0)
    return xp.where(fresh, abs(numerator), scale)


class ZeroRateWatch(NamedTuple):
    """The memory of the watch on runs of steps at rate 0 (:func:`watch_zero_rate`; scalars: 0-d arrays in Optax's
    state, where the field names are unique beside the rule's, NumPy numbers in PyTorch): the current run's
    length, the run's first numerator magnitude (:func:`numerator_scale`), the last rate above 0 (NaN before
    one), and whether the numerator was negative (the loss rising along the update) on the step a run first
    reached :data:`ZERO_RATE_STEPS` (NaN before; 1.0 or 0.0 then, kept: the tuners warn once)."""

    zero_run: Any
    zero_scale: Any
    zero_last_rate: Any
    zero_rising: Any

    @classmethod
    def start(cls, zero: Any, zero_count: Any) -> "ZeroRateWatch":
        """The memory before any step, from a 0 of the accumulator dtype and one of the count's integer type."""
        nan = zero + math.nan
        return cls(zero_count, nan, nan, nan)


def watch_zero_rate(watch: ZeroRateWatch, lr: Any, numerator: Any, loss: Any, eps: Any, xp: Any) -> ZeroRateWatch:
    """``watch`` after a step at rate ``lr`` with numerator ``-g^T u`` and ``loss`` (NaN: not known); ``eps``: the
    parameters' machine epsilon (:func:`zero_rate_run`)."""
    scale = numerator_scale(watch.zero_scale, numerator, xp)
    run = zero_rate_run(watch.zero_run, lr, numerator, scale, eps, loss, watch.zero_last_rate, xp)
    last = xp.where(lr > 0, lr, watch.zero_last_rate)
    fired = xp.isnan(watch.zero_rising) & (run >= ZERO_RATE_STEPS)
    rising = xp.where(fired, xp.where(numerator < 0, 1.0, 0.0), watch.zero_rising)
    return ZeroRateWatch(run, scale, last, rising)


def zero_rate_message(rising: bool, decays: bool, carries: bool = False, optax: bool = False) -> str:
    """The warning for a run of :func:`zero_rate_run` steps. ``rising``: the loss rises along the base's update
    (``-g^T u < 0``) on the last of them; ``decays``: the base decays its weights; ``carries``: its update carries
    earlier steps' gradients (:func:`curvopt.base.carries_gradients`); ``optax``: Optax's wording (what the base
    chain holds is not known where the state is read: a memory and a decay are named as possible causes)."""
    head = f"curvopt: the learning rate has been 0 for {ZERO_RATE_STEPS} steps, so the parameters have not moved. "
    if not rising:
        return head + (
            "The loss falls along the base optimizer's update, but the rule gives it no step: the curvature along "
            "the update is not finite (a probe's loss or gradient is NaN or inf, the closure failing a little way "
            "from the parameters: the stats' curvature is NaN), or it is not positive and nothing bounds the step "
            "(f_star=-inf turns off the floor that gives "
            "one: pass a lower bound of the loss), the sharpness is 0 or negative (the edge-of-stability rule has no "
            "edge to follow there, its rate held at the last one, 0 at first: a loss without curvature, L1 or hinge "
            "on a linear model; use another tuner), a line search accepts no trial, the rule's sigma at this step is "
            "not a positive number (a schedule of sigma that reached 0, crossed below it or returned NaN)" + (
                " or a setting injected by optax.inject_hyperparams is outside the range its constructor accepts"
                if optax else "") + ", or the "
            "loss is at the rule's f_star (Polyak's rate (f - f_star) / (-g^T u) is then 0: if the loss can go "
            "lower, f_star is too high).")
    head += "The loss rises along the base optimizer's update (-g^T u <= 0). "
    if carries or optax:  # each cause that applies, then the others
        head += ("If the base's update carries earlier steps' gradients (a momentum, Adam's first moment), " if optax
                 else "The base's update carries earlier steps' gradients (its momentum, Adam's first moment): ") + (
            "after steps that overshot, where the loss rose, it can climb the loss until that memory turns, the rate "
            "staying 0 meanwhile (measured: QuadraticGreedy behind Adam on an autoencoder in batches of 64, the loss "
            "from 0.24 to 29 by step 64, then rate 0 for 30 steps, then training again). ")
    if optax:
        head += (
            "If the base decays the weights (optax.add_decayed_weights inside it), the rate is chosen for the loss "
            "without the decay, and where the decay outweighs the gradient the update climbs the loss (measured: "
            "quadratic_greedy(optax.chain(optax.identity(), optax.add_decayed_weights(0.3))) stopped for good at "
            "step 3): put the L2 term in the loss (0.5 * wd * sum of squared weights) instead, or lower the decay. ")
    elif decays:
        head += (
            "The rate is chosen for the loss the gradient comes from (the closure's); the base's weight_decay is not "
            "part of it, and where the decay outweighs that gradient the update climbs the loss (measured: logistic "
            "regression behind SGD(momentum=0.9, weight_decay=1e-3) stopped for good at step 8). Put the L2 term "
            "in the loss (0.5 * wd * sum of squared weights) instead of weight_decay=, or lower weight_decay. ")
    unknown = ("a base_method that is not the base's, or updates handed to the tuner that are not the loss's "
               "gradient transformed by the base" if optax else
               "a base the tuner does not know (allow_any_base=True), or gradients that are not the loss's")
    return head + ("Otherwise the update" if carries or decays or optax else "The update") + (
        f" is not a descent direction of the loss: {unknown}.")


GRADIENT_MISSING_MESSAGE = (
    "every entry of the gradient is zero: step skipped (parameters, base state and tuner state unchanged). "
    "Without a closure (PyTorch) or value_fn (Optax) the tuner reads the gradient it is handed: call "
    "loss.backward() before opt.step() (gradients zeroed with set_to_none=False and no backward look like this); "
    "a batch whose loss does not depend on the parameters (every target ignored under a summed loss), or a point "
    "where the gradient is exactly zero (an optimum reached), has nothing to step on.")


def has_gradient(grad_abs_max: Any) -> Any:
    """Whether a closure-free step (the secant's: the gradient is handed over, not computed by the tuner) can be
    taken: ``max_i |g_i| > 0`` (not ``||g||^2``, which underflows to 0 for a tiny float32 gradient). A gradient
    that is zero in every entry carries no descent information and is most often one that was never computed
    (:data:`GRADIENT_MISSING_MESSAGE`); the secant would read the previous step's ``-g_{t-1}^T u_{t-1}`` against
    it as curvature, and a momentum or Adam base would still move. Such a step is skipped like a non-finite one
    (a NaN ``grad_abs_max`` gives False too)."""
    return grad_abs_max > 0


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def accumulator_dtype_name(dtype_names: Iterable[str]) -> str:
    """The dtype of a tuner's own scalars (learning rate, moving averages, dot products, statistics): the
    widest floating dtype of the parameters, at least float32 (bf16/fp16 parameters accumulate in float32).

    ``dtype_names``: the parameters' dtype names (``"float32"``, ``"torch.bfloat16"``, ...). Complex
    parameters are refused (the tuners' inner products are real), and so are integer and boolean ones (the
    advice for PyTorch where the name is torch's).
    """
    out = "float32"
    for raw in dtype_names:
        name = str(raw).replace("torch.", "")
        if "complex" in name:
            raise ValueError(f"complex parameters ({name}) are not supported: the tuners' inner products and "
                             "curvatures are real; optimise the real and imaginary parts as real parameters")
        if name == "float64":
            out = "float64"
        elif name not in _FLOATS:
            where = ("Keep counters and masks out of the optimizer's parameters (a module buffer, "
                     "register_buffer, or a tensor left out of the param groups)" if str(raw).startswith("torch.")
                     else "Keep counters and masks out of the parameters (equinox: eqx.filter(model, "
                     "eqx.is_inexact_array), not eqx.is_array), or leave them out of the tuner (Optax: optax.masked "
                     "or optax.multi_transform)")
            raise ValueError(f"the parameters hold a leaf of dtype {name}: the tuners step floating-point parameters "
                             f"only. {where}")
    return out
