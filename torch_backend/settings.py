"""The settings surface the PyTorch tuners share: constructor defaults read from the core's rule values, rule
fields assignable on the tuner (``opt.sigma = ...``), and the ``sharpness=`` argument with the 0.1 keywords it
replaces (deprecated for one release)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from curvopt.config import LEGACY_SHARPNESS, SharpnessConfig, as_sharpness, legacy_sharpness

from .warning import warn

__all__ = ["default_of", "RuleField", "rule_fields", "resolve_sharpness"]

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
