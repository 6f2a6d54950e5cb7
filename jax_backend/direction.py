"""The base direction and the little tree algebra the tuners need on top of ``optax.tree``.

The tuner receives the incoming updates ``d`` (gradient-like, as ``scale_by_adam``/``trace`` produce them);
the descent direction is ``u = -d``. A chain that already negated ``d`` (e.g. ``optax.sgd(1.0)`` before the
tuner) hands an ascent direction: ``-g^T u = g^T d < 0``. The rules clip that numerator to 0 (``lr = 0``);
the tuners count such steps in ``ascent_steps`` (``ascent_steps == steps`` means every step so far was
uphill), :func:`jax_backend.stats` warns on the host when it reads that, and with ``warn_ascent=True`` the step
itself warns through ``jax.debug.callback`` (jit-safe but a host callback per step, so opt-in) on the first
step; a tuner built around its base (the conveniences) checks the base's sign when ``init`` runs on concrete
parameters (:func:`warn_if_base_negates`).

Inside ``optax.masked``/``optax.multi_transform`` the tuner sees the parameters with the masked-out leaves
replaced by ``optax.MaskedNode`` (a node without leaves); :func:`like_params` brings a full tree handed as an
extra argument (``grad=``) to that structure.
"""
from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from curvopt.config import accumulator_dtype_name
from curvopt.runs import CONCAT_BELOW, concat_limit, cut_into_runs

from .control import concrete, cond
from .warning import warn

__all__ = ["accumulator_dtype", "least_precise_eps", "incoming", "vdot", "runs_vdot", "flat", "norm", "add_scaled",
           "scaled", "has_masked", "like_params", "moving_leaves", "moved", "warn_if_negated", "warn_if_base_negates",
           "base_update_at_init", "NEGATED_DIRECTION_MESSAGE"]

_NEGATED = (
    "curvopt: the direction handed to the tuner is an ascent direction {evidence}: the "
    "chain before it probably already negated the updates (e.g. optax.sgd(1.0)). The tuner replaces "
    "optax.scale_by_learning_rate: chain it after a scale_by_* base (optax.scale_by_adam(), optax.trace(...), "
    "optax.identity() for gradient descent). With the paper's guard the learning rate is 0; the state's "
    "ascent_steps counts such steps.")
NEGATED_DIRECTION_MESSAGE = _NEGATED.format(evidence="on its first step (g^T d < 0)")


def accumulator_dtype(params: Any) -> Any:
    """The dtype of the tuner's own scalars (:func:`curvopt.config.accumulator_dtype_name`)."""
    return jnp.dtype(accumulator_dtype_name(str(jnp.result_type(x)) for x in jax.tree.leaves(params)))


