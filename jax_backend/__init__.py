"""JAX/Optax backend of curvopt (public entry point: ``curvopt.optax``).

Transforms that take the place of ``optax.scale_by_learning_rate``: they receive the base's raw direction
``d`` (gradient-like, ``u = -d``) and return ``lr * u`` with the tuned learning rate.
``<tuner>(base, ...)``, e.g. ``cdat(optax.scale_by_adam(), base_method="adam")``, builds the chain
``optax.chain(base, scale_by_<tuner>(...))`` and also hands the base's state and the incoming gradient to the
tuner (Adam's momentum numerator and preconditioned sharpness, the closure-free mode) and keeps the base's state
on a skipped step: the recommended composition (behind Adam, a bare chain gets no Adam state: ``scale_by_cdat``
warns and falls back to the paper's numerator).
Each transform's state is its own NamedTuple with the logged numbers in ``state.stats``
(:class:`curvopt.stats.TunerStats`), so ``optax.tree_utils.tree_get(opt_state, "lr")`` is the tuner's lr.
"""
from curvopt.base import BaseMethod
from curvopt.config import SharpnessConfig
from curvopt.stats import TunerStats

from .cdat import PairedMemory, ScaleByCDATState, ScaleByQuadraticGreedyState, cdat, quadratic_greedy, \
    scale_by_cdat, scale_by_quadratic_greedy
from .edge_of_stability import ScaleByEdgeOfStabilityState, edge_of_stability, scale_by_edge_of_stability
from .linesearch import ScaleByArmijoState, armijo, scale_by_armijo
from .oracles import SecantMemory
from .polyak import ScaleByPolyakState, polyak, scale_by_polyak
from .sharpness import EigenMemory, hessian_top_eigenvalue, preconditioner_from_adam_state
from .tuner import stats, with_base_state

__all__ = [
    "scale_by_cdat", "cdat",
    "scale_by_quadratic_greedy", "quadratic_greedy",
    "scale_by_armijo", "armijo",
    "scale_by_polyak", "polyak",
    "scale_by_edge_of_stability", "edge_of_stability",
    "hessian_top_eigenvalue", "preconditioner_from_adam_state",
    "with_base_state", "BaseMethod", "SharpnessConfig", "stats",
    "ScaleByCDATState", "ScaleByQuadraticGreedyState", "ScaleByPolyakState", "ScaleByEdgeOfStabilityState",
    "ScaleByArmijoState", "TunerStats", "SecantMemory", "EigenMemory", "PairedMemory",
]
from .mup import (MuP, ScaleByMupState, add_decayed_weights_mup, mup_multipliers, mup_table, parameterize,  # noqa: E402
                  scale_by_mup)
__all__ += ["parameterize", "mup_table", "mup_multipliers", "scale_by_mup", "ScaleByMupState", "add_decayed_weights_mup",
            "MuP"]
