"""Making the tuners' scalars global under ``torch.distributed`` (DDP), and refusing what is not supported.

Under ``DistributedDataParallel`` every rank holds the same parameters and, after ``backward``, the same
gradient: DDP's own all-reduce averages ``.grad`` over the ranks. So every scalar a tuner computes from
parameters and gradients — the base direction ``u``, ``-g^T u``, the ``fd`` and ``secant`` curvatures,
finite-difference Hessian-vector products, the power iteration's Rayleigh quotients — is already global
and identical on every rank, and must *not* be reduced again. Two kinds of scalar bypass DDP and are
rank-local:

* the **loss** the closure returns (each rank's mean over its own shard of the batch): Polyak's rule, the
  Armijo test and the NaN/Inf check need the global loss;
* anything computed with ``torch.func``/double backward on the bare module (the ``"exact"`` oracle's
  double backward of ``functional_loss``): DDP's gradient hooks never see it.

:class:`DataParallel` reduces exactly those, each once, with one ``all_reduce`` (sum, then divided by the
world size: the global loss is the mean of the ranks' losses when every rank's shard has the same size,
which DDP's gradient averaging assumes as well). The number of reductions is counted in ``calls`` so that
tests can check that nothing is reduced twice.

Sharded parameters (FSDP1 ``FlatParameter`` shards with a sharding strategy other than ``NO_SHARD``, FSDP2
``DTensor`` parameters) would need every dot product and norm over the parameters summed across shards,
which the tuners do not do: :func:`check_params` refuses them at construction with a clear error.
FSDP1 with ``ShardingStrategy.NO_SHARD`` keeps full replicated parameters and averaged gradients (like
DDP) and is supported.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["DataParallel", "resolve", "check_params", "DistributedLike", "SHARDED_MESSAGE"]

DistributedLike = Union[str, None, bool, Any]  # "auto", None/False, or a torch.distributed ProcessGroup

SHARDED_MESSAGE = (
    "{tuner}: the parameters are sharded across ranks ({kind}); the tuners need the full parameter and "
    "gradient vectors on every rank (their dot products and norms are not summed across shards). Use "
    "DistributedDataParallel, or FSDP with sharding_strategy=ShardingStrategy.NO_SHARD, with curvopt's tuners; "
    "sharded FSDP (FSDP1 FULL_SHARD/SHARD_GRAD_OP/HYBRID_SHARD, FSDP2 fully_shard) is not supported.")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class DataParallel:
    """Reduces the rank-local scalars of a data-parallel run (see the module docstring).

    ``mean(x)`` all-reduces a 0-d tensor (sum) and divides by the world size: one collective per call,
    counted in ``calls``. Every rank must call it the same number of times, in the same order, which the
    tuners guarantee because all their control flow depends only on global (identical) values.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = torch.distributed.get_world_size(group)
        self.calls = 0

    def mean(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x).detach().clone()
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.calls += 1
        return x / self.world_size

    def __repr__(self) -> str:
        return f"DataParallel(world_size={self.world_size})"


def resolve(distributed: DistributedLike) -> Optional[DataParallel]:
    """The reducer a tuner uses for ``distributed=``.

    * ``"auto"`` (default): when ``torch.distributed`` is initialized with more than one rank, a data-parallel
      run over the default group (each rank computes the loss on its own shard of the batch, as with DDP);
      otherwise nothing.
    * ``None`` or ``False``: never reduce (e.g. independent runs that happen to share a process group).
    * a ``ProcessGroup``: a data-parallel run over that group.
    """
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, str):
        if distributed != "auto":
            raise ValueError(f"distributed must be 'auto', None/False or a torch.distributed ProcessGroup, "
                             f"got {distributed!r}")
        if not _dist_ready() or torch.distributed.get_world_size() <= 1:
            return None
        return DataParallel(None)
    if distributed is True:
        if not _dist_ready():
            raise ValueError("distributed=True but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return DataParallel(None)
    if not _dist_ready():
        raise ValueError("distributed= was given a process group but torch.distributed is not initialized")
    if torch.distributed.get_world_size(distributed) <= 1:
        return None
    return DataParallel(distributed)


def _sharding_kind(p: Tensor) -> Optional[str]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    if DTensor and isinstance(p, DTensor):
        return "DTensor parameters, e.g. FSDP2 fully_shard"
    if getattr(p, "_is_flat_param", False):
        # FSDP1: a FlatParameter holds this rank's shard unless the strategy is NO_SHARD (then it holds the
        # full flattened parameters)
        full = getattr(p, "_unpadded_unsharded_size", None)
        if full is not None and p.numel() != torch.Size(full).numel():
            return "FSDP1 FlatParameter shards"
    return None


def check_params(params: Sequence[Tensor], tuner: str) -> None:
    """Raise ``NotImplementedError`` (at construction) for sharded parameters the tuners cannot handle."""
    for p in params:
        kind = _sharding_kind(p)
        if kind is not None:
            raise NotImplementedError(SHARDED_MESSAGE.format(tuner=tuner, kind=kind))
