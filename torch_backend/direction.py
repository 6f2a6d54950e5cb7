"""The base optimizer's direction ``u``, and what the tuners infer from (and refuse in) the base.

**The trick.** A base whose update is linear in its learning rate (SGD, momentum, Nesterov, Adam, AdamW,
with weight decay) gives its direction by stepping once at its own per-group ``lr`` (the relative
multiplier): snapshot ``w``, ``base.step()``, ``u = w_new - w`` (the update at multiplier ``lr_g``, so ``u``
carries the per-group ratios), and let the tuner write ``w <- w + lr * u`` from the snapshot (a copy, never
a subtraction; the snapshot and ``u`` are the buffers of :mod:`torch_backend.workspace`). The base's state
(momentum buffers, Adam's moments and step counter) advances exactly as in a bare run, since it does not
depend on the learning rate.

Bases for which this is wrong are refused (:func:`check_base`): a base whose update is not linear in ``lr``
(``Rprop``'s per-weight step sizes, ``LBFGS``'s own line search, ``Adafactor``'s step size ``min(lr,
1/sqrt(t))``), one that keeps iterate averages (``ASGD``: its average would collect the probe points),
``SparseAdam`` (sparse gradients), ``maximize=True``, and ``torch.distributed.optim.ZeroRedundancyOptimizer``
(each rank holds the base's state for its shard only).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional

import torch
from torch import Tensor

from curvopt.base import BaseMethod

__all__ = ["SUPPORTED_BASES", "base_method", "base_stability_coefficient", "check_base", "check_group", "group_method",
           "is_adam_like", "kind_change"]

#: the group settings :func:`group_method` reads, behind SGD and behind Adam/AdamW
_SGD_SETTINGS, _ADAM_SETTINGS = ("momentum", "nesterov", "dampening"), ("betas", "eps")

#: the bases the tuners accept without ``allow_any_base=True``
SUPPORTED_BASES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_REFUSED = {
    "LBFGS": "its update is its own line search, not linear in lr",
    "SparseAdam": "it works on sparse gradients, which the tuners' inner products do not support",
    "ASGD": "it keeps an average of the iterates, which would collect the tuner's probe points",
    "Rprop": "its per-weight step sizes adapt to the sign of the gradient: the update is not linear in lr",
    "Adafactor": ("its step size is min(lr, 1/sqrt(step)), not linear in lr: the tuner steps the base at its lr "
                  "scaled to 1, where the cap your lr sets is gone (the direction 1/sqrt(step) of the one at lr)"),
}
_SUPPORTED_TEXT = ("torch.optim.SGD (with or without momentum/Nesterov/weight decay), torch.optim.Adam and "
                   "torch.optim.AdamW")


def is_adam_like(base: torch.optim.Optimizer) -> bool:
    """``torch.optim.Adam`` or ``AdamW`` (the bases with a diagonal preconditioner ``P``)."""
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW))


def _is_zero(cls: type) -> bool:
    return cls.__name__ == "ZeroRedundancyOptimizer" and cls.__module__.startswith("torch.distributed.optim")


def _built_by_zero() -> bool:
    """Whether ``ZeroRedundancyOptimizer._init_local_optimizer``, where ZeRO calls its ``optimizer_class``, is among
    the callers: compared by code object (reading the callers' ``f_locals`` kept their locals alive before Python
    3.13, and matched ZeRO's other methods)."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")  # (not imported: no ZeRO built)
    code = getattr(getattr(getattr(zero, "ZeroRedundancyOptimizer", None), "_init_local_optimizer", None),
                   "__code__", None)
    frame = sys._getframe(1) if code is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def check_base(base: torch.optim.Optimizer, allow_any_base: bool, tuner: str) -> None:
    """Refuse a base the tuners cannot wrap, with the supported ones named (see the module docstring).

    ``allow_any_base=True`` accepts other ``torch.optim`` optimizers whose update is linear in ``lr`` and that
    keep no iterate averages (``RMSprop``, ``Adagrad``, ``Adamax``, ``NAdam``, ... , and subclasses of the
    supported ones, read as their parent: the caller vouches for it); the four in ``_REFUSED`` and
    ``ZeroRedundancyOptimizer`` are refused regardless, and so is a tuner that ``ZeroRedundancyOptimizer`` builds
    as its ``optimizer_class`` (a subclass or factory taking ``params``: each rank then tuned the rate of its own
    shard, the ranks' rates 3x apart, silently), and an optimizer whose ``torch.optim.Optimizer.__init__`` never
    ran (a wrapper of another optimizer, as Opacus's ``DPOptimizer``: the tuner registers hooks on its base).
    """
    name = type(base).__name__
    if _built_by_zero():
        raise ValueError(
            f"{tuner} cannot be ZeroRedundancyOptimizer's optimizer_class (here through a subclass or a factory): "
            "each rank would step its own shard of the parameters with a rate tuned on that shard alone. Wrap the "
            "plain base under DistributedDataParallel in the tuner instead, e.g. "
            "curvopt.torch.CDAT(torch.optim.AdamW(ddp_model.parameters(), lr=1.0)).")
    if any(_is_zero(cls) for cls in type(base).__mro__):
        raise ValueError(
            f"{tuner} cannot wrap ZeroRedundancyOptimizer, even with allow_any_base=True: each rank keeps the base's "
            "state (Adam's moments) for its own shard of the parameters only, where the tuner reads it for all of "
            "them (the preconditioner, the noise correction), and the base's kind, which sets the tuner's "
            "defaults, is hidden inside. Wrap the plain base under DistributedDataParallel instead: "
            f"{tuner}(torch.optim.AdamW(ddp_model.parameters(), lr=1.0)).")
    if not hasattr(base, "_optimizer_state_dict_post_hooks"):  # (was an AttributeError from inside the tuner)
        raise TypeError(
            f"{tuner} cannot wrap {name}: its torch.optim.Optimizer.__init__ never ran (it has no optimizer hooks; "
            "a wrapper of another optimizer, as Opacus's DPOptimizer, is built so). Wrap a plain torch.optim "
            "optimizer; for differential privacy, see docs/limits.md on per-example clipping first.")
    for cls in type(base).__mro__:
        if cls.__module__.startswith("torch.optim") and cls.__name__ in _REFUSED:
            raise ValueError(f"{tuner} cannot wrap {name}: {_REFUSED[cls.__name__]}. Supported bases: "
                             f"{_SUPPORTED_TEXT}.")
    if type(base) not in SUPPORTED_BASES and not allow_any_base:
        parent = next((cls for cls in SUPPORTED_BASES if isinstance(base, cls)), None)
        if parent is not None:  # a subclass may reshape the step (a field test's capped SGD: moved 2,300x its cap)
            raise ValueError(
                f"{tuner} cannot tell whether the step of {name}, a subclass of torch.optim.{parent.__name__}, is "
                f"still {parent.__name__}'s (linear in lr, no iterate average, the same state). If it is, pass "
                f"allow_any_base=True: the tuner then reads it as {parent.__name__}.")
        raise ValueError(
            f"{tuner} does not know whether {name}'s update is linear in its lr (the tuner scales it). "
            f"Supported bases: {_SUPPORTED_TEXT}. For another base whose update is linear in lr and that keeps "
            "no iterate average (RMSprop, Adagrad, NAdam, ...), pass allow_any_base=True (and "
            "stability_coefficient= if you want eos_ratio or the edge-of-stability rule).")
    for group in base.param_groups:
        check_group(group, tuner)
        check_listed_once(group["params"], tuner)


def check_group(group: dict, tuner: str) -> None:
    """Refuse a param group the tuners cannot handle (``maximize=True``, ``differentiable=True``, an ``lr`` that is
    negative or not finite: a scheduler can write one, which the base would take; a tensor ``lr`` on an accelerator
    is not read, which would cost a sync a step)."""
    lr = group.get("lr")
    if isinstance(lr, Tensor) and lr.device.type != "cpu":  # (read on the host: a sync per step)
        lr = None
    if lr is not None and not 0.0 <= float(lr) < math.inf:
        raise ValueError(f"{tuner}: a param group's lr is {float(lr)!r}; the tuner's rate multiplies each group's lr, "
                         "which must be a finite number >= 0 (a negative one would climb the loss). An LR "
                         "scheduler or a hand edit of param_groups wrote it: check its schedule")
    if group.get("maximize", False):
        raise ValueError(f"{tuner}: maximize=True is not supported (the tuners minimise the closure's loss); "
                         "return the negated objective from the closure instead")
    if group.get("differentiable", False):
        raise ValueError(f"{tuner}: differentiable=True is not supported (the tuner's step runs under no_grad and "
                         "its rate comes from host-side rules: no gradient flows through it); build the base "
                         "without it")


def check_listed_once(params: Any, tuner: str) -> None:
    """Refuse a parameter listed twice in a group (torch only warns that this is deprecated): the base steps it
    twice per step and the tuner's direction holds it twice, so the rates are those of another problem (a field
    test: a digits MLP behind AdamW, closure-free, ended at loss 0.045 against 1e-4 listed once, its rate 4.5x
    lower, with a warning that named another cause)."""
    params = [params] if isinstance(params, Tensor) else list(params)
    if len({id(p) for p in params}) < len(params):
        raise ValueError(f"{tuner}: a parameter group lists the same tensor more than once; the base would step it "
                         "twice per step and the tuner would count it twice. List each parameter once "
                         "(model.parameters() lists a tied weight once; list(dict.fromkeys(params)) drops repeats).")


def group_method(base: torch.optim.Optimizer, group: dict) -> Optional[BaseMethod]:
    """The :class:`curvopt.base.BaseMethod` of one parameter group of a torch base, or None for a base the core
    does not describe.

    SGD without momentum is ``"gd"``, with momentum ``"heavy_ball"`` (with its dampening) or ``"nesterov"``;
    Adam/AdamW are ``"adam"`` with their betas and eps.
    """
    if isinstance(base, torch.optim.SGD):
        m = float(group.get("momentum", 0.0))
        if m == 0.0:
            return BaseMethod.gd()
        if group.get("nesterov", False):
            return BaseMethod.nesterov(m)
        return BaseMethod.heavy_ball(m, float(group.get("dampening", 0.0)))
    if is_adam_like(base):
        b1, b2 = group["betas"]
        return BaseMethod.adam(float(b1), float(b2), float(group["eps"]))
    return None


def base_method(base: torch.optim.Optimizer) -> Optional[BaseMethod]:
    """The base as the core describes it (:func:`group_method`), or None for a base the core does not describe.

    Parameter groups that differ in momentum or betas are described by the most restrictive group with a
    momentum (SGD groups without any count only when no group has one), the one with the smallest stability
    coefficient (the first of equals): its kind chooses the defaults (sigma 2 rather than plain SGD's 4 for
    CDAT) and its coefficient the edge. The order the groups are listed in never matters: the first group
    decided, and the edge rule's rates behind Adam groups with beta1 0.9/0.5/0 were 19x apart by their order.
    The numerators read each group's own beta1.
    """
    keys = _SGD_SETTINGS if isinstance(base, torch.optim.SGD) else _ADAM_SETTINGS if is_adam_like(base) else None
    if keys is None:
        return None
    distinct: dict = {}  # one description per distinct setting (read every step: 200 groups cost 2.3 ms built each)
    for group in base.param_groups:
        distinct.setdefault(tuple(tuple(v) if isinstance(v, list) else v for v in map(group.get, keys)), group)
    methods = [group_method(base, group) for group in distinct.values()]
    return min(methods, key=lambda method: (method.kind == "gd", method.coefficient))


def kind_change(method: Optional[BaseMethod], kind: Optional[str], defaults: tuple, tuner: str) -> Optional[str]:
    """A warning where the base's parameter groups (described as ``method``: :func:`base_method`) are no longer of
    the ``kind`` the tuner
    took its ``defaults`` from at construction (CDAT's and the edge rule's ``sigma``, Armijo's ``c``; a scheduler
    gave SGD a momentum, a checkpoint of SGD with momentum was loaded into a tuner built around SGD without); None
    otherwise. Such a checkpoint ran CDAT at plain SGD's sigma (4, above the edge) behind heavy ball, its rates up
    to 2.8x the uninterrupted run's, silently."""
    if not defaults or kind is None or method is None or method.kind == kind:
        return None
    return (f"{tuner} was built around a {kind!r} base and took its default {' and '.join(defaults)} from it, but "
            f"the base's param groups are {method.kind!r} now (their momentum or nesterov): build the tuner around "
            f"the base as it runs (under OneCycleLR or CyclicLR, SGD with its momentum; a checkpoint into a tuner "
            f"built like the one saved), or give {' and '.join(defaults)}")


def base_stability_coefficient(base: torch.optim.Optimizer) -> Optional[float]:
    """The stability coefficient ``c`` of the base (threshold ``c / lr``; its describing group's:
    :func:`base_method`), None for an unknown base."""
    method = base_method(base)
    return None if method is None else method.coefficient
