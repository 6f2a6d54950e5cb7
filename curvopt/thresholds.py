"""Stability thresholds of the base methods (edge of stability).

On a quadratic with top Hessian eigenvalue ``lam`` a base method with learning rate ``lr`` is stable iff
``lr * lam < c`` for the method's coefficient ``c``; the threshold on the sharpness is ``c / lr``. For
Adam-like methods ``lam`` is the preconditioned sharpness ``lambda_max(P^-1 H)``.
"""
from __future__ import annotations

from .validation import check_choice, check_in_unit_interval, check_positive

__all__ = ["METHODS", "stability_coefficient", "stability_threshold"]

METHODS = ("gd", "heavy_ball", "nesterov", "adam")


def stability_coefficient(method: str, *, momentum: float = 0.0, dampening: float = 0.0,
                          beta1: float = 0.9) -> float:
    """The coefficient ``c`` of the stability threshold ``c / lr``.

    * ``"gd"``: 2.
    * ``"heavy_ball"`` (``v <- momentum v + (1 - dampening) g``, ``w <- w - lr v``):
      ``(2 + 2 momentum) / (1 - dampening)``.
    * ``"nesterov"`` (PyTorch's form, ``w <- w - lr (g + momentum v)``):
      ``(2 + 2 momentum) / (1 + 2 momentum)`` (from the characteristic polynomial of the linear recursion).
    * ``"adam"`` (``m <- beta1 m + (1 - beta1) g``): ``(2 + 2 beta1) / (1 - beta1)``, 38 at beta1 = 0.9,
      on the preconditioned sharpness.
    """
    check_choice("method", method, METHODS)
    if method == "gd":
        return 2.0
    if method == "heavy_ball":
        m = check_in_unit_interval("momentum", momentum)
        d = check_in_unit_interval("dampening", dampening)
        return (2.0 + 2.0 * m) / (1.0 - d)
    if method == "nesterov":
        m = check_in_unit_interval("momentum", momentum)
        return (2.0 + 2.0 * m) / (1.0 + 2.0 * m)
    b = check_in_unit_interval("beta1", beta1)
    return (2.0 + 2.0 * b) / (1.0 - b)


def stability_threshold(lr: float, method: str, **kwargs: float) -> float:
    """The sharpness ``c / lr`` above which the base method at learning rate ``lr`` is unstable."""
    return stability_coefficient(method, **kwargs) / check_positive("lr", lr)
