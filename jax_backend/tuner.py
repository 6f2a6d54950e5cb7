"""What every Optax tuner's update shares, and the combinator that hands the base's state to a tuner.

Each tuner is one flat function (``scale_by_cdat``, ...) with its own state; its update runs, in the order
the PyTorch tuners use (so that both backends produce the same sequence):

1. :func:`prepare`: value and gradient at ``w`` (given, else from ``value_fn``), the incoming updates ``d``
   (``u = -d``), ``numerator = -g^T u``, and whether the step can be taken at all: the value (when known),
   the gradient **and the direction** must be finite;
2. the tuner's own work (curvature oracle, online sharpness, line search) and its rule through
   :func:`curvopt.rules.apply_rule`, which owns the guard (a non-finite input the rule needs gives ``lr = 0``
   and leaves the rule state unchanged);
3. :func:`finish`: updates ``lr * u`` and the stats; or, for a step that cannot be taken, :func:`skip`: zero
   updates, ``skipped + 1``, every other piece of state untouched. The two are combined by :func:`select`
   (no host branching; a skipped step's NaNs are discarded).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvopt import rules
from curvopt.base import UNLIKE_SCALE, BaseMethod, adam_betas_seen, adam_update_unlike, as_base_method
from curvopt.config import (EXTERNAL_CLIP_MESSAGE_OPTAX, OUTSIDE_MOTION_MESSAGE_OPTAX, REPLAY_MESSAGE_OPTAX,
                            SECANT_COLLAPSE_MESSAGE, SECANT_STALL_MESSAGE, SKIP_MESSAGE, ZERO_GRADIENT_SKIP,
                            SharpnessConfig, ZeroRateWatch, collapse_sustained, resolve_curvature, watch_zero_rate,
                            zero_rate_message)
from curvopt.bound_watch import BoundWatch, bound_messages, watch_bound
from curvopt.minibatch_watch import minibatch_message
from curvopt.stats import STAT_FIELDS, TunerStats

from .control import concrete, cond
from .direction import (NEGATED_DIRECTION_MESSAGE, base_update_at_init, fill_masked, has_masked, incoming,
                        least_precise_eps, like_params, scaled, vdot, warn_if_base_negates, warn_if_negated)
from .loss import (bind, check_fits_params, check_loss_agrees, check_params_whole, misspelled_keywords,
                   value_and_grad_at)
from .noise import find_trace_state
from .oracles import loss_reads_params
from .sharpness import (EigenMemory, find_adam_state, group_rate_scales, online_sharpness,
                        preconditioner_from_adam_state)
from .warning import warn

__all__ = ["Prepared", "prepare", "oracle_for", "sharpness_of", "stats_init", "finish", "bound_init", "bound_watched",
           "zero_rate_init", "zero_rate_watched", "ascent_count", "skip", "select", "pick", "transform", "check_state",
           "STATE_MISMATCH_MESSAGE", "Sharpness", "with_base_state", "check_base_method", "convenience", "stats",
           "fresh_leaves"]


class Prepared(NamedTuple):
    """One step's inputs: ``f`` (``params -> loss``, or None), ``value`` (0-d accumulator dtype, NaN when not
    known), ``grad``, ``d`` (the incoming direction, ``u = -d``; :func:`jax_backend.direction.incoming`),
    ``numerator = -g^T u = g^T d``, ``finite`` (the step can be taken), ``dtype``, ``masked`` (the tuner sees a
    masked view of the parameters) and ``extra_calls`` (1 when the value was computed here from ``value_fn`` by
    a forward pass of its own, beside the gradient handed over; counted in ``closure_calls``)."""

    f: Callable[[Any], Any] | None
    value: Any
    grad: Any
    d: Any
    numerator: Any
    finite: Any
    dtype: Any
    masked: bool
    extra_calls: int


def prepare(tuner: str, updates: Any, params: Any, dtype: Any, *, value: Any, grad: Any, value_fn: Any,
            extra_args: dict, need_value: bool, want_value: bool = False) -> Prepared:
    """The step's :class:`Prepared` inputs. A missing loss value is computed from ``value_fn`` (one forward
    pass) when ``need_value`` (an error without ``value_fn``), or when ``want_value`` and ``value_fn`` is usable
    (not inside ``optax.masked``, where the tuner sees part of the parameters)."""
    if params is None:
        raise ValueError(f"{tuner} needs params: update(updates, state, params, ...)")
    masked = has_masked(params)
    if masked and value_fn is not None:  # at trace time
        warn(f"{tuner}: inside optax.masked/multi_transform value_fn is not used: it takes the whole "
             "parameter tree and the tuner sees only its part. The curvature is the closure-free secant's, "
             "which assumes the other parts do not move between steps (a frozen part); another optimizer "
             "on the other part changes this part's gradients and the secant reads that as curvature")
    for key, meant in misspelled_keywords(extra_args, value_fn).items():  # at trace time
        warn(f"{tuner}: update() got {key}=, which the tuner does not take (did you mean {meant}=?) and value_fn "
             "does not accept, so it is ignored")
    f = None if value_fn is None or masked else bind(value_fn, extra_args)
    grad = like_params(grad, params)
    check_fits_params(params, grad, f, tuner)
    traced = jax.make_jaxpr(f)(params) if f is not None else None  # at trace time
    if traced is not None and not loss_reads_params(traced):
        raise ValueError(f"{tuner}: value_fn's loss does not depend on its first argument, the parameters the "
                         "tuner probes (a value_fn that closes over the model and ignores its argument: every "
                         "probe would read the same loss and a zero gradient, and the rate come out hundreds of "
                         "times too small). Compute the loss from the argument: value_fn(params, **batch); with "
                         "nnx, nnx.merge(graphdef, params, rest, copy=True) inside value_fn, rest cloned from the "
                         "split (docs/optax.md)")
    loss = traced.out_avals[0] if traced is not None else None
    if isinstance(value, (tuple, list)):  # (loss, aux), as jax.value_and_grad(..., has_aux=True) gives it
        value = value[0]
    check_params_whole(tuner, params, value, loss)
    check_loss_agrees(tuner, params, value, loss)
    given = value is not None or grad is None  # without grad, value_and_grad gives both in the main evaluation
    value, grad = value_and_grad_at(params, value, grad, f,
                                    need_value=need_value or (want_value and f is not None), tuner=tuner)
    extra_calls = int(not given and value is not None)
    d = incoming(updates, params)
    numerator = vdot(grad, d, dtype)  # -g^T u
    # g^T u is finite iff no entry of g or u is NaN/Inf (a NaN or Inf term makes the sum NaN or Inf, Inf * 0
    # included), short of an overflow of the sum itself (a step that would be garbage anyway): the check costs
    # nothing beyond the numerator (per-leaf isfinite reductions doubled the update's compile time)
    finite = jnp.isfinite(numerator)
    if value is None:
        value = jnp.full((), jnp.nan, dtype)
    else:
        value = value.astype(dtype)
        finite = finite & jnp.isfinite(value)
    return Prepared(f, value, grad, d, numerator, finite, dtype, masked, extra_calls)


def stats_init(dtype: Any) -> TunerStats:
    """The stats before the first step: ``lr = 0``, counters 0, everything else NaN (distinct buffers)."""
    nan = lambda: jnp.full((), jnp.nan, dtype)  # noqa: E731
    return TunerStats(lr=jnp.zeros((), dtype), numerator=nan(), curvature=nan(), sharpness=nan(),
                      preconditioned_sharpness=nan(), eos_ratio=nan(), skipped=jnp.zeros((), jnp.int32),
                      closure_calls=jnp.zeros((), jnp.int32))


def fresh_leaves(state: Any) -> Any:
    """``state`` with every leaf its own buffer (``jax.jit(step, donate_argnums=...)`` refuses to donate one
    buffer twice; ``rule.init(zero)`` and friends reuse one array for several fields)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def precondition_for(method: BaseMethod, wanted: bool, base_state: Any, params: Any, tuner: str) -> Any:
    """Adam's ``P`` from the base's state when the preconditioned sharpness is wanted, else None; infinite
    (``P^-1 = 0``) on leaves no Adam group of the base covers (:func:`jax_backend.sharpness.find_adam_state`)."""
    if not (method.preconditioned and wanted):
        return None
    adam = find_adam_state(base_state, method.b2)
    if adam is None:
        warn(
            f"{tuner}: base_method is Adam but no optax.ScaleByAdamState was handed over, so the "
            "preconditioned sharpness stays NaN: build the optimizer with the convenience (e.g. "
            "cdat(optax.scale_by_adam(), ...)) or with_base_state(base, tuner), or pass base_state= (the "
            "base's state after this step's update).")
        return None
    return fill_masked(preconditioner_from_adam_state(adam, b1=method.b1, b2=method.b2, eps=method.eps), params,
                       math.inf)


