"""Public JAX/Optax entry point: ``from curvopt.optax import scale_by_cdat, ...`` (re-exports ``jax_backend``)."""
from jax_backend import *  # noqa: F401,F403
from jax_backend import __all__  # noqa: F401
