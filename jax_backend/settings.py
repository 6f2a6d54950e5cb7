"""Settings of the Optax tuners: validated by the core's config dataclasses, tolerant of traced values.

The core dataclasses (:mod:`curvopt.config`) hold the defaults and raise ``ValueError`` on a bad value at
construction, as in PyTorch. Under ``optax.inject_hyperparams`` the factory is called again inside the
jitted update with the numeric hyperparameters as tracers: those cannot be checked (they were checked, as
concrete arrays, when the state was initialised), so they bypass validation and are used as given.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

__all__ = ["validated", "is_traced", "concrete_int"]


def is_traced(value: Any) -> bool:
    """Whether ``value`` is an abstract (traced) JAX value, i.e. cannot be read on the host."""
    return isinstance(value, jax.core.Tracer)


def validated(config_cls: type, **values: Any) -> Any:
    """``config_cls(**values)`` (raising ``ValueError`` on a bad value), with traced values kept unchecked."""
    traced = {k: v for k, v in values.items() if is_traced(v)}
    config = config_cls(**{k: v for k, v in values.items() if k not in traced})
    for name, value in traced.items():
        object.__setattr__(config, name, value)  # frozen dataclass: bypass only for unreadable tracers
    return config


def concrete_int(value: Any, default: int) -> int:
    """The Python int of a concrete value; ``default`` for a traced one (structure decisions at trace time)."""
    return default if is_traced(value) else int(value)


def fields(config: Any) -> dict[str, Any]:
    """The config's fields as a dict (values possibly traced)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