def check_base_method(given: Any, method: BaseMethod, updates: Any, grad: Any, base_state: Any,
                      tuner: str, *, rate_follows_base: bool = True) -> None:
    """At trace time: warn when the base is visibly not ``base_method``'s, as the tuner's defaults follow it
    (CDAT's ``sigma`` and ``ema``, every stability coefficient, the preconditioned sharpness). ``given`` is the
    ``base_method`` argument as passed (``None``: unset, read as gradient descent); ``rate_follows_base``:
    whether the rate depends on the base (CDAT with a default ``sigma`` or ``ema``, the edge-of-stability
    rule), else only the diagnostics and the sharpness do. Warns when

    * the base's state handed over (``base_state=``, the conveniences) is Adam's but ``base_method`` is not (a
      base that runs Adam on some parameters and another per-parameter method on the rest, such as
      ``optax.contrib.muon``, is not Adam: it falls under the next cases, whose advice ``"gd"`` it takes);
    * the rate follows the base, ``base_method`` is unset and that state is a momentum trace's
      (``optax.TraceState``), or another that keeps per-parameter arrays (``scale_by_rms``, ``scale_by_belief``,
      ``scale_by_lion``: not gradient descent, whose defaults would apply);
    * the rate follows the base, nothing is handed over, ``base_method`` is unset and the updates are not the
      gradient itself (the same arrays as ``grad=``): behind ``optax.chain(optax.scale_by_adam(),
      scale_by_cdat())`` the tuner cannot tell its base, and gradient descent's defaults would silently set
      the rate of an Adam base.
    """
    hint = ('pass base_method="adam" (or BaseMethod.adam(b1, b2, eps)), BaseMethod.heavy_ball(momentum) / '
            'BaseMethod.nesterov(momentum), or "gd"')
    if base_state is not None:
        if (not method.preconditioned and find_adam_state(base_state, method.b2) is not None
                and not _keeps_per_parameter_state(_without_adam(base_state))):
            found = ("Adam's (optax.ScaleByAdamState; scale_by_radam and scale_by_adamax keep it too, and behind "
                     "them base_method stays unset, with a sigma and ema of your own)")
        elif rate_follows_base and given is None and find_trace_state(base_state) is not None:
            found = "a momentum trace's (optax.TraceState)"
        elif rate_follows_base and given is None and _keeps_per_parameter_state(base_state):
            found = (f"{_state_names(base_state)}, which keeps per-parameter state the tuner does not recognise "
                     "(RMSprop, AdaBelief, Lion, Muon with Adam on the other parameters, ...: preconditioned or "
                     "momentum bases)")
        else:
            return
        message = (f"the base's state is {found} but base_method is {method.kind!r}, so the defaults for that base "
                   "apply (CDAT's sigma and ema, Polyak's lr_max, the line search's c, the stability coefficient "
                   "of eos_ratio and of the edge-of-stability rule) and no preconditioned sharpness is estimated")
    elif rate_follows_base and given is None and not _same_arrays(updates, grad):
        message = ("base_method is unset and the updates reaching the tuner are not the gradient (grad=), so the "
                   "tuner cannot tell its base and assumes gradient descent: behind Adam or momentum its defaults "
                   "(CDAT's sigma and ema, Polyak's lr_max, the line search's c, the stability coefficients) are "
                   "the wrong ones")
    else:
        return
    warn(f"{tuner}: {message}: {hint}.")


