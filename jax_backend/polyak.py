"""The Polyak step as an Optax transform (DESIGN §3)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from curvopt import rules
from curvopt.config import PolyakConfig, SharpnessConfig

from .base_method import BaseMethod, as_base_method
from .cdat import sharpness_config
from .settings import validated
from .tuner import curvature_tuner, with_base_state

__all__ = ["scale_by_polyak", "polyak"]

_POLYAK = PolyakConfig()
_SHARP = SharpnessConfig()


def scale_by_polyak(
    f_star: float = _POLYAK.f_star,
    lr_max: float = _POLYAK.lr_max,
    sharpness_every: int = _SHARP.every,
    sharpness_iters: int = _SHARP.iters,
    sharpness_first_iters: int = _SHARP.first_iters,
    sharpness_tol: float = _SHARP.tol,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Polyak's step ``lr = min((f - f_star) / (-g^T u), lr_max)`` (:func:`curvopt.rules.polyak_lr`).

    Needs the loss value (``value=``, else one forward pass of ``value_fn``); no curvature (the state's
    ``curvature`` is NaN). ``value_fn`` is needed only for a missing value/grad or the online sharpness.
    Other arguments as :func:`jax_backend.cdat.scale_by_cdat`.
    """
    cfg = validated(PolyakConfig, f_star=f_star, lr_max=lr_max)
    sharp = sharpness_config(sharpness_every, sharpness_iters, sharpness_first_iters, sharpness_tol)

    def rule(numerator, curv, value, sharpness, state):
        return rules.polyak_lr(value, numerator, f_star=cfg.f_star, lr_max=cfg.lr_max, xp=jnp), None

    return curvature_tuner("scale_by_polyak", rule, rule_init=lambda zero: None, oracle=None,
                           needs_value=True, sharpness=sharp, method=as_base_method(base_method),
                           warn_ascent=warn_ascent)


def polyak(base: optax.GradientTransformation, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, scale_by_polyak(**kwargs))``, handing the base's state to the tuner."""
    return with_base_state(base, scale_by_polyak(**kwargs))