def least_precise_eps(params: Any) -> float:
    """Machine epsilon of the coarsest floating dtype in ``params``: a finite-difference displacement must be
    representable in every parameter."""
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(params)]
    eps = [float(jnp.finfo(d).eps) for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return max(eps, default=float(jnp.finfo(jnp.float32).eps))


def vdot(a: Any, b: Any, dtype: Any) -> Any:
    """``a^T b`` accumulated in ``dtype`` (0 for empty trees): one reduction per run of concatenated leaves
    (:func:`flat`, :func:`runs_vdot`; a small tree on one device is one run), rather than ``optax.tree.vdot``'s one
    per leaf. XLA:CPU compiles each per-leaf reduction as a kernel of its own and copies the sum of the partial
    results into every consumer's kernel; one reduction over the whole tree (the concatenation fuses into it) keeps
    the jitted update's compile time close to the bare base's. ``b`` must have ``a``'s structure."""
    if not jax.tree.leaves(a):
        return jnp.zeros((), dtype)
    return runs_vdot(flat(a, dtype), flat(b, dtype, like=a)).astype(dtype)


def runs_vdot(a: tuple, b: tuple) -> Any:
    """``a^T b`` of two trees of real arrays of one structure and shapes (the runs of :func:`flat`): one
    ``tensordot`` over every axis of each array, as ``optax.tree.vdot`` means to, without raveling: a ravel of an
    array split across devices along another than its first axis (a weight matrix split by columns over a
    ``model`` mesh axis) gathers it whole on every device. (optax 0.2.8 ravels with jnp.vdot under any JAX from
    0.10: its test ``jax.__version__ < '0.7.2'`` compares strings. Measured in a field test, a 2.1M-parameter MLP
    split 4 ways by columns: ``cdat`` behind Adam closure-free held 90 MiB of temporaries per device, one device
    unsplit 65 MiB, bare ``optax.adam`` 2 MiB.) The concatenation of smaller leaves into one run would gather them
    as well, so with more than one device :func:`flat` keeps every leaf in its own shape (an MLP of four 2^18-entry
    weights split 4 ways: 90 all-gathers of whole weights per step and 59 MiB of temporaries per device before,
    none and 6 MiB after)."""
    dots = jax.tree.map(lambda x, y: jnp.tensordot(x, y, jnp.ndim(x), precision=jax.lax.Precision.HIGHEST), a, b)
    return jax.tree.reduce(operator.add, dots, initializer=0)


def flat(tree: Any, dtype: Any, like: Any = None) -> tuple:
    """The leaves of ``tree`` (taken in the order of ``like``'s structure when given) cast to ``dtype``, in runs:
    a tuple of arrays, each the consecutive leaves of at most :data:`curvopt.runs.CONCAT_BELOW` entries raveled
    and concatenated into a vector, or a larger leaf alone in its own shape (raveling an array split across
    devices gathers it, see :func:`runs_vdot`). With more than one device (``jax.device_count()``: a leaf may be
    split across them, and the trace does not tell) every leaf is a run of its own, in its own shape
    (:func:`curvopt.runs.concat_limit`). The cut is :func:`curvopt.runs.cut_into_runs` of the leaf sizes of
    ``like``, else of ``tree``, so two trees of one structure are cut alike. The tuners' inner products
    and elementwise formulas over a whole tree run on the runs (``optax.tree`` arithmetic): a small tree is one run,
    one XLA:CPU kernel (the concatenation fuses into its consumer) instead of one per leaf (see :func:`vdot`); on a
    large tree (5M-60M parameters in a field test) the concatenation was materialised, temporaries of 5-13
    parameter sizes, where runs keep them within a few runs. A leaf that ``tree`` masks out where ``like`` has an
    array (a base state inside the base's own ``optax.masked``/``multi_transform``: the frozen part of the tree
    has no moments) reads as zeros."""
    ref = jax.tree.leaves(tree if like is None else like)
    leaves = ref if like is None else jax.tree.structure(like).flatten_up_to(tree)
    parts = [jnp.zeros(jnp.shape(y), dtype) if _is_masked(x) else jnp.asarray(x).astype(dtype)
             for x, y in zip(leaves, ref)]
    return tuple(parts[run[0]] if len(run) == 1 else jnp.concatenate([jnp.ravel(parts[i]) for i in run])
                 for run in _runs(ref))


def _runs(ref: list) -> list:
    """The runs (of leaf indices) :func:`flat` cuts the leaves ``ref`` into."""
    sizes = [jnp.size(x) for x in ref]
    return cut_into_runs(range(len(sizes)), sizes, concat_limit(jax.device_count(), CONCAT_BELOW))


def moving_leaves(direction: Any, gradient: Any, like: Any = None) -> tuple:
    """False on every entry of a leaf the base froze (its ``direction`` 0 everywhere while its ``gradient`` is
    not), True elsewhere, in :func:`flat`'s runs of ``like`` (default ``gradient``; a run of one leaf: one
    scalar). A part the base freezes (``optax.set_to_zero`` inside it) takes no part in the share of the gradient
    the base saw, the noise metric's products or Adam's numerators (:func:`moved`), as a PyTorch param group at
    lr 0 takes none (its rate multiplier is 0). What a batch leaves at 0 counts, as in PyTorch: an entry inside a
    moving leaf (an embedding row missing from the batch), a whole leaf without gradient (a task head the batch
    does not use; reviews found an entry-wise, then a direction-only mask 18-57 % off PyTorch's rates there).
    Behind Adam under ``multi_transform`` or ``masked`` a frozen part's gradient counted in the share (its masked
    moments read as 0): closure-free CDAT's rate fell 12-60x in a field test (a frozen body with 11x the head's
    gradient norm); behind ``chain(scale_by_adam(), masked(set_to_zero(), body))``, whose moments cover the body,
    its noise and its momentum terms counted too, the rate about 0. The masked copies cost two more leaf-sized
    temporaries closure-free (test_large_trees)."""
    like = gradient if like is None else like
    ref = jax.tree.leaves(like)
    structure = jax.tree.structure(like)
    keep = [jnp.any(u != 0) | jnp.all(g == 0)
            for u, g in zip(structure.flatten_up_to(direction), structure.flatten_up_to(gradient))]
    # cut as flat() cuts: a leaf alone in its run gets a scalar (no parameter-sized mask to keep)
    return tuple(keep[run[0]] if len(run) == 1 else
                 jnp.concatenate([jnp.broadcast_to(keep[i], (jnp.size(ref[i]),)) for i in run]) for run in _runs(ref))


def moved(x: Any, mask: Any) -> Any:
    """``x`` (flat) where ``mask`` (:func:`moving_leaves`) is true, 0 elsewhere."""
    return tuple(jnp.where(m, v, 0) for v, m in zip(x, mask))


def norm(a: Any, dtype: Any) -> Any:
    return jnp.sqrt(vdot(a, a, dtype))


def abs_max(a: Any, dtype: Any) -> Any:
    """``max_i |a_i|`` over the whole tree in ``dtype`` (0 for an empty tree), one reduction per run (see
    :func:`vdot`): ``optax.tree.norm(a, ord="inf")`` is three kernels per leaf."""
    if not jax.tree.leaves(a):
        return jnp.zeros((), dtype)
    return optax.tree.max(jax.tree.map(jnp.abs, flat(a, dtype)))


def scaled(s: Any, a: Any) -> Any:
    """``s a`` in ``a``'s dtypes."""
    return optax.tree.cast_like(optax.tree.scale(s, a), a)


def add_scaled(a: Any, s: Any, b: Any) -> Any:
    """``a + s b`` in ``a``'s dtypes."""
    return optax.tree.cast_like(optax.tree.add_scale(a, s, b), a)


def incoming(updates: Any, params: Any) -> Any:
    """The incoming direction ``d`` in the parameters' dtypes (JVP tangents must match their primals). The tuners
    keep ``d`` and write ``u = -d`` into their formulas as sign flips (``-g^T u = g^T d``, ``w + h u = w - h d``):
    a negated copy of every leaf would be one more XLA:CPU kernel per leaf, compiled and run each step, for
    bit-identical results (negation is exact)."""
    return optax.tree.cast_like(updates, params)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked(params: Any) -> bool:
    """Whether ``params`` is a masked view (``optax.masked``/``multi_transform``)."""
    return any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked))


