"""A step as a transaction: what a failing step must undo, and the snapshot of the base's state it restores.

The tuner fills a :class:`Transaction` as its step proceeds (the parameters' values before the step, whether
the base has stepped, the tuner's global keys it hid from the base); on any exception — and on a skipped step —
:meth:`Transaction.rollback` puts the parameters, the base's state and the module buffers/RNG back bit-exactly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import state as layout

__all__ = ["fits", "BaseSnapshot", "Transaction"]


def fits(b: Optional[Tensor], p: Tensor) -> bool:
    return b is not None and b.shape == p.shape and b.dtype == p.dtype and b.device == p.device


class BaseSnapshot:
    """The base's state of the parameters it is about to step, restorable bit-exactly (the copies' storage is
    allocated once and reused)."""

    def __init__(self) -> None:
        self._copies: list[Tensor] = []
        self._ids: list[int] = []
        self.entries: list[tuple[Tensor, Optional[dict]]] = []
        self.tensors: list[Tensor] = []

    def take(self, state: dict, params: list[Tensor]) -> None:
        entries, tensors = [], []
        for p in params:
            st = state.get(p)
            if not st:
                entries.append((p, None))
                continue
            entries.append((p, st.copy()))
            for k, v in st.items():
                if type(v) is Tensor and not (type(k) is str and k.startswith(layout.PREFIX)):
                    tensors.append(v)
        ids = [id(t) for t in tensors]
        if ids != self._ids:  # the base's tensors changed (first steps, a load): check and reallocate
            copies = self._copies
            if len(copies) != len(tensors) or not all(fits(c, t) for c, t in zip(copies, tensors)):
                self._copies = [torch.empty_like(t) for t in tensors]
            self._ids = ids
        if tensors:
            torch._foreach_copy_(self._copies, tensors)
        self.entries, self.tensors = entries, tensors

    def restore(self, state: dict) -> None:
        """The base's tensors and entries as taken (the tuner writes its own keys only at the commit, so the
        whole entry can be put back)."""
        if self.tensors:
            torch._foreach_copy_(self.tensors, self._copies)
        for p, saved in self.entries:
            st = state.get(p)
            if saved is None:
                if st is not None:
                    del state[p]
            elif st is None:
                state[p] = saved
            else:
                st.clear()
                st.update(saved)
        self.entries = []  # (self.tensors stays referenced: their ids cannot be reused by new tensors)


class Transaction:
    """What a failing step must undo (filled in as the step proceeds)."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner
        self.params: Optional[list[Tensor]] = None
        self.w0: Optional[list[Tensor]] = None
        self.base_stepped = False
        self.hidden: Optional[tuple[Tensor, dict]] = None

    def undo_base(self) -> None:
        t = self.tuner
        if self.base_stepped:
            t._snapshot.restore(t.state)
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
            self.tuner.guard.rollback()
