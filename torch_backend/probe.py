"""One step as the curvature oracles, the line search and the sharpness see it: a :class:`Probe`.

A probe carries what evaluating the loss away from ``w`` needs — the closure, the parameters that have a
gradient this step, their values ``w0`` at the start of the step, the base direction ``u``, the main call's
loss and gradient, the guard that protects module buffers and the random state
(:class:`torch_backend.buffers.ProbeGuard`), and the reducer of a data-parallel run — and nothing else: it
holds no reference to the tuner, so the oracles (:mod:`torch_backend.oracles`) and the sharpness
(:mod:`torch_backend.sharpness`) import neither the tuner nor each other's internals.

Moving the parameters (:meth:`Probe.move`) writes ``w0 + a u`` into them; the tuner's step writes the final
``w0 + lr u`` (or restores ``w0`` if the step fails), so a probe never restores anything itself.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .buffers import ProbeGuard
from .scalars import as_scalar
from .vectors import axpy, axpy_into, dot, flat_dots

__all__ = ["Probe", "move_flat"]


def move_flat(params: Sequence[Tensor], w0: Tensor, u: Tensor, scratch: Tensor, views: Sequence[Tensor],
              a: Tensor) -> None:
    """Parameters <- ``w0 + a * u`` for flat ``w0`` and ``u`` (one kernel into ``scratch``, whose per-parameter
    ``views`` are then copied into the parameters): the same rounding as :func:`axpy_into` per parameter."""
    axpy(w0, u, a, scratch)
    torch._foreach_copy_(list(params), list(views))


class Probe:
    """See the module docstring. ``loss``: the main call's loss, a 0-d tensor of the accumulator dtype;
    ``numerator``: ``-g^T u``, a host scalar; ``all_params`` and ``index``: every parameter of the tuner in
    ``param_groups`` order and the positions of ``params`` in it (for a functional loss over all of them)."""

    def __init__(self, closure: Callable[[], Tensor], params: Sequence[Tensor], grads: Sequence[Tensor],
                 w0: Sequence[Tensor], u: Sequence[Tensor], loss: Tensor, numerator: Any, guard: ProbeGuard,
                 reducer: Optional[Any], all_params: Sequence[Tensor], index: Sequence[int],
                 flat: Optional[tuple[Tensor, Tensor, Tensor, Sequence[Tensor]]] = None) -> None:
        self.closure = closure
        self.params, self.grads, self.w0, self.u = list(params), list(grads), list(w0), list(u)
        self.loss, self.numerator = loss, numerator
        self.guard, self.reducer = guard, reducer
        self.all_params, self.index = list(all_params), list(index)
        #: ``(w0, u, scratch, scratch's per-parameter views)`` when ``w0`` and ``u`` are views of flat buffers
        self.flat = flat
        #: the fd oracle's step and its probe's loss (None until it ran)
        self.fd_step: Any = None
        self.fd_loss: Optional[Tensor] = None

    # -- moving and calling ------------------------------------------------------------------------------
    def move(self, a: Tensor, direction: Optional[Sequence[Tensor]] = None) -> None:
        """Parameters <- ``w0 + a * direction`` (``u`` by default)."""
        if direction is None and self.flat is not None:
            move_flat(self.params, *self.flat, a)
            return
        axpy_into(self.params, self.w0, a, self.u if direction is None else direction)

    def at_start(self) -> None:
        """Parameters <- ``w0``, exactly."""
        torch._foreach_copy_(self.params, self.w0)

    def call(self) -> Tensor:
        """The closure at the current parameters (a probe: buffers and RNG protected); its rank-local loss in
        the dtype of the main loss. The gradients are then in ``.grad`` (:meth:`gradient`)."""
        for p in self.params:
            p.grad = None
        out = self.guard.probe(self.closure)
        return as_scalar(out, self.loss.dtype, self.loss.device)

    def loss_at(self, a: Tensor) -> Tensor:
        """``f(w0 + a u)``, global (the mean over the ranks of a data-parallel run)."""
        self.move(a)
        return self.global_mean(self.call())

    def call_at(self, a: float) -> tuple[Tensor, Tensor]:
        """The closure called at ``w0 + a u`` (a probe; ``a = 0``: again at ``w0``): its loss and ``g^T u``, both
        global. The gradients the previous call left in ``.grad`` are put back afterwards, so a check leaves the
        step what it read."""
        kept = [p.grad for p in self.params]
        try:
            loss = self.loss_at(torch.tensor(a, dtype=self.loss.dtype, device=self.loss.device))
            return loss, self.gradient_dot_u()
        finally:
            for p, g in zip(self.params, kept):
                p.grad = g

    def gradient_dot_u(self) -> Tensor:
        """``g^T u`` for the gradient of the last call (0 where a parameter got none), global."""
        if self.flat is None:
            return dot(self.gradient(), self.u)
        _, u, scratch, views = self.flat
        torch._foreach_copy_(list(views), self.gradient())
        return flat_dots([(scratch, u)])[0]

    def gradient(self, take: bool = False) -> list[Tensor]:
        """The gradient of the last call (zeros where a parameter got none); ``take=True`` also detaches it
        from ``.grad`` so the caller may overwrite it."""
        out = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if take:
            for p in self.params:
                p.grad = None
        return out

    # -- helpers -------------------------------------------------------------------------------------------
    def global_mean(self, x: Tensor) -> Tensor:
        """A rank-local scalar (a probe's loss, a double-backward curvature) made global: the mean over the
        ranks of a data-parallel run (one all_reduce), unchanged in a single process."""
        return x if self.reducer is None else self.reducer.mean(x)

    def protected(self, fn: Callable[[], Tensor]) -> Tensor:
        """Run ``fn`` (not a closure call, e.g. a functional loss) protected like a probe."""
        return self.guard.protect(fn)

    def all_points_and_directions(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(w0, u)`` over all the tuner's parameters in ``param_groups`` order (``u = 0`` where no gradient)."""
        pos = {i: k for k, i in enumerate(self.index)}
        ws, us = [], []
        for i, p in enumerate(self.all_params):
            k = pos.get(i)
            if k is not None:
                ws.append(self.w0[k].detach())
                us.append(self.u[k])
            else:
                ws.append(p.detach())
                us.append(torch.zeros_like(p))
        return tuple(ws), tuple(us)
