"""The step every curvature tuner shares, and the combinator that hands a base's state to a tuner.

One update, in the order the PyTorch tuners use (so that both backends produce the same sequence):

1. value and gradient at ``w`` (given, else computed from ``value_fn``: see :mod:`jax_backend.loss`);
2. if the value or the gradient is not finite: zero updates, ``skipped += 1``, the step's statistics NaN,
   nothing else changes (a ``where`` select of the computed step and the skip, no host branching);
3. ``u = -d`` from the incoming updates ``d``; ``numerator = -g^T u``; ``curvature = u^T H u`` from the
   oracle (tuners that need it);
4. the online (preconditioned) sharpness at ``w`` on steps ``1, 1 + k, ...``;
5. ``lr`` from the tuner's rule in :mod:`curvopt.rules` (called with ``xp=jax.numpy``); for CDAT, a
   non-finite result (a non-finite curvature probe) gives ``lr = 0`` and leaves the averages unchanged;
6. updates ``lr * u``; ``eos_ratio = lr * sharpness / c`` (``c`` the base's stability coefficient, the
   preconditioned sharpness for Adam).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from curvopt import rules

from .base_method import BaseMethod
from .direction import accumulator_dtype, all_finite, descent, vdot, warn_if_negated
from .loss import bind, require_value_fn, value_and_grad_at
from .oracles import curvature, secant_init
from .sharpness import find_adam_state, online_sharpness, preconditioner_from_adam_state, sharpness_init
from .state import TunerState

__all__ = ["curvature_tuner", "with_base_state", "stat_init", "maybe_preconditioner", "skip", "Rule"]

#: ``rule(numerator, curvature, value, sharpness, state) -> (lr, new rule state)``; ``sharpness`` is the
#: one that matters for the base (preconditioned for Adam).
Rule = Callable[[Any, Any, Any, Any, TunerState], tuple[Any, Any]]


def _dtype(params: Any) -> Any:
    """The state's float dtype: the widest parameter dtype, at least float32 (bf16 params, f32 state)."""
    return accumulator_dtype(params)


def stat_init(params: Any) -> dict[str, Any]:
    """The statistics before the first step: ``lr = 0``, counters 0, everything else NaN."""
    dtype = _dtype(params)
    nan = jnp.full((), jnp.nan, dtype)
    zero_i = jnp.zeros((), jnp.int32)
    return dict(lr=jnp.zeros((), dtype), numerator=nan, curvature=nan, sharpness=nan,
                preconditioned_sharpness=nan, eos_ratio=nan, skipped=zero_i, closure_calls=zero_i,
                count=zero_i, last_lr=jnp.zeros((), dtype), ascent_steps=zero_i)


def maybe_preconditioner(method: BaseMethod, memory: Any, base_state: Any, tuner: str) -> Any:
    """Adam's ``P`` from the base's state when the preconditioned sharpness is wanted, else None."""
    if not method.preconditioned or memory is None:
        return None
    adam = find_adam_state(base_state)
    if adam is None:
        warnings.warn(
            f"{tuner}: base_method is Adam but no optax.ScaleByAdamState was handed over, so the "
            "preconditioned sharpness stays NaN: build the optimizer with the convenience (e.g. "
            "cdat(optax.scale_by_adam(), ...)) or with_base_state(base, tuner), or pass base_state= (the "
            "base's state after this step's update).", RuntimeWarning, stacklevel=3)
        return None
    return preconditioner_from_adam_state(adam, b1=method.b1, b2=method.b2, eps=method.eps)