def merge_masked(trees: list) -> Any:
    """One tree from masked views of the same tree (``multi_transform``'s groups): each leaf from the first view
    that has it (still masked where none has)."""
    return jax.tree.map(lambda *xs: next((x for x in xs if not _is_masked(x)), xs[0]), *trees, is_leaf=_is_masked)


def fill_masked(tree: Any, like: Any, value: float) -> Any:
    """``tree`` with its masked-out leaves replaced by ``value`` in the shape of ``like``'s (unmasked ones kept)."""
    return jax.tree.map(lambda x, y: jnp.full(jnp.shape(y), value, jnp.result_type(y)) if _is_masked(x) and not
                        _is_masked(y) else x, tree, like, is_leaf=_is_masked)


def like_params(tree: Any, params: Any) -> Any:
    """``tree`` with the leaves that ``params`` masks out replaced by ``MaskedNode`` (no-op when unmasked)."""
    if tree is None or not has_masked(params) or has_masked(tree):
        return tree
    return jax.tree.map(lambda p, t: p if _is_masked(p) else t, params, tree, is_leaf=_is_masked)


#: how many updates :func:`warn_if_base_negates` takes while they are exactly zero (a schedule warming up from 0)
NEGATION_CHECK_UPDATES = 3


def warn_if_base_negates(base: Any, base_state: Any, params: Any) -> None:
    """At ``init`` of a tuner built around ``base`` (:func:`jax_backend.with_base_state`, the conveniences), on
    concrete parameters: warn when the base's first update of an all-ones gradient points uphill (``1^T d <
    0``), as ``optax.adam(1e-3)`` or ``optax.sgd(0.1)`` in place of ``optax.scale_by_adam()`` or
    ``optax.identity()`` do: the tuner's rate would be 0 on every step, and inside ``jax.jit`` the step itself
    cannot tell (only :func:`jax_backend.stats` or ``warn_ascent=True`` would). An update of exactly zero (a
    learning-rate schedule that warms up from 0, ``optax.adamw(optax.linear_schedule(0.0, 1e-3, 100))``) tells
    nothing, so up to :data:`NEGATION_CHECK_UPDATES` updates are taken, each from the state the last one left
    (a field test: no warning there, and the rate stayed 0 on every step). Skipped under tracing (a jitted
    ``init``, or one traced with the parameters closed over: ``jax.eval_shape(lambda: tx.init(params))``, where
    the parameters are concrete but the arrays made from them are not) and for a base whose update cannot run on
    that gradient alone (it needs extra arguments): the check is a diagnostic and never stops ``init``."""
    state = base_state
    for _ in range(NEGATION_CHECK_UPDATES):
        taken = base_update_at_init(base, state, params)
        if taken is None:
            return
        d, state = taken
        slope = float(vdot(jax.tree.map(jnp.ones_like, params), d, jnp.float32))
        if slope < 0:
            warn(_NEGATED.format(evidence="(the base's update of an all-ones gradient is negative)"))
        if slope != 0:
            return