def _keeps_per_parameter_state(tree: Any) -> bool:
    """Whether a base's state holds floating arrays of at least one dimension (moments, traces), not only
    counters and empty states."""
    return any(jnp.ndim(x) >= 1 and jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in jax.tree.leaves(tree))


def _without_adam(tree: Any) -> Any:
    """A base's state with its Adam states (``optax.ScaleByAdamState``/``ScaleByAmsgradState``) left out."""
    is_adam = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByAmsgradState))  # noqa: E731
    return jax.tree.map(lambda x: None if is_adam(x) else x, tree, is_leaf=is_adam)


def _state_names(tree: Any) -> str:
    """The names of the innermost NamedTuple states in a base's state (a chain's is a tuple of them; a wrapper's,
    ``optax.partition``'s or ``masked``'s, holds others) that keep per-parameter arrays."""
    return " + ".join(dict.fromkeys(type(x).__name__ for x in _innermost_states(tree))) or type(tree).__name__


def _innermost_states(tree: Any) -> list:
    """The NamedTuple nodes of ``tree`` that keep per-parameter arrays and hold no other such node."""
    named = lambda x: hasattr(x, "_fields")  # noqa: E731
    out = []
    for node in jax.tree.leaves(tree, is_leaf=named):
        if named(node) and _keeps_per_parameter_state(node):
            out += _innermost_states(list(node)) or [node]
    return out


def _same_arrays(updates: Any, grad: Any) -> bool:
    """Whether ``updates`` are ``grad`` itself, leaf for leaf (the tuner is first in its chain: gradient descent)."""
    if grad is None:
        return False
    a, b = jax.tree.leaves(updates), jax.tree.leaves(grad)
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def oracle_for(curvature: str, p: Prepared, tuner: str) -> str:
    """The oracle this step uses (:func:`curvopt.config.resolve_curvature`, at trace time)."""
    if p.masked and curvature in ("fd", "exact"):
        raise ValueError(f"{tuner}: inside optax.masked/multi_transform the tuner sees only part of the parameters "
                         f'and cannot evaluate value_fn at a probe point: use curvature="secant" (or "auto", '
                         "which picks it there)")
    return resolve_curvature(curvature, has_loss_fn=p.f is not None)


class Sharpness(NamedTuple):
    """A step's sharpness (:func:`sharpness_of`), with the largest group rate of the base (``scale_by_mup``'s: the
    factor the rate carries on its fastest leaves, as PyTorch's largest group lr, read by ``eos_ratio``)."""
    plain: Any
    preconditioned: Any
    top: Any


