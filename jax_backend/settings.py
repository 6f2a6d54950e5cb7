"""The Optax tuners' settings: rule values from the core, the ``sharpness=`` argument (and its deprecated
keywords), and the values ``optax.inject_hyperparams`` hands over as arrays.

Under ``inject_hyperparams`` a tuner factory is called again in ``init`` and in every ``update`` with its
numeric hyperparameters as arrays: concrete ones are validated and converted by the core as usual, traced
ones (a jitted ``init``/``update``) cannot be read on the host and are used as given (they were checked as
concrete values when the hyperparameters were first given). Nothing about the state's *structure* depends on
whether a value is traced: an online-sharpness period given as an array allocates the eigenvector memory
whatever its value (``sharpness=0`` through ``inject_hyperparams`` therefore keeps an unused eigenvector).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvopt.config import SharpnessConfig, as_sharpness, legacy_sharpness
from curvopt.validation import check_scalar, is_abstract

from .warning import warn

__all__ = ["make", "sharpness_setting", "sharpness_enabled"]


def make(cls: type, **values: Any) -> Any:
    """``cls(**values)`` (a frozen core dataclass, validated), with abstract (traced) values stored unchecked. A
    float setting given as an array of fewer than 32 bits is a ``ValueError`` (:func:`_check_precision`)."""
    _check_precision(values)
    traced = {k: check_scalar(k, v) for k, v in values.items() if is_abstract(v)}
    out = cls(**{k: v for k, v in values.items() if k not in traced})
    for name, value in traced.items():
        object.__setattr__(out, name, value)  # frozen: bypassed only for values that cannot be read
    return out


def _check_precision(values: dict) -> None:
    """Refuses settings held in a float dtype of fewer than 32 bits. ``optax.inject_hyperparams`` casts the float
    hyperparameters to the parameters' dtype unless given ``hyperparam_dtype``, the numeric defaults included:
    with bfloat16 parameters CDAT's ``ema=0.99`` became 0.98828125 (rates 16-17 % high, unwarned, in a field
    test), ``ema=0.999`` became 1 (refused, naming a value the user never gave), the line search's ``c`` and
    ``decrease_factor`` moved (rates up to 18 % off)."""
    low = {k: v.dtype for k, v in values.items()
           if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) and jnp.finfo(v.dtype).bits < 32}
    if low:
        dtype = next(iter(low.values()))
        raise ValueError(f"{', '.join(low)} reached the tuner as {dtype} arrays, which round the settings (0.99 is "
                         f"{float(jnp.asarray(0.99, dtype))} in {dtype}): give them as Python floats; "
                         "optax.inject_hyperparams casts the float hyperparameters to the parameters' dtype, so "
                         "pass hyperparam_dtype=jnp.float32 to it")


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def sharpness_setting(value: Any, default: SharpnessConfig, tuner: str, **legacy: Any) -> SharpnessConfig:
    """The tuner's online-sharpness settings from ``sharpness=`` (a :class:`SharpnessConfig`, an int period, or
    None for the rule's ``default``) or from the deprecated ``sharpness_*`` keywords (``legacy``, None = not
    given). An array period (``inject_hyperparams``) is kept as the config's ``every``."""
    fields = legacy_sharpness(value, legacy, tuner, warn)
    if fields:
        return make(SharpnessConfig, **{**dataclasses.asdict(default), **fields})
    if _is_array(value):
        return make(SharpnessConfig, every=value)
    return as_sharpness(value, default)


def sharpness_enabled(config: SharpnessConfig) -> bool:
    """Whether the state carries the eigenvector memory: a positive int period, or any array period."""
    every = config.every
    return _is_array(every) or is_abstract(every) or int(every) > 0
