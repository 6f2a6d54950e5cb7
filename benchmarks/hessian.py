"""An independent reference for the top Hessian eigenvalue (PyTorch): exact Hessian-vector products by double
backward, solved by SciPy's ARPACK. The benchmarks check the library's online estimates against it and the μP
measurements use it, so neither depends on the estimator they measure.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["hvp_operator", "top_eigenvalue"]


def hvp_operator(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                 scales: Sequence[torch.Tensor] | None = None):
    """``(matvec, n, counter)``: ``v -> S H S v`` on flat float64 NumPy vectors (``S = diag(scales)``, identity
    when None), the dimension, and a one-element list counting the products."""
    params = list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    counter = [0]

    def matvec(v):
        counter[0] += 1
        v = torch.as_tensor(np.asarray(v, dtype=np.float64).ravel())
        parts = [c.reshape(p.shape).to(p.dtype) for c, p in zip(torch.split(v, sizes), params)]
        if scales is not None:
            parts = [t * s for t, s in zip(parts, scales)]
        hv = torch.autograd.grad(grads, params, parts, retain_graph=True)
        if scales is not None:
            hv = [h * s for h, s in zip(hv, scales)]
        return torch.cat([h.reshape(-1).double() for h in hv]).numpy()

    return matvec, n, counter


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *,
                   scales: Sequence[torch.Tensor] | None = None, tol: float = 1e-6,
                   v0: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """``(lambda_max(S H S), its eigenvector as a flat array)`` (ARPACK, largest algebraic)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    matvec, n, _ = hvp_operator(loss_fn, params, scales)
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    vals, vecs = eigsh(op, k=1, which="LA", tol=tol, v0=v0, maxiter=max(1000, 10 * n))
    return float(vals[0]), vecs[:, 0]
