"""The secant's mini-batch noise in PyTorch: the base's noise metric ``A`` and the three ``A``-inner products of
:func:`curvopt.curvature.secant_noise_numerator` (the formula and its derivation are the core's).

For a base whose update is linear in the current gradient, ``u = -A g + c``, ``A = lr_group a`` with ``a`` the
core's :func:`curvopt.curvature.gradient_weight` of the group's hyperparameters (weight decay adds to ``c``, not
to ``A``); behind Adam/AdamW divided elementwise by ``P``, the core's Adam preconditioner
(:func:`curvopt.preconditioner.adam_preconditioner`) read from the base's state before it steps (the ``P`` of the
previous step, the one the noise of the previous gradient went through).

The products run over chunks of parameters that share ``A``'s scalars (a param group and, behind Adam, a step
count): a chunk's vectors are concatenated when the step concatenates its dot products
(:func:`torch_backend.vectors.concatenating`: small models, whose step is dispatch-bound), so the metric and
the products cost a few kernels per chunk rather than per parameter; else each parameter is a chunk.

Another base (``allow_any_base=True``) has no known ``A``: the correction is off for it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from curvopt.curvature import gradient_weight, secant_noise_numerator
from curvopt.preconditioner import adam_preconditioner

from .direction import is_adam_like
from .vectors import concatenating_now, global_sum, joined

__all__ = ["knows_noise", "noise_numerator"]


def knows_noise(base: torch.optim.Optimizer) -> bool:
    """Whether the base's noise metric ``A`` is known (SGD, Adam, AdamW)."""
    return isinstance(base, torch.optim.SGD) or is_adam_like(base)


Step = Union[float, Tensor]


def _step(st: dict) -> Step:
    """Adam's step count: a float when it is on the host (a number, or a CPU tensor), else a float64 tensor on its
    device (``capturable``/``fused`` Adam: reading it would synchronise)."""
    step = st["step"]
    if not isinstance(step, Tensor):
        return float(step)
    return float(step) if step.device.type == "cpu" else step.to(torch.float64)


def _chunks(base: torch.optim.Optimizer, params: Sequence[Tensor]
            ) -> list[tuple[list[int], float, Optional[dict], Optional[Step]]]:
    """``(indices, lr_group a, Adam's group or None, Adam's step or None)`` per chunk; behind Adam a parameter it
    has not stepped yet (``A = 0``) is in none."""
    group_of = {p: g for g in base.param_groups for p in g["params"]}
    adam = is_adam_like(base)
    together = concatenating_now()
    chunks: dict[tuple, tuple[list[int], Optional[Step]]] = {}
    for i, p in enumerate(params):
        g, step = group_of[p], None
        if adam:
            st = base.state.get(p, {})
            if "exp_avg_sq" not in st:
                continue
            step = _step(st)
        key = (id(g), step) if together and not isinstance(step, Tensor) else (i,)
        chunks.setdefault(key, ([], step))[0].append(i)
    out = []
    for idx, step in chunks.values():
        g = group_of[params[idx[0]]]
        if adam:
            a = gradient_weight("adam", beta1=float(g["betas"][0]))
        else:
            a = gradient_weight("nesterov" if g.get("nesterov", False) else "heavy_ball",
                                momentum=float(g.get("momentum", 0.0)), dampening=float(g.get("dampening", 0.0)))
        out.append((idx, float(g["lr"]) * a, g if adam else None, step))
    return out


def _cat(xs: Sequence[Tensor]) -> Tensor:
    """The tensors' entries as one float vector of at least float32 (a view for one contiguous tensor)."""
    flat = joined(xs)
    return flat if flat.dtype not in (torch.float16, torch.bfloat16) else flat.float()


def noise_numerator(base: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor],
                    prev_grads: Sequence[Tensor], prev_u: Sequence[Tensor], dtype: torch.dtype,
                    prev_u_flat: Optional[Tensor] = None) -> Tensor:
    """``0.5 ||D_perp||_A^2`` with ``D = g_t - g_{t-1}`` (``grads`` minus ``prev_grads``, a chunk at a time: no
    buffer of the parameters' size is kept for it) and ``u_{t-1}`` (``prev_u``; ``prev_u_flat``: the same entries
    as one flat tensor in ``params`` order when the tuner keeps it so, read in place of a concatenation where a
    chunk holds every parameter), in ``dtype``; the base's ``A`` read before it steps (:func:`knows_noise` must
    hold)."""
    sums = torch.zeros(3, dtype=dtype, device=params[0].device)
    for idx, scale, adam, step in _chunks(base, params):
        d = _cat([grads[i] for i in idx]) - _cat([prev_grads[i] for i in idx])
        whole = prev_u_flat is not None and len(idx) == len(params)
        u = _cat([prev_u_flat] if whole else [prev_u[i] for i in idx])
        if adam is None:
            metric = scale
        else:
            v = _cat([base.state[params[i]]["max_exp_avg_sq" if adam.get("amsgrad", False) else "exp_avg_sq"]
                      for i in idx])
            beta1, beta2 = adam["betas"]
            metric = scale / adam_preconditioner(v, step, beta1=float(beta1), beta2=float(beta2),
                                                 eps=float(adam["eps"]), xp=torch)
        ad = d * metric
        sums += torch.stack([torch.dot(ad, d), torch.dot(ad, u), torch.dot(u * metric, u)]).to(dtype)
    sums = global_sum(sums)
    return secant_noise_numerator(sums[0], sums[1], sums[2], xp=torch)
