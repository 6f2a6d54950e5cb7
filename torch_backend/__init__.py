"""PyTorch backend of curvopt (public entry point: ``curvopt.torch``).

Tuners wrap an existing ``torch.optim`` optimizer (the base) and choose the global learning rate each step
from the loss curvature; see :mod:`torch_backend.tuner` for the step and ``opt.stats`` for the logged
numbers.
"""
from .buffers import is_probe
from .cdat import CDAT, QuadraticGreedy
from .direction import base_stability_coefficient
from .edge_of_stability import EdgeOfStability
from .linesearch import ArmijoLineSearch
from .polyak import PolyakStep
from .preconditioning import adam_preconditioner_from_optimizer
from .sharpness import hessian_top_eigenvalue
from .tuner import CurvatureTuner

__all__ = [
    "CDAT",
    "QuadraticGreedy",
    "ArmijoLineSearch",
    "PolyakStep",
    "EdgeOfStability",
    "CurvatureTuner",
    "hessian_top_eigenvalue",
    "adam_preconditioner_from_optimizer",
    "base_stability_coefficient",
    "is_probe",
]
from .mup import MuPParamGroups, mup_multipliers, mup_table, parameterize, remove_parameterization  # noqa: E402
__all__ += ["parameterize", "mup_table", "mup_multipliers", "remove_parameterization", "MuPParamGroups"]