def sharpness_of(p: Prepared, params: Any, eigen: EigenMemory | None, steps: Any, last: Any,
                 config: SharpnessConfig, method: BaseMethod, base_state: Any, tuner: str, *, optional: bool = True
                 ) -> tuple[Sharpness, EigenMemory | None, Any]:
    """``(sharpness, eigen memory, HVPs used)``: the online estimate on its scheduled steps (``eigen`` memory
    present), else the last estimates (``last``: the stats); of the operator the step applies, with the group rates
    of a ``scale_by_mup`` in the base folded in (:func:`jax_backend.sharpness.group_rate_scales`; before, Optax read
    the plain Hessian there, and the edge-of-stability rule's rate was 11-46 % off PyTorch's with the same groups).
    ``optional``: whether the tuner can run without it (``sharpness=0``; not the edge-of-stability rule)."""
    if eigen is None:  # (no estimate: the sharpness and eos_ratio stay NaN, no group rates to read)
        return Sharpness(last.sharpness, last.preconditioned_sharpness, jnp.ones((), p.dtype)), eigen, jnp.int32(0)
    top, rates = group_rate_scales(base_state, params, p.dtype)
    kept = Sharpness(last.sharpness, last.preconditioned_sharpness, top)
    if p.f is None:
        where = (" (inside optax.masked/multi_transform the tuner sees only part of the parameters and cannot use "
                 "value_fn: use it on the whole tree)" if p.masked else "")
        raise ValueError(f"{tuner}: the online sharpness evaluates Hessian-vector products of the loss, so the "
                         "update needs value_fn over all the parameters (update(..., value_fn=loss_fn, **batch))"
                         f"{where}" + ("; or pass sharpness=0 to turn it off" if optional else ""))
    pre = precondition_for(method, eigen.preconditioned_eigenvector is not None, base_state, params, tuner)
    lam, lam_p, eigen, used = online_sharpness(p.f, params, eigen, kept[:2], steps=steps, config=config,
                                               preconditioner=pre, dtype=p.dtype, direction=p.d, rates=rates)
    return Sharpness(lam, lam_p, top), eigen, used


def finish(updates: Any, p: Prepared, lr: Any, *, curvature: Any, sharpness: Sharpness, calls: Any,
           method: BaseMethod, old: TunerStats, coefficient: Any = None) -> tuple[Any, TunerStats]:
    """The taken step's updates ``lr * u`` (in the incoming dtypes) and its stats; ``eos_ratio`` of the fastest
    leaves' rate (``lr`` times the largest group rate) against ``coefficient`` (a tuner's own
    ``stability_coefficient``), by default the base's; ``calls`` the tuner's
    evaluations (the main one included), to which the forward pass :func:`prepare` spent is added."""
    dtype = p.dtype
    lr = jnp.asarray(lr, dtype)
    relevant = sharpness[1] if method.preconditioned else sharpness[0]
    out = optax.tree.cast_like(scaled(-lr, p.d), updates)  # lr u
    return out, TunerStats(
        lr=lr, numerator=p.numerator, curvature=jnp.asarray(curvature, dtype),
        sharpness=jnp.asarray(sharpness[0], dtype), preconditioned_sharpness=jnp.asarray(sharpness[1], dtype),
        eos_ratio=jnp.asarray(rules.eos_ratio(lr * sharpness.top, relevant, method.coefficient if coefficient is None
                                              else coefficient), dtype),
        skipped=old.skipped, closure_calls=jnp.asarray(calls + p.extra_calls, jnp.int32))


def bound_init(dtype: Any) -> BoundWatch:
    return BoundWatch.start(jnp.zeros((), dtype))


def bound_watched(watch: BoundWatch | None, p: Prepared, f_star: float) -> BoundWatch | None:
    """The watch on the loss against the rule's bound ``f_star`` after a taken step (:mod:`curvopt.bound_watch`;
    :func:`stats` warns); None stays None (a state made before the watch existed goes on without it)."""
    if watch is None:
        return None
    return optax.tree.cast_like(watch_bound(watch, p.value, p.numerator, f_star, jnp), watch)


def zero_rate_init(dtype: Any) -> ZeroRateWatch:
    return ZeroRateWatch.start(jnp.zeros((), dtype), jnp.zeros((), jnp.int32))


def zero_rate_watched(watch: ZeroRateWatch | None, p: Prepared, stats: TunerStats, params: Any
                      ) -> ZeroRateWatch | None:
    """The watch on runs of steps at rate 0 after a taken step whose curvature, if any, is the current point's
    (:func:`curvopt.config.watch_zero_rate`, with the step's logged rate; :func:`stats` warns); None stays None (a
    state made before the watch existed goes on without it)."""
    if watch is None:
        return None
    eps = least_precise_eps(p.d if params is None else params)
    return optax.tree.cast_like(watch_zero_rate(watch, stats.lr, p.numerator, p.value, eps, jnp), watch)


def ascent_count(p: Prepared, ascent_steps: Any, steps: Any, warn: bool) -> Any:
    return ascent_steps + warn_if_negated(p.numerator, steps, warn).astype(jnp.int32)


def skip(updates: Any, state: Any) -> tuple[Any, Any]:
    """A step that cannot be taken (non-finite value, gradient or direction; closure-free, a gradient that is zero
    in every entry: :func:`curvopt.config.has_gradient`), as in PyTorch: zero updates,
    ``skipped + 1``, the step's ``lr``/``numerator``/``curvature``/``eos_ratio`` NaN, one evaluation; all other
    state untouched."""
    s = state.stats
    nan = jnp.full((), jnp.nan, s.lr.dtype)
    return optax.tree.zeros_like(updates), state._replace(stats=s._replace(
        lr=nan, numerator=nan, curvature=nan, eos_ratio=nan, skipped=s.skipped + 1,
        closure_calls=jnp.ones((), jnp.int32)))


