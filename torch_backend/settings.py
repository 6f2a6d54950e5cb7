"""The settings surface the PyTorch tuners share: constructor defaults read from the core's rule values, rule
fields assignable on the tuner (``opt.sigma = ...``), and the ``sharpness=`` argument with the 0.1 keywords it
replaces (deprecated for one release)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from curvopt.config import LEGACY_SHARPNESS, SharpnessConfig, as_sharpness, legacy_sharpness

from .warning import warn

__all__ = ["default_of", "RuleField", "rule_fields", "resolve_sharpness", "settings_in_groups"]

def default_of(rule_cls: type, name: str) -> Any:
    """The core's default of a rule field (the tuners' constructor defaults are the core's, never restated)."""
    return rule_cls.__dataclass_fields__[name].default


class RuleField:
    """A tuner attribute that reads and assigns a field of its rule value (``opt.sigma = 1.0`` replaces
    ``opt.rule`` by a validated copy; a schedule ``step -> value`` is accepted where the rule allows it). A value
    assigned is the user's: the field no longer counts among the defaults taken from the base's kind
    (``kind_defaults``, :func:`~torch_backend.direction.kind_change`). Every setting of a tuner's rule is one of
    these, so no assignment is silently ignored. ``fixed``: why the field cannot change after construction
    (QuadraticGreedy's ``sigma``, CDAT's ``startup``): readable, an assignment is a ``TypeError`` saying so."""

    def __init__(self, fixed: str = "") -> None:
        self.fixed = fixed

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        return self if obj is None else getattr(obj.rule, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if self.fixed:
            raise TypeError(f"{type(obj).__name__}'s {self.name} cannot be assigned: {self.fixed}")
        obj.rule = dataclasses.replace(obj.rule, **{self.name: value})
        obj.kind_defaults = tuple(k for k in getattr(obj, "kind_defaults", ()) if k != self.name)


def rule_fields(rule_cls: type, fixed: Optional[dict[str, str]] = None, exclude: tuple[str, ...] = ()
                ) -> Callable[[type], type]:
    """Class decorator: a :class:`RuleField` on the tuner for every field of its rule class ``rule_cls`` (but
    ``exclude``), ``fixed`` mapping a field to why it cannot be assigned."""
    def add(cls: type) -> type:
        for f in dataclasses.fields(rule_cls):
            if f.name not in exclude:
                field = RuleField((fixed or {}).get(f.name, ""))
                field.__set_name__(cls, f.name)
                setattr(cls, f.name, field)
        return cls
    return add


@functools.lru_cache(maxsize=None)
def _setting_names(cls: type) -> frozenset[str]:
    return frozenset(name for k in cls.__mro__ for name, v in vars(k).items() if isinstance(v, RuleField))


def settings_in_groups(tuner: Any) -> Optional[str]:
    """A warning where the param groups hold a key named like one of the tuner's settings (its
    :class:`RuleField` fields; not the base's own keys, such as Adam's ``eps``), None otherwise. Frameworks set an
    optimizer's settings by writing the key into every group (ignite's ``PiecewiseLinear(opt, "sigma", ...)``,
    skorch's ``set_params(optimizer__sigma=...)`` on a fitted net, fastai's ``set_hyper``): the tuner's settings
    are its attributes, one for all groups, and such a key changed nothing (a field test: sigma scheduled from 4 to
    0.5, the rates those of sigma 4, silently)."""
    names = _setting_names(type(tuner)) - tuner.base.defaults.keys()
    found = sorted({key for group in tuner.param_groups for key in names & group.keys()})
    if not found:
        return None
    name, first = type(tuner).__name__, found[0]
    why = {key: getattr(type(tuner), key).fixed for key in found}  # ("" where the setting can be assigned)
    free = [key for key in found if not why[key]]
    advice = "; ".join(
        ([f"assign {', '.join(f'opt.{key} = value' for key in free)} (from a callback or handler) or, where the "
          f"setting takes one, pass a schedule {free[0]}=lambda step: value at construction"] if free else [])
        + [f"{name}'s {key} cannot change after construction ({why[key]})" for key in found if why[key]])
    return (f"{name}: the param groups hold {', '.join(map(repr, found))}, named like the tuner's own setting, which "
            f"it does not read there (a tuner's settings are its attributes, one for all groups). A scheduler or "
            f"framework that writes optimizer settings into the param groups (ignite's param schedulers, skorch's "
            f"set_params(optimizer__{first}=...), fastai's set_hyper) does not reach it: {advice}")


def resolve_sharpness(sharpness: Any, default: SharpnessConfig, legacy: dict, tuner: str) -> SharpnessConfig:
    """``sharpness=`` (SharpnessConfig | int | None) plus the deprecated ``sharpness_*`` keywords
    (:func:`curvopt.config.legacy_sharpness`)."""
    fields = legacy_sharpness(sharpness, legacy, tuner, warn)
    cfg = as_sharpness(sharpness, default)
    try:
        return dataclasses.replace(cfg, **fields) if fields else cfg
    except ValueError as e:  # name the keyword the caller used
        for k, f in LEGACY_SHARPNESS.items():
            if f"sharpness.{f} " in str(e):
                raise ValueError(f"{k}: {e}") from None
        raise
