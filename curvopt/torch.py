"""Public PyTorch entry point: ``from curvopt.torch import CDAT, ...`` (re-exports ``torch_backend``)."""
from .backends import check_backend

check_backend("torch_backend", "curvopt.torch", "torch", ("torch",))

from torch_backend import *  # noqa: E402,F401,F403
from torch_backend import __all__  # noqa: E402,F401
