"""Loss access with Optax's line-search convention: ``value``, ``grad``, ``value_fn`` and extra arguments.

``update(updates, state, params, value=..., grad=..., value_fn=..., **extra_args)``: the extra arguments
that ``value_fn`` accepts by name are forwarded to it (as in ``optax.scale_by_backtracking_linesearch``);
unlike Optax's line search, arguments ``value_fn`` does not accept are ignored rather than rejected, so a
chain can carry keywords meant for another member. A ``value_fn`` with ``**kwargs`` receives them all.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax

__all__ = ["fn_kwargs", "bind", "require_value_fn", "value_and_grad_at"]


def fn_kwargs(value_fn: Callable[..., Any] | None, extra_args: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``extra_args`` that ``value_fn`` accepts by keyword."""
    if value_fn is None or not extra_args:
        return {}
    params = inspect.signature(value_fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(extra_args)
    accepted = {n for n, p in params.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in extra_args.items() if k in accepted}


def bind(value_fn: Callable[..., Any], extra_args: dict[str, Any]) -> Callable[[Any], Any]:
    """``params -> value_fn(params, **accepted extra args)``."""
    kwargs = fn_kwargs(value_fn, extra_args)
    return functools.partial(value_fn, **kwargs) if kwargs else value_fn


def require_value_fn(value_fn: Any, tuner: str, why: str) -> Callable[..., Any]:
    """``value_fn``, or a ``ValueError`` (at trace time) explaining why the tuner needs it."""
    if value_fn is None:
        raise ValueError(
            f"{tuner} needs value_fn for {why}: call update(updates, state, params, value=loss, grad=grads, "
            "value_fn=loss_fn, **batch_kwargs) with loss_fn(params, **batch_kwargs) -> scalar")
    if not callable(value_fn):
        raise TypeError(f"value_fn must be callable, got {type(value_fn).__name__}")
    return value_fn


def value_and_grad_at(params: Any, value: Any, grad: Any, f: Callable[[Any], Any] | None, *,
                      need_value: bool, tuner: str) -> tuple[Any, Any]:
    """The loss value and gradient at ``params``: the given ones, else computed from ``f`` (bound).

    A missing ``grad`` costs one ``jax.value_and_grad`` (a forward and a backward pass, which also gives the
    value); a missing ``value`` when ``need_value`` costs one forward pass. Pass both to avoid the cost.
    Without ``need_value`` a missing value stays ``None`` (only the gradient is checked for finiteness).
    """
    if grad is None:
        f = require_value_fn(f, tuner, "the gradient (grad was not given)")
        computed_value, grad = jax.value_and_grad(f)(params)
        value = computed_value if value is None else value
    elif value is None and need_value:
        f = require_value_fn(f, tuner, "the loss value (value was not given)")
        value = f(params)
    return value, grad
