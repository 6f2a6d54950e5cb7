"""Loss access with Optax's line-search convention: ``value``, ``grad``, ``value_fn`` and extra arguments.

``update(updates, state, params, value=..., grad=..., value_fn=..., **extra_args)``: the extra arguments
that ``value_fn`` accepts by name are forwarded to it (as in ``optax.scale_by_backtracking_linesearch``);
unlike Optax's line search, arguments ``value_fn`` does not accept are ignored rather than rejected, so a
chain can carry keywords meant for another member. A ``value_fn`` with ``**kwargs`` receives them all.

``value_fn`` may return the loss as a scalar or a one-element array (shape ``(1,)``), or ``(loss, aux)`` as a
``has_aux`` loss does (flax examples): the tuners use the loss and **drop the aux** (a probe's aux belongs to
a probe point, not to the step; take the aux from your own forward pass at ``params``). ``value`` likewise
may have shape ``()`` or ``(1,)``; the tuners' state never changes shape because of it.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["fn_kwargs", "bind", "scalar_loss", "require_value_fn", "value_and_grad_at", "check_fits_params",
           "varying_axes", "check_loss_agrees", "check_params_whole", "LOSS_KEYWORDS", "misspelled_keywords"]

#: the keywords through which the tuners' ``update`` takes the loss
LOSS_KEYWORDS = ("value", "grad", "value_fn")


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


def scalar_loss(out: Any) -> Any:
    """The loss as a 0-d array from a ``value_fn`` output or a ``value``: ``(loss, aux)`` gives ``loss``; a
    one-element array is reshaped to ``()``; anything larger is refused (at trace time)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = jnp.asarray(out)
    if out.size != 1:
        raise ValueError(f"the loss must be a scalar (or shape (1,), or (loss, aux)), got shape {out.shape}")
    if out.dtype == jnp.bool_ or jnp.issubdtype(out.dtype, jnp.complexfloating):
        raise ValueError(f"the loss must be a real number, got dtype {out.dtype}")
    return out.reshape(())


#: how Python words a call that does not fit a signature (the TypeErrors :func:`bind` explains)
_SIGNATURE_ERROR = re.compile(r"missing \d+ required|unexpected keyword argument|positional argument|"
                              r"multiple values for argument")


def bind(value_fn: Callable[..., Any], extra_args: dict[str, Any]) -> Callable[[Any], Any]:
    """``params -> loss`` (0-d): ``value_fn(params, **accepted extra args)`` through :func:`scalar_loss`. A
    ``TypeError`` from the call says which extra arguments were left out (a ``value_fn`` taking ``*args`` or
    positional-only parameters, or other names), or, with none left out, how the tuners call ``value_fn`` (a batch
    not passed to ``update``, a ``value_fn`` written to take a model); another ``TypeError`` (a shape mismatch in
    the loss) passes unchanged."""
    kwargs = fn_kwargs(_callable(value_fn), extra_args)
    bound = functools.partial(value_fn, **kwargs) if kwargs else value_fn
    left_out = sorted(set(extra_args) - set(kwargs))

    def f(params: Any) -> Any:
        try:
            out = bound(params)
        except TypeError as e:
            if not _SIGNATURE_ERROR.search(str(e)):  # a TypeError of the loss's own computation (shapes, dtypes)
                raise
            why = (f"these were not passed: {left_out}. Name them in value_fn's signature (value_fn(params, x, y)), "
                   "not *args or positional-only." if left_out else
                   "the batch goes to update() by keyword too (update(..., value_fn=loss_fn, x=x, y=y); through "
                   "the README's LossTrainState, apply_gradients(..., loss_kwargs=dict(x=x, y=y))). The first "
                   "argument is the parameter tree the tuner probes, not a model: with nnx the state nnx.Optimizer's "
                   "wrt= selects; rebuild the model inside value_fn with nnx.merge(graphdef, params, rest, copy=True).")
            raise TypeError(
                f"value_fn(params, **{sorted(kwargs)}) raised {type(e).__name__}: {e}. The tuners pass value_fn the "
                "update's extra arguments by keyword, only those its signature names (parameters that can be "
                f"passed by keyword, or **kwargs); {why}") from e
        except Exception as e:
            if type(e).__name__ != "TraceContextError":  # flax's (not imported: flax is optional)
                raise
            raise ValueError(
                f"value_fn raised flax's TraceContextError: {e}. The tuners call value_fn inside their own "
                "transformations (jax.jvp, jax.grad), where it may not write to the model's nnx Variables "
                "(BatchNorm statistics, rng streams): rebuild the model inside value_fn from its argument and "
                "copies of the rest, graphdef, params, rest = nnx.split(model, nnx.Param, ...); rest = "
                "nnx.clone(rest); value_fn(params, x, y) applies nnx.merge(graphdef, params, rest, copy=True), "
                "and do not close over the model (docs/optax.md, nnx)") from e
        return scalar_loss(out)
    return f


