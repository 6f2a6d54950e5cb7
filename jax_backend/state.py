"""The states of the Optax tuners: NamedTuples that hold the per-step statistics and the tuner's memory.

Every state has, as its first fields and with the same meaning as PyTorch's ``opt.stats``, exactly
:data:`curvopt.stats.STAT_FIELDS` (``lr``, ``numerator``, ``curvature``, ``sharpness``,
``preconditioned_sharpness``, ``eos_ratio``, ``skipped``, ``closure_calls``). A number not computed this
step is NaN (after a skipped step: ``lr``, ``numerator``, ``curvature``, ``eos_ratio``); the sharpness keeps
its last estimate between estimates. ``closure_calls`` counts the
evaluations of the loss this step: the value/gradient at ``w`` (given or computed) counts as one, plus one
per extra gradient, forward-over-forward JVP, line-search trial or Hessian-vector product.

Read them with :func:`stats` (a dict of Python-side arrays, found anywhere in a chain's state) or directly
(``state[1].lr`` for ``optax.chain(base, scale_by_cdat())``). The float fields have the dtype of the
parameters (the first leaf's), the counters are ``int32``: the state's dtypes never change from step to
step, so a jitted update never retraces.
"""
from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax

from curvopt.rules import CDATState
from curvopt.stats import STAT_FIELDS

__all__ = ["TunerState", "ArmijoState", "SecantMemory", "SharpnessMemory", "stats", "STAT_FIELDS"]


class SecantMemory(NamedTuple):
    """What the secant oracle keeps from the previous step: its direction ``u``, ``g^T u``, ``||u||^2``.

    The previous learning rate is the state's ``last_lr``.
    """

    direction: Any
    grad_dot_direction: Any
    direction_sq: Any


class SharpnessMemory(NamedTuple):
    """Warm starts of the online power iterations: the last top eigenvectors (unit norm, shaped like the
    parameters) of ``H`` and, for an Adam-like base, of ``P^-1/2 H P^-1/2`` (``None`` otherwise)."""

    eigenvector: Any
    preconditioned_eigenvector: Any


class TunerState(NamedTuple):
    """State of :func:`scale_by_cdat`, :func:`scale_by_quadratic_greedy`, :func:`scale_by_polyak` and
    :func:`scale_by_edge_of_stability`.

    The first eight fields are the statistics (see the module docstring). Internals:

    * ``count``: steps taken (not skipped), ``int32``; the sharpness is estimated on steps
      ``1, 1 + k, 1 + 2k, ...`` of this count (``k = sharpness_every``).
    * ``last_lr``: the learning rate of the last step taken (the stat ``lr`` is NaN after a skipped step;
      this one is what the secant oracle and the edge-of-stability rule remember).
    * ``ascent_steps``: steps whose incoming direction ``d`` had ``g^T d < 0``, i.e. ``u = -d`` pointed
      uphill. Occasional ones are normal with momentum; one on the first step means the chain before the
      tuner already negated the direction (e.g. ``optax.sgd(1.0)`` instead of ``optax.identity()``/a
      ``scale_by_*`` base): the tuner then picks ``lr = 0``; :func:`stats` warns when it reads
      ``ascent_steps == count`` and ``warn_ascent=True`` makes the step itself warn.
    * ``rule``: CDAT's moving averages (:class:`curvopt.rules.CDATState`), ``None`` for the other tuners.
    * ``secant``: :class:`SecantMemory` with the ``"secant"`` oracle, else ``None``.
    * ``sharpness_memory``: :class:`SharpnessMemory` when online sharpness is on, else ``None``.
    """

    lr: Any
    numerator: Any
    curvature: Any
    sharpness: Any
    preconditioned_sharpness: Any
    eos_ratio: Any
    skipped: Any
    closure_calls: Any
    count: Any
    last_lr: Any
    ascent_steps: Any
    rule: CDATState | None
    secant: SecantMemory | None
    sharpness_memory: SharpnessMemory | None


class ArmijoState(NamedTuple):
    """State of :func:`scale_by_armijo`: the statistics, then ``count``, ``ascent_steps``,
    ``sharpness_memory`` as in :class:`TunerState`, and ``search``, the state of the wrapped
    ``optax.scale_by_backtracking_linesearch`` (its ``learning_rate`` is the last accepted one and
    ``info.num_linesearch_steps`` the trials of the last search). ``curvature`` is NaN (not computed).
    ``last_lr`` mirrors the search's learning rate."""

    lr: Any
    numerator: Any
    curvature: Any
    sharpness: Any
    preconditioned_sharpness: Any
    eos_ratio: Any
    skipped: Any
    closure_calls: Any
    count: Any
    last_lr: Any
    ascent_steps: Any
    sharpness_memory: SharpnessMemory | None
    search: Any


assert TunerState._fields[: len(STAT_FIELDS)] == STAT_FIELDS
assert ArmijoState._fields[: len(STAT_FIELDS)] == STAT_FIELDS

_STATES = (TunerState, ArmijoState)


def stats(opt_state: Any) -> dict[str, Any]:
    """The statistics of the first curvopt tuner state found in ``opt_state`` (any chain/nesting), as a
    dict keyed by :data:`curvopt.stats.STAT_FIELDS`. Raises ``ValueError`` when there is none.

    Read on the host (concrete values), it also warns when every step so far had an uphill direction
    (``ascent_steps == count > 0``): the chain before the tuner negated the updates and ``lr`` is 0.
    """
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, _STATES))
             if isinstance(s, _STATES)]
    if not found:
        raise ValueError("no curvopt tuner state (TunerState/ArmijoState) in the given optimizer state")
    state = found[0]
    if not isinstance(state.count, jax.core.Tracer):
        count, ascent = int(state.count), int(state.ascent_steps)
        if count > 0 and ascent == count:
            from .direction import NEGATED_DIRECTION_MESSAGE
            warnings.warn(NEGATED_DIRECTION_MESSAGE.replace("on its first step", f"on all {count} steps"),
                          RuntimeWarning, stacklevel=2)
    return {name: getattr(state, name) for name in STAT_FIELDS}
