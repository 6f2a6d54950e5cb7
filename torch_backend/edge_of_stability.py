"""The edge-of-stability rule: ``lr = sigma * c / sharpness`` from the online sharpness."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from curvopt.config import EdgeOfStabilityConfig, SharpnessConfig
from curvopt.rules import edge_of_stability_lr
from curvopt.validation import check_positive_int

from .buffers import ModulesLike
from .distributed import DistributedLike
from .tuner import CurvatureTuner, StepContext

__all__ = ["EdgeOfStability"]


class EdgeOfStability(CurvatureTuner):
    """``lr = sigma * c / lambda`` with ``c`` the base's stability coefficient (2 for GD, ``2 + 2 beta`` for
    heavy ball, ``(2 + 2 beta1) / (1 - beta1)`` for Adam) and ``lambda`` the online sharpness
    (``lambda_max(P^-1 H)`` for Adam/AdamW bases, ``lambda_max(H)`` otherwise).

    The sharpness is estimated on steps 1, 1 + k, 1 + 2k, ... (``sharpness_every = k >= 1``, default 10); in
    between the learning rate stays. ``sigma = 1`` sits exactly on the edge; the paper found ``sigma c`` about
    3 good for GD (``sigma = 1.5``). A non-positive estimate keeps the previous lr (0 at step 1).
    ``stability_coefficient`` must be given for a base other than SGD/momentum/Nesterov/Adam/AdamW.
    """

    def __init__(self, base: torch.optim.Optimizer, sigma: float = 1.5, lr_max: float = math.inf,
                 sharpness_every: int = 10, *, sharpness_iters: int = 4, sharpness_first_iters: int = 50,
                 sharpness_tol: float = 1e-3, modules: ModulesLike = None,
                 stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto") -> None:
        self.config = EdgeOfStabilityConfig(sigma=sigma, lr_max=lr_max)
        check_positive_int("sharpness_every", sharpness_every, minimum=1)
        sharp = SharpnessConfig(every=sharpness_every, iters=sharpness_iters, first_iters=sharpness_first_iters,
                                tol=sharpness_tol)
        super().__init__(base, sharpness=sharp, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed)
        if self.coefficient is None:
            raise ValueError(f"stability_coefficient must be given for a {type(base).__name__} base "
                             "(it is inferred only for SGD, momentum, Nesterov, Adam and AdamW)")
        like = self._acc_like()
        self._lr = torch.zeros((), dtype=like.dtype, device=like.device)

    def _learning_rate(self, ctx: StepContext, flags: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        assert self.coefficient is not None
        sharp = torch.tensor(self.current_sharpness(), dtype=self._lr.dtype, device=self._lr.device)
        self._lr = edge_of_stability_lr(sharp, self._lr, sigma=self.config.sigma, coefficient=self.coefficient,
                                        lr_max=self.config.lr_max, xp=torch)
        return self._lr, None

    def _rule_state(self) -> dict:
        return {"lr": self._lr.clone()}

    def _load_rule_state(self, state: dict, like: Tensor) -> None:
        self._lr = state["lr"].to(device=like.device, dtype=like.dtype)
