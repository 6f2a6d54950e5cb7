"""Hyperparameter checks, in one place.

Every tuner in both backends validates its settings through these functions at construction, so a bad value
fails early with a ``ValueError`` that names the parameter and the accepted range, and the *converted* value
(a Python ``float``/``int``) is what gets stored: a string such as ``"2.0"`` is refused, not kept.

Two kinds of value are accepted unchecked and returned as given:

* a **schedule**: a callable ``step -> value`` (as Optax schedules), for the hyperparameters a rule documents
  as schedulable (:func:`check_schedulable`); the rule evaluates it each step (:func:`at_step`) and the
  core's guard keeps the resulting learning rate finite and non-negative;
* an **abstract array** (a traced JAX value, e.g. under ``optax.inject_hyperparams`` inside ``jit``): it
  cannot be read on the host. Its shape must be a scalar's (else a ``ValueError`` naming it, at trace time); its
  range is checked on the device by :func:`traced_validity`, which the rules' guard reads (a value written into
  ``state.hyperparams`` mid-run out of range gives a step at rate 0 with the rule's state kept, not a state
  corrupted for good).
"""
from __future__ import annotations

import functools
import math
import operator
from contextvars import ContextVar
from typing import Any, Callable, Iterable

import numpy as np

__all__ = [
    "INT32_MAX",
    "check_bool",
    "check_positive",
    "check_nonnegative",
    "check_in_unit_interval",
    "check_at_least",
    "check_choice",
    "check_positive_int",
    "check_finite",
    "check_lower_bound",
    "check_scalar",
    "check_schedulable",
    "at_step",
    "is_abstract",
    "traced_validity",
]

#: where :func:`traced_validity` collects the range tests of abstract values (None: not collecting)
_TRACED: ContextVar[list | None] = ContextVar("curvopt_traced_checks", default=None)


def _abstract(name: str, value: Any, in_range: Callable[[Any], Any]) -> bool:
    """Whether ``value`` is abstract (then returned unchecked by the caller): it must be a scalar (an array of
    another shape is a ``ValueError`` naming ``name``), and where :func:`traced_validity` collects, its test
    ``in_range(value)`` (operators only: no backend imported) is recorded."""
    if not is_abstract(value):
        return False
    check_scalar(name, value)
    collected = _TRACED.get()
    if collected is not None:
        collected.append(in_range(value))
    return True


def check_scalar(name: str, value: Any) -> Any:
    """An array (a traced one included) of a scalar's shape: a hyperparameter injected as an array of another
    shape failed deep inside the step, naming neither it nor the shape."""
    shape = tuple(getattr(value, "shape", ()))
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {shape}")
    return value


def traced_validity(settings: Any) -> Any:
    """Whether the abstract values among a rule's settings (``settings``, a dataclass whose ``__post_init__``
    checks them) are in the ranges its checks accept, as one traced boolean; None where none is abstract (every
    value was checked on the host). A NaN fails every test."""
    if not any(hasattr(v, "aval") for v in vars(settings).values()):
        return None
    token = _TRACED.set([])
    try:
        settings.__post_init__()
        tests = _TRACED.get()
    finally:
        _TRACED.reset(token)
    return functools.reduce(operator.and_, tests) if tests else None


def is_abstract(value: Any) -> bool:
    """A value that cannot be read on the host (a traced JAX array): it has an abstract value (``aval``) and
    ``float()`` of it raises."""
    if not hasattr(value, "aval"):
        return False
    try:
        float(value)
    except TypeError:
        return True
    return False


