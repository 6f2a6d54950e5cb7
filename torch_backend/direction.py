"""The base optimizer's direction ``u`` and what the tuners infer from the base.

**The trick.** Any base whose update is linear in its learning rate (SGD, momentum, Nesterov, Adam, AdamW,
with weight decay) gives its direction by stepping once at its own per-group ``lr`` (the relative
multiplier): snapshot ``w``, ``base.step()``, ``u = w_new - w`` (the update at multiplier ``lr_g``, so ``u``
carries the per-group ratios), put ``w`` back bit-exactly (a copy, never a subtraction), and let the tuner take
``w <- w + lr * u``. The base's state (momentum buffers, Adam's moments and step counter) advances exactly as
in a bare run, since it does not depend on the learning rate.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from curvopt.thresholds import stability_coefficient

__all__ = ["base_method", "base_stability_coefficient", "is_adam_like", "snapshot_into", "direction_into"]


def is_adam_like(base: torch.optim.Optimizer) -> bool:
    """``torch.optim.Adam`` or ``AdamW`` (the bases with a diagonal preconditioner ``P``)."""
    return isinstance(base, (torch.optim.Adam, torch.optim.AdamW))


def base_method(base: torch.optim.Optimizer) -> Optional[tuple[str, dict]]:
    """``(method, kwargs)`` for :func:`curvopt.thresholds.stability_coefficient`, or None if unknown.

    SGD without momentum is ``"gd"``, with momentum ``"heavy_ball"`` (with its dampening) or ``"nesterov"``;
    Adam/AdamW are ``"adam"`` with their ``beta1``. The first parameter group decides.
    """
    group = base.param_groups[0]
    if isinstance(base, torch.optim.SGD):
        m = float(group.get("momentum", 0.0))
        if m == 0.0:
            return "gd", {}
        if group.get("nesterov", False):
            return "nesterov", {"momentum": m}
        return "heavy_ball", {"momentum": m, "dampening": float(group.get("dampening", 0.0))}
    if is_adam_like(base):
        return "adam", {"beta1": float(group["betas"][0])}
    return None


def base_stability_coefficient(base: torch.optim.Optimizer) -> Optional[float]:
    """The stability coefficient ``c`` of the base (threshold ``c / lr``), None for an unknown base."""
    method = base_method(base)
    if method is None:
        return None
    name, kwargs = method
    return stability_coefficient(name, **kwargs)


def snapshot_into(w0: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """``w0 <- params`` (exact copies)."""
    torch._foreach_copy_(list(w0), list(params))


def direction_into(u: Sequence[Tensor], params: Sequence[Tensor], w0: Sequence[Tensor]) -> None:
    """``u <- params - w0`` after the base stepped from ``w0`` to ``params``."""
    u = list(u)
    torch._foreach_copy_(u, list(params))
    torch._foreach_sub_(u, list(w0))
