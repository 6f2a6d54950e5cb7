"""The base optimizer as the tuners see it: its kind, its stability coefficient, Adam's hyperparameters.

Both backends describe their base with a :class:`BaseMethod`. PyTorch infers it from the wrapped
``torch.optim`` instance (``torch_backend.direction.base_method``); an Optax base is a closure whose
hyperparameters are not visible, so the Optax tuners take ``base_method=`` (``None`` = gradient descent, with
a warning when the base is visibly another: ``jax_backend.tuner.check_base_method``).

* ``"gd"`` (``torch.optim.SGD`` without momentum, ``optax.identity()``): stability coefficient 2;
* ``"heavy_ball"`` (``v <- momentum v + (1 - dampening) g``; ``optax.trace(decay=momentum)``):
  ``(2 + 2 momentum) / (1 - dampening)``; ``"nesterov"``: PyTorch's form;
* ``"adam"`` (``torch.optim.Adam``/``AdamW``, ``optax.scale_by_adam(b1, b2, eps)``): ``(2 + 2 b1)/(1 - b1)`` on
  the preconditioned sharpness, whose ``P`` is built from the base's second moments with ``b1, b2, eps``.

The coefficient scales ``eos_ratio`` and the edge-of-stability rule (:mod:`curvopt.thresholds`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .thresholds import METHODS, stability_coefficient
from .validation import check_choice, check_in_unit_interval, check_nonnegative

__all__ = ["BaseMethod", "as_base_method", "carries_gradients", "direction_unit", "followed_rate", "BETAS_RTOL",
           "adam_betas_seen", "adam_update_unlike", "UNLIKE_SCALE"]


@dataclass(frozen=True)
class BaseMethod:
    """The base method's kind and the hyperparameters the tuners need from it (validated)."""

    kind: str = "gd"
    momentum: float = 0.0
    dampening: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("base_method", self.kind, METHODS)
        for name in ("momentum", "dampening", "b1", "b2"):
            object.__setattr__(self, name, check_in_unit_interval(name, getattr(self, name)))
        object.__setattr__(self, "eps", check_nonnegative("eps", self.eps))
        unused = [name for name in ("momentum", "dampening") if getattr(self, name) and (
            self.kind in ("gd", "adam") or (self.kind, name) == ("nesterov", "dampening"))]
        if unused:  # (read as 0: kind="gd" with momentum 0.9 stepped as plain gradient descent)
            raise ValueError(f"base_method {self.kind!r} takes no {unused[0]} (got {getattr(self, unused[0])!r}): "
                             "momentum belongs to 'heavy_ball' (with its dampening) and 'nesterov'")

    @classmethod
    def gd(cls) -> "BaseMethod":
        return cls("gd")

    @classmethod
    def heavy_ball(cls, momentum: float, dampening: float = 0.0) -> "BaseMethod":
        return cls("heavy_ball", momentum=momentum, dampening=dampening)

    @classmethod
    def nesterov(cls, momentum: float) -> "BaseMethod":
        return cls("nesterov", momentum=momentum)

    @classmethod
    def adam(cls, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> "BaseMethod":
        return cls("adam", b1=b1, b2=b2, eps=eps)

    @property
    def preconditioned(self) -> bool:
        """Whether the sharpness that matters is Adam's preconditioned one, ``lambda_max(P^-1 H)``."""
        return self.kind == "adam"

    @property
    def rescaled_gradient(self) -> bool:
        """Whether the base's direction is the gradient it took in times a scale (gradient descent): a clip's
        factor is then a unit the rule's averages follow (:func:`direction_unit`)."""
        return self.kind == "gd"

    @property
    def coefficient(self) -> float:
        """The stability coefficient ``c`` (threshold ``c / lr``)."""
        return stability_coefficient(self.kind, momentum=self.momentum, dampening=self.dampening, beta1=self.b1)


#: how far ``1 - beta`` read off an Adam base's first update may be from the declared one, relative (bfloat16
#: moments round by 0.4 %)
BETAS_RTOL = 0.05


def adam_betas_seen(method: BaseMethod, first_mu: float, first_nu: float, second_mu: float = math.nan,
                    mu_eps: float = 0.0) -> Optional[tuple[float, float]]:
    """The betas ``(b1, b2)`` an Adam base shows where they are not ``method``'s, else None: from zero moments, its
    first update of an all-ones gradient leaves ``first_mu = 1 - b1`` and ``first_nu = 1 - b2`` (``optax`` cannot
    be asked for them, and a ``base_method="adam"`` that means the default betas for ``scale_by_adam(b2=0.95)`` set
    the edge-of-stability rule's rate 7-12x too high and read the preconditioned sharpness 50x low in a field
    test). Each ``1 - beta`` may be off by :data:`BETAS_RTOL` of the declared one; a NaN one is not judged.

    A factor ``c`` the base applies to the gradient before Adam (``clip_by_global_norm`` shrinks the all-ones
    gradient by ``max_norm / sqrt(n)``) leaves ``(1 - b1) c`` and ``(1 - b2) c^2`` (the README's clip-inside-the-
    base recipe read as ``b2 = 0.999999`` in a field test, and following that advice trained 13x worse).
    ``second_mu``, the first moment after a second such update (``(1 - b1^2) c``), gives the betas free of ``c``:
    ``1 - b1 = 2 - second_mu / first_mu``, then ``1 - b2 = (1 - b1)^2 first_nu / first_mu^2``; where that
    difference of two moments is too rough to judge (``mu_eps``, the first moment's machine epsilon: bfloat16's)
    or ``second_mu`` is NaN, only the ratio ``first_mu^2 / first_nu``, free of ``c``, is judged against the
    declared betas' (it cannot tell ``b1 = 0.8, b2 = 0.996`` from the defaults)."""
    def off(seen: float, declared: float) -> bool:
        return abs(seen - declared) > BETAS_RTOL * declared

    def ratio(x: float, y: float) -> float:
        return x / y if y else math.nan

    a, b = 1 - method.b1, 1 - method.b2
    if not (off(first_mu, a) or off(first_nu, b)):
        return None
    seen_a = 2 - ratio(second_mu, first_mu)
    if math.isfinite(seen_a) and 8 * mu_eps <= BETAS_RTOL * a:  # free of c, and precise enough to judge
        seen_b = seen_a ** 2 * ratio(first_nu, first_mu ** 2)
        return None if not (off(seen_a, a) or off(seen_b, b)) else (1 - seen_a, 1 - seen_b)
    if not off(ratio(first_mu ** 2, first_nu), a * a / b):
        return None
    return 1 - first_mu, 1 - first_nu  # (read at c = 1)


#: how much smaller the gradient of :func:`adam_update_unlike`'s second reading is than the all-ones one
UNLIKE_SCALE = 0.01


def adam_update_unlike(method: BaseMethod, first: tuple[Any, Any, Any], small: tuple[Any, Any, Any],
                       tiny: float = 0.0) -> Optional[str]:
    """Why a base declared to be Adam (``method``) does not update as Adam, else None. ``first``: ``(mu, nu,
    direction)``, flat NumPy arrays, after its first update of an all-ones gradient from zero moments; ``small``:
    the same after one of a gradient :data:`UNLIKE_SCALE` times that. Per entry (a weight decay in the base makes
    the gradient Adam sees uneven), judged on the median entry of those whose moments are not 0:

    * Adam's second moment is the gradient's square, so ``nu`` scales as ``mu`` squared (``scale_by_adamax``, which
      keeps ``optax.ScaleByAdamState`` too, keeps the absolute value: it was read as Adam with ``b2 = 0``, and the
      edge-of-stability rule's rate came out 80x too high in a field test);
    * its denominator is ``sqrt(nu_hat) + eps`` of its own moments, so the direction changes between the two
      gradients as ``mu_hat / (sqrt(nu_hat) + eps)`` does (a factor on the numerator, NAdam's, cancels):
      ``scale_by_radam``'s first steps take ``mu_hat`` alone (1,280x off the rate's assumption there), an
      ``eps_root`` inside the root shrinks the small gradient's direction (the preconditioned sharpness read 5.7x
      high at ``eps_root = 1e-3``), and so does an ``eps`` other than the declared one.

    Each may be off by :data:`BETAS_RTOL` (relative); arrays of other lengths are not judged, nor entries whose
    second moment is below ``tiny / BETAS_RTOL`` (``tiny``: the smallest normal number of its dtype; float16's
    small reading is subnormal, and read plain Adam as not Adam in a review)."""
    (mu, nu, d), (mu_s, nu_s, d_s) = (tuple(np.asarray(x, np.float64) for x in t) for t in (first, small))
    if len({x.shape for x in (mu, nu, d, mu_s, nu_s, d_s)}) != 1:
        return None
    floor = tiny / BETAS_RTOL
    read = (mu != 0) & (mu_s != 0) & (nu > floor) & (nu_s > floor) & (d != 0) & np.isfinite(d_s)
    if not read.any():
        return None
    mu, nu, d, mu_s, nu_s, d_s = (x[read] for x in (mu, nu, d, mu_s, nu_s, d_s))
    if abs(np.median(nu_s / nu / (mu_s / mu) ** 2) - 1) > BETAS_RTOL:
        return ("its second moment does not grow as the gradient's square (scale_by_adamax keeps a maximum of "
                "absolute values in Adam's state)")
    adam, adam_s = ((m / (1 - method.b1)) / (np.sqrt(v / (1 - method.b2)) + method.eps) for m, v in ((mu, nu),
                                                                                                 (mu_s, nu_s)))
    change = np.median((d_s / d) / (adam_s / adam))
    if abs(change - 1) > BETAS_RTOL:
        return (f"at a gradient {UNLIKE_SCALE:g} times smaller its direction changes by {change:.3g} times what "
                "Adam's from its own moments would (scale_by_radam's first steps are not preconditioned; an "
                "eps_root adds to the second moment inside the root; an eps other than the declared one)")
    return None


def carries_gradients(method: Optional[BaseMethod], momentum: float = 0.0) -> bool:
    """Whether the base's update carries earlier steps' gradients (a momentum, Adam's first moment), so that after
    steps that overshot it can point uphill for a while (:func:`curvopt.config.zero_rate_message`). ``method``
    None: a base the core does not know, which carries them when it has a ``momentum`` (its first-moment factor,
    PyTorch's ``momentum`` or ``betas[0]``), as :func:`curvopt.minibatch_watch.watches` reads it."""
    if method is None:
        return momentum > 0
    if method.kind == "adam":
        return method.b1 > 0
    return method.kind != "gd" and method.momentum > 0


def as_base_method(value: "BaseMethod | str | None") -> BaseMethod:
    """``None`` -> gradient descent; ``"gd"``, or ``"adam"`` with Adam's default betas and eps (optax's and
    torch's); ``"heavy_ball"`` and ``"nesterov"`` are refused (their momentum has no default: the string would
    mean momentum 0, a stability coefficient of 2 instead of 3.8 at momentum 0.9)."""
    if value is None:
        return BaseMethod.gd()
    if isinstance(value, BaseMethod):
        return value
    if value in ("heavy_ball", "nesterov"):
        raise ValueError(f"base_method={value!r} needs the momentum: pass BaseMethod.{value}(momentum) "
                         f"(e.g. BaseMethod.{value}(0.9) behind optax.trace(decay=0.9"
                         f"{', nesterov=True' if value == 'nesterov' else ''}))")
    if isinstance(value, str):
        return BaseMethod(value)
    raise ValueError(f"base_method must be None, one of {METHODS} or a BaseMethod, got {value!r}")


def direction_unit(method: "BaseMethod | None", seen: Any, xp: Any, fits: Any = True, rate: Any = 1.0) -> Any:
    """The scale of the base's direction that CDAT's averages follow from step to step
    (:attr:`curvopt.rules.RuleInputs.unit`): behind gradient descent ``seen``, the share of the gradient the base
    took in (in PyTorch the largest group lr, a scheduler's factor, times ``max_grad_norm``'s factor; in Optax
    :func:`curvopt.curvature.gradient_scale` of the incoming direction: a clip's factor times the base's own scale,
    schedule included), where ``fits`` (the direction is that share of the
    gradient plus a multiple of the parameters; else NaN, not known: a momentum base declared as gradient descent);
    ``rate`` behind any other base, whose direction is not a rescaled gradient (momentum carries earlier steps'
    factors, Adam's normalisation cancels a lasting one) but is linear in the rate the base steps at (PyTorch's
    momentum and Adam multiply their step by the current lr): PyTorch's largest group lr in the units the rule
    state's ``unit`` already holds, so that a scheduler's factor cancels at once there too; 1 in Optax.

    Why: CDAT's averages weigh steps in their direction's units. A global clip that binds on some steps and not on
    others changes those units from step to step; the rate, a ratio of averages in the old units applied to the new
    direction, gave the steps of small-gradient batches (factor near 1) the rate made for long clipped ones.
    Closure-free behind SGD in mini-batch (``python -m benchmarks.closure_free clip``: a tanh MLP, batches of 16,
    seeds 0-2, ``max_grad_norm=1.0``) the final train loss was 5e4-1.8e6 against 0.65 / 1.56 / 0.71 unclipped; with
    the averages carried the clipped run is the unclipped one (0.72 / 1.56 / 0.71), in both backends."""
    if method is None or not method.rescaled_gradient:
        return rate
    return xp.where(fits, seen, float("nan"))


def followed_rate(held: Any, current: float, last: float) -> Any:
    """:func:`direction_unit`'s ``rate`` for a base whose step is linear in the rate it steps at: ``held``, the
    rule state's unit (1 while none is known), times the rate's change since the last step, ``current / last``
    (1 where either is not positive: after a zero rate, or with no last rate, as in a state saved before it was
    kept, which is then not rescaled)."""
    change = current / last if current > 0 and last > 0 else 1.0
    return (held if held > 0 else 1.0) * change
