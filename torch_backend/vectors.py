"""Vector arithmetic on lists of tensors (one tensor per parameter), without flattening copies.

The tuners treat the parameters as one vector split into tensors. These helpers return 0-d tensors (no host
sync) and write results in place where the caller provides the storage, so a step allocates nothing of the
parameters' size beyond the buffers the tuner keeps.

Sharded parameters (FSDP1 ``FULL_SHARD``): inside :func:`reducing` with a sharded reducer (the tuner's step
runs there), ``dot``, ``sq_norm``, ``norm`` and ``max_abs`` are reductions over the *global* vector: each
all-reduces its rank-local partial result once (see :mod:`torch_backend.distributed`). Outside it, or with
no/replicated (DDP) reducer, they are purely local and issue no collective.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["accumulator_dtype", "least_precise_eps", "dot", "sq_norm", "norm", "max_abs", "axpy_into", "scalar",
           "reducing"]

#: the reducer of sharded parameters while a tuner step runs (None: reductions are local)
_SHARDS: ContextVar[Optional[Any]] = ContextVar("curvopt_shard_reducer", default=None)


@contextmanager
def reducing(reducer: Optional[Any]) -> Iterator[None]:
    """Within the block, reductions over parameter vectors are summed (max for ``max_abs``) across the
    ranks by ``reducer`` (a :class:`torch_backend.distributed.DataParallel`) if it is ``sharded``; with a
    replicated reducer or ``None`` nothing changes."""
    token = _SHARDS.set(reducer if reducer is not None and getattr(reducer, "sharded", False) else None)
    try:
        yield
    finally:
        _SHARDS.reset(token)


def _global_sum(x: Tensor) -> Tensor:
    r = _SHARDS.get()
    return x if r is None else r.sum_(x)


def scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor with the dtype and device of ``like``."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <x_i, y_i>`` as a 0-d tensor (accumulated per tensor, then summed)."""
    return _global_sum(torch.stack([torch.dot(_flat(_acc(x)), _flat(_acc(y))) for x, y in zip(xs, ys)]).sum())


def _acc(x: Tensor) -> Tensor:
    """bf16/fp16 tensors are read in float32 for reductions (the tuners' scalars are at least float32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _flat(x: Tensor) -> Tensor:
    return x.view(-1) if x.is_contiguous() else x.reshape(-1)


def sq_norm(xs: Sequence[Tensor]) -> Tensor:
    """``sum_i ||x_i||^2`` (one fused norm kernel per call)."""
    return _global_sum(torch.stack(torch._foreach_norm([_acc(x) for x in xs])).square().sum())


def norm(xs: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``xs``."""
    if _SHARDS.get() is not None:
        return sq_norm(xs).sqrt()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([_acc(x) for x in xs])))


def max_abs(xs: Sequence[Tensor]) -> Tensor:
    """``max_i |x_i|`` over all entries; NaN if any entry is NaN, inf if any is infinite."""
    local = torch.stack(torch._foreach_norm(list(xs), float("inf"))).max()
    r = _SHARDS.get()
    return local if r is None else r.max_abs_(local)


def axpy_into(out: Sequence[Tensor], xs: Sequence[Tensor], a: Tensor, ys: Sequence[Tensor]) -> None:
    """``out_i <- x_i + a * y_i`` with a 0-d tensor ``a`` (rounded as ``fl(x + fl(a y))``, no host sync).

    ``out`` may alias neither ``xs`` nor ``ys``; it is typically the parameters themselves.
    """
    for o, x, y in zip(out, xs, ys):
        torch.addcmul(x, y, a, out=o)


_LOW = (torch.float16, torch.bfloat16)


def accumulator_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The dtype of the tuners' own scalars (learning rate, moving averages, dot products, statistics): the
    widest floating dtype of the parameters and at least float32 (bf16/fp16 parameters accumulate in
    float32)."""
    out = torch.float32
    for p in params:
        if p.is_floating_point():
            out = torch.promote_types(out, p.dtype)
    return out


def least_precise_eps(params: Sequence[Tensor]) -> float:
    """Machine epsilon of the least precise parameter dtype: a finite-difference displacement must be
    representable in every parameter, so its size follows the coarsest one."""
    return max(torch.finfo(p.dtype).eps for p in params)