def require_value_fn(value_fn: Any, tuner: str, why: str) -> Callable[..., Any]:
    """``value_fn``, or a ``ValueError`` (at trace time) explaining why the tuner needs it."""
    if value_fn is None:
        raise ValueError(
            f"{tuner} needs value_fn for {why}: call update(updates, state, params, value=loss, grad=grads, "
            "value_fn=loss_fn, **batch_kwargs) with loss_fn(params, **batch_kwargs) -> scalar")
    return _callable(value_fn)


def _callable(value_fn: Any) -> Callable[..., Any]:
    if not callable(value_fn):
        raise TypeError(f"value_fn must be callable (value_fn(params, **batch) -> loss), got "
                        f"{type(value_fn).__name__}; the loss's value goes to value=")
    return value_fn


def value_and_grad_at(params: Any, value: Any, grad: Any, f: Callable[[Any], Any] | None, *,
                      need_value: bool, tuner: str) -> tuple[Any, Any]:
    """The loss value (0-d, or None) and gradient at ``params``: the given ones, else computed from ``f``.

    A missing ``grad`` costs one ``jax.value_and_grad`` (which also gives the value); a missing ``value``
    when ``need_value`` costs one forward pass. Without ``need_value`` a missing value stays ``None``.
    """
    if grad is None:
        if f is None:
            raise ValueError(
                f"{tuner} needs the gradient: pass grad= (update(updates, state, params, grad=grads)), or "
                "value_fn= to compute it, or build the optimizer with the convenience (e.g. "
                "curvopt.optax.cdat(optax.scale_by_adam())), which hands the incoming gradient to the tuner "
                "(the closure-free mode of TrainState.apply_gradients / nnx.Optimizer.update)")
        computed_value, grad = jax.value_and_grad(f)(params)
        value = computed_value if value is None else value
    elif value is None and need_value:
        value = require_value_fn(f, tuner, "the loss value (value was not given)")(params)
    return (None if value is None else scalar_loss(value)), grad


def check_fits_params(params: Any, grad: Any, f: Callable[[Any], Any] | None, tuner: str) -> None:
    """At trace time: a ``ValueError`` when ``grad`` does not have the structure of ``params``, or when the
    parameters are one vector (as ``optax.flatten`` around the tuner hands them over: it ravels the updates and
    the parameters but passes ``grad=`` and ``value_fn=`` through as they are) and ``f`` cannot take them (an
    abstract evaluation, no computation). A tree of several leaves is not evaluated here: its ``value_fn``
    fails, if at all, with its own error."""
    leaves = jax.tree.leaves(params)
    flat = len(leaves) == 1 and jnp.ndim(leaves[0]) == 1
    hint = (" optax.flatten around a tuner ravels the updates and the parameters into one vector but passes "
            "grad= and value_fn= through unraveled; the tuners concatenate the leaves themselves, so leave "
            "optax.flatten out (or ravel grad and value_fn's argument yourself: jax.flatten_util.ravel_pytree)."
            if flat else "")
    if grad is not None and jax.tree.structure(grad) != jax.tree.structure(params):
        raise ValueError(f"{tuner}: grad= must have the structure of params: got {jax.tree.structure(grad)} for "
                         f"{jax.tree.structure(params)}.{hint}")
    if grad is not None:
        for (path, g), p in zip(jax.tree_util.tree_leaves_with_path(grad), leaves):
            if jnp.shape(g) != jnp.shape(p):
                raise ValueError(f"{tuner}: grad= must have the shapes of params: grad{jax.tree_util.keystr(path)} "
                                 f"has shape {jnp.shape(g)}, the parameter {jnp.shape(p)}")
    if flat and f is not None:
        try:
            jax.eval_shape(f, params)
        except Exception as e:  # the user's function on the wrong argument: say why, the error chained below
            raise ValueError(f"{tuner}: value_fn cannot take the parameters the tuner was handed, one vector of "
                             f"{leaves[0].shape[0]} entries ({type(e).__name__}: {e}).{hint}") from e


