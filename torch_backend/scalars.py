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
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ScalarNamespace", "host_values", "to_tensors"]

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
        """``x`` as a 0-d tensor of the accumulator dtype on ``device``."""
        return torch.tensor(float(x), dtype=self.dtype, device=device)

    @staticmethod
    def errstate() -> Any:
        return np.errstate(all="ignore")


def host_values(xs: Sequence[Tensor], ns: ScalarNamespace) -> list:
    """The 0-d or 1-d tensors ``xs`` (any floating dtype no wider than the accumulator's) read to the host as
    scalars of the accumulator dtype, in order: one transfer (the step's host sync)."""
    if not xs:
        return []
    acc = ns.dtype
    xs = [x if x.dtype == acc else x.to(acc) for x in xs]
    if len(xs) == 1:
        vals = xs[0].reshape(-1).tolist()
    else:
        vals = torch.cat([x.reshape(-1) for x in xs]).tolist()
    t = ns.scalar
    return [t(v) for v in vals]


def to_tensors(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    """Scalars of the accumulator dtype as 0-d tensors of ``dtype`` on ``device``: one tensor made and split
    (one transfer), so the 0-d tensors share its small storage; nothing writes into them in place."""
    if not values:
        return []
    if device.type == "cpu" and dtype in _NUMPY:
        return list(torch.from_numpy(np.array(values, dtype=_NUMPY[dtype])).unbind())
    return list(torch.tensor([float(v) for v in values], dtype=dtype, device=device).unbind())
