"""Polyak step size around a base optimizer (:class:`curvopt.rules.PolyakRule`)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from curvopt.config import SharpnessLike
from curvopt.rules import PolyakRule, polyak_cap_warning

from .buffers import ModulesLike
from .distributed import DistributedLike
from .settings import default_of, rule_fields
from .tuner import CurvatureTuner
from .warning import warn

__all__ = ["PolyakStep"]


@rule_fields(PolyakRule)
class PolyakStep(CurvatureTuner):
    """``lr = min((f - f_star) / (-g^T u), lr_max)`` (``||g||^2`` in the denominator for GD); one
    closure call a step, and one more at each of the first 3 steps: the check that the closure replays (not in
    distributed runs; the Optax transform, handed ``value``, makes none). 0 when ``f <= f_star`` or ``u`` is not a
    descent direction.

    Args: ``f_star`` (the optimal value or a lower bound, 0 for most losses), ``lr_max`` (default 1; behind a
    base other than SGD give it, in the base's units: :func:`curvopt.rules.polyak_cap_warning` says why, and
    warns); the other arguments as in :class:`torch_backend.CDAT`.
    """

    def __init__(self, base: torch.optim.Optimizer, f_star: float = default_of(PolyakRule, "f_star"),
                 lr_max: Optional[float] = None, *, sharpness: SharpnessLike = None,
                 modules: ModulesLike = None, stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto", allow_any_base: bool = False,
                 max_grad_norm: Optional[float] = None, functional_loss: Optional[Callable] = None,
                 **deprecated: Any) -> None:
        self.rule = PolyakRule(f_star=f_star, lr_max=lr_max)
        super().__init__(base, sharpness=sharpness, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed, allow_any_base=allow_any_base, legacy=deprecated,
                         max_grad_norm=max_grad_norm, functional_loss=functional_loss)
        message = polyak_cap_warning(self.method, lr_max)
        if message:
            warn(f"{type(self).__name__}: {message}")