def select(pred: Any, taken: tuple[Any, Any], skipped: tuple[Any, Any], *, leafwise_updates: bool = False
           ) -> tuple[Any, Any]:
    """``taken`` (updates, state) if ``pred`` else ``skipped``. Both are computed (no host branching, and no
    computation inside a ``lax.cond``: XLA:CPU runs convolutions inside cond/while bodies far slower,
    jax-ml/jax#12868, ~40x for a small CNN's backward) and passed through one :func:`pick`; with
    ``leafwise_updates`` the updates instead by a leafwise ``where`` (the state still through the pick), which
    fuses into the scaling and into ``optax.apply_updates`` where the pick's pass-through keeps them apart. The
    closure-free update uses it: ~0.2 s less compile on the benchmark ViT's 19 leaves (the tuner's update alone,
    1.6 s against 1.8 s; the runner's whole step ~0.15 of a bare step less), and at 500 leaves 10.6 s against
    11.4 s. With ``value_fn`` the leafwise ``where`` grows the compile time faster than the leaf count (CDAT
    behind Adam, 500 leaves: 73 s against 17 s with the pick, the bare Adam step ~4 s)."""
    if leafwise_updates:
        updates = jax.tree.map(lambda a, b: jnp.where(pred, a, b), taken[0], skipped[0])
        return updates, pick(pred, taken[1], skipped[1])
    return pick(pred, taken, skipped)


def transform(init: Callable[[Any], Any], update: Callable[..., tuple[Any, Any]]
              ) -> optax.GradientTransformationExtraArgs:
    """A tuner's transformation, whose ``update`` first makes the incoming state's flags bool again where
    ``init`` makes them bool (an abstract evaluation of ``init``, no computation; a cast only where a dtype
    differs). Wrappers that blend a reset state in arithmetically, ``(1 - s) * state + s * init``
    (``optax.lookahead(reset_state=True)``, ``optax.contrib.sam``), turn the state's bool leaves into int32, and
    the update's skip (:func:`pick`, a ``lax.cond`` between the new state and the old) needs both of one type.
    Other scalars' dtypes are left as they come (a state made before ``jax_enable_x64`` was switched keeps its
    float32). A state that ``init`` would not make for these parameters is refused (:func:`check_state`)."""
    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        if params is not None:
            like = _without_added(jax.eval_shape(init, params), state)
            check_state(state, like)
            state = jax.tree.map(lambda x, y: x.astype(bool) if y.dtype == bool and x.dtype != bool else x,
                                 state, like)
        return update(updates, state, params, **extra_args)
    return optax.GradientTransformationExtraArgs(init, update_fn)


def _without_added(like: Any, state: Any) -> Any:
    """``like`` (what ``init`` makes) without the fields ``state`` lacks because it was made before they were added:
    a state NamedTuple's fields with a default (None) that are None in ``state``, in it and in the NamedTuples it
    holds. Such a state goes on without them (a CDAT state pickled before its ``replay`` check existed, a rule state
    before the above-edge guard's lagged minimum)."""
    if type(state) is not type(like) or not hasattr(like, "_fields"):
        return like
    defaults = type(like)._field_defaults
    return like._replace(**{f: None if f in defaults and getattr(state, f) is None
                            else _without_added(getattr(like, f), getattr(state, f)) for f in like._fields})


STATE_MISMATCH_MESSAGE = (
    "curvopt: the optimizer state does not fit this transformation ({detail}). It was made by another "
    "configuration (another tuner or base, or a setting that shapes the state: sharpness=, noise_correction=, "
    "curvature=, numerator=), for parameters of another structure or dtype (a model changed since init, as "
    "eqx.tree_at does), or restored without a target (orbax's "
    "restore(path) returns dicts and lists). Initialise it with opt.init(params), or restore the checkpoint "
    "into a target of this configuration: jax.eval_shape(opt.init, params).")


def _node_difference(state: Any, like: Any, path: str = "") -> str | None:
    """The first node, outermost first, where ``state`` and ``like`` differ in type or metadata, as ``state<path>
    is <node>, init makes <node>`` (each node with its children as ``*``); None where none does."""
    def node(tree: Any) -> Any:
        return jax.tree.structure(tree, is_leaf=lambda x: x is not tree)  # the node alone, its children leaves

    if node(state) != node(like):
        return f"state{path} is {node(state)}, init makes {node(like)}"
    children = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: x is not state)[0]
    for (key, s), lk in zip(children, jax.tree.leaves(like, is_leaf=lambda x: x is not like)):
        if jax.tree.structure(s) != jax.tree.structure(lk):
            return _node_difference(s, lk, path + jax.tree_util.keystr(key))
    return None


def check_state(state: Any, like: Any, dtypes: bool = True) -> None:
    """Raise ``ValueError`` (:data:`STATE_MISMATCH_MESSAGE`, naming the first difference) when ``state`` is not
    what ``init`` makes for the parameters at hand, ``like`` (its abstract evaluation): another structure (a
    field missing or extra, other containers), or, with ``dtypes``, a parameter-shaped leaf (not a scalar) of
    another dtype. Without it such a state met an ``AttributeError`` deep in the update (a state made with
    ``noise_correction=False`` fed to the default), a ``lax.cond`` type error (a float32 state for bfloat16
    parameters), or ran silently without a part of the tuner (a state made without ``sharpness=`` fed to a tuner
    with it: no estimate, no warning). A bool flag that arrives as a number (:func:`transform`) and a scalar's
    dtype pass."""
    if jax.tree.structure(state) != jax.tree.structure(like):
        have = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
        want = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
        missing = [k for k in want if k not in have]
        extra = sorted(have - set(want))
        if missing or extra:
            detail = (f"init makes state{missing[0]}, which it lacks" if missing else
                      f"it holds state{extra[0]}, which init does not make")
        else:  # the same key paths: a node of another type or metadata (an Equinox layer's static out_features
            # after a surgery)
            detail = _node_difference(state, like) or "it holds init's fields in other containers"
        raise ValueError(STATE_MISMATCH_MESSAGE.format(detail=detail))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(like)):
        if dtypes and jnp.ndim(y) and jnp.result_type(x) != y.dtype:
            raise ValueError(STATE_MISMATCH_MESSAGE.format(
                detail=f"state{jax.tree_util.keystr(path)} is {jnp.result_type(x)}, init makes it {y.dtype} for "
                       "these parameters"))


