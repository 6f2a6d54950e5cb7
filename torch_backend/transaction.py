"""A step as a transaction: what a failing step must undo.

The tuner fills a :class:`Transaction` as its step proceeds (the parameters' values before the step, the
snapshot of the base's state taken before the base stepped — :meth:`torch_backend.workspace.Workspace.take_start`
— and the tuner's global keys it hid from the base); on any exception :meth:`Transaction.rollback` puts the
parameters, the base's state and the module buffers/RNG back bit-exactly (a skipped step undoes the base with
:meth:`Transaction.undo_base` and leaves the generators where the main call left them:
:meth:`torch_backend.buffers.ProbeGuard.rollback`), and on an exception the tuner's watches too (its attributes
named in ``STEP_MEMORY``: a step retried after its closure raised is judged once, not once per attempt).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["fits", "Transaction"]


def fits(b: Optional[Tensor], p: Tensor) -> bool:
    return b is not None and b.shape == p.shape and b.dtype == p.dtype and b.device == p.device


class Transaction:
    """What a failing step must undo (filled in as the step proceeds)."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self.params: Optional[list[Tensor]] = None
        self.w0: Optional[list[Tensor]] = None
        self.base_stepped = False
        self.workspace: Any = None
        self.entries: Optional[list] = None
        self.hidden: Optional[tuple[Tensor, dict]] = None
        self.memory = {name: copy.copy(getattr(tuner, name)) for name in tuner.STEP_MEMORY}

    def undo_base(self) -> None:
        t = self.tuner
        if self.base_stepped:
            self.workspace.restore_snapshot(t.state, self.entries)
            self.base_stepped = False
        if self.params is not None:
            torch._foreach_copy_(self.params, self.w0)
        if self.hidden is not None:
            p0, keys = self.hidden
            t.state[p0].update(keys)
            self.hidden = None

    def rollback(self) -> None:
        with torch.no_grad():
            self.undo_base()
            self.tuner.probe_guard.rollback()
        for name, value in self.memory.items():
            setattr(self.tuner, name, value)
