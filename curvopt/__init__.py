"""curvopt: learning rates chosen from the loss curvature.

This package is the backend-agnostic core: the rules as formulas and as values (``rules``), the base
optimizer's description (``base``), stability thresholds (``thresholds``), Adam's preconditioner
(``preconditioner``), the online eigen-solver (``eigen``), shared settings (``config``), hyperparameter checks
(``validation``), the names of the logged statistics (``stats``), the precision a gradient shows (``precision``),
the curvature oracles' formulas (``curvature``), the mini-batch watch (``minibatch_watch``), warnings at the
user's line (``caller``), diagnostics and the μP tables (``mup``), and how the parameters are cut into runs for
vector work (``runs``). It imports neither torch nor jax.

The tuners themselves live in the backends, imported through ``curvopt.torch`` (PyTorch) and
``curvopt.optax`` (JAX/Optax), which check first that the backend can be found (``backends``).
"""
from . import base, config, diagnostics, eigen, precision, preconditioner, rules, runs, stats, thresholds, validation
from .base import BaseMethod
from .config import SharpnessConfig
from .rules import ArmijoRule, CDATRule, EdgeOfStabilityRule, PolyakRule
from .thresholds import stability_coefficient, stability_threshold

__version__ = "0.2.0"

__all__ = [
    "base", "config", "diagnostics", "eigen", "precision", "preconditioner", "rules", "runs", "stats", "thresholds",
    "validation",
    "BaseMethod", "SharpnessConfig", "CDATRule", "PolyakRule", "EdgeOfStabilityRule", "ArmijoRule",
    "stability_coefficient", "stability_threshold",
]