def pick(pred: Any, a: Any, b: Any) -> Any:
    """``a`` if ``pred`` else ``b`` (pytrees of one structure, both already computed) by a ``lax.cond`` whose
    branches only pass one of them through. A leafwise ``where`` is one XLA:CPU kernel per leaf (compiled
    separately: a state with a per-parameter memory, or an Adam base's moments, added 19-38 kernels to a small
    ViT's ~180); the cond is none."""
    return cond(pred, lambda x, y: x, lambda x, y: y, a, b)


# ------------------------------------------------------------------------------------------------ chains
def _tuner_stats(state: Any) -> TunerStats | None:
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, TunerStats))
             if isinstance(s, TunerStats)]
    return found[0] if found else None


class _AdamReading(NamedTuple):
    """What :func:`warn_if_not_declared_adam` reads off Adam's state after one update: ``(mu, nu, direction)``
    entries, the largest ``mu`` and ``nu``, the step count, and the moments' dtype limits (``mu``'s epsilon,
    ``nu``'s smallest normal number)."""
    entries: tuple
    mu: float
    nu: float
    count: int
    mu_eps: float
    nu_tiny: float


def warn_if_not_declared_adam(base: Any, base_state: Any, params: Any, method: BaseMethod) -> None:
    """At ``init`` of a tuner declared to follow Adam (``method``) around ``base``, on concrete parameters: warn
    when the base's first update moves Adam's moments as other betas would (:func:`curvopt.base.adam_betas_seen`,
    which a second update tells from a clip's factor), or is not Adam's update at all (a third, of a smaller
    gradient: :func:`curvopt.base.adam_update_unlike`), since the tuner reads the declared method. Nothing is
    judged without an Adam state in the base (:func:`jax_backend.sharpness.find_adam_state`) or where the update
    cannot be taken at init (:func:`jax_backend.direction.base_update_at_init`)."""
    def first(tree: Any) -> float:  # every entry the same after a uniform gradient (masked ones 0)
        return max((float(jnp.max(x)) for x in jax.tree.leaves(tree) if x.size), default=math.nan)

    def entries(tree: Any) -> np.ndarray:  # each leaf's first entries, in the order of the leaves (masked ones out)
        return np.concatenate([np.asarray(jnp.ravel(x)[:1024], np.float64) for x in jax.tree.leaves(tree)]
                              or [np.zeros(0)])

    def readings(scale: float, state: Any) -> tuple[Any, _AdamReading] | None:
        """``(the base's new state, what Adam's part of it reads)`` after one update of a uniform gradient (host
        values: the update's trees are let go before the next is taken)."""
        taken = base_update_at_init(base, state, params, scale)
        adam = None if taken is None else find_adam_state(taken[1], method.b2)
        if adam is None:
            return None
        return taken[1], _AdamReading(
            (entries(adam.mu), entries(adam.nu), entries(like_params(taken[0], adam.mu))), first(adam.mu),
            first(adam.nu), int(adam.count), float(jnp.finfo(jnp.result_type(*jax.tree.leaves(adam.mu))).eps),
            float(jnp.finfo(jnp.result_type(*jax.tree.leaves(adam.nu))).tiny))

    taken = readings(1.0, base_state)
    if taken is None or taken[1].count != 1:
        return
    state, one = taken
    again = readings(1.0, state)  # (the betas free of a clip's factor)
    del taken, state
    second_mu = math.nan if again is None else again[1].mu
    del again
    small = readings(UNLIKE_SCALE, base_state)
    seen = adam_betas_seen(method, one.mu, one.nu, second_mu, one.mu_eps)
    unlike = None if small is None else adam_update_unlike(method, one.entries, small[1].entries, one.nu_tiny)
    if unlike is not None and (seen is None or "second moment" in unlike):
        warn(f"curvopt: base_method declares Adam, but the base's update is not Adam's: {unlike}. The tuner reads "
             "Adam's update (the preconditioned sharpness, the edge-of-stability rule's rate, eos_ratio, CDAT's "
             "momentum numerator): use optax.scale_by_adam (eps_root=0), or leave base_method unset (gradient "
             "descent's defaults) and choose sigma and ema yourself")
    elif seen is not None:
        b1, b2 = (1 - float(f"{1 - b:.2g}") for b in seen)  # (bfloat16 moments: 0.2002 for 1 - b1 = 0.2)
        warn(f"curvopt: base_method declares Adam with b1={method.b1:g}, b2={method.b2:g}, but the base's first "
             f"update moves its moments as Adam's with b1={b1:g}, b2={b2:g}. The tuner reads the declared betas "
             "(the preconditioned sharpness, the edge-of-stability rule's rate, eos_ratio, CDAT's momentum "
             f"numerator): pass base_method=BaseMethod.adam(b1={b1:g}, b2={b2:g}) (the string \"adam\" means the "
             "default betas; an Optax base cannot be asked for its own)")