def curvature_tuner(name: str, rule: Rule, *, rule_init: Callable[[Any], Any], oracle: str | None,
                    needs_value: bool, sharpness: Any, method: BaseMethod, warn_ascent: bool = False
                    ) -> optax.GradientTransformationExtraArgs:
    """A tuner transform from a learning-rate rule (see the module docstring for the step)."""

    def init(params: Any) -> TunerState:
        dtype = _dtype(params)
        return TunerState(
            **stat_init(params),
            rule=rule_init(jnp.zeros((), dtype)),
            secant=secant_init(params, dtype) if oracle == "secant" else None,
            sharpness_memory=sharpness_init(params, sharpness.every, method.preconditioned),
        )

    def update(updates: Any, state: TunerState, params: Any = None, *, value: Any = None, grad: Any = None,
               value_fn: Callable[..., Any] | None = None, base_state: Any = None,
               **extra_args: Any) -> tuple[Any, TunerState]:
        if params is None:
            raise ValueError(f"{name} needs params: update(updates, state, params, ...)")
        dtype = state.lr.dtype
        memory = state.sharpness_memory
        if oracle is not None or memory is not None:
            require_value_fn(value_fn, name, "the curvature oracle and the sharpness")
        f = None if value_fn is None else bind(value_fn, extra_args)
        value, grad = value_and_grad_at(params, value, grad, f, need_value=needs_value, tuner=name)
        finite = all_finite(grad)
        if value is not None:
            finite = finite & jnp.all(jnp.isfinite(value))
        precond = maybe_preconditioner(method, memory, base_state, name)
        nan = jnp.full((), jnp.nan, dtype)

        def step() -> tuple[Any, TunerState]:
            u = descent(updates, params)
            numerator = -vdot(grad, u, dtype)
            ascent = warn_if_negated(numerator, state.count, warn_ascent)
            calls = jnp.int32(1)
            curv, secant = nan, state.secant
            if oracle is not None:
                curv, extra, secant = curvature(oracle, f, params, grad, u, -numerator, state.secant,
                                                state.last_lr, dtype)
                calls = calls + extra
            sharp, pre = state.sharpness, state.preconditioned_sharpness
            if memory is not None:
                sharp, pre, new_memory, used = online_sharpness(
                    f, params, memory, count=state.count, last=(sharp, pre), config=sharpness,
                    preconditioner=precond, dtype=dtype)
                calls = calls + used
            else:
                new_memory = memory
            relevant = pre if method.preconditioned else sharp
            val = nan if value is None else jnp.asarray(value).astype(dtype)
            lr, rule_state = rule(numerator, curv, val, relevant, state)
            lr = jnp.asarray(lr).astype(dtype)
            # as PyTorch: a non-finite curvature probe gives lr 0 and leaves CDAT's averages unchanged
            ok = jnp.isfinite(lr)
            lr = jnp.where(ok, lr, 0.0).astype(dtype)
            if rule_state is not None:
                rule_state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), rule_state, state.rule)
            new_updates = jax.tree_util.tree_map(lambda x, d: (lr * x).astype(d.dtype), u, updates)
            new_state = TunerState(
                lr=lr, numerator=numerator, curvature=jnp.asarray(curv).astype(dtype),
                sharpness=jnp.asarray(sharp).astype(dtype),
                preconditioned_sharpness=jnp.asarray(pre).astype(dtype),
                eos_ratio=jnp.asarray(rules.eos_ratio(lr, relevant, method.coefficient)).astype(dtype),
                skipped=state.skipped, closure_calls=calls, count=state.count + 1, last_lr=lr,
                ascent_steps=state.ascent_steps + ascent.astype(jnp.int32),
                rule=jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(dtype), rule_state),
                secant=secant, sharpness_memory=new_memory,
            )
            return new_updates, new_state

        # A select rather than lax.cond: XLA:CPU runs convolutions inside cond/while bodies far slower
        # (jax-ml/jax#12868; ~40x for a small CNN's backward pass). A skipped step's NaNs are discarded.
        return select(finite, step(), skip(updates, state))

    return optax.GradientTransformationExtraArgs(init, update)


def select(pred: Any, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(pred, on_true, on_false)`` over two trees of the same structure."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def skip(updates: Any, state: Any) -> tuple[Any, Any]:
    """A skipped step (non-finite value or gradient), as in PyTorch: zero updates, ``skipped + 1``, the
    step's ``lr``/``numerator``/``curvature``/``eos_ratio`` NaN, one evaluation; all memory untouched."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, updates)
    nan = jnp.full((), jnp.nan, state.lr.dtype)
    return zeros, state._replace(lr=nan, numerator=nan, curvature=nan, eos_ratio=nan,
                                 skipped=state.skipped + 1, closure_calls=jnp.int32(1))


def with_base_state(base: optax.GradientTransformation, tuner: optax.GradientTransformation
                    ) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, tuner)`` that also hands the base's new state to the tuner (``base_state=``).

    The state is the same tuple ``(base_state, tuner_state)`` as ``optax.chain``'s, and extra arguments
    reach both members as in ``optax.chain``. Two things a plain ``optax.chain`` cannot do (members do not
    see each other's state):

    * the tuner finds Adam's moments (``optax.ScaleByAdamState``) anywhere in ``base_state`` (a chain,
      ``inject_hyperparams``...) for the preconditioned sharpness;
    * when the tuner skips a step (non-finite value or gradient), the base's state is kept as it was, as
      in PyTorch, instead of absorbing the bad gradient (Adam's moments would stay NaN for good). In a plain
      chain, wrap the base in ``optax.apply_if_finite`` for that.
    """
    base = optax.with_extra_args_support(base)
    tuner = optax.with_extra_args_support(tuner)

    def init(params: Any) -> tuple[Any, Any]:
        return base.init(params), tuner.init(params)

    def update(updates: Any, state: tuple[Any, Any], params: Any = None, **extra_args: Any):
        direction, base_state = base.update(updates, state[0], params, **extra_args)
        extra_args = {k: v for k, v in extra_args.items() if k != "base_state"}
        out, tuner_state = tuner.update(direction, state[1], params, base_state=base_state, **extra_args)
        if hasattr(tuner_state, "skipped"):
            skipped = tuner_state.skipped > state[1].skipped
            base_state = jax.tree_util.tree_map(lambda new, old: jnp.where(skipped, old, new), base_state, state[0])
        return out, (base_state, tuner_state)

    return optax.GradientTransformationExtraArgs(init, update)
