"""The tuner registry: builds each tuner for each backend from a name and settings.

Names (``--tuners``), each optionally with settings ``name:key=value,key=value`` (the whole string is then
the run's label, e.g. ``cdat:sigma=1.5,ema=0``):

=============  ==================================================================================
``constant``   the baseline: the bare base optimizer at a fixed lr; one run per value of the grid
               (``constant:lr=0.1`` runs one value)
``cdat``       CDAT, sigma=2, ema=0.9 (the step "on edge")
``greedy``     the quadratically greedy step (CDAT sigma=1, ema=0)
``linesearch`` Armijo backtracking line search (the core's defaults: c=1e-4, x2 increase, x0.8 decrease)
``polyak``     Polyak step, f*=0
``eos``        edge-of-stability rule lr = sigma * c / sharpness (sigma * c = 3 for GD)
``prodigy``    peer baseline (``prodigyopt`` for torch, ``optax.contrib.prodigy`` for JAX), lr=1
``schedulefree`` peer baseline: schedule-free AdamW (``schedulefree`` / ``optax.contrib``), lr=2.5e-3
=============  ==================================================================================

Bases as the paper pairs them: gradient descent (``gd``) or heavy ball (``momentum``, 0.9) for ResNet
and the MLP, Adam for ViT and LM. The curvature tuners use the ``fd`` oracle in both backends by default
(the same estimate on both sides; pass ``curvature=exact`` for JAX's forward-over-forward JVP).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TUNERS", "TunerSpec", "parse_tuner", "build_torch", "build_optax", "available", "ExtraMissing",
           "BASES"]

BASES = ("gd", "momentum", "adam")
MOMENTUM = 0.9


class ExtraMissing(RuntimeError):
    """An optional peer baseline is not installed (the run is skipped with this message)."""


@dataclass(frozen=True)
class TunerSpec:
    name: str
    kind: str  # "constant" | "curvopt" | "extra"
    defaults: dict = field(default_factory=dict)
    torch_cls: str | None = None
    optax_fn: str | None = None
    doc: str = ""


_CURV = {"curvature": "fd"}
TUNERS: dict[str, TunerSpec] = {
    "constant": TunerSpec("constant", "constant", {}, doc="tuned constant learning rate (grid)"),
    "cdat": TunerSpec("cdat", "curvopt", {"sigma": 2.0, "ema": 0.9, **_CURV}, "CDAT", "cdat", "CDAT sigma=2"),
    "greedy": TunerSpec("greedy", "curvopt", dict(_CURV), "QuadraticGreedy", "quadratic_greedy",
                        "quadratically greedy (sigma=1)"),
    "linesearch": TunerSpec("linesearch", "curvopt", {}, "ArmijoLineSearch", "armijo", "Armijo line search"),
    "polyak": TunerSpec("polyak", "curvopt", {"f_star": 0.0}, "PolyakStep", "polyak", "Polyak step"),
    "eos": TunerSpec("eos", "curvopt", {"sigma": 1.5}, "EdgeOfStability", "edge_of_stability",
                     "edge-of-stability rule"),
    "prodigy": TunerSpec("prodigy", "extra", {"lr": 1.0}, doc="Prodigy (peer baseline)"),
    "schedulefree": TunerSpec("schedulefree", "extra", {"lr": 2.5e-3, "warmup_steps": 10},
                              doc="schedule-free AdamW (peer baseline)"),
}


def _coerce(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() in ("inf", "infinity"):
        return math.inf
    return v


def parse_tuner(label: str) -> tuple[str, dict]:
    """``"cdat:sigma=1.5,ema=0"`` -> ``("cdat", {"sigma": 1.5, "ema": 0})``; validates the name."""
    name, _, rest = label.partition(":")
    if name not in TUNERS:
        raise ValueError(f"unknown tuner {name!r}; expected one of {sorted(TUNERS)}")
    settings = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"tuner setting {item!r} in {label!r} is not key=value")
        settings[k.strip()] = _coerce(v.strip())
    return name, settings


def settings_for(name: str, overrides: dict) -> dict:
    s = dict(TUNERS[name].defaults)
    s.update(overrides)
    return s


def available(name: str, backend: str) -> str | None:
    """None if the tuner can run on the backend, else the reason (for a skip message)."""
    if name == "prodigy":
        mod = "prodigyopt" if backend == "torch" else "optax.contrib"
    elif name == "schedulefree":
        mod = "schedulefree" if backend == "torch" else "optax.contrib"
    elif TUNERS[name].kind == "curvopt":
        mod = "curvopt.torch" if backend == "torch" else "curvopt.optax"
    else:
        return None
    try:
        m = importlib.import_module(mod)
    except ImportError as e:
        return f"{name} on {backend} needs {mod!r} ({e}); pip install {mod.split('.')[0]}"
    if TUNERS[name].kind == "curvopt":
        attr = TUNERS[name].torch_cls if backend == "torch" else TUNERS[name].optax_fn
        if not hasattr(m, attr):
            return f"{mod}.{attr} is not available yet"
    return None


def _require(name: str, backend: str) -> None:
    why = available(name, backend)
    if why:
        raise ExtraMissing(why)


def _tuner_kwargs(name: str, settings: dict, sharpness_every: int) -> dict:
    """The tuner's settings plus the experiment's online-sharpness period (the eos rule needs one >= 1)."""
    kw = dict(settings)
    if sharpness_every:
        kw.setdefault("sharpness_every", sharpness_every)
    if name == "eos":
        kw.setdefault("sharpness_every", 1)
    return kw


# -------------------------------------------------------------------------------------------- torch
def torch_base(base: str, params, lr: float):
    import torch

    if base == "gd":
        return torch.optim.SGD(params, lr=lr)
    if base == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)
    if base == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    raise ValueError(f"unknown base {base!r}; expected one of {BASES}")


def build_torch(name: str, settings: dict, base: str, model, *, sharpness_every: int = 0, params=None):
    """A ``torch.optim.Optimizer`` whose ``step(closure)`` trains ``model`` (LBFGS closure convention)."""
    params = list(model.parameters()) if params is None else params
    spec = TUNERS[name]
    if spec.kind == "constant":
        return torch_base(base, params, float(settings["lr"]))
    if spec.kind == "extra":
        _require(name, "torch")
        s = dict(settings)
        if name == "prodigy":
            mod = importlib.import_module("prodigyopt")
            return mod.Prodigy(params, lr=s.pop("lr"), **s)
        mod = importlib.import_module("schedulefree")
        opt = mod.AdamWScheduleFree(params, lr=s.pop("lr"), **s)
        opt.train()
        return opt
    _require(name, "torch")
    ct = importlib.import_module("curvopt.torch")
    kw = _tuner_kwargs(name, settings, sharpness_every)
    return getattr(ct, spec.torch_cls)(torch_base(base, params, 1.0), modules=model, **kw)


def torch_stats(opt) -> dict:
    """The tuner's latest per-step numbers as floats (``nan`` when absent); constant: just the lr."""
    st = getattr(opt, "stats", None)
    if st is None:
        return {"lr": float(opt.param_groups[0]["lr"])}
    out = {}
    for k, v in st.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