def base_update_at_init(base: Any, base_state: Any, params: Any, scale: float = 1.0) -> tuple[Any, Any] | None:
    """``base.update`` of an all-``scale`` gradient from ``base_state``: ``(direction, new state)``, or None under
    tracing (a jitted ``init``, or one traced with the parameters closed over, where the arrays made from them are
    not concrete), for no parameters, and for a base whose update cannot run on that gradient alone (it needs extra
    arguments). The init-time checks' (:func:`warn_if_base_negates`, :func:`jax_backend.tuner.with_base_state`'s
    betas), which never stop ``init``."""
    if not jax.tree.leaves(params):
        return None
    ones = jax.tree.map(lambda x: jnp.full_like(x, scale), params)
    if not concrete(params, ones, base_state):
        return None
    try:
        return base.update(ones, base_state, params)
    except Exception:  # noqa: BLE001 -- a base that needs more than (updates, state, params): no check
        return None


def _warn(flag: Any) -> None:
    if bool(flag):
        warn(NEGATED_DIRECTION_MESSAGE)


def warn_if_negated(numerator: Any, steps: Any, enabled: bool) -> Any:
    """Whether the direction points uphill; with ``enabled``, warn (host callback) if it does on the first
    step."""
    if enabled:
        flag = (numerator < 0) & (steps == 0)
        cond(flag, lambda: jax.debug.callback(_warn, flag), lambda: None)
    return numerator < 0
