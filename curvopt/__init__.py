"""curvopt: learning rates chosen from the loss curvature.

This package is the backend-agnostic core: the rules as math on scalars (``rules``), stability thresholds
(``thresholds``), Adam's preconditioner (``preconditioner``), validated settings (``config``), the names of
the logged statistics (``stats``) and diagnostics. It imports neither torch nor jax.

The tuners themselves live in the backends, imported through ``curvopt.torch`` (PyTorch) and
``curvopt.optax`` (JAX/Optax).
"""
from . import config, diagnostics, preconditioner, rules, stats, thresholds, validation
from .config import ArmijoConfig, CDATConfig, EdgeOfStabilityConfig, PolyakConfig, SharpnessConfig
from .thresholds import stability_coefficient, stability_threshold

__version__ = "0.1.0"

__all__ = [
    "config", "diagnostics", "preconditioner", "rules", "stats", "thresholds", "validation",
    "ArmijoConfig", "CDATConfig", "EdgeOfStabilityConfig", "PolyakConfig", "SharpnessConfig",
    "stability_coefficient", "stability_threshold",
]
