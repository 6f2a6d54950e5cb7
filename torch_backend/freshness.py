"""Whether the gradients a closure-free step reads came from a new backward pass into zeroed gradients.

A bare torch optimizer steps on whatever ``.grad`` holds, and two slips in a training loop leave it training: a
second ``opt.step()`` on one backward (the same gradient twice) and a forgotten ``zero_grad`` (each step's gradient
the sum of every backward so far). The closure-free secant compares consecutive gradients, so on the first it reads
the gradient against itself (curvature 0, averaged in) and on the second the difference of two sums, the newest
gradient alone, whose slope along the last step is a descent's: a negative curvature, which the concave re-probe
answers by doubling the rate each step. A field test, CDAT behind SGD on an MLP on the digits, 30 steps: the loss
281 with each step taken twice and 765 without ``zero_grad``, against 0.14 (bare SGD with the same slips: 0.36 and
0.0008).

Autograd's version counter tells both apart from a normal step: every in-place write to a tensor advances it, a
backward that accumulates into an existing gradient by one, ``zero_grad(set_to_none=False)`` by one more, and
``zero_grad()`` (``set_to_none=True``, the default) hands the next backward a new tensor. :class:`GradientMarks`
records each gradient tensor and its version as a step leaves them; at the next closure-free step

* every gradient the same tensor at the same version: no backward ran since (``"stale"``). Writes through
  ``.data`` (``p.grad.data.copy_(g)``), which autograd does not count, look the same: the tuner skips the step only
  where the gradient it kept from the last step (behind Adam, for the noise correction) shows the values unchanged,
  and otherwise warns once and steps (a field test's loop that wrote through ``.data`` had 149 of 150 steps
  skipped by a first version that trusted the count alone);
* every gradient the same tensor, one write further: one backward accumulated into the last step's gradients,
  unzeroed (``"accumulated"``). Writing a new gradient in place (``p.grad.copy_(g)``, a functional loop's habit)
  looks the same, but its secant is seldom not positive (1-2 % of steps on a ReLU MLP, against 25-61 % with a
  forgotten ``zero_grad``): the tuner warns once :data:`ACCUMULATED_MISSES` of the last
  :data:`ACCUMULATED_WINDOW` such steps read a curvature that is not positive (one such step warned on 10 of 10
  seeds of ``copy_`` behind momentum SGD).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

from torch import Tensor

__all__ = ["GradientMarks", "STALE_GRADIENT_MESSAGE", "UNCONFIRMED_STALE_MESSAGE", "ACCUMULATED_GRADIENT_MESSAGE",
           "ACCUMULATED_WINDOW", "ACCUMULATED_MISSES"]

#: the accumulated steps the forgotten-``zero_grad`` warning looks back over, and how many of them must read a
#: curvature that is not positive
ACCUMULATED_WINDOW = 10
ACCUMULATED_MISSES = 3

STALE_GRADIENT_MESSAGE = (
    "no backward pass since the last step: the gradients are the ones it stepped on (the same tensors, unchanged), "
    "so the step is skipped (the closure-free secant would compare the gradient with itself). Call loss.backward() "
    "once before each opt.step()")

UNCONFIRMED_STALE_MESSAGE = (
    "{tuner}: the gradients are the tensors the last step read, unchanged by autograd's count: was there no backward "
    "pass since? A second opt.step() on one backward has the closure-free secant compare the gradient with itself "
    "(a curvature of 0, averaged in): call loss.backward() once before each opt.step(). Gradients written through "
    ".data (p.grad.data.copy_(g)), which autograd does not count, look the same: then ignore this, or assign them "
    "(p.grad = g)")

ACCUMULATED_GRADIENT_MESSAGE = (
    "{tuner}: the gradients were not zeroed since the last step: one backward pass accumulated into the gradient "
    "tensors the last step read, and the secant of consecutive gradients then reads the newest gradient alone (here "
    "curvatures that are not positive; the rate grows each step and the run diverges). Call optimizer.zero_grad() "
    "before each backward (or after each step). If you write the gradients in place yourself (p.grad.copy_(g)), "
    "each step's own, this warning is a false alarm: assign them (p.grad = g) instead")


class GradientMarks:
    """The gradient tensors of a list of parameters and their versions, as a step left them (weak references: the
    marks keep no gradient alive); also what :class:`torch_backend.buffers.ProbeGuard` reads to tell a closure that
    computed nothing (:meth:`same_tensors`)."""

    def __init__(self) -> None:
        self._marks: Optional[list] = None

    def take(self, params: Sequence[Tensor]) -> None:
        self._marks = [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]

    def clear(self) -> None:
        self._marks = None

    def same_tensors(self, params: Sequence[Tensor]) -> bool:
        """Whether every parameter has the gradient tensor marked (None both times); their values may have changed
        in place."""
        marks = self._marks
        return marks is not None and len(marks) == len(params) and all(
            (mark is None) if p.grad is None else (mark is not None and mark[0]() is p.grad)
            for p, mark in zip(params, marks))

    def compare(self, params: Sequence[Tensor]) -> Optional[str]:
        """``"stale"``, ``"accumulated"`` (module docstring) or None (new gradients, or nothing to compare:
        no marks, other parameters)."""
        marks = self._marks
        if marks is None or len(marks) != len(params):
            return None
        advanced = set()
        for p, mark in zip(params, marks):
            g = p.grad
            if g is None:
                continue
            if mark is None or mark[0]() is not g:
                return None
            advanced.add(g._version - mark[1])
        if advanced == {0}:
            return "stale"
        return "accumulated" if advanced == {1} else None
