"""Vector arithmetic on lists of tensors (one tensor per parameter), without flattening copies.

The tuners treat the parameters as one vector split into tensors. These helpers return 0-d tensors (no host
sync) and write results in place where the caller provides the storage, so a step allocates nothing of the
parameters' size beyond the buffers the tuner keeps.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["dot", "sq_norm", "norm", "max_abs", "axpy_into", "scalar"]


def scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor with the dtype and device of ``like``."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <x_i, y_i>`` as a 0-d tensor (accumulated per tensor, then summed)."""
    return torch.stack([torch.dot(_flat(x), _flat(y)) for x, y in zip(xs, ys)]).sum()


def _flat(x: Tensor) -> Tensor:
    return x.view(-1) if x.is_contiguous() else x.reshape(-1)


def sq_norm(xs: Sequence[Tensor]) -> Tensor:
    """``sum_i ||x_i||^2`` (one fused norm kernel per call)."""
    return torch.stack(torch._foreach_norm(list(xs))).square().sum()


def norm(xs: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``xs``."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(xs))))


def max_abs(xs: Sequence[Tensor]) -> Tensor:
    """``max_i |x_i|`` over all entries; NaN if any entry is NaN, inf if any is infinite."""
    return torch.stack(torch._foreach_norm(list(xs), float("inf"))).max()


def axpy_into(out: Sequence[Tensor], xs: Sequence[Tensor], a: Tensor, ys: Sequence[Tensor]) -> None:
    """``out_i <- x_i + a * y_i`` with a 0-d tensor ``a`` (rounded as ``fl(x + fl(a y))``, no host sync).

    ``out`` may alias neither ``xs`` nor ``ys``; it is typically the parameters themselves.
    """
    for o, x, y in zip(out, xs, ys):
        torch.addcmul(x, y, a, out=o)