def varying_axes(x: Any) -> frozenset:
    """The ``shard_map`` mesh axes over which ``x`` (an array or an abstract value) varies, as JAX types it under
    ``check_vma=True``; empty elsewhere (outside ``shard_map``, under ``check_vma=False`` and under ``pmap``, where
    nothing is typed so)."""
    aval = x if isinstance(x, jax.core.AbstractValue) else jax.typeof(x)
    typed = getattr(aval, "manual_axis_type", None)  # JAX 0.10; earlier releases: aval.vma
    return frozenset(typed.varying if typed is not None else getattr(aval, "vma", ()))


def check_params_whole(tuner: str, params: Any, value: Any, loss: Any) -> None:
    """At trace time, inside ``shard_map`` (``check_vma=True``): a ``ValueError`` when the parameters are split over a
    mesh axis, each device holding a part of them (tensor parallelism inside ``shard_map``): some of them vary over
    the axis and others do not, or they do and the loss (``value``, or ``loss``, ``value_fn``'s abstract loss) does
    not. The tuner's inner products over the parameters would be each device's part (a field test: JAX's ``cond``
    type errors, and under ``check_vma=False``, where nothing is typed, each device its own rate, 0.31 and 0.27
    where one device took 0.75). Parameters that all vary with the loss (one model per device) are not refused
    here."""
    each = [varying_axes(x) for x in jax.tree.leaves(params)]
    if not each:
        return
    split = frozenset().union(*each) - frozenset.intersection(*each)
    for x in (value, loss):
        if x is not None:
            split |= frozenset().union(*each) - varying_axes(x)
    if split:
        raise ValueError(
            f"{tuner}: the parameters are split over the shard_map mesh axes {sorted(split)} (each device holds a "
            "part of them), and the tuner's inner products over the parameters would be each device's part: its "
            "rate would differ between devices. Shard the parameters with jax.jit and NamedSharding instead (the "
            "compiler then reduces over the devices; docs/optax.md), or run the tuner outside shard_map on the "
            "gathered updates")


def check_loss_agrees(tuner: str, params: Any, value: Any, loss: Any) -> None:
    """At trace time, inside ``shard_map`` (``check_vma=True``): a ``ValueError`` when ``value`` or ``loss``
    (``value_fn``'s loss, an abstract value) varies over a mesh axis the parameters do not: each device's own
    loss where the step needs the batch's (``lax.pmean``), which gave each device its own rate (CDAT behind gradient
    descent 0.561 against one device's 0.814, the greedy rate 1.8e-7 against 7.9 in a field test) or JAX's
    ``cond``/``while_loop`` type errors."""
    own = frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(params)))
    for what, x in (("value=", value), ("value_fn's loss", loss)):
        axes = sorted(varying_axes(x) - own) if x is not None else []
        if axes:
            mean = f"jax.lax.pmean(loss, {axes[0] if len(axes) == 1 else tuple(axes)!r})"
            fix = f"value={mean}" if what == "value=" else f"return {mean} from value_fn"
            raise ValueError(
                f"{tuner}: {what} varies over the shard_map mesh axes {axes} (each device's own loss) and the "
                "parameters do not: the tuner needs the loss of the whole batch, the same on every device. Average "
                f"it over the devices: {fix}")


def misspelled_keywords(extra_args: dict[str, Any], value_fn: Any) -> dict[str, str]:
    """``{keyword: loss keyword}`` for the extra arguments that look like a misspelled :data:`LOSS_KEYWORDS`
    (``grads=`` for ``grad=``, ``valuefn=``) and that ``value_fn`` does not take: such an argument is otherwise
    ignored, and the tuner runs without the loss or gradient it was meant to get."""
    taken = fn_kwargs(_callable(value_fn), extra_args) if value_fn is not None else {}
    found = {}
    for key in extra_args:
        close = difflib.get_close_matches(key, LOSS_KEYWORDS, n=1, cutoff=0.8)
        if close and key not in taken:
            found[key] = close[0]
    return found
