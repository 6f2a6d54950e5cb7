"""Adam's diagonal preconditioner ``P`` read from a ``torch.optim.Adam``/``AdamW`` instance.

The formula is the core's (:func:`curvopt.preconditioner.adam_preconditioner`):
``P = (1 - beta1^t) (sqrt(v_t / (1 - beta2^t)) + eps)``, both bias corrections, ``eps`` outside the root,
with ``v`` the second-moment EMA (``max_exp_avg_sq`` under ``amsgrad``) and ``t`` the step counter. Adam's
update at learning rate 1 is ``-P^-1 m`` with ``m`` the raw first-moment EMA, so ``P^-1 H`` is the
preconditioned Hessian whose top eigenvalue Adam's stability threshold ``38 / lr`` (beta1 = 0.9) refers to.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from curvopt.preconditioner import adam_preconditioner, inverse_sqrt
from curvopt.runs import cut_into_runs

from .direction import is_adam_like
from .vectors import joined

__all__ = ["adam_preconditioner_from_optimizer", "adam_diagonal_by_group", "adam_step_counts",
           "preconditioner_scales"]

PreconditionerLike = Optional[Union[torch.optim.Optimizer, Sequence[Optional[Tensor]]]]


def adam_preconditioner_from_optimizer(optimizer: torch.optim.Optimizer,
                                       params: Optional[Iterable[Tensor]] = None) -> list[Optional[Tensor]]:
    """The diagonal ``P`` of each parameter (None for a parameter Adam has not stepped yet), in at least float32.

    ``params`` defaults to all parameters of ``optimizer`` in ``param_groups`` order.
    """
    if not is_adam_like(optimizer):
        raise TypeError(f"expected torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    group_of = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[p] = g
    if params is None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
    out: list[Optional[Tensor]] = []
    for p in params:
        if p not in group_of:
            raise ValueError("a parameter is not managed by the given optimizer")
        g = group_of[p]
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st:
            out.append(None)
            continue
        v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
        v = v.to(torch.promote_types(v.dtype, torch.float32))  # 1 - beta2^t is 0 in bfloat16
        step = st["step"]
        step = step.to(torch.float64) if isinstance(step, Tensor) else float(step)
        beta1, beta2 = g["betas"]
        out.append(adam_preconditioner(v, step, beta1=float(beta1), beta2=float(beta2), eps=float(g["eps"]),
                                       xp=torch))
    return out


def preconditioner_scales(preconditioner: PreconditionerLike, params: Sequence[Tensor]) -> Optional[list[Tensor]]:
    """``P^-1/2`` per parameter (zeros where ``P`` is unknown, which leaves that parameter out), or None.

    ``preconditioner`` is an Adam/AdamW optimizer or a list of diagonal tensors (``P`` itself, positive).
    """
    if preconditioner is None:
        return None
    if isinstance(preconditioner, torch.optim.Optimizer):
        diags = adam_preconditioner_from_optimizer(preconditioner, params)
    else:
        diags = list(preconditioner)
        if len(diags) != len(params):
            raise ValueError(f"preconditioner has {len(diags)} tensors for {len(params)} parameters")
    out = []
    for d, p in zip(diags, params):
        if d is None:
            out.append(torch.zeros_like(p))
        else:
            if d.shape != p.shape:
                raise ValueError(f"preconditioner shape {tuple(d.shape)} != parameter shape {tuple(p.shape)}")
            out.append(inverse_sqrt(d.to(p.dtype), torch))
    return out


def adam_step_counts(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[float]:
    """Adam's step count of each of ``params`` (all stepped by ``optimizer``), read with one host read."""
    counts = [optimizer.state[p]["step"] for p in params]
    if all(isinstance(c, Tensor) for c in counts):
        return torch.stack(counts).tolist()
    return [float(c) for c in counts]


def adam_diagonal_by_group(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], dtype: torch.dtype,
                           chunk: int) -> Optional[list[tuple[dict, list[int], float, Callable[[], Tensor]]]]:
    """Adam's ``D = lr_group / P`` for ``params`` (all stepped by ``optimizer``), one flat tensor per param
    group, or per run of its parameters of at most ``chunk`` entries: ``[(group, positions in params, its step
    count, a function that returns D over those parameters flattened and concatenated), ...]``, in ``dtype``,
    the core's formula applied once per run (a few tensor operations instead of a few per parameter). Computed
    when asked for, one run at a time, the runs bound the step's transient memory (the whole model in one piece
    held 3 parameter-sized copies at once behind a 60M-parameter model in a field test). None when a group's
    parameters are at different step counts (their bias corrections differ: use
    :func:`adam_preconditioner_from_optimizer` per parameter). The step counts are read with one host read for
    all groups; the bias corrections are Python doubles."""
    positions: dict[int, list[int]] = {}
    groups: dict[int, dict] = {}
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    for i, p in enumerate(params):
        g = group_of[p]
        positions.setdefault(id(g), []).append(i)
        groups[id(g)] = g
    states = [optimizer.state[p] for p in params]
    counts = adam_step_counts(optimizer, params)
    sizes = [p.numel() for p in params]
    out = []
    for key, group_pos in positions.items():
        g = groups[key]
        step = float(counts[group_pos[0]])
        if any(counts[i] != step for i in group_pos):
            return None
        out += [(g, pos, step, functools.partial(_diagonal, g, [states[i] for i in pos], step, dtype))
                for pos in cut_into_runs(group_pos, sizes, chunk)]
    return out


def _diagonal(group: dict, states: list[dict], step: float, dtype: torch.dtype) -> Tensor:
    """``D = lr_group / P`` over the parameters whose Adam ``states`` are given, flattened and concatenated."""
    v = joined([st["max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"] for st in states]).to(dtype)
    beta1, beta2 = group["betas"]
    pre = adam_preconditioner(v, step, beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]), xp=torch)
    return pre.reciprocal_().mul_(float(group["lr"]))
