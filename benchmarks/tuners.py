"""The tuner registry: what each ``--tuners`` name builds, in each backend, and how its settings are checked.

A tuner label is ``NAME`` or ``NAME:key=value;key=value`` (the whole string is the run's label, e.g.
``cdat:startup=paper``). Settings not given are the library's (or the peer package's) own defaults: the
benchmark never restates a default, so ``cdat`` is always what ``curvopt.torch.CDAT(base)`` does.

==============  ================================================================================
``constant``    the bare base optimizer at a fixed lr; one run per value of the grid (``constant:lr=0.1``: one)
``cdat``        CDAT (library defaults; ``cdat:startup=paper`` is the paper-exact start-up)
``greedy``      the quadratically greedy step (``QuadraticGreedy``)
``linesearch``  Armijo backtracking line search (``ArmijoLineSearch``)
``polyak``      Polyak step (``PolyakStep``, f* = 0)
``eos``         edge-of-stability rule (``EdgeOfStability``)
``prodigy``     peer: Prodigy (``prodigyopt.Prodigy`` / ``optax.contrib.prodigy``), its defaults
``schedulefree`` peer: schedule-free AdamW (``schedulefree.AdamWScheduleFree`` / ``optax.contrib``)
``dadapt``      peer: D-Adaptation Adam (``dadaptation.DAdaptAdam`` / ``optax.contrib.dadapt_adamw``)
``sophia``      peer: Sophia-H (``pytorch_optimizer.SophiaH``; torch only: optax's sophia has no default lr)
==============  ================================================================================

Bases as the paper pairs them: gradient descent (``gd``) or heavy ball (``momentum``, 0.9) for ResNet and
the MLP, Adam for ViT and LM. The peers are complete optimizers and ignore the base.

:func:`check_settings` validates a label's settings without building a model (the command line is checked
before any run): the curvopt tuners through the core's rule values (``curvopt.rules``) and settings
(``curvopt.config``), the peers against their constructor's signature and a construction on a dummy tensor.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["TUNERS", "TunerSpec", "parse_tuner", "canonical_label", "check_settings", "available", "build_torch",
           "build_optax", "torch_stats", "BASES", "MOMENTUM"]

BASES = ("gd", "momentum", "adam")
MOMENTUM = 0.9


@dataclass(frozen=True)
class TunerSpec:
    name: str
    kind: str  # "constant" | "curvopt" | "peer"
    doc: str
    torch_attr: str | None = None  # curvopt.torch class, or "module:Class" of a peer
    optax_attr: str | None = None  # curvopt.optax function, or "module:function" of a peer
    rule: str | None = None  # the core rule whose fields are the tuner's hyperparameters
    options: tuple[str, ...] = ()  # backend keywords beside the rule's fields


_SHARP = ("sharpness",)  # keywords both backends take beside the rule's fields
_CURV = ("curvature",) + _SHARP
TUNERS: dict[str, TunerSpec] = {t.name: t for t in (
    TunerSpec("constant", "constant", "tuned constant learning rate (grid)"),
    TunerSpec("cdat", "curvopt", "CDAT (library defaults)", "CDAT", "cdat", "CDATRule", _CURV + ("numerator",)),
    TunerSpec("greedy", "curvopt", "quadratically greedy step", "QuadraticGreedy", "quadratic_greedy", "greedy",
              _CURV),
    TunerSpec("linesearch", "curvopt", "Armijo line search", "ArmijoLineSearch", "armijo", "ArmijoRule", _SHARP),
    TunerSpec("polyak", "curvopt", "Polyak step", "PolyakStep", "polyak", "PolyakRule", _SHARP),
    TunerSpec("eos", "curvopt", "edge-of-stability rule", "EdgeOfStability", "edge_of_stability",
              "EdgeOfStabilityRule", _SHARP),
    TunerSpec("prodigy", "peer", "Prodigy (peer, its defaults)", "prodigyopt:Prodigy", "optax.contrib:prodigy"),
    TunerSpec("schedulefree", "peer", "schedule-free AdamW (peer, its defaults)",
              "schedulefree:AdamWScheduleFree", "optax.contrib:schedule_free_adamw"),
    TunerSpec("dadapt", "peer", "D-Adaptation Adam (peer, its defaults)", "dadaptation:DAdaptAdam",
              "optax.contrib:dadapt_adamw"),
    TunerSpec("sophia", "peer", "Sophia-H (peer, its defaults; torch only)", "pytorch_optimizer:SophiaH", None),
)}


# ------------------------------------------------------------------------------------------ parsing
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
    return v  # strings stay strings: a numeric hyperparameter given "abc" is refused by check_settings


def parse_tuner(label: str) -> tuple[str, dict]:
    """``"cdat:sigma=1.5;ema=0"`` -> ``("cdat", {"sigma": 1.5, "ema": 0})``. Checks the name and the syntax;
    :func:`check_settings` checks the values."""
    name, _, rest = label.partition(":")
    if name not in TUNERS:
        raise ValueError(f"unknown tuner {name!r} in {label!r}; expected one of {', '.join(TUNERS)}")
    settings: dict = {}
    for item in _setting_items(rest):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"tuner setting {item!r} in {label!r} is not key=value")
        if k.strip() in settings:
            raise ValueError(f"tuner setting {k.strip()!r} given twice in {label!r}")
        settings[k.strip()] = _coerce(v.strip())
    return name, settings


def canonical_label(label: str) -> str:
    """One spelling per run: ``"cdat:sigma=2, ema=0.9"`` -> ``"cdat:ema=0.9;sigma=2"`` (settings sorted, ``;``,
    no spaces; the values as written). The label keys the run in ``results.jsonl`` (a resume finds it) and names its
    row in the report."""
    name, _, rest = label.partition(":")
    items = sorted(k.strip() + eq + v.strip() for k, eq, v in (i.partition("=") for i in _setting_items(rest)))
    return f"{name}:{';'.join(items)}" if items else name


def _setting_items(rest: str) -> list[str]:
    """The ``key=value`` items after a label's ``:`` (separated by ``;`` or ``,``), stripped, empty ones dropped."""
    return [s.strip() for s in rest.replace(",", ";").split(";") if s.strip()]


