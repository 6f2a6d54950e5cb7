"""Public JAX/Optax entry point: ``from curvopt.optax import scale_by_cdat, ...`` (re-exports ``jax_backend``)."""
from .backends import check_backend

check_backend("jax_backend", "curvopt.optax", "jax", ("jax", "optax"))

from jax_backend import *  # noqa: E402,F401,F403
from jax_backend import __all__  # noqa: E402,F401
