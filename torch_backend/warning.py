"""The PyTorch backend's warnings, attributed to the first line outside curvopt and torch
(:func:`curvopt.caller.warn`): the training loop's ``opt.step()``, ``scaler.step(opt)`` or constructor call."""
from __future__ import annotations

from curvopt.caller import package_dirs
from curvopt.caller import warn as warn_at_caller

__all__ = ["warn"]

_INTERNAL = package_dirs("curvopt", "torch_backend", "torch")


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    warn_at_caller(message, category, _INTERNAL)