# -------------------------------------------------------------------------------------------- optax
def optax_direction(base: str):
    """The base's raw direction ``d`` (gradient-like; the tuner returns ``-lr * d``)."""
    import optax

    if base == "gd":
        return optax.identity()
    if base == "momentum":
        return optax.trace(decay=MOMENTUM)
    if base == "adam":
        return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    raise ValueError(f"unknown base {base!r}; expected one of {BASES}")


def base_method(base: str):
    from curvopt.optax import BaseMethod

    return {"gd": BaseMethod.gd(), "momentum": BaseMethod.heavy_ball(MOMENTUM), "adam": BaseMethod.adam()}[base]


def build_optax(name: str, settings: dict, base: str, *, sharpness_every: int = 0):
    """An Optax transformation; curvopt tuners get ``value``/``grad``/``value_fn``/``batch`` in ``update``."""
    import optax

    spec = TUNERS[name]
    if spec.kind == "constant":
        return optax.chain(optax_direction(base), optax.scale(-float(settings["lr"])))
    if spec.kind == "extra":
        _require(name, "jax")
        s = dict(settings)
        if name == "prodigy":
            return optax.contrib.prodigy(learning_rate=s.pop("lr"), **s)
        return optax.contrib.schedule_free_adamw(learning_rate=s.pop("lr"), **s)
    _require(name, "jax")
    co = importlib.import_module("curvopt.optax")
    kw = _tuner_kwargs(name, settings, sharpness_every)
    kw.setdefault("base_method", base_method(base))
    return getattr(co, spec.optax_fn)(optax_direction(base), **kw)
