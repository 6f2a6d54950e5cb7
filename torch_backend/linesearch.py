"""Armijo backtracking line search around a base optimizer (:class:`curvopt.rules.ArmijoRule`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from curvopt.config import SharpnessLike
from curvopt.rules import ArmijoRule, default_armijo_c

from .buffers import ModulesLike
from .distributed import DistributedLike
from .settings import default_of, rule_fields
from .tuner import CurvatureTuner

__all__ = ["ArmijoLineSearch"]


@rule_fields(ArmijoRule)
class ArmijoLineSearch(CurvatureTuner):
    """Accept the first ``lr`` with ``f(w + lr u) <= f(w) + delta |f(w)| + c lr g^T u``.

    The test is Optax's where ``f >= 0`` (:func:`curvopt.rules.armijo_decrease_error`). Trials (the sequence of
    ``optax.scale_by_backtracking_linesearch`` with
    ``max_backtracking_steps = max_trials - 1``, ``slope_rtol = c``, ``rtol = delta``, ``atol = 0``):
    ``lr_1 = min(increase_factor * lr_prev, lr_max)`` with ``lr_prev = init_lr`` at the start (so the very first
    trial is ``min(increase_factor * init_lr, lr_max)``, as in Optax; ``init_lr`` itself when that is not a finite
    positive number, e.g. ``increase_factor = inf``), then ``lr_{k+1} = decrease_factor * lr_k``, stopping at
    the first accepted trial or after ``max_trials`` closure calls. Unlike Optax, a search that accepts nothing
    takes **no step** (the parameters stay); an ascent direction (``-g^T u <= 0``, e.g. a momentum base after
    the gradient turned) takes no step and spends no trial. Where the next search starts after a failure is
    :meth:`curvopt.rules.ArmijoRule.finish`'s decision (from the last trial; from ``init_lr`` after a stall).

    Trial closure calls run backward too (the closure convention); module buffers and the random state are
    protected. ``stats["closure_calls"]`` is 1 + the number of trials (+ sharpness products), and one more
    at each of the first 3 searches (or sharpness estimates): the check that the closure replays (not in
    distributed runs). ``last_trials`` and ``last_decrease_error`` (0 = accepted) describe the last search.
    ``c`` defaults by the base (:func:`curvopt.rules.default_armijo_c`: 0.1 behind SGD, 0.5 behind momentum,
    Nesterov and Adam; :class:`curvopt.rules.ArmijoRule` gives the measurements). Other arguments as in
    :class:`torch_backend.CDAT`.
    """

    def __init__(self, base: torch.optim.Optimizer, c: Optional[float] = None,
                 delta: float = default_of(ArmijoRule, "delta"),
                 increase_factor: float = default_of(ArmijoRule, "increase_factor"),
                 decrease_factor: float = default_of(ArmijoRule, "decrease_factor"),
                 lr_max: float = default_of(ArmijoRule, "lr_max"), init_lr: float = default_of(ArmijoRule, "init_lr"),
                 max_trials: int = default_of(ArmijoRule, "max_trials"), *, sharpness: SharpnessLike = None,
                 modules: ModulesLike = None, stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto", allow_any_base: bool = False,
                 max_grad_norm: Optional[float] = None, functional_loss: Optional[Callable] = None,
                 **deprecated: Any) -> None:
        self.rule = ArmijoRule(c=default_armijo_c(None, c), delta=delta, increase_factor=increase_factor,
                               decrease_factor=decrease_factor, lr_max=lr_max, init_lr=init_lr, max_trials=max_trials)
        super().__init__(base, sharpness=sharpness, modules=modules, stability_coefficient=stability_coefficient,
                         seed=seed, distributed=distributed, allow_any_base=allow_any_base, legacy=deprecated,
                         max_grad_norm=max_grad_norm, functional_loss=functional_loss)
        # None: the base's default (curvopt.rules.default_armijo_c); the base is known from here on
        self.kind_defaults = ("c",) if c is None else ()
        self.rule = dataclasses.replace(self.rule, c=default_armijo_c(self.method, c))
