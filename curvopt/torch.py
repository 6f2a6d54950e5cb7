"""Public PyTorch entry point: ``from curvopt.torch import CDAT, ...`` (re-exports ``torch_backend``)."""
from torch_backend import *  # noqa: F401,F403
from torch_backend import __all__  # noqa: F401
