"""Armijo backtracking line search around a base optimizer, with Optax's exact semantics."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from curvopt.config import ArmijoConfig, SharpnessConfig
from curvopt.rules import armijo_decrease_error, armijo_initial_lr

from .buffers import ModulesLike
from .distributed import DistributedLike
from .tuner import CurvatureTuner, StepContext

__all__ = ["ArmijoLineSearch"]


class ArmijoLineSearch(CurvatureTuner):
    """Accept the first ``lr`` with ``f(w + lr u) <= (1 + delta) f(w) + c lr g^T u``.

    Trials (the same sequence as ``optax.scale_by_backtracking_linesearch`` with
    ``max_backtracking_steps = max_trials - 1``, ``slope_rtol = c``, ``rtol = delta``, ``atol = 0``):
    ``lr_1 = min(increase_factor * lr_prev, lr_max)`` (``lr_prev`` starts at ``init_lr``), then
    ``lr_{k+1} = decrease_factor * lr_k``, stopping at the first accepted trial or after ``max_trials``
    closure calls. If none is accepted, the last trial is used anyway (as Optax does), unless its decrease
    error is infinite (a NaN/Inf trial loss), in which case the step uses ``lr = 0``; the lr used becomes
    ``lr_prev`` (so, as in Optax, a 0 there keeps later first trials at 0).

    Trial closure calls run backward too (the closure convention); module buffers and the random state are
    protected. ``stats["closure_calls"]`` is 1 + the number of trials (+ sharpness products).
    """

    def __init__(self, base: torch.optim.Optimizer, c: float = 1e-4, delta: float = 0.0,
                 increase_factor: float = 2.0, decrease_factor: float = 0.8, lr_max: float = math.inf,
                 init_lr: float = 1.0, max_trials: int = 30, sharpness_every: int = 0, *,
                 sharpness_iters: int = 4, sharpness_first_iters: int = 50, sharpness_tol: float = 1e-3,
                 modules: ModulesLike = None, stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto") -> None:
        self.config = ArmijoConfig(c=c, delta=delta, increase_factor=increase_factor,
                                   decrease_factor=decrease_factor, lr_max=lr_max, init_lr=init_lr,
                                   max_trials=max_trials)
        sharp = SharpnessConfig(every=sharpness_every, iters=sharpness_iters, first_iters=sharpness_first_iters,
                                tol=sharpness_tol)
        super().__init__(base, sharpness=sharp, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed)
        like = self._acc_like()
        self._lr = torch.tensor(self.config.init_lr, dtype=like.dtype, device=like.device)
        #: trials of the last step, and the decrease error of the trial used (0 = accepted)
        self.last_trials = 0
        self.last_decrease_error = float("nan")

    def _learning_rate(self, ctx: StepContext, flags: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        cfg = self.config
        slope = -ctx.numerator
        lr = armijo_initial_lr(self._lr, increase_factor=cfg.increase_factor, lr_max=cfg.lr_max, xp=torch)
        err_f = math.inf
        trials = 0
        for k in range(cfg.max_trials):
            if k > 0:
                lr = cfg.decrease_factor * lr
            new_value = ctx.global_mean(ctx.probe(lr))  # rank-local under DDP
            err = armijo_decrease_error(new_value, ctx.loss, lr, slope, c=cfg.c, delta=cfg.delta, xp=torch)
            trials += 1
            err_f = float(err)
            if err_f <= 0.0:
                break
        self.last_trials = trials
        self.last_decrease_error = err_f
        if math.isinf(err_f):
            lr = torch.zeros_like(lr)
        self._lr = lr
        return lr, None

    def _rule_state(self) -> dict:
        return {"lr": self._lr.clone()}

    def _load_rule_state(self, state: dict, like: Tensor) -> None:
        self._lr = state["lr"].to(device=like.device, dtype=like.dtype)
