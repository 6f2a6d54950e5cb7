"""The precision a closure computes its loss in, seen from inside (PyTorch's counterpart of the Optax backend's
jaxpr reading, :func:`jax_backend.oracles.computation_eps`).

A ``torch.autocast(bfloat16)`` forward pass computes in bfloat16 while the parameters stay float32: a
finite-difference displacement sized for float32 is then rounded away in the forward pass (the ``fd`` curvature
was off by a median 46-127 % per seed behind Adam on a digits MLP, worst 66x, with sign flips). The torch
function mode below watches one call and records the floating dtypes of the operations' outputs that require
grad (that depend on the parameters: the batch's own preprocessing does not count) and that the returned loss was
computed through (a bfloat16 metric logged beside a float32 loss does not count: it sized the probe 256x too
large, the greedy rates up to 36 % off). Closure-free there is no call to watch: :func:`gradient_eps` reads the
precision from the gradients (:mod:`curvopt.precision`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from curvopt.precision import gradient_compute_eps, sample_stride, within_budgets

from .vectors import global_sum

__all__ = ["computation_eps", "gradient_eps"]


#: the key of the dtypes seen while ``torch.compile`` traces the call: they count whatever the loss's graph (reading
#: an output's ``grad_fn`` there broke the compiled BatchNorm model's graph, and its probes no longer replayed it)
_TRACED = object()


class _GradDtypes(TorchFunctionMode):
    """The floating dtypes of the outputs that require grad, by the autograd node that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[Any, set[torch.dtype]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point():
                self.made.setdefault(_TRACED if torch.compiler.is_compiling() else t.grad_fn, set()).add(t.dtype)
        return out


def _graph_of(loss: Any) -> set | None:
    """The autograd nodes ``loss`` was computed through (its graph's structure outlives the backward pass); None
    when it is no tensor with a graph (a closure that returns a detached loss or a number)."""
    root = getattr(loss, "grad_fn", None)
    if root is None:
        return None
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(child for child, _ in node.next_functions)
    return seen


def computation_eps(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), eps)``: ``eps`` the machine epsilon of the least precise floating dtype among the outputs of the
    torch operations ``fn`` ran that require grad and that its result was computed through (every such output
    where the result has no graph, and every one ``torch.compile`` traced), 0.0: none."""
    with _GradDtypes() as mode:
        out = fn()
    graph = _graph_of(out)
    dtypes = {d for node, ds in mode.made.items() if graph is None or node is _TRACED or node in graph for d in ds}
    return out, max((torch.finfo(d).eps for d in dtypes), default=0.0)


def gradient_eps(grads: Sequence[torch.Tensor], terms: int = 1) -> float:
    """The precision the forward pass behind ``grads`` computed in, as the core reads it from them
    (:func:`curvopt.precision.gradient_compute_eps`, from at most :data:`curvopt.precision.SAMPLE_ENTRIES`
    entries of each tensor): a machine epsilon, 0.0 when nothing shows a half dtype.
    ``terms``: the number of gradients averaged into ``grads`` (the data-parallel world size), which widens each
    dtype's budget of significant bits (:func:`curvopt.precision.significant_bit_budgets`)."""
    wide = [g for g in grads if g.dtype in (torch.float32, torch.float64) and not g.is_sparse]
    if not wide:
        return 0.0

    def counts_of(g: torch.Tensor) -> torch.Tensor:
        g = g.reshape(-1)[::sample_stride(g.numel())]
        nonzero = g != 0
        return torch.stack([torch.count_nonzero(nonzero)]
                           + [torch.count_nonzero(w & nonzero) for w in within_budgets(g, terms, torch)])

    counts = torch.stack([counts_of(g) for g in wide]).sum(0)
    nonzero, *representable = global_sum(counts).tolist()  # over every shard; one host read
    return float(gradient_compute_eps(nonzero, representable, np))
