"""The edge-of-stability rule: ``lr = sigma * c / sharpness`` from the online sharpness
(:class:`curvopt.rules.EdgeOfStabilityRule`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from curvopt.config import SharpnessLike
from curvopt.rules import EdgeOfStabilityRule, default_eos_free_steps, default_eos_sigma
from curvopt.validation import check_bool

from .buffers import ModulesLike
from .direction import base_stability_coefficient, check_base
from .distributed import DistributedLike
from .settings import default_of, rule_fields
from .tuner import CurvatureTuner

__all__ = ["EdgeOfStability"]


@rule_fields(EdgeOfStabilityRule, exclude=("coefficient",))  # (the base's: :attr:`coefficient`)
class EdgeOfStability(CurvatureTuner):
    """``lr = sigma * c / lambda`` with ``c`` the base's stability coefficient
    (:func:`curvopt.thresholds.stability_coefficient`: 2 for GD, ``(2 + 2 beta1) / (1 - beta1)`` for Adam; heavy ball
    and Nesterov by their momentum and dampening), read from the base's groups at each step (the most
    restrictive: :func:`torch_backend.direction.base_method`), so a scheduler that cycles the momentum or beta1
    moves it; ``stability_coefficient`` fixes it) and ``lambda``
    the online sharpness
    (``lambda_max(P^-1 H)`` for Adam/AdamW bases, ``lambda_max(H)`` otherwise).

    The sharpness is estimated on steps 1, 1 + k, 1 + 2k, ... (``sharpness=k``; the rule's default,
    ``EdgeOfStabilityRule.default_sharpness``, when None); in between the last estimate is held and the rate is
    recomputed from it at every step, so a ``sigma`` schedule or a scheduled momentum/beta1 moves the rate
    between estimates. ``sigma = 1`` sits exactly on the edge; the paper found ``sigma c`` about 3 good for GD
    (``sigma = 1.5``; the default, 0.25 behind heavy ball, Nesterov and Adam: :func:`curvopt.rules.default_eos_sigma`).
    The rate rises at most ``growth`` (1.005) times per step and falls at once: set from the sharpness alone it
    ran away in field tests (:class:`curvopt.rules.EdgeOfStabilityRule` gives the measurements; ``growth=inf``
    is the paper's rule); on the first ``free_steps`` steps it follows the estimates uncapped (default
    :func:`curvopt.rules.default_eos_free_steps`: ``every + 1`` behind Adam, whose first preconditioned estimate is
    taken with one gradient's second moment, 0 otherwise), and at most ``loss_cap`` (1; ``inf``: off) times
    ``2 (f - f_star) / (-g^T u)``, the minimiser of the flattest quadratic model consistent with the loss bound
    ``f_star`` (an overshoot the sharpness estimate is too old to see). A non-positive estimate
    keeps the previous lr (0 at step 1). ``stability_coefficient``
    must be given for a base other than SGD/momentum/Nesterov/Adam/AdamW. ``functional_loss`` (as in
    :class:`torch_backend.CDAT`) makes the sharpness's Hessian-vector products exact (double backward) instead of
    finite differences of closure gradients, which on a float32 ReLU network cross kinks and read the sharpness
    2-11x too high (and the rate as much too low). Other arguments as in :class:`torch_backend.CDAT`.
    """

    def __init__(self, base: torch.optim.Optimizer, sigma: Any = None,
                 lr_max: float = default_of(EdgeOfStabilityRule, "lr_max"), *,
                 growth: float = default_of(EdgeOfStabilityRule, "growth"), sharpness: SharpnessLike = None,
                 stability_coefficient: Optional[float] = None, modules: ModulesLike = None, seed: int = 0,
                 distributed: DistributedLike = "auto", allow_any_base: bool = False,
                 max_grad_norm: Optional[float] = None, functional_loss: Optional[Callable] = None,
                 free_steps: Optional[int] = None, loss_cap: float = default_of(EdgeOfStabilityRule, "loss_cap"),
                 f_star: float = default_of(EdgeOfStabilityRule, "f_star"), **deprecated: Any) -> None:
        if isinstance(base, torch.optim.Optimizer):  # a base it cannot wrap is refused before anything is asked
            check_base(base, check_bool("allow_any_base", allow_any_base), type(self).__name__)
        coefficient = stability_coefficient
        if coefficient is None and isinstance(base, torch.optim.Optimizer):
            coefficient = base_stability_coefficient(base)
        if coefficient is None:
            raise ValueError(f"stability_coefficient must be given for the base {type(base).__name__} "
                             "(it is inferred only for SGD, momentum, Nesterov, Adam and AdamW)")
        self.rule = EdgeOfStabilityRule(coefficient=coefficient, sigma=default_eos_sigma(None, sigma), lr_max=lr_max,
                                        growth=growth, loss_cap=loss_cap, f_star=f_star)
        super().__init__(base, sharpness=sharpness, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed, allow_any_base=allow_any_base, legacy=deprecated,
                         max_grad_norm=max_grad_norm, functional_loss=functional_loss)
        # None: the base's defaults (curvopt.rules.default_eos_sigma, default_eos_free_steps); the base is known
        # from here on
        self.kind_defaults = ("sigma",) if sigma is None else ()
        self.rule = dataclasses.replace(
            self.rule, sigma=default_eos_sigma(self.method, sigma),
            free_steps=default_eos_free_steps(self.method, self.sharpness_config.every, free_steps))
