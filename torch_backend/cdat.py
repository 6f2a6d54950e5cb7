"""CDAT (Curvature Dynamics Aware Tuning, Roulet et al. 2024) and the quadratically greedy rule."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from curvopt.config import CDATConfig, SharpnessConfig
from curvopt.rules import CDATState, cdat_init, cdat_step

from .buffers import ModulesLike
from .distributed import DistributedLike
from .tuner import CurvatureTuner, StepContext

__all__ = ["CDAT", "QuadraticGreedy"]


class CDAT(CurvatureTuner):
    """``lr_t = sigma * avg(max(-g^T u, 0)) / avg(|u^T H u| + eps)`` around a base optimizer.

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1.0)   # lr = relative multiplier
        opt = CDAT(base, sigma=2.0, ema=0.9, modules=model)
        loss = opt.step(closure)                               # closure: zero_grad, loss, backward, return
        print(float(opt.stats["lr"]), float(opt.stats["curvature"]))

    Args:
        base: the base optimizer instance (SGD with or without momentum/Nesterov, Adam, AdamW, ...; any
            optimizer whose update is linear in its ``lr``). Its per-group ``lr`` is a relative multiplier.
        sigma: scale of the quadratic-model step; 1 is greedy, 2 "on edge" (the largest lr with
            ``q(lr) <= f``). The paper uses about 2 in full batch, less for small batches.
        ema: ``beta`` of the two exponential moving averages (numerator and denominator, kept separately).
            They start at 0 without bias correction: the correction ``1 - ema^t`` is the same for both and
            cancels in the ratio, so step 1 is already ``sigma n_1 / d_1`` and step ``t`` is
            ``sigma * sum_s ema^(t-s) n_s / sum_s ema^(t-s) d_s``.
        eps: added to ``|u^T H u|`` (0 in the paper).
        lr_max: cap on the learning rate.
        curvature: the oracle for ``u^T H u``: ``"fd"``, ``"secant"`` or ``"exact"`` (see
            :mod:`torch_backend.oracles`).
        sharpness_every: estimate the sharpness online every k steps (0 = never); ``sharpness_iters``,
            ``sharpness_first_iters``, ``sharpness_tol`` as in :class:`curvopt.config.SharpnessConfig`.
        modules: the model (or a list of modules) whose buffers (BatchNorm running statistics) probes must
            not change.
        functional_loss: ``f(params: list[Tensor]) -> Tensor`` over the tuner's parameters in
            ``param_groups`` order; required by ``curvature="exact"``.
        stability_coefficient: the base's ``c`` (threshold ``c / lr``) for ``stats["eos_ratio"]``; inferred
            for SGD/momentum/Nesterov/Adam/AdamW.
        seed: seeds the random start of the first power iteration.
        distributed: ``"auto"`` (default: under an initialized ``torch.distributed`` with more than one
            rank, a data-parallel run whose closure returns the rank-local loss, e.g. DDP), ``None`` (never
            reduce) or a process group; see :mod:`torch_backend.distributed` for what is reduced.

    Guards (the core's): an ascent direction counts as a zero numerator, negative curvature by its
    magnitude, a zero averaged denominator keeps the previous lr (0 at step 1); a non-finite curvature probe
    gives lr 0 for that step and leaves the averages unchanged.
    """

    uses_curvature = True

    def __init__(self, base: torch.optim.Optimizer, sigma: float = 2.0, ema: float = 0.9, eps: float = 0.0,
                 lr_max: float = math.inf, curvature: str = "fd", sharpness_every: int = 0, *,
                 sharpness_iters: int = 4, sharpness_first_iters: int = 50, sharpness_tol: float = 1e-3,
                 modules: ModulesLike = None, functional_loss: Optional[Callable] = None,
                 stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto") -> None:
        self.config = CDATConfig(sigma=sigma, ema=ema, eps=eps, lr_max=lr_max, curvature=curvature)
        sharp = SharpnessConfig(every=sharpness_every, iters=sharpness_iters, first_iters=sharpness_first_iters,
                                tol=sharpness_tol)
        super().__init__(base, sharpness=sharp, modules=modules, curvature=curvature,
                         functional_loss=functional_loss, stability_coefficient=stability_coefficient, seed=seed,
                         distributed=distributed)
        like = self._acc_like()
        self._cdat: CDATState = cdat_init(torch.zeros((), dtype=like.dtype, device=like.device))

    def _learning_rate(self, ctx: StepContext, flags: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        assert self.oracle is not None
        curvature = self.oracle.curvature(ctx, flags)
        c = self.config
        new = cdat_step(ctx.numerator, curvature, self._cdat, sigma=c.sigma, ema=c.ema, eps=c.eps,
                        lr_max=c.lr_max, xp=torch)
        ok = torch.isfinite(new.lr)
        self._cdat = CDATState(*(torch.where(ok, n, o) for n, o in zip(new, self._cdat)))
        lr = torch.where(ok, new.lr, torch.zeros_like(new.lr))
        return lr, curvature

    def _rule_state(self) -> dict:
        return {"cdat": [t.clone() for t in self._cdat]}

    def _load_rule_state(self, state: dict, like: Tensor) -> None:
        self._cdat = CDATState(*(t.to(device=like.device, dtype=like.dtype) for t in state["cdat"]))


class QuadraticGreedy(CDAT):
    """``lr = -g^T u / u^T H u``, the minimiser of the quadratic model along ``u`` (CDAT with sigma = 1,
    ema = 0, eps = 0). Same arguments as :class:`CDAT` otherwise."""

    def __init__(self, base: torch.optim.Optimizer, lr_max: float = math.inf, curvature: str = "fd",
                 sharpness_every: int = 0, **kwargs) -> None:
        super().__init__(base, sigma=1.0, ema=0.0, eps=0.0, lr_max=lr_max, curvature=curvature,
                         sharpness_every=sharpness_every, **kwargs)
