"""Hyperparameter checks, in one place.

Every tuner in both backends validates its settings through these functions at construction, so a bad value
fails early with a ``ValueError`` that names the parameter and the accepted range.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = [
    "check_positive",
    "check_nonnegative",
    "check_in_unit_interval",
    "check_at_least",
    "check_choice",
    "check_positive_int",
    "check_finite",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(name: str, value: Any) -> float:
    # Accept Python numbers and 0-d arrays/tensors (numpy, torch, jax) without importing any backend.
    if _is_real(value):
        return float(value)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    return out


def check_finite(name: str, value: Any) -> float:
    """A finite real number."""
    v = _as_float(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A number in (0, inf) (or (0, inf] with ``allow_inf``)."""
    v = _as_float(name, value)
    ok = v > 0 and (allow_inf or math.isfinite(v))
    if not ok or math.isnan(v):
        rng = "(0, inf]" if allow_inf else "(0, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """A number in [0, inf) (or [0, inf] with ``allow_inf``)."""
    v = _as_float(name, value)
    ok = v >= 0 and (allow_inf or math.isfinite(v))
    if not ok or math.isnan(v):
        rng = "[0, inf]" if allow_inf else "[0, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_in_unit_interval(name: str, value: Any, *, closed_low: bool = True, closed_high: bool = False) -> float:
    """A number in [0, 1) by default; the ends are configurable."""
    v = _as_float(name, value)
    lo_ok = v >= 0 if closed_low else v > 0
    hi_ok = v <= 1 if closed_high else v < 1
    if not (lo_ok and hi_ok) or math.isnan(v):
        rng = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_at_least(name: str, value: Any, low: float) -> float:
    """A number in [low, inf]."""
    v = _as_float(name, value)
    if not v >= low:
        raise ValueError(f"{name} must be in [{low}, inf], got {value!r}")
    return v


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
        if as_int != value:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        value = as_int
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of a fixed set of values."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
