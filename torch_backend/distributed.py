"""Making the tuners' scalars global under ``torch.distributed`` (DDP), and refusing what is not supported.

Under ``DistributedDataParallel`` every rank holds the same parameters and, after ``backward``, the same
gradient: DDP's own all-reduce averages ``.grad`` over the ranks. So every scalar a tuner computes from
parameters and gradients — the base direction ``u``, ``-g^T u``, the ``fd`` and ``secant`` curvatures,
finite-difference Hessian-vector products, the power iteration's Rayleigh quotients — is already global
and identical on every rank, and must *not* be reduced again. Two kinds of scalar bypass DDP and are
rank-local:

* the **loss** the closure returns (each rank's mean over its own shard of the batch): Polyak's rule, the
  Armijo test and the NaN/Inf check need the global loss;
* anything computed by differentiating ``functional_loss`` on the bare module (the ``"exact"`` oracle's
  double backward): DDP's gradient hooks never see it.

:class:`DataParallel` reduces exactly those, each once, with one ``all_reduce`` (sum, then divided by the
world size: the global loss is the mean of the ranks' losses when every rank's shard has the same size,
which DDP's gradient averaging assumes as well). The number of reductions is counted in ``calls`` so that
tests can check that nothing is reduced twice.

Sharded parameters (FSDP1 ``FlatParameter`` shards with ``FULL_SHARD``/``SHARD_GRAD_OP`` and
``use_orig_params=False``): each rank holds one shard of every (flattened) parameter and of its averaged
gradient, so every dot product, squared norm, norm and max-abs over the parameters is a sum (a max) of the
ranks' partial results. The reducer then knows it is ``sharded``, and the tuner's step runs inside
:func:`torch_backend.vectors.reducing`, which makes :func:`~torch_backend.vectors.dot`,
:func:`~torch_backend.vectors.sq_norm`, :func:`~torch_backend.vectors.norm` and
:func:`~torch_backend.vectors.max_abs` all-reduce their partial result once (``sum_`` / ``max_abs_``). Every
scalar built from them (``-g^T u``, the ``fd`` step ``h`` from the global norms, the ``fd``/``secant``
curvatures, the power iteration's inner products) is then global. Under DDP or ``NO_SHARD`` nothing
changes (replicated parameters: their dot products are already global and must not be summed again).

Not supported, refused by :func:`check_params` at construction with a clear error: FSDP2 ``DTensor``
parameters (``fully_shard``), FSDP1 with ``use_orig_params=True`` on more than one rank (the optimizer then
holds each rank's views of its shard, or full copies under ``NO_SHARD``, and nothing on them tells which),
sharding that does not split each flat parameter evenly over the reducer's
group (``HYBRID_SHARD``/``_HYBRID_SHARD_ZERO2``: replicas would be summed twice), ``distributed=None`` with
sharded parameters, and the ``"exact"`` oracle on sharded parameters (its double backward needs the full
parameters).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["DataParallel", "resolve", "check_params", "comm_hooks", "DistributedLike", "SHARDED_MESSAGE",
           "COMM_HOOK_MESSAGE"]

DistributedLike = Union[str, None, bool, Any]  # "auto", None/False, or a torch.distributed ProcessGroup

SHARDED_MESSAGE = (
    "{tuner}: the parameters are sharded across ranks ({kind}), which curvopt's tuners do not support: {why}. "
    "Supported: DistributedDataParallel, FSDP1 with sharding_strategy=ShardingStrategy.NO_SHARD, and FSDP1 "
    "FULL_SHARD/SHARD_GRAD_OP with use_orig_params=False (flat parameter shards, dot products and norms summed "
    "across the ranks); not supported: FSDP2 fully_shard (DTensor parameters), FSDP1 with use_orig_params=True, "
    "HYBRID_SHARD.")

COMM_HOOK_MESSAGE = (
    "{tuner}: the DistributedDataParallel model the closure runs has a communication hook ({hooks}) that changes "
    "the gradients it averages; the tuner's curvature reads that change (an fp16 compression's rounding: rates "
    "19 % off to 0 in a field test; PowerSGD's error feedback, which every probe runs through: 57-470x low). "
    "Register no such hook (nor DDP's mixed_precision=, which adds one) on a model a tuner steps.")


def comm_hooks(modules: Sequence[torch.nn.Module]) -> list[str]:
    """The names of the communication hooks other than plain averaging (``allreduce_hook``) registered on the
    ``DistributedDataParallel`` modules among ``modules`` and their submodules (``fp16_compress_hook``, PowerSGD's:
    the gradients the tuner reads are then not the averaged ones)."""
    from torch.nn.parallel import DistributedDataParallel

    return [getattr(hook, "__name__", type(hook).__name__) for root in modules for m in root.modules()
            if isinstance(m, DistributedDataParallel) for hook, _ in getattr(m, "_comm_hooks", ())
            if getattr(hook, "__name__", "") != "allreduce_hook"]


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DataParallel:
    """Reduces the rank-local scalars of a data-parallel run (see the module docstring).

    ``mean(x)`` all-reduces a 0-d tensor (sum) and divides by the world size: one collective per call,
    counted in ``calls``. Every rank must call it the same number of times, in the same order, which the
    tuners guarantee because all their control flow depends only on global (identical) values.
    """

    def __init__(self, group: Any = None, sharded: bool = False) -> None:
        self.group = group
        self.world_size = torch.distributed.get_world_size(group)
        #: whether the parameters are sharded (FSDP1 FULL_SHARD): reductions over them are then summed
        self.sharded = sharded
        self.calls = 0

    def sum_(self, x: Tensor) -> Tensor:
        """A sharded parameter reduction's partial result (0-d) summed over the ranks (one all_reduce)."""
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.calls += 1
        return x

    def max_abs_(self, x: Tensor) -> Tensor:
        """The maximum over the ranks of a partial ``max |x_i|`` (one all_reduce); NaN if any rank's is NaN
        (a collective MAX need not propagate NaN, so NaN travels as a flag)."""
        both = torch.stack([torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x),
                            torch.isnan(x).to(x.dtype)])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.calls += 1
        return torch.where(both[1] > 0, torch.full_like(x, float("nan")), both[0])

    def mean(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).detach().clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.calls += 1
        return x / self.world_size

    def __repr__(self) -> str:
        return f"DataParallel(world_size={self.world_size}, sharded={self.sharded})"


