"""The edge-of-stability rule ``lr = sigma * c / sharpness`` as an Optax transform (DESIGN §3)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from curvopt import rules
from curvopt.config import EdgeOfStabilityConfig, SharpnessConfig
from curvopt.validation import check_positive_int

from .base_method import BaseMethod, as_base_method
from .cdat import sharpness_config
from .settings import is_traced, validated
from .tuner import curvature_tuner, with_base_state

__all__ = ["scale_by_edge_of_stability", "edge_of_stability"]

_EOS = EdgeOfStabilityConfig()
_SHARP = SharpnessConfig()


def scale_by_edge_of_stability(
    sigma: float = _EOS.sigma,
    lr_max: float = _EOS.lr_max,
    sharpness_every: int = 10,
    sharpness_iters: int = _SHARP.iters,
    sharpness_first_iters: int = _SHARP.first_iters,
    sharpness_tol: float = _SHARP.tol,
    base_method: BaseMethod | str | None = None,
    warn_ascent: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``lr = sigma * c / lambda`` (:func:`curvopt.rules.edge_of_stability_lr`) with ``c`` the base's
    stability coefficient and ``lambda`` the online sharpness (Adam: the preconditioned one, which needs the
    base's state: use :func:`edge_of_stability` or pass ``base_state=``). The sharpness is estimated every
    ``sharpness_every`` (>= 1) steps and the last estimate is used in between; a non-positive estimate keeps
    the previous lr. Needs ``value_fn``. Other arguments as :func:`jax_backend.cdat.scale_by_cdat`.
    """
    cfg = validated(EdgeOfStabilityConfig, sigma=sigma, lr_max=lr_max)
    if not is_traced(sharpness_every):
        check_positive_int("sharpness_every", sharpness_every, minimum=1)
    sharp = sharpness_config(sharpness_every, sharpness_iters, sharpness_first_iters, sharpness_tol)
    method = as_base_method(base_method)

    def rule(numerator, curv, value, sharpness, state):
        return rules.edge_of_stability_lr(sharpness, state.last_lr, sigma=cfg.sigma, coefficient=method.coefficient,
                                          lr_max=cfg.lr_max, xp=jnp), None

    return curvature_tuner("scale_by_edge_of_stability", rule, rule_init=lambda zero: None, oracle=None,
                           needs_value=False, sharpness=sharp, method=method,
                           warn_ascent=warn_ascent)


def edge_of_stability(base: optax.GradientTransformation, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(base, scale_by_edge_of_stability(**kwargs))``, handing the base's state to the tuner."""
    return with_base_state(base, scale_by_edge_of_stability(**kwargs))
