"""The step's scalar arithmetic on the host: the core's formulas over NumPy scalars of the accumulator dtype.

A tuner step computes a few dozen scalars (the rule's moving averages and guards, the secant and the
finite-difference quotients, the ratio to the edge of stability). As 0-d torch tensors each operation is a
dispatch of several microseconds; the rule alone cost about as much as a small model's base step. The step
therefore reads its reductions to the host once (it needs one host sync anyway, to decide whether to skip)
and evaluates the core's formulas with :class:`ScalarNamespace` as the array namespace ``xp``, over
``numpy.float32``/``numpy.float64`` scalars (the tuner's accumulator dtype).

The results are bit-identical to the same formulas on 0-d torch tensors of that dtype: ``+ - * /`` and
``sqrt`` are correctly rounded IEEE operations in both, a Python number meets a scalar of the accumulator
dtype the same way in both (it is converted to that dtype first: NumPy's NEP 50 promotion, torch's wrapped
numbers), and ``where`` returns the chosen operand converted to the accumulator dtype as ``torch.where`` does.
Floating-point warnings (overflow, ``inf - inf``) are silenced as torch never raises them.

What a step commits goes back into the tuner's state as 0-d tensors written in place (:class:`ScalarStore`),
whose host values the next step reads without a transfer.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ScalarNamespace", "host_values", "as_scalar", "ScalarStore"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


class ScalarNamespace:
    """``xp`` for the core's formulas over NumPy scalars of one dtype (``where``, ``isfinite``, ``sqrt``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.scalar = _NUMPY[dtype]

    def __call__(self, x: Any) -> Any:
        """``x`` (a Python number, a NumPy scalar or a 0-d tensor) as a scalar of the accumulator dtype."""
        t = self.scalar
        if type(x) is t:
            return x
        if isinstance(x, Tensor):
            x = x.item()
        return t(x)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        r = a if cond else b
        return r if type(r) is self.scalar else self(r)

    @staticmethod
    def isfinite(x: Any) -> np.bool_:
        return np.bool_(math.isfinite(x))

    def sqrt(self, x: Any) -> Any:
        return np.sqrt(self(x))

    def tensor(self, x: Any, device: torch.device) -> Tensor:
        """``x`` as a 0-d tensor of the accumulator dtype on ``device`` (on the CPU a NumPy scalar array's
        memory: no torch operation)."""
        if device.type == "cpu":
            return torch.from_numpy(np.array(x, dtype=self.scalar))
        return torch.tensor(float(x), dtype=self.dtype, device=device)

    @staticmethod
    def errstate() -> Any:
        return np.errstate(all="ignore")


def host_values(xs: Sequence[Tensor], ns: ScalarNamespace) -> list:
    """The 0-d or 1-d tensors ``xs`` (any floating dtype no wider than the accumulator's) read to the host as
    scalars of the accumulator dtype, in order: one transfer (the step's host sync), after one ``stack`` (all
    0-d) or ``cat`` (else) when there are several."""
    if not xs:
        return []
    acc = ns.dtype
    xs = [x if x.dtype == acc else x.to(acc) for x in xs]
    if len(xs) == 1:
        vals = xs[0].tolist() if xs[0].dim() else [xs[0].item()]
    elif all(x.dim() == 0 for x in xs):
        vals = torch.stack(xs).tolist()
    else:
        vals = torch.cat([x.reshape(-1) for x in xs]).tolist()
    t = ns.scalar
    return [t(v) for v in vals]


def as_scalar(x: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` (a loss: a number or a tensor of one element) as a detached 0-d tensor of ``dtype`` on ``device``,
    with no further operation when it already is one."""
    t = (x if isinstance(x, Tensor) else torch.as_tensor(x)).detach()
    if t.dim() or t.dtype != dtype or t.device != device:
        t = t.to(device=device, dtype=dtype).reshape(())
    return t


class ScalarStore:
    """The scalars a step commits (the learning rate, the rule's state, the secant's memory) as 0-d tensors
    written in place instead of made anew: the views of two small tensors of the accumulator dtype, used in
    turn, so that the views the state holds until a commit assigns the new ones are never written while a
    step runs (a step that raises keeps them). On the CPU a write goes through a NumPy array sharing the
    tensor's memory (no torch operation), elsewhere it is one host-to-device copy. ``key`` names the layout
    (which scalar each position holds); a step whose layout differs makes a new store. The values written
    are kept on the host (:meth:`host`) as the tensors hold them: a value of another precision (a group lr as a
    Python float) reads back rounded to the store's dtype, as it does from a loaded state, so a resumed run
    continues bit for bit."""

    def __init__(self, key: Any, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.key = key
        np_dtype = _NUMPY.get(dtype) if device.type == "cpu" else None
        self._arrays: list[Any] = []
        self._flats: list[Tensor] = []
        self._views: list[Sequence[Tensor]] = []
        self._index: dict[int, tuple[int, int]] = {}
        for k in range(2):
            array = np.zeros(n, dtype=np_dtype) if np_dtype is not None else None
            flat = torch.from_numpy(array) if array is not None else torch.zeros(n, dtype=dtype, device=device)
            self._arrays.append(array)
            self._flats.append(flat)
            self._views.append(flat.unbind())
            self._index.update({id(v): (k, i) for i, v in enumerate(self._views[k])})
        self._values: list[Sequence[Any]] = [(), ()]
        self._versions = [-1, -1]
        self._next = 0

    def write(self, values: Sequence[Any]) -> Sequence[Tensor]:
        """0-d tensors holding ``values`` (scalars of the accumulator dtype, in layout order): the views of the
        tensor not written last time."""
        k = self._next
        self._next = 1 - k
        flat = self._flats[k]
        array = self._arrays[k]
        if array is not None:
            array[:] = values
        else:
            array = np.array([float(v) for v in values], dtype=_NUMPY[flat.dtype])
            flat.copy_(torch.from_numpy(array))
        self._values[k] = tuple(array)  # as stored (rounded to the dtype), as a state loaded later reads them
        self._versions[k] = flat._version
        return self._views[k]

    def host(self, t: Tensor) -> Any:
        """The host value last written to ``t`` if ``t`` is one of the views and nothing modified it in place
        since (torch bumps the version counter the views of a tensor share); else None."""
        where = self._index.get(id(t))
        if where is None:
            return None
        k, i = where
        if self._views[k][i] is not t or t._version != self._versions[k]:
            return None
        return self._values[k][i]