def resolve(distributed: DistributedLike, params: Sequence[Tensor] = ()) -> Optional[DataParallel]:
    """The reducer a tuner uses for ``distributed=``.

    * ``"auto"`` (default): when ``torch.distributed`` is initialized with more than one rank, a data-parallel
      run over the default group (each rank computes the loss on its own shard of the batch, as with DDP);
      otherwise nothing. The tuners resolve it again at each step while it is nothing, so a process group set up
      after the tuner is found (DDP wraps a model built before it).
    * ``None`` or ``False``: never reduce (e.g. independent runs that happen to share a process group).
    * a ``ProcessGroup``: a data-parallel run over that group.

    The reducer is ``sharded`` when some of ``params`` are FSDP1 flat-parameter shards (read only when there is
    a reducer: ``"auto"`` without a process group costs no pass over the parameters, at every step it is resolved).
    """
    def sharded() -> bool:
        return any(_sharding_kind(p) is not None for p in params)
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, str):
        if distributed != "auto":
            raise ValueError(f"distributed must be 'auto', None/False or a torch.distributed ProcessGroup, "
                             f"got {distributed!r}")
        if not _dist_ready() or torch.distributed.get_world_size() <= 1:
            return None
        return DataParallel(None, sharded())
    if distributed is True:
        if not _dist_ready():
            raise ValueError("distributed=True but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return DataParallel(None, sharded())
    if not _dist_ready():
        raise ValueError("distributed= was given a process group but torch.distributed is not initialized")
    if torch.distributed.get_world_size(distributed) <= 1:
        return None
    return DataParallel(distributed, sharded())


def _sharding_kind(p: Tensor) -> Optional[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    if DTensor and isinstance(p, DTensor):
        return "DTensor parameters, e.g. FSDP2 fully_shard"
    if getattr(p, "_fsdp_flattened", False) and not getattr(p, "_is_flat_param", False):
        # FSDP1 marks the original parameters it flattened; they reach the optimizer only with use_orig_params=True
        return "FSDP1 with use_orig_params=True"
    if getattr(p, "_is_flat_param", False):
        # FSDP1: a FlatParameter holds this rank's shard unless the strategy is NO_SHARD (then it holds the
        # full flattened parameters)
        full = getattr(p, "_unpadded_unsharded_size", None)
        if full is not None and p.numel() != torch.Size(full).numel():
            return "FSDP1 FlatParameter shards"
    return None


def check_params(params: Sequence[Tensor], tuner: str, reducer: Optional[DataParallel] = None,
                 curvature: Optional[str] = None) -> None:
    """Raise ``NotImplementedError`` (at construction) for sharded parameters the tuners cannot handle."""
    for p in params:
        kind = _sharding_kind(p)
        if kind is None:
            continue
        why = None
        if kind.startswith("DTensor"):
            why = "their local shards are not read through DTensor's API"
        elif kind.endswith("use_orig_params=True"):
            if not _dist_ready() or torch.distributed.get_world_size() <= 1:
                continue  # one rank holds the full parameters
            why = ("each rank's parameters are views of its own shard (FULL_SHARD, SHARD_GRAD_OP: shapes differ "
                   "between the ranks) or full copies (NO_SHARD), which cannot be told apart from the parameters; "
                   "wrap the model with use_orig_params=False")
        elif reducer is None:
            why = ("distributed=None (or a one-rank group) with sharded parameters: their dot products and "
                   "norms must be summed across the ranks; pass distributed='auto' or the FSDP process group")
        elif curvature == "exact":
            why = ('the "exact" oracle differentiates functional_loss twice, which needs the full parameters; '
                   'use curvature="fd" or "secant"')
        else:
            # FSDP1 pads the flat parameter to a multiple of the world size and gives each rank one chunk
            full = torch.Size(getattr(p, "_unpadded_unsharded_size")).numel()
            if p.numel() != -(-full // reducer.world_size):
                why = ("the flat parameter is not split evenly over the reducer's process group "
                       "(HYBRID_SHARD, or a group other than FSDP's): shards would be summed twice or missed")
        if why is not None:
            raise NotImplementedError(SHARDED_MESSAGE.format(tuner=tuner, kind=kind, why=why))
