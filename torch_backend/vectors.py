"""Vector arithmetic on lists of tensors (one tensor per parameter), without flattening copies.

The tuners treat the parameters as one vector split into tensors. These helpers return 0-d tensors (no host
sync) and write results in place where the caller provides the storage, so a step allocates nothing of the
parameters' size beyond the buffers the tuner keeps. :class:`ListOps` is the vector algebra the core's power
iteration (:mod:`curvopt.eigen`) runs on.

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

from curvopt import runs

__all__ = ["least_precise_eps", "dot", "dots", "flat_dots", "norms", "flat_norms", "sq_norm", "local_sq_norm", "norm",
           "max_abs", "axpy", "axpy_into", "reducing", "concatenating", "concatenating_now",
           "can_concatenate", "global_sum", "joined", "ListOps"]

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


def global_sum(x: Tensor) -> Tensor:
    """``x``, a sum over this rank's parameters, summed over the ranks' shards inside :func:`reducing` with sharded
    parameters (else unchanged: replicated parameters' sums are already global)."""
    r = _SHARDS.get()
    return x if r is None else r.sum_(x)


_LOW = (torch.float16, torch.bfloat16)


def _acc(x: Tensor) -> Tensor:
    """bf16/fp16 tensors are read in float32 for reductions (the tuners' scalars are at least float32)."""
    return x.float() if x.dtype in _LOW else x


def _flat(x: Tensor) -> Tensor:
    return x.view(-1) if x.is_contiguous() else x.reshape(-1)


def joined(xs: Sequence[Tensor]) -> Tensor:
    """The tensors' entries as one flat tensor: a view of a single contiguous tensor (``torch.cat`` copies even
    one: behind a 5M-parameter model, whose runs are single tensors, such copies were 3-4 % of a closure-free
    step's CPU time in a profile, within the step time's run-to-run spread), else their concatenation. Read
    it, do not write to it."""
    return _flat(xs[0]) if len(xs) == 1 else torch.cat([_flat(x) for x in xs])


#: below this many entries (and with one dtype and device) a tuner's dot products concatenate their operands:
#: one kernel instead of one per tensor, for small models whose step is dispatch-bound (:func:`concatenating`);
#: the core's run size (:data:`curvopt.runs.CONCAT_BELOW`), here so that tests can lower it for this backend
CONCAT_BELOW = runs.CONCAT_BELOW
_CONCAT: ContextVar[bool] = ContextVar("curvopt_concat_dots", default=False)


def can_concatenate(params: Sequence[Tensor]) -> bool:
    """Whether dot products over ``params`` (and vectors shaped like them) may concatenate their operands (not
    before lazy modules have materialised their parameters: their sizes are unknown)."""
    if any(isinstance(p, torch.nn.parameter.UninitializedTensorMixin) for p in params):
        return False
    return len({(p.dtype, p.device) for p in params}) == 1 and sum(p.numel() for p in params) < CONCAT_BELOW


def concatenating_now() -> bool:
    """Whether the step running now concatenates its dot products (inside :func:`concatenating`)."""
    return _CONCAT.get()


@contextmanager
def concatenating(flag: bool) -> Iterator[None]:
    """Within the block, :func:`dot` concatenates its operands when ``flag`` (see :func:`can_concatenate`)."""
    token = _CONCAT.set(flag)
    try:
        yield
    finally:
        _CONCAT.reset(token)


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <x_i, y_i>`` as a 0-d tensor (real inner product)."""
    if len(xs) == 1:
        return global_sum(torch.dot(_flat(_acc(xs[0])), _flat(_acc(ys[0]))))
    if _CONCAT.get():
        return global_sum(torch.dot(_acc(torch.cat([_flat(x) for x in xs])), _acc(torch.cat([_flat(y) for y in ys]))))
    return global_sum(torch.stack([torch.dot(_flat(_acc(x)), _flat(_acc(y))) for x, y in zip(xs, ys)]).sum())


def dots(pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> Tensor:
    """``[dot(xs, ys) for xs, ys in pairs]`` as one 1-d tensor: each distinct operand list is concatenated once
    (when :func:`concatenating`) and a sharded run reduces the vector with one collective."""
    if _CONCAT.get():
        flat: dict[int, Tensor] = {}

        def cat(xs: Sequence[Tensor]) -> Tensor:
            k = id(xs)
            if k not in flat:
                flat[k] = _acc(joined(xs))
            return flat[k]
        out = torch.stack([torch.dot(cat(xs), cat(ys)) for xs, ys in pairs])
    else:
        out = torch.stack([torch.stack([torch.dot(_flat(_acc(x)), _flat(_acc(y))) for x, y in zip(xs, ys)]).sum()
                           for xs, ys in pairs])
    return global_sum(out)


def flat_dots(pairs: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """:func:`dots` over vectors already concatenated (1-d tensors, e.g. a tuner's flat buffers), as a list of
    0-d tensors (a sharded run reduces them with one collective): the same values as :func:`dots` of the lists
    they concatenate, under :func:`concatenating`."""
    acc: dict[int, Tensor] = {}

    def read(x: Tensor) -> Tensor:
        k = id(x)
        if k not in acc:
            acc[k] = _acc(x)
        return acc[k]
    out = [torch.dot(read(x), read(y)) for x, y in pairs]
    return out if _SHARDS.get() is None else list(global_sum(torch.stack(out)).unbind())


def norms(*lists: Sequence[Tensor]) -> list[Tensor]:
    """``[norm(xs) for xs in lists]`` with one fused norm kernel for all of them (same values)."""
    if _SHARDS.get() is not None or any(x.dtype in _LOW for xs in lists for x in xs):
        return [norm(xs) for xs in lists]
    each = torch.stack(torch._foreach_norm([x for xs in lists for x in xs]))
    out, o = [], 0
    for xs in lists:
        out.append(torch.linalg.vector_norm(each[o:o + len(xs)]))
        o += len(xs)
    return out


def flat_norms(xs: Sequence[Tensor]) -> list[Tensor]:
    """:func:`norms` of vectors already concatenated (1-d tensors, e.g. a tuner's flat buffers): one fused
    kernel; equal to :func:`norms` of the lists they concatenate up to rounding."""
    if _SHARDS.get() is not None:
        return [norm([x]) for x in xs]
    return list(torch._foreach_norm([_acc(x) for x in xs]))


def local_sq_norm(xs: Sequence[Tensor]) -> Tensor:
    """``sum_i ||x_i||^2`` on this process alone (no collective): one fused norm kernel, or one inner product for
    a single contiguous tensor (a flat buffer)."""
    if len(xs) == 1 and xs[0].is_contiguous():
        a = _acc(xs[0]).view(-1)
        return torch.dot(a, a)
    return torch.stack(torch._foreach_norm([_acc(x) for x in xs])).square().sum()


def sq_norm(xs: Sequence[Tensor]) -> Tensor:
    """``sum_i ||x_i||^2`` (one fused norm kernel per call)."""
    return global_sum(torch.stack(torch._foreach_norm([_acc(x) for x in xs])).square().sum())


def norm(xs: Sequence[Tensor]) -> Tensor:
    """The Euclidean norm of the concatenation of ``xs``."""
    if _SHARDS.get() is not None:
        return sq_norm(xs).sqrt()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([_acc(x) for x in xs])))


def max_abs(xs: Sequence[Tensor]) -> Tensor:
    """``max_i |x_i|`` over all entries (0 when there are none); NaN if any entry is NaN, inf if any is infinite.

    From each tensor's ``aminmax``: on CPU the infinity norm (``torch._foreach_norm(xs, inf)``) took 1.4-1.5 ms on
    600k float32 entries, the extrema 0.12-0.23 ms (one tensor / 54 tensors)."""
    ends = [e for x in xs if x.numel() for e in torch.aminmax(x)]
    if not ends:
        return torch.zeros((), dtype=xs[0].dtype, device=xs[0].device)
    if len({e.dtype for e in ends}) > 1:
        ends = [e.to(torch.float64) for e in ends]
    local = torch.stack(ends).abs().max()
    r = _SHARDS.get()
    return local if r is None else r.max_abs_(local)


def axpy_into(out: Sequence[Tensor], xs: Sequence[Tensor], a: Tensor, ys: Sequence[Tensor]) -> None:
    """``out_i <- x_i + a * y_i`` with a 0-d tensor ``a`` (rounded as ``fl(x + fl(a y))``, no host sync).

    ``out`` may alias neither ``xs`` nor ``ys``; it is typically the parameters themselves.
    """
    for o, x, y in zip(out, xs, ys):
        axpy(x, y, a, o)


def axpy(x: Tensor, y: Tensor, a: Tensor, out: Tensor) -> None:
    """``out <- x + a * y`` with a 0-d tensor ``a``, one kernel. In float16 two: ``addcmul`` would cast ``a`` to
    float16 first, and a rate above 65504 (behind a group lr of 1e-4 the rate is 1e4 times the effective one)
    became inf and the parameters NaN; ``mul`` reads a 0-d ``a`` at float32 and rounds only the product."""
    if x.dtype == torch.float16:
        torch.add(x, torch.mul(y, a), out=out)
    else:
        torch.addcmul(x, y, a, out=out)


_EPS: dict[torch.dtype, float] = {}


def least_precise_eps(params: Sequence[Tensor]) -> float:
    """Machine epsilon of the least precise parameter dtype: a finite-difference displacement must be
    representable in every parameter, so its size follows the coarsest one."""
    out = 0.0
    for d in {p.dtype for p in params}:
        eps = _EPS.get(d)
        if eps is None:
            eps = _EPS[d] = torch.finfo(d).eps
        out = max(out, eps)
    return out


class ListOps:
    """The vector algebra of :class:`curvopt.eigen.VectorOps` on lists of tensors."""

    @staticmethod
    def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return dot(a, b)

    @staticmethod
    def scale(s: Tensor, a: Sequence[Tensor]) -> list[Tensor]:
        return list(torch._foreach_mul(list(a), s))

    @staticmethod
    def axpy(a: Sequence[Tensor], s: Tensor, b: Sequence[Tensor]) -> list[Tensor]:
        return list(torch._foreach_add(list(a), torch._foreach_mul(list(b), s)))

    @staticmethod
    def select(pred: Tensor, a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
        return [torch.where(pred, x, y) for x, y in zip(a, b)]
