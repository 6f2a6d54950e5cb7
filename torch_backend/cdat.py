"""CDAT (Curvature Dynamics Aware Tuning, Roulet et al. 2024) and the quadratically greedy rule."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import torch

from curvopt.config import DEFAULT_CURVATURE, SharpnessLike
from curvopt.curvature import GREEDY_NOISE_CORRECTION
from curvopt.rules import (CDATRule, check_numerator, default_ema, default_lagged_growth, default_numerator,
                           default_sigma)

from .buffers import ModulesLike
from .distributed import DistributedLike
from .settings import default_of, rule_fields
from .tuner import CurvatureTuner

__all__ = ["CDAT", "QuadraticGreedy"]


@rule_fields(CDATRule, fixed={"startup": "the defaults of sigma, lagged_growth and the numerator follow it; set "
                                         "it at construction"})
class CDAT(CurvatureTuner):
    """``lr_t = sigma * avg(n) / avg(d + eps)`` around a base optimizer, ``n = max(-g^T u, 0)`` (the rule's
    numerator, see ``numerator``) and ``d`` the curvature ``u^T H u``: under the default ``startup="robust"``
    floored by the loss bound, ``d = max(u^T H u, n^2 / (2 (f - f_star)))``, with a ramp, a growth cap and,
    above the edge, a guard and a loss cap; under ``startup="paper"`` the paper's ``d = |u^T H u|``
    (:class:`curvopt.rules.CDATRule`, whose docstring states each).

    Example::

        base = torch.optim.Adam(model.parameters(), lr=1.0)   # lr = relative multiplier
        opt = CDAT(base, sigma=2.0, ema=0.9, modules=model)
        loss = opt.step(closure)                               # closure: zero_grad, loss, backward, return
        print(float(opt.stats["lr"]), float(opt.stats["curvature"]))

    Args:
        base: the base optimizer instance: ``torch.optim.SGD`` (with or without momentum/Nesterov),
            ``Adam`` or ``AdamW`` (others with ``allow_any_base=True``, see
            :func:`torch_backend.direction.check_base`). Its per-group ``lr`` is a relative multiplier.
        sigma: scale of the quadratic-model step; 1 is greedy, 2 "on edge" (the largest lr with
            ``q(lr) <= f``). May be a schedule ``step -> sigma``, and assigned (``opt.sigma = ...``). None
            (default): by the base and the numerator, 4 (above the edge, guarded) for SGD without momentum and
            for Adam/AdamW with the momentum numerator (their defaults), 2 for SGD with momentum or Nesterov,
            Adam/AdamW with another numerator, another base and ``startup="paper"``
            (:func:`curvopt.rules.default_sigma`; :class:`curvopt.rules.CDATRule` says why).
        ema: factor of the two exponential moving averages (numerator and denominator, kept separately);
            None (default): by the base, 0.99 for Adam/AdamW, 0.9 for SGD (with or without momentum) and 0.99
            for another base (:func:`curvopt.rules.default_ema`, :class:`curvopt.rules.CDATRule` says why).
        eps: added to the curvature ``d`` (0 in the paper).
        lr_max: cap on the learning rate.
        startup, f_star, growth: ``startup="robust"`` (default: a loss-bound curvature floor for a loss bounded
            below by ``f_star``, a ramp over the averages' horizon and a growth cap of ``growth`` per step) or
            ``"paper"`` (the paper's rule exactly); :class:`curvopt.rules.CDATRule` states each. Behind heavy ball
            and Nesterov, steps with a closure also feed a watch for mini-batch training, which warns once and,
            but for ``"paper"``, holds the rate from then on at most at that step's
            (:mod:`curvopt.minibatch_watch`).
        guard, guard_sigma: the robust start-up's above-edge guard, for ``sigma > 2``: once the loss (averaged
            with ``ema``) has risen past ``guard`` times its lowest average, the rate is ``guard_sigma`` times
            the quadratic step until it is back (``guard=inf``: off). It needs the loss: in a closure-free step
            a ``sigma`` above 2 is held at 2 (:func:`curvopt.rules.above_edge_guard`).
        lagged_growth: on a step whose curvature is the secant's (closure-free, ``probes=False``,
            ``curvature="secant"``) the step's length ``lr ||u||`` grows at most this factor over the previous
            one (:class:`curvopt.rules.CDATRule`, growth cap); None (default): ``growth`` behind Adam/AdamW, 1.1
            behind SGD and with ``startup="paper"`` (:func:`curvopt.rules.default_lagged_growth`).
        loss_cap: for ``sigma > 2``, the rate is at most ``loss_cap * (1 - ema^t) * 2 (f - f_star) / n``, ``n``
            the rule's numerator (``-g^T u``; behind Adam/AdamW by default the momentum numerator) (1: the
            minimiser of the flattest quadratic model consistent with the loss bound, ramped; ``inf``: off;
            needs the loss, so inactive in a closure-free step; :class:`curvopt.rules.CDATRule`).
        curvature: the oracle for ``u^T H u``: ``"auto"`` (``"fd"`` with a closure), ``"fd"``, ``"secant"`` or
            ``"exact"`` (see :mod:`torch_backend.oracles`).
        sharpness: the online sharpness: a :class:`curvopt.SharpnessConfig`, an int ``k`` (every k steps) or
            None (off). The old ``sharpness_every``/``sharpness_iters``/``sharpness_first_iters``/
            ``sharpness_tol`` keywords still work for one release (deprecated).
        modules: the model (or a list of modules) whose buffers (BatchNorm running statistics) probes must
            not change; None: the modules the closure runs in its first call, and any it starts calling later,
            found by the probes (:mod:`torch_backend.buffers`).
        functional_loss: ``f(params: list[Tensor]) -> Tensor`` over the tuner's parameters in
            ``param_groups`` order; required by ``curvature="exact"``. Given, the online sharpness's
            Hessian-vector products are exact too (double backward; finite differences of closure gradients
            otherwise, which on a float32 ReLU network cross kinks and read the sharpness 2-11x too high). With
            neither it is not used, and a warning says so. It must be the closure's loss on the same batch: the
            first three steps that use it compare its loss and slope with the closure's and warn on a mismatch.
        stability_coefficient: the base's ``c`` (threshold ``c / lr``) for ``stats["eos_ratio"]``; inferred
            for SGD/momentum/Nesterov/Adam/AdamW.
        seed: seeds the random start of the power iteration (an integer in ``[0, 2**63)``).
        distributed: ``"auto"`` (default: under an initialized ``torch.distributed`` with more than one
            rank, a data-parallel run whose closure returns the rank-local loss, e.g. DDP), ``None`` (never
            reduce) or a process group; see :mod:`torch_backend.distributed` for what is reduced.
        allow_any_base: accept a base other than SGD/Adam/AdamW whose update is linear in its lr.
        max_grad_norm: clip the gradient of the step's main call to this norm inside the tuner (the probes'
            gradients are the loss's own; see :meth:`torch_backend.tuner.CurvatureTuner.step`). Never clip
            inside the closure.
        probes: False: call the closure once per step and never at probe points (Lightning's automatic
            optimization, closures with side effects): the curvature comes from the secant as in a
            closure-free step.
        noise_correction: whether the secant curvature (closure-free steps, ``probes=False``,
            ``curvature="secant"``) has its mini-batch noise bias removed (:mod:`torch_backend.noise`; one more
            parameter-sized buffer, the previous gradient). None (default): behind Adam/AdamW only
            (:func:`curvopt.curvature.noise_correction_on`: behind SGD its rate collapsed late on the benchmark's
            mini-batch ResNet; in full batch, where there is no noise, it subtracts part of the gradient's drift:
            :data:`curvopt.curvature.GREEDY_NOISE_CORRECTION`); True/False: on/off. The correction needs the
            base's noise metric, known for SGD, Adam and AdamW: behind another base (``allow_any_base``) it is
            off and True is refused.
        numerator: None (default): ``"momentum"`` behind Adam/AdamW with ``startup="robust"``, else
            ``"direction"`` (:func:`curvopt.rules.default_numerator`). ``"direction"``: ``-g^T u``, the paper's;
            ``"momentum"`` (Adam/AdamW only): ``-g^T u`` with the batch's own gradient inside Adam's first moment
            replaced by the previous (bias-corrected) momentum (:func:`curvopt.rules.momentum_numerator`): in
            mini-batch ``-g^T u`` holds ``(1 - beta1) g^T P^-1 g``, whose mean is the batch noise's, not a slope;
            in full batch it lowers the rate (the previous momentum lags the gradient;
            docs/minibatch_study.md, section 8), which the default's ``sigma = 4`` makes up for
            (:class:`curvopt.rules.CDATRule` gives the measurements).
            ``"paired"`` (Adam/AdamW, the fd oracle: ``curvature="fd"``, or ``"auto"`` with a closure and
            probes): ``-g^T u`` minus that noise's second moment, measured between this batch's gradient and the
            previous batch's predicted at the current point from the previous step's fd probe
            (:func:`curvopt.rules.paired_numerator`; one more parameter-sized buffer, no extra gradient).
            Suite's mini-batch LM: 1.03x instead of 1.14x. In full batch what it subtracts is the prediction's
            second-order error, which over a step at the edge is not small (the full-batch LM's rate 5x lower,
            its loss unchanged), so it is not the default.
            Only the rule sees either numerator: ``stats["numerator"]``, the secant and the probe's replay
            check keep ``-g^T u``.

    Guards (the core's :func:`curvopt.rules.apply_rule`): an ascent direction counts as a zero numerator; a
    non-finite curvature probe gives lr 0 for that step and leaves the averages unchanged.
    """

    def __init__(self, base: torch.optim.Optimizer, sigma: Any = None,
                 ema: Optional[float] = None, eps: float = default_of(CDATRule, "eps"),
                 lr_max: float = default_of(CDATRule, "lr_max"), *, startup: str = default_of(CDATRule, "startup"),
                 f_star: float = default_of(CDATRule, "f_star"), growth: float = default_of(CDATRule, "growth"),
                 guard: float = default_of(CDATRule, "guard"),
                 guard_sigma: float = default_of(CDATRule, "guard_sigma"),
                 lagged_growth: Optional[float] = None,
                 loss_cap: float = default_of(CDATRule, "loss_cap"),
                 curvature: str = DEFAULT_CURVATURE, sharpness: SharpnessLike = None, modules: ModulesLike = None,
                 functional_loss: Optional[Callable] = None, stability_coefficient: Optional[float] = None,
                 seed: int = 0, distributed: DistributedLike = "auto", allow_any_base: bool = False,
                 max_grad_norm: Optional[float] = None, probes: bool = True, noise_correction: Optional[bool] = None,
                 numerator: Optional[str] = None, **deprecated: Any) -> None:
        self.rule = CDATRule(sigma=default_sigma(None, sigma, startup), ema=default_ema(None, ema), eps=eps,
                             lr_max=lr_max, startup=startup, f_star=f_star, growth=growth, guard=guard,
                             guard_sigma=guard_sigma,
                             lagged_growth=default_lagged_growth(None, lagged_growth, startup, growth),
                             loss_cap=loss_cap)
        super().__init__(base, curvature=curvature, sharpness=sharpness, modules=modules,
                         functional_loss=functional_loss, stability_coefficient=stability_coefficient, seed=seed,
                         distributed=distributed, allow_any_base=allow_any_base, legacy=deprecated,
                         max_grad_norm=max_grad_norm, probes=probes, noise_correction=noise_correction)
        # None: the base's defaults (curvopt.rules.default_ema / default_sigma); the base is known from here on
        #: ``"direction"``, ``"momentum"`` or ``"paired"`` (see the class docstring)
        self.numerator = check_numerator(default_numerator(self.method, numerator, startup), self.method,
                                         type(base).__name__, curvature if probes else "secant")
        self.kind_defaults = ("sigma",) if sigma is None else ()
        self.rule = dataclasses.replace(self.rule, ema=default_ema(self.method, ema),
                                        sigma=default_sigma(self.method, sigma, startup, self.numerator),
                                        lagged_growth=default_lagged_growth(self.method, lagged_growth, startup,
                                                                            growth))


_GREEDY_FIXED = "the greedy rule is CDAT with sigma=1, ema=0, eps=0, startup='paper'; use CDAT, which takes it"


@rule_fields(CDATRule, fixed={f.name: _GREEDY_FIXED for f in dataclasses.fields(CDATRule) if f.name != "lr_max"})
class QuadraticGreedy(CDAT):
    """``lr = -g^T u / |u^T H u|``, the minimiser of the quadratic model along ``u``, at most ``lr_max`` (the rate
    where the curvature is exactly 0 along a descent direction; without one no step)
    (:meth:`curvopt.rules.CDATRule.greedy`). The keyword arguments of :class:`CDAT` but the rule's, which it
    fixes (``sigma``, ``ema``, ``eps``, ``startup``, ``f_star``, ``numerator``, ...: CDAT with ``sigma=1, ema=0,
    eps=0, startup="paper", numerator="direction"``; a ``TypeError`` names them). The secant's
    ``noise_correction`` is off by default behind every base (:data:`curvopt.curvature.GREEDY_NOISE_CORRECTION`)."""

    def __init__(self, base: torch.optim.Optimizer,
                 lr_max: float = inspect.signature(CDATRule.greedy).parameters["lr_max"].default, *,
                 curvature: str = DEFAULT_CURVATURE, sharpness: SharpnessLike = None,
                 noise_correction: Optional[bool] = GREEDY_NOISE_CORRECTION, **kwargs: Any) -> None:
        greedy = CDATRule.greedy(lr_max)
        fixed = {f.name: getattr(greedy, f.name) for f in dataclasses.fields(greedy)}
        given = sorted(set(kwargs) & (set(fixed) | {"numerator"}))  # (its numerator is -g^T u, as in Optax)
        if given:
            raise TypeError(f"QuadraticGreedy fixes the rule's {', '.join(given)} (it is CDAT with sigma=1, ema=0, "
                            "eps=0, startup='paper', numerator='direction'); set them on CDAT instead")
        super().__init__(base, **fixed, curvature=curvature, sharpness=sharpness, noise_correction=noise_correction,
                         **kwargs)
