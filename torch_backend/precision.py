"""The precision a closure computes its loss in, seen from inside (PyTorch's counterpart of the Optax backend's
jaxpr reading, :func:`jax_backend.oracles.computation_eps`).

A ``torch.autocast(bfloat16)`` forward pass computes in bfloat16 while the parameters stay float32: a
finite-difference displacement sized for float32 is then rounded away in the forward pass (the ``fd`` curvature
was off by a median 46-127 % per seed behind Adam on a digits MLP, worst 66x, with sign flips). The torch
function mode below watches one call and records the floating dtypes of the operations' outputs that require
grad (that depend on the parameters: the batch's own preprocessing does not count).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["computation_eps", "gradient_eps"]

#: the half-precision dtypes an autocast forward pass computes in, coarsest first
_HALF = (torch.bfloat16, torch.float16)


class _GradDtypes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


def computation_eps(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), eps)``: ``eps`` the machine epsilon of the least precise floating dtype among the outputs of the
    torch operations ``fn`` ran that require grad (0.0: none)."""
    with _GradDtypes() as mode:
        out = fn()
    return out, max((torch.finfo(d).eps for d in mode.seen), default=0.0)


def gradient_eps(grads: Sequence[torch.Tensor], min_entries: int = 64) -> float:
    """The machine epsilon of the coarsest half-precision dtype (bfloat16, then float16) in which some wider
    gradient is exactly representable in each of its nonzero entries (at least ``min_entries`` of them); 0.0 if
    none is.

    Closure-free, the forward pass ran before ``step``, so its precision cannot be watched
    (:func:`computation_eps`). An autocast forward pass leaves its trace in the gradients, though: the gradient
    of a parameter whose operation ran in bfloat16 is a bfloat16 tensor cast up, every entry representable in
    bfloat16, which an entry computed in float32 is with a chance of 2^-16. Parameters whose operations autocast
    keeps in float32 (normalisation layers) do not count against it. A gradient rescaled by a factor that is not
    a power of two (an outside ``clip_grad_norm_``, accumulated micro-batches) loses the trace: 0.0 then."""
    out = 0.0
    for g in grads:
        if g.dtype not in (torch.float32, torch.float64) or g.is_sparse:
            continue
        nonzero = g[g != 0]
        if nonzero.numel() < min_entries:
            continue
        for d in _HALF:
            eps = torch.finfo(d).eps
            if eps > out and bool(torch.equal(nonzero.to(d).to(g.dtype), nonzero)):
                out = eps
                break
    return out
