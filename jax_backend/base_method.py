"""What the base transform before the tuner is, for the numbers that depend on it.

PyTorch's tuners read the base optimizer's hyperparameters from the optimizer; an Optax base is a closure
whose hyperparameters are not visible, so the tuners take ``base_method``:

* ``None`` or ``"gd"`` (``optax.identity()``): stability coefficient 2;
* ``BaseMethod.heavy_ball(momentum)`` (``optax.trace(decay=momentum)``, ``v <- momentum v + g``):
  ``2 + 2 momentum``; ``BaseMethod.nesterov(momentum)`` (``optax.trace(decay, nesterov=True)``);
* ``BaseMethod.adam(b1, b2, eps)`` (``optax.scale_by_adam(b1, b2, eps)``): ``(2 + 2 b1)/(1 - b1)`` on the
  preconditioned sharpness, and ``P`` built from the base's ``ScaleByAdamState`` with these values.

The coefficient scales ``eos_ratio`` and the edge-of-stability rule (:mod:`curvopt.thresholds`).
"""
from __future__ import annotations

from dataclasses import dataclass

from curvopt.thresholds import METHODS, stability_coefficient
from curvopt.validation import check_choice, check_in_unit_interval, check_nonnegative

__all__ = ["BaseMethod", "as_base_method"]


@dataclass(frozen=True)
class BaseMethod:
    """The base method's kind and the hyperparameters the tuner needs from it (validated)."""

    kind: str = "gd"
    momentum: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        check_choice("base_method", self.kind, METHODS)
        check_in_unit_interval("momentum", self.momentum)
        check_in_unit_interval("b1", self.b1)
        check_in_unit_interval("b2", self.b2)
        check_nonnegative("eps", self.eps)

    @classmethod
    def gd(cls) -> "BaseMethod":
        return cls("gd")

    @classmethod
    def heavy_ball(cls, momentum: float) -> "BaseMethod":
        return cls("heavy_ball", momentum=momentum)

    @classmethod
    def nesterov(cls, momentum: float) -> "BaseMethod":
        return cls("nesterov", momentum=momentum)

    @classmethod
    def adam(cls, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> "BaseMethod":
        return cls("adam", b1=b1, b2=b2, eps=eps)

    @property
    def preconditioned(self) -> bool:
        """Whether the sharpness that matters is Adam's preconditioned one."""
        return self.kind == "adam"

    @property
    def coefficient(self) -> float:
        """The stability coefficient ``c`` (threshold ``c / lr``)."""
        return stability_coefficient(self.kind, momentum=self.momentum, beta1=self.b1)


def as_base_method(value: "BaseMethod | str | None") -> BaseMethod:
    """``None`` -> gradient descent; a string -> that kind with default hyperparameters."""
    if value is None:
        return BaseMethod.gd()
    if isinstance(value, BaseMethod):
        return value
    if isinstance(value, str):
        return BaseMethod(value)
    raise ValueError(f"base_method must be None, one of {METHODS} or a BaseMethod, got {value!r}")
