"""CDAT and the quadratically greedy rule as Optax transforms (DESIGN §3)."""
from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import optax

from curvopt import rules
from curvopt.config import CDATConfig, SharpnessConfig

from .base_method import BaseMethod, as_base_method
from .settings import validated
from .tuner import curvature_tuner, with_base_state

__all__ = ["scale_by_cdat", "cdat", "scale_by_quadratic_greedy", "quadratic_greedy", "sharpness_config"]

_CDAT = CDATConfig()
_SHARP = SharpnessConfig()


def sharpness_config(every: Any, iters: Any, first_iters: Any, tol: Any) -> SharpnessConfig:
    """The validated online-sharpness settings shared by every tuner."""
    return validated(SharpnessConfig, every=every, iters=iters, first_iters=first_iters, tol=tol)


def scale_by_cdat(
    sigma: float = _CDAT.sigma,
    ema: float = _CDAT.ema,
    eps: float = _CDAT.eps,
    lr_max: float = _CDAT.lr_max,
    curvature: str = "exact",
    sharpness_every: int = _SHARP.every,
    sharpness_iters: int = _SHARP.iters,
    sharpness_first_iters: int = _SHARP.first_iters,
    sharpness_tol: float = _SHARP.tol,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """CDAT in place of ``optax.scale_by_learning_rate``: ``lr = sigma * avg(max(-g^T u, 0)) / avg(|u^T H u| + eps)``.

    Receives the base's direction ``d`` (``u = -d``) and returns ``lr * u``. The averages are exponential
    moving averages with factor ``ema``, started at 0 without bias correction (the correction cancels in the
    ratio, so step 1 is exactly ``sigma * n / d``). ``sigma = 2`` is the step "on edge", ``sigma = 1, ema = 0``
    the quadratically greedy step. ``curvature``: ``"exact"`` (default, forward-over-forward JVP), ``"fd"``
    or ``"secant"`` (:mod:`jax_backend.oracles`). ``sharpness_*``: online top-eigenvalue estimation every
    ``sharpness_every`` steps (0 = off); ``base_method`` (:class:`BaseMethod`) gives the stability
    coefficient and Adam's hyperparameters for the preconditioned sharpness. ``warn_ascent``: also warn from
    inside the jitted step (a ``jax.debug.callback``, which costs milliseconds per step on CPU) when the first
    step's direction points uphill, i.e. the chain was already negated; without it the state's
    ``ascent_steps`` flags it and :func:`jax_backend.stats` warns on the host.

    ``update(updates, state, params, *, value=None, grad=None, value_fn=None, base_state=None, **extra)``:
    ``value_fn(params, **extra)`` is required (the oracle differentiates it); a missing ``grad`` costs one
    ``jax.value_and_grad``. Bad settings raise ``ValueError`` here. State: :class:`TunerState`.
    """
    cfg = validated(CDATConfig, sigma=sigma, ema=ema, eps=eps, lr_max=lr_max, curvature=curvature)
    sharp = sharpness_config(sharpness_every, sharpness_iters, sharpness_first_iters, sharpness_tol)

    def rule(numerator, curv, value, sharpness, state):
        new = rules.cdat_step(numerator, curv, state.rule, sigma=cfg.sigma, ema=cfg.ema, eps=cfg.eps,
                              lr_max=cfg.lr_max, xp=jnp)
        return new.lr, new

    return curvature_tuner("scale_by_cdat", rule, rule_init=rules.cdat_init, oracle=cfg.curvature,
                           needs_value=False, sharpness=sharp, method=as_base_method(base_method),
                           warn_ascent=warn_ascent)


def scale_by_quadratic_greedy(
    lr_max: float = math.inf,
    curvature: str = "exact",
    sharpness_every: int = _SHARP.every,
    sharpness_iters: int = _SHARP.iters,
    sharpness_first_iters: int = _SHARP.first_iters,
    sharpness_tol: float = _SHARP.tol,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The quadratically greedy step ``lr = -g^T u / u^T H u`` (:func:`curvopt.rules.quadratic_greedy_lr`),
    the minimiser of the quadratic model along ``u``; arguments as :func:`scale_by_cdat`."""
    cfg = validated(CDATConfig, sigma=1.0, ema=0.0, eps=0.0, lr_max=lr_max, curvature=curvature)
    sharp = sharpness_config(sharpness_every, sharpness_iters, sharpness_first_iters, sharpness_tol)

    def rule(numerator, curv, value, sharpness, state):
        return rules.quadratic_greedy_lr(numerator, curv, lr_max=cfg.lr_max, xp=jnp), None

    return curvature_tuner("scale_by_quadratic_greedy", rule, rule_init=lambda zero: None,
                           oracle=cfg.curvature, needs_value=False, sharpness=sharp,
                           method=as_base_method(base_method), warn_ascent=warn_ascent)


def cdat(base: optax.GradientTransformation, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, scale_by_cdat(**kwargs))`` (same state layout), handing the base's state to the
    tuner for the preconditioned sharpness (:func:`jax_backend.tuner.with_base_state`)."""
    return with_base_state(base, scale_by_cdat(**kwargs))


def quadratic_greedy(base: optax.GradientTransformation, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, scale_by_quadratic_greedy(**kwargs))``, as :func:`cdat`."""
    return with_base_state(base, scale_by_quadratic_greedy(**kwargs))