def with_base_state(base: optax.GradientTransformation, tuner: optax.GradientTransformation,
                    base_method: BaseMethod | str | None = None) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, tuner)`` that also hands the tuner what a plain chain cannot: the base's new state
    (``base_state=``: Adam's moments for the preconditioned sharpness; ``base_state_before=``: its state before
    the update, for the gradient Adam averaged) and the incoming gradient (``grad=``,
    unless given: the closure-free mode of ``TrainState.apply_gradients``/``nnx.Optimizer.update``).

    The state is the same tuple ``(base_state, tuner_state)`` as ``optax.chain``'s, and extra arguments reach
    both members. When the tuner skips a step (non-finite value, gradient or base direction) the base's state
    is kept as it was, as in PyTorch, instead of absorbing the bad gradient: in a plain chain one NaN gradient
    leaves Adam's moments NaN for good (the tuner then skips every later step: the parameters stay finite but
    training stops). ``init`` warns when ``base`` already applies a negative learning rate
    (:func:`jax_backend.direction.warn_if_base_negates`); ``update`` refuses a state whose base part ``base.init``
    would not make (:func:`check_state`: a checkpoint of another base). ``base_method``: the tuner's, as passed to
    it (the conveniences hand it over); behind Adam ``init`` warns when the base's betas are not the declared ones
    (:func:`warn_if_not_declared_adam`).
    """
    base = optax.with_extra_args_support(base)
    tuner = optax.with_extra_args_support(tuner)
    method = as_base_method(base_method)

    def init(params: Any) -> tuple[Any, Any]:
        tuner_state = tuner.init(params)  # first: it refuses the leaves no tuner takes (complex, integer) clearly
        base_state = base.init(params)
        warn_if_base_negates(base, base_state, params)
        if method.kind == "adam":
            warn_if_not_declared_adam(base, base_state, params, method)
        return base_state, tuner_state

    def update(updates: Any, state: tuple[Any, Any], params: Any = None, **extra_args: Any):
        if params is not None:
            # the structure (a checkpoint of another base); its dtypes are the base's affair, as in optax.chain; a
            # tuner state made before a field was added goes on without it (_without_added), as the bare one does
            made = state[1] if isinstance(state, (tuple, list)) and len(state) == 2 else None
            like = (jax.eval_shape(base.init, params), _without_added(jax.eval_shape(tuner.init, params), made))
            check_state(state, like, dtypes=False)
        direction, base_state = base.update(updates, state[0], params, **extra_args)
        kwargs = {k: v for k, v in extra_args.items() if k != "base_state"}
        if kwargs.get("grad") is None:
            kwargs["grad"] = updates
        kwargs.pop("base_state_before", None)
        out, tuner_state = tuner.update(direction, state[1], params, base_state=base_state,
                                        base_state_before=state[0], **kwargs)
        new, old = _tuner_stats(tuner_state), _tuner_stats(state[1])
        if new is not None:
            base_state = pick(new.skipped > old.skipped, state[0], base_state)
        return out, (base_state, tuner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def convenience(transform: Callable[..., Any], name: str) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``name(base, **settings) = with_base_state(base, transform(**settings))`` with an explicit signature
    (``base`` then the transform's parameters), so that ``optax.inject_hyperparams(name)(base, sigma=...)``
    sees and injects the numeric settings."""

    def build(base: optax.GradientTransformation, *args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        if not (hasattr(base, "init") and hasattr(base, "update")):
            raise TypeError(f"{name}(base, ...): base must be an optax.GradientTransformation, got "
                            f"{getattr(base, '__name__', type(base).__name__)!r}"
                            + (" (a factory: call it, e.g. optax.scale_by_adam())" if callable(base) else ""))
        given = sig.bind_partial(*args, **kwargs).arguments.get("base_method")
        return with_base_state(base, transform(*args, **kwargs), base_method=given)

    sig = inspect.signature(transform)
    base = inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    build.__signature__ = sig.replace(parameters=[base, *sig.parameters.values()])
    build.__name__ = build.__qualname__ = name
    build.__module__ = transform.__module__  # defined beside its transform: found there by pickle
    build.__doc__ = (f"``optax.chain(base, {transform.__name__}(...))`` (same state layout) that also hands the "
                     f"tuner the base's state and the incoming gradient, and keeps the base's state on a skipped "
                     f"step (:func:`jax_backend.with_base_state`). Settings as :func:`{transform.__name__}`.")
    return build


def _warnings_of(state: Any) -> list[str]:
    """The warnings :func:`stats` gives for one run's tuner state (host values)."""
    said: list[str] = []
    steps, ascent = int(state.steps), int(state.ascent_steps)
    skipped = int(state.stats.skipped)
    if steps == 0 and skipped:
        said.append(f"curvopt: none of the {skipped} steps so far was taken: {SKIP_MESSAGE}; or, without "
                    f"value_fn, {ZERO_GRADIENT_SKIP}. A base whose update is NaN from the start "
                    "(optax.scale_by_adam in float16, where eps=1e-8 is 0) does the first")
    elif skipped and math.isnan(float(state.stats.lr)):  # (a skipped step's lr is NaN, a taken one's not)
        said.append(f"curvopt: the last step was skipped ({skipped} of the {steps + skipped} steps so far): "
                    f"{SKIP_MESSAGE}; or, without value_fn, {ZERO_GRADIENT_SKIP}. If it was not finite, in "
                    "a bare chain (optax.chain(optax.scale_by_adam(), scale_by_cdat())) the non-finite gradient "
                    "also reached the base's state, Adam's moments, and every later step is skipped too: the "
                    "conveniences (cdat(base), ...) keep the base's state on a skipped step")
    if steps > 0 and ascent == steps:
        said.append(NEGATED_DIRECTION_MESSAGE.replace("on its first step", "on every step so far"))
    secant = getattr(state, "secant", None)
    if secant is not None and int(secant.stalled):  # int(): also an nnx.Optimizer's OptArray
        said.append(SECANT_STALL_MESSAGE)
    if secant is not None and collapse_sustained(int(secant.collapsed)):
        said.append(SECANT_COLLAPSE_MESSAGE)
    if secant is not None and int(secant.clip_suspected):
        said.append(EXTERNAL_CLIP_MESSAGE_OPTAX)
    if secant is not None and int(secant.moved_outside):
        said.append(OUTSIDE_MOTION_MESSAGE_OPTAX)
    replay = getattr(state, "replay", None)
    if replay is not None and int(replay.missed):
        said.append(REPLAY_MESSAGE_OPTAX)
    watch = getattr(state, "watch", None)
    if watch is not None and math.isfinite(float(watch.watch_fired)):
        said.append(minibatch_message(watch))
    bound = getattr(state, "bound", None)
    if bound is not None:
        said.extend(bound_messages(bound, "curvopt"))
    zero = getattr(state, "zero_rate", None)
    if zero is not None and not math.isnan(float(zero.zero_rising)):
        said.append(zero_rate_message(float(zero.zero_rising) > 0, decays=False, optax=True))
    return said


def stats(opt_state: Any) -> dict[str, Any]:
    """The stats of the first curvopt tuner found in ``opt_state`` (any chain/nesting), as a dict keyed by
    :data:`curvopt.stats.STAT_FIELDS` (also ``optax.tree_utils.tree_get(opt_state, "lr")`` etc.). Raises
    ``ValueError`` when there is none.

    Read on the host (concrete values, one run's), it also warns when every step so far had an uphill direction
    (``ascent_steps == steps > 0``): the chain before the tuner negated the updates and ``lr`` is 0; when every
    step so far was skipped (non-finite: the parameters have not moved), or the last one (``stats["skipped"]``
    counts them all); when a closure-free rate stalled below
    its probing step (:func:`curvopt.config.secant_stalled`: the secant of noisy consecutive gradients; pass
    ``value_fn``), or collapsed far below its peak where the noise dominated its curvature
    (:func:`curvopt.config.secant_collapsed`); when a clip before the closure-free tuner fixed the gradients' norm
    (:func:`curvopt.config.external_clip_suspected`); when a closure-free step started from other parameters than
    the tuner's last step left (:func:`curvopt.config.moved_outside`); when one of the first fd probes found
    ``value_fn``'s loss off the step's quadratic model (:func:`jax_backend.oracles.replay_check`: randomness or a
    batch ``value_fn`` does not replay); and when CDAT behind heavy ball or Nesterov
    saw the loss change between steps, as in mini-batch training (:mod:`curvopt.minibatch_watch`). A vmapped
    state (an ensemble; vmapped again, a sweep of ensembles) gives each field with its leading axes, and each
    warning once, naming the members it applies to (by index tuple under more than one axis).
    """
    is_tuner = lambda x: hasattr(x, "_fields") and "stats" in x._fields and "steps" in x._fields  # noqa: E731
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_tuner) if is_tuner(s)]
    if not found:
        raise ValueError("no curvopt tuner state in the given optimizer state")
    state = found[0]
    if concrete(state.steps) and jnp.ndim(state.steps) == 0:
        for message in _warnings_of(state):
            warn(message)
    elif concrete(state.steps):  # a vmapped ensemble (vmapped again: a sweep of ensembles, members indexed)
        shape = jnp.shape(state.steps)
        members: dict[str, list[str]] = {}  # each member's warnings (its scalars: the leaves of that shape), once
        host = jax.tree.map(lambda x: np.asarray(x) if jnp.shape(x) == shape else x, state)  # (one transfer a leaf)
        for i in np.ndindex(shape):
            member = jax.tree.map(lambda x: x[i] if isinstance(x, np.ndarray) else x, host)
            for message in _warnings_of(member):
                members.setdefault(message, []).append(str(i[0] if len(i) == 1 else i))
        total = shape[0] if len(shape) == 1 else "x".join(map(str, shape))
        for message, which in members.items():
            warn(f"{message} (ensemble member{'s' * (len(which) > 1)} {', '.join(which)} of {total})")
    # an nnx.Optimizer's state holds each leaf in an OptArray: hand out its array, as from any other state (by
    # get_value(): reading .value is deprecated since flax 0.12)
    return {k: v.get_value() if hasattr(v, "get_value") else v for k, v in state.stats._asdict().items()}


assert TunerStats._fields == STAT_FIELDS
