"""Finding the backend packages (``torch_backend``, ``jax_backend``) that ``curvopt.torch`` and ``curvopt.optax``
re-export, with an error a user can act on.

The backends install beside ``curvopt`` as top-level packages (the repository's layout), so a framework left out
of the install, or a user's own module of the same name earlier on ``sys.path`` (a ``torch_backend.py`` beside the
training script), would otherwise surface as an unrelated ``ImportError`` of a curvopt name.
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["check_backend"]


def check_backend(package: str, entry: str, extra: str, frameworks: tuple[str, ...]) -> None:
    """Raise ImportError, before anything is imported, when a framework of the ``extra`` is not installed or
    ``package`` would be found anywhere but beside this ``curvopt`` (the message names the file that shadows
    it)."""
    for framework in frameworks:
        if importlib.util.find_spec(framework) is None:
            raise ImportError(f"{entry} needs {framework}, which is not installed: pip install 'curvopt[{extra}]'")
    spec = importlib.util.find_spec(package)
    ours = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if spec is None or spec.origin is None:
        raise ImportError(f"{entry} re-exports curvopt's package {package!r}, which is not installed beside it in "
                          f"{ours}: reinstall curvopt")
    where = os.path.realpath(spec.origin)
    folder = os.path.dirname(where)  # the package's own folder, whose parent must be curvopt's
    if os.path.basename(where) != "__init__.py" or os.path.basename(folder) != package or \
            os.path.dirname(folder) != ours:
        raise ImportError(f"{entry} re-exports curvopt's package {package!r}, installed in {ours}, but "
                          f"{spec.origin} is found first on sys.path: rename that module (or reinstall curvopt)")