def _rule(spec: TunerSpec, settings: dict, base: str):
    """The core rule value for the curvopt tuner's rule settings (validated by the core)."""
    from curvopt import rules

    if spec.rule == "greedy":
        return rules.CDATRule.greedy(**settings)
    cls = getattr(rules, spec.rule)
    kw = dict(settings)
    if spec.rule == "EdgeOfStabilityRule":
        given = kw.pop("stability_coefficient", None)
        kw["coefficient"] = _base_method(base).coefficient if given is None else given
    return cls(**kw)


def _rule_keys(spec: TunerSpec) -> tuple[str, ...]:
    from curvopt import rules

    if spec.rule == "greedy":
        return ("lr_max",)
    keys = tuple(f.name for f in dataclasses.fields(getattr(rules, spec.rule)))
    return tuple("stability_coefficient" if k == "coefficient" else k for k in keys)


def _peer_class(spec: TunerSpec, backend: str):
    mod, _, attr = (spec.torch_attr if backend == "torch" else spec.optax_attr).partition(":")
    return getattr(importlib.import_module(mod), attr)


def check_settings(name: str, settings: dict, base: str, backends: Sequence[str] = ("torch",)) -> dict:
    """Validate a tuner's settings (no model, no backend needed for the curvopt tuners): raises ``ValueError``
    naming the setting and what is accepted. A peer's settings are its own constructor's keywords, checked against
    the implementation of every one of ``backends`` it runs on (the PyTorch package's and ``optax.contrib``'s
    names differ: ``lr`` against ``learning_rate``). Returns the settings, converted."""
    spec = TUNERS[name]
    where = f"{name}:" + ";".join(f"{k}={v}" for k, v in settings.items())
    try:
        if spec.kind == "constant":
            extra = set(settings) - {"lr"}
            if extra:
                raise ValueError(f"unknown setting(s) {sorted(extra)}; constant takes only lr")
            if "lr" in settings:
                lr = settings["lr"]
                if isinstance(lr, (bool, str)) or not math.isfinite(float(lr)) or float(lr) <= 0:
                    raise ValueError(f"lr must be a positive finite number, got {lr!r}")
                return {"lr": float(lr)}
            return {}
        if spec.kind == "curvopt":
            from curvopt.config import CURVATURE_ORACLES, as_sharpness

            known = _rule_keys(spec) + spec.options
            extra = [k for k in settings if k not in known]
            if extra:
                raise ValueError(f"unknown setting(s) {extra}; {name} accepts {', '.join(known)}")
            _rule(spec, {k: v for k, v in settings.items() if k in _rule_keys(spec)}, base)
            if "curvature" in settings and settings["curvature"] not in CURVATURE_ORACLES:
                raise ValueError(f"curvature must be one of {CURVATURE_ORACLES}, got {settings['curvature']!r}")
            if "sharpness" in settings:
                as_sharpness(settings["sharpness"])
            return dict(settings)
        # peers: keyword names from the constructor, values checked by constructing it on a dummy tensor/array
        for backend in backends:
            if available(name, backend) is None:
                _check_peer_settings(spec, backend, settings)
        return dict(settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tuner {where!r}: {e}") from None


def _check_peer_settings(spec: TunerSpec, backend: str, settings: dict) -> None:
    """A peer's ``settings`` against its ``backend`` implementation's keywords, then used to build it on a dummy
    parameter (``ValueError``/``TypeError`` naming what is wrong)."""
    make = _peer_class(spec, backend)
    attr = spec.torch_attr if backend == "torch" else spec.optax_attr
    signature = inspect.signature(make.__init__ if backend == "torch" else make).parameters
    params = [p for p in signature if p not in ("self", "params")]
    extra = [k for k in settings if k not in params]
    if extra:
        raise ValueError(f"unknown setting(s) {extra} for {backend}; {attr} accepts {', '.join(params)} (a peer's "
                         "settings go to each backend's own implementation: where their names differ, run one "
                         "--backend at a time)")
    for k, v in settings.items():  # (the constructors compare a string with a number: a cryptic TypeError)
        default = signature[k].default
        if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
            raise ValueError(f"{k} must be a number (its default: {default!r}), got {v!r}")
    if backend == "torch":
        import torch

        make([torch.zeros(1, requires_grad=True)], **settings)
    else:
        import jax.numpy as jnp

        make(**settings).init(jnp.zeros(1))


def available(name: str, backend: str) -> str | None:
    """None if the tuner can run on the backend, else the reason (for a skip message)."""
    spec = TUNERS[name]
    if spec.kind == "constant":
        return None
    if spec.kind == "curvopt":
        mod, attr = ("curvopt.torch", spec.torch_attr) if backend == "torch" else ("curvopt.optax", spec.optax_attr)
    else:
        target = spec.torch_attr if backend == "torch" else spec.optax_attr
        if target is None:
            return f"{name} has no {backend} implementation with default settings"
        mod, _, attr = target.partition(":")
    if importlib.util.find_spec(mod.split(".")[0]) is None:
        return f"{name} on {backend} needs the {mod.split('.')[0]!r} package (pip install -e '.[bench]')"
    m = importlib.import_module(mod)  # installed: a real import error propagates
    if not hasattr(m, attr):
        return f"{mod}.{attr} does not exist"
    return None


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


def _curvopt_kwargs(spec: TunerSpec, settings: dict, sharpness: int) -> dict:
    kw = dict(settings)
    if sharpness and "sharpness" not in kw:
        kw["sharpness"] = sharpness  # the experiment's online-sharpness period (for the plots)
    return kw


def build_torch(name: str, settings: dict, base: str, model, *, sharpness: int = 0, params=None,
                functional_loss=None):
    """A ``torch.optim.Optimizer`` whose ``step(closure)`` trains ``model``; with the online sharpness on, a
    curvopt tuner gets ``functional_loss`` (its products are then exact, as Optax's: a finite difference of
    gradients crosses the ReLUs' kinks in float32 and read the sharpness 2-11x too high)."""
    params = list(model.parameters()) if params is None else params
    spec = TUNERS[name]
    if spec.kind == "constant":
        return torch_base(base, params, float(settings["lr"]))
    if spec.kind == "peer":
        opt = _peer_class(spec, "torch")(params, **settings)
        if hasattr(opt, "train"):  # schedule-free: train mode for the steps, eval mode for evaluation
            opt.train()
        return opt
    ct = importlib.import_module("curvopt.torch")
    kw = _curvopt_kwargs(spec, settings, sharpness)
    if kw.get("sharpness") and functional_loss is not None:
        kw["functional_loss"] = functional_loss
    return getattr(ct, spec.torch_attr)(torch_base(base, params, 1.0), modules=model, **kw)


def torch_stats(opt) -> dict:
    """The tuner's latest per-step numbers as floats (``nan`` when absent); others: the group lr."""
    st = getattr(opt, "stats", None)
    if not isinstance(st, dict):
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
    """The base's raw direction (gradient-like; the tuner or ``optax.scale(-lr)`` turns it into a step)."""
    import optax

    if base == "gd":
        return optax.identity()
    if base == "momentum":
        return optax.trace(decay=MOMENTUM)
    if base == "adam":
        return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    raise ValueError(f"unknown base {base!r}; expected one of {BASES}")


def _base_method(base: str):
    from curvopt.base import BaseMethod

    return {"gd": BaseMethod.gd(), "momentum": BaseMethod.heavy_ball(MOMENTUM), "adam": BaseMethod.adam()}[base]


def build_optax(name: str, settings: dict, base: str, *, sharpness: int = 0):
    """An Optax transformation; curvopt tuners get ``value``/``grad``/``value_fn``/``batch`` in ``update``."""
    import optax

    spec = TUNERS[name]
    if spec.kind == "constant":
        return optax.chain(optax_direction(base), optax.scale(-float(settings["lr"])))
    if spec.kind == "peer":
        return _peer_class(spec, "jax")(**settings)
    co = importlib.import_module("curvopt.optax")
    kw = _curvopt_kwargs(spec, settings, sharpness)
    kw.setdefault("base_method", _base_method(base))
    return getattr(co, spec.optax_attr)(optax_direction(base), **kw)
