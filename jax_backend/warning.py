"""The JAX backend's warnings, attributed to the first line outside curvopt, JAX, Optax and flax
(:func:`curvopt.caller.warn`): the training loop's ``tx.update``, jitted step or constructor call, however deep
the transform sits in a chain and whether or not it is being traced."""
from __future__ import annotations

from curvopt.caller import package_dirs
from curvopt.caller import warn as warn_at_caller

__all__ = ["warn"]

_INTERNAL = package_dirs("curvopt", "jax_backend", "jax", "jaxlib", "optax", "flax")


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    warn_at_caller(message, category, _INTERNAL)