def _as_float(name: str, value: Any) -> float:
    # Python numbers and 0-d arrays/tensors (numpy, torch, jax) without importing any backend; never strings.
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, complex) or "complex" in str(getattr(value, "dtype", "")):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        if callable(getattr(value, "init", None)) and callable(getattr(value, "update", None)):
            raise ValueError(  # a base handed to a scale_by_* transform (a field test: scale_by_cdat(scale_by_adam()))
                f"{name} must be a real number, got the transformation {value!r}: the scale_by_* transforms take "
                "no base; chain one after it, optax.chain(base, scale_by_cdat(...)), or use the convenience named "
                "without scale_by_, cdat(base, ...), polyak(base, ...)") from None
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def check_finite(name: str, value: Any) -> Any:
    """A finite real number."""
    if _abstract(name, value, lambda v: (v > -math.inf) & (v < math.inf)):
        return value
    v = _as_float(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_lower_bound(name: str, value: Any) -> Any:
    """A lower bound of a loss: a finite real number, or ``-inf`` (no bound)."""
    if _abstract(name, value, lambda v: v < math.inf):
        return value
    v = _as_float(name, value)
    if not v < math.inf:
        raise ValueError(f"{name} must be finite or -inf, got {value!r}")
    return v


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> Any:
    """A number in (0, inf) (or (0, inf] with ``allow_inf``)."""
    if _abstract(name, value, lambda v: (v > 0) if allow_inf else (v > 0) & (v < math.inf)):
        return value
    v = _as_float(name, value)
    ok = v > 0 and (allow_inf or math.isfinite(v))
    if not ok or math.isnan(v):
        rng = "(0, inf]" if allow_inf else "(0, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> Any:
    """A number in [0, inf) (or [0, inf] with ``allow_inf``)."""
    if _abstract(name, value, lambda v: (v >= 0) if allow_inf else (v >= 0) & (v < math.inf)):
        return value
    v = _as_float(name, value)
    ok = v >= 0 and (allow_inf or math.isfinite(v))
    if not ok or math.isnan(v):
        rng = "[0, inf]" if allow_inf else "[0, inf)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_in_unit_interval(name: str, value: Any, *, closed_low: bool = True, closed_high: bool = False) -> Any:
    """A number in [0, 1) by default; the ends are configurable."""
    if _abstract(name, value, lambda v: ((v >= 0) if closed_low else (v > 0)) & ((v <= 1) if closed_high else (v < 1))):
        return value
    v = _as_float(name, value)
    lo_ok = v >= 0 if closed_low else v > 0
    hi_ok = v <= 1 if closed_high else v < 1
    if not (lo_ok and hi_ok) or math.isnan(v):
        rng = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def check_at_least(name: str, value: Any, low: float) -> Any:
    """A number in [low, inf]."""
    if _abstract(name, value, lambda v: v >= low):
        return value
    v = _as_float(name, value)
    if not v >= low:
        raise ValueError(f"{name} must be in [{low}, inf], got {value!r}")
    return v


#: the largest count a hyperparameter may hold: JAX keeps the tuners' counts (steps, trials, iterations) in int32
#: (a larger one wrapped negative or overflowed inside jit), and PyTorch takes the same range, for pairing
INT32_MAX = 2**31 - 1


def check_positive_int(name: str, value: Any, *, minimum: int = 1, maximum: int | None = INT32_MAX) -> int:
    """An integer >= ``minimum`` and <= ``maximum`` (:data:`INT32_MAX` unless given; None: no bound); an integral
    float such as ``3.0`` is converted, ``3.5`` and strings are refused."""
    if _abstract(name, value, lambda v: v >= minimum):  # (the top: int8's 2**31 - 1 wraps to -1)
        return value
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
        if as_int != value:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        value = as_int
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any, *, none: bool = False) -> Any:
    """``True`` or ``False`` (and ``None`` where ``none``), nothing read by its truth value: a string ``"False"``
    switched ``allow_any_base`` on."""
    if not (isinstance(value, (bool, np.bool_)) or (none and value is None)):
        raise TypeError(f"{name} must be {'None, ' if none else ''}True or False, got {value!r}")
    return None if value is None else bool(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of a fixed set of values."""
    choices = tuple(choices)
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_schedulable(check: Callable[..., Any], name: str, value: Any, **kwargs: Any) -> Any:
    """``check(name, value, **kwargs)`` for a number; a callable (a schedule ``step -> value``) is returned
    as is and evaluated each step by :func:`at_step`."""
    if callable(value):
        return value
    return check(name, value, **kwargs)


def at_step(value: Any, step: Any, name: str = "a hyperparameter") -> Any:
    """A hyperparameter's value at ``step`` (steps taken before this one): ``value(step)`` for a schedule,
    else ``value``. A schedule returning no number (None, a string: it failed deep inside the step, in Optax
    inside the jit trace) is a TypeError naming ``name``; a non-finite number is the rule guard's affair."""
    if not callable(value):
        return value
    out = value(step)
    if out is None or isinstance(out, (str, bytes, bool, list, tuple, dict)):
        raise TypeError(f"the schedule given as {name} returned {out!r}; it must return a number")
    return out
