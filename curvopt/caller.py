"""Warnings that point at the user's line.

A fixed ``stacklevel`` is right for one call path only: ``opt.step()`` reaches the tuner through torch's step
wrapper, ``scaler.step(opt)`` through the GradScaler, ``tx.update`` under ``jax.jit`` through JAX's tracing,
and each lands the warning at a different depth. :func:`warn` instead attributes the warning to the first frame
outside the packages given (the library's own and the framework's), so a warning names the line of the
training loop that led to it, and Python's once-per-location filter counts it there.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

__all__ = ["package_dirs", "warn"]


def package_dirs(*names: str) -> tuple[str, ...]:
    """The directories of the installed packages ``names`` (each with a trailing separator; a package that is not
    installed is left out, none is imported), for :func:`warn`'s ``internal``."""
    specs = [importlib.util.find_spec(name) for name in names]
    return tuple(os.path.abspath(d) + os.sep for s in specs if s is not None for d in s.submodule_search_locations)


def warn(message: str, category: type[Warning], internal: tuple[str, ...]) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller whose file is not under ``internal``
    (directories from :func:`package_dirs`)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
