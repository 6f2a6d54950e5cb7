"""Polyak step size around a base optimizer."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvopt.config import PolyakConfig, SharpnessConfig
from curvopt.rules import polyak_lr

from .buffers import ModulesLike
from .distributed import DistributedLike
from .tuner import CurvatureTuner, StepContext

__all__ = ["PolyakStep"]


class PolyakStep(CurvatureTuner):
    """``lr = min((f - f_star) / (-g^T u), lr_max)`` (``||g||^2`` in the denominator for GD); no extra
    closure call. 0 when ``f <= f_star`` or ``u`` is not a descent direction.

    Args: ``f_star`` (the optimal value or a lower bound, 0 for most losses), ``lr_max``; the sharpness and
    ``modules`` arguments as in :class:`torch_backend.CDAT`.
    """

    def __init__(self, base: torch.optim.Optimizer, f_star: float = 0.0, lr_max: float = 1.0,
                 sharpness_every: int = 0, *, sharpness_iters: int = 4, sharpness_first_iters: int = 50,
                 sharpness_tol: float = 1e-3, modules: ModulesLike = None,
                 stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto") -> None:
        self.config = PolyakConfig(f_star=f_star, lr_max=lr_max)
        sharp = SharpnessConfig(every=sharpness_every, iters=sharpness_iters, first_iters=sharpness_first_iters,
                                tol=sharpness_tol)
        super().__init__(base, sharpness=sharp, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed)

    def _learning_rate(self, ctx: StepContext, flags: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        lr = polyak_lr(ctx.loss, ctx.numerator, f_star=self.config.f_star, lr_max=self.config.lr_max, xp=torch)
        return lr, None
