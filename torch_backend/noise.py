"""The secant's mini-batch noise in PyTorch: the base's noise metric ``A`` and the three ``A``-inner products of
:func:`curvopt.curvature.secant_noise_numerator` (the formula and its derivation are the core's).

For a base whose update is linear in the current gradient, ``u = -A g + c``:

* SGD: ``A = lr_group``; heavy ball: ``(1 - dampening) lr_group``; Nesterov: ``(1 + momentum (1 - dampening))
  lr_group`` (weight decay adds to ``c``, not to ``A``);
* Adam/AdamW: ``A = lr_group (1 - beta1) / P`` elementwise, ``P`` the core's Adam preconditioner read from the
  base's state before it steps (the ``P`` of the previous step, the one the noise of the previous gradient went
  through).

Another base (``allow_any_base=True``) has no known ``A``: the correction is off for it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from curvopt.curvature import secant_noise_numerator

from .direction import is_adam_like
from .preconditioning import adam_preconditioner_from_optimizer
from .vectors import dot

__all__ = ["noise_metric", "noise_numerator"]

Metric = list[Union[float, Tensor]]


def noise_metric(base: torch.optim.Optimizer, params: Sequence[Tensor]) -> Optional[Metric]:
    """``A`` per parameter (a float for the SGD family, a tensor for Adam), or None for an unknown base."""
    group_of = {p: g for g in base.param_groups for p in g["params"]}
    if isinstance(base, torch.optim.SGD):
        out: Metric = []
        for p in params:
            g = group_of[p]
            m, d = float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0))
            factor = 1.0 if m == 0.0 else (1.0 + m * (1.0 - d) if g.get("nesterov", False) else 1.0 - d)
            out.append(float(g["lr"]) * factor)
        return out
    if is_adam_like(base):
        diags = adam_preconditioner_from_optimizer(base, params)
        out = []
        for p, d in zip(params, diags):
            g = group_of[p]
            if d is None:
                out.append(0.0)
            else:
                out.append((float(g["lr"]) * (1.0 - float(g["betas"][0]))) / d.to(p.dtype))
        return out
    return None


def _weighted_dot(xs: Sequence[Tensor], ys: Sequence[Tensor], a: Metric) -> Tensor:
    if all(not isinstance(w, Tensor) for w in a):
        if len(set(a)) == 1:
            return a[0] * dot(xs, ys)
        return dot(list(torch._foreach_mul(list(xs), list(a))), ys)
    return dot([x * w for x, w in zip(xs, a)], ys)


def noise_numerator(diff: Sequence[Tensor], prev_u: Sequence[Tensor], a: Metric) -> Tensor:
    """``0.5 ||D_perp||_A^2`` with ``D = g_t - g_{t-1}`` (``diff``) and ``u_{t-1}`` (``prev_u``)."""
    return secant_noise_numerator(_weighted_dot(diff, diff, a), _weighted_dot(diff, prev_u, a),
                                  _weighted_dot(prev_u, prev_u, a), xp=torch)
