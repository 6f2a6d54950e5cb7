"""Sharpness: the top eigenvalue of the Hessian, or of Adam's preconditioned Hessian ``P^-1 H``.

Power iteration on Hessian-vector products (HVPs). Each HVP is a forward finite difference of closure
gradients, ``H v ~ (g(w + h v) - g(w)) / h`` with ``h ||v|| = sqrt(eps) (1 + ||w||)`` (the core's
:func:`curvopt.rules.finite_difference_step`): one closure call per product, any closure works (no double
backward needed), accurate to about ``sqrt(eps)`` of the dtype (1e-8 relative in float64). For ``P^-1 H``
the iteration runs on the symmetric ``P^-1/2 H P^-1/2``, which has the same eigenvalues.

Algorithms. The default is Lanczos (a Krylov method: after ``k`` products the estimate is the best over
the whole Krylov space of ``v0``, which converges much faster than power iteration when the eigengap is
small and targets the top *algebraic* eigenvalue even when a negative one dominates in magnitude), with full
reorthogonalisation, restarted from the Ritz vector every 10 products. While running it keeps up to 10
vectors the size of the parameters (``iters`` of them online, 4 by default). ``method="power"`` is power
iteration (two vectors); ``method="eigsh"`` (standalone function only) hands the products to SciPy's ARPACK.

Stopping: after each product the Rayleigh quotient ``v^T M v`` is compared with the previous one (for a warm
start, with the previous estimate); the iteration stops when they agree to ``tol`` (relative). If the
dominant eigenvalue turns out negative, a second pass on ``M - lambda I`` finds the top (algebraic) one.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from curvopt.config import SharpnessConfig
from curvopt.curvature import rayleigh_converged
from curvopt.rules import finite_difference_step

from .buffers import BufferSnapshot, ModulesLike, ProbeGuard
from .preconditioning import PreconditionerLike, preconditioner_scales
from .vectors import axpy_into, dot, norm, least_precise_eps

__all__ = ["hessian_top_eigenvalue", "FiniteDifferenceHVP", "top_eigenpair", "OnlineSharpness"]

MatVec = Callable[[list[Tensor]], list[Tensor]]


class FiniteDifferenceHVP:
    """``v -> H v`` at ``w0`` by forward differences of closure gradients.

    ``probe`` calls the closure with the parameters already moved (and protects buffers / RNG); ``g0`` is the
    gradient at ``w0``. The parameters are left at the last probe point: the caller restores them.
    """

    def __init__(self, probe: Callable[[], object], params: Sequence[Tensor], w0: Sequence[Tensor],
                 g0: Sequence[Tensor]) -> None:
        self.probe, self.params, self.w0, self.g0 = probe, list(params), list(w0), list(g0)
        like = self.params[0]
        self.eps = least_precise_eps(self.params)
        self.w_norm = norm(self.w0)
        self.count = 0

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        h = finite_difference_step(self.w_norm, norm(v), dtype_eps=self.eps, xp=torch)
        axpy_into(self.params, self.w0, h, v)
        for p in self.params:
            p.grad = None
        self.probe()
        self.count += 1
        out = []
        for p, g0 in zip(self.params, self.g0):
            g1 = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = None
            out.append(g1.sub_(g0).div_(h))
        return out


def _preconditioned(matvec: MatVec, scales: Optional[list[Tensor]]) -> MatVec:
    if scales is None:
        return matvec

    def mv(v: list[Tensor]) -> list[Tensor]:
        out = matvec(torch._foreach_mul(v, scales))
        torch._foreach_mul_(out, scales)
        return out

    return mv


def _power(matvec: MatVec, v: list[Tensor], iters: int, tol: float, previous: Optional[float],
           shift: float = 0.0) -> tuple[float, list[Tensor], int]:
    """Power iteration on ``M - shift I``; returns (eigenvalue of M - shift I, unit vector, products)."""
    n0 = norm(v)
    v = torch._foreach_div(v, n0)
    lam_prev = previous
    lam = float("nan")
    count = 0
    for _ in range(iters):
        mv = matvec(v)
        count += 1
        if shift:
            torch._foreach_add_(mv, v, alpha=-shift)
        lam_t, n_t = dot(v, mv), norm(mv)
        lam, n = torch.stack([lam_t, n_t]).tolist()
        if not (math.isfinite(lam) and math.isfinite(n)) or n == 0.0:
            break
        torch._foreach_div_(mv, n_t)
        v = mv
        if lam_prev is not None and rayleigh_converged(lam, lam_prev, tol):
            break
        lam_prev = lam
    return lam, v, count


def _lanczos_window(matvec: MatVec, v: list[Tensor], budget: int, tol: float, previous: Optional[float]
                    ) -> tuple[float, list[Tensor], int, bool]:
    """Up to ``budget`` Lanczos steps from unit ``v`` (full reorthogonalisation); the top Ritz pair.

    Stops early when the top Ritz value changes by at most ``tol`` (relative) from one step to the next (the
    first step is compared with ``previous``). Returns (value, unit Ritz vector, products, converged).
    """
    import numpy as np

    basis = [v]
    alphas: list[float] = []
    betas: list[float] = []
    theta_prev = previous
    theta, y = float("nan"), np.ones(1)
    count = 0
    converged = False
    for j in range(budget):
        w = matvec(basis[j])
        count += 1
        a = float(dot(basis[j], w))
        if not math.isfinite(a):  # a non-finite product (e.g. a NaN probe loss): no estimate this time
            theta = float("nan")
            break
        torch._foreach_add_(w, basis[j], alpha=-a)
        if j > 0:
            torch._foreach_add_(w, basis[j - 1], alpha=-betas[-1])
        for q in basis:  # full reorthogonalisation (the window is short)
            c = float(dot(q, w))
            torch._foreach_add_(w, q, alpha=-c)
        alphas.append(a)
        b = float(norm(w))
        if not all(math.isfinite(t) for t in alphas):
            theta = float("nan")
            break
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        vals, vecs = np.linalg.eigh(T)
        theta, y = float(vals[-1]), vecs[:, -1]
        if not math.isfinite(theta):
            break
        if theta_prev is not None and rayleigh_converged(theta, theta_prev, tol):
            converged = True
            break
        theta_prev = theta
        if j + 1 == budget or not math.isfinite(b) or b <= 1e-12 * max(abs(theta), 1e-300):
            converged = not (math.isfinite(b) and b > 0) if j + 1 < budget else False
            break
        betas.append(b)
        torch._foreach_div_(w, b)
        basis.append(w)
    x = torch._foreach_mul(basis[0], float(y[0]))
    for coef, q in zip(y[1:len(basis)], basis[1:len(y)]):
        torch._foreach_add_(x, q, alpha=float(coef))
    nx = norm(x)
    torch._foreach_div_(x, nx)
    return theta, x, count, converged


def lanczos_top(matvec: MatVec, v0: list[Tensor], *, iters: int, tol: float, previous: Optional[float] = None,
                window: int = 10) -> tuple[float, list[Tensor], int]:
    """Top (algebraic) eigenpair by Lanczos restarted from the Ritz vector every ``window`` products, at most
    ``iters`` products in all. Returns (eigenvalue, unit eigenvector, products)."""
    n0 = norm(v0)
    v = torch._foreach_div(v0, n0)
    lam, count = float("nan"), 0
    prev = previous
    while count < iters:
        lam_w, v_w, c, done = _lanczos_window(matvec, v, min(window, iters - count), tol, prev)
        count += c
        if not math.isfinite(lam_w):
            break
        lam, v, prev = lam_w, v_w, lam_w
        if done:
            break
    return lam, v, count


def top_eigenpair(matvec: MatVec, v0: list[Tensor], *, iters: int, tol: float, previous: Optional[float] = None,
                  fresh: Optional[Callable[[], list[Tensor]]] = None) -> tuple[float, list[Tensor], int]:
    """The largest (algebraic) eigenvalue of the symmetric operator ``matvec`` and its unit eigenvector.

    Returns ``(eigenvalue, eigenvector, number of products)``. ``previous`` is a warm start's last eigenvalue
    (the first product may then already satisfy the stopping test). If the dominant eigenvalue is negative,
    a second pass on the shifted operator (started from ``fresh()``) finds the top one.
    """
    lam, v, count = _power(matvec, v0, iters, tol, previous)
    if math.isfinite(lam) and lam < 0 and fresh is not None:
        shift = lam
        mu, v2, c2 = _power(matvec, fresh(), iters, tol, None, shift=shift)
        count += c2
        if math.isfinite(mu):
            lam, v = mu + shift, v2
    return lam, v, count


def _random_like(params: Sequence[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]


def _lanczos(matvec: MatVec, v0: list[Tensor], iters: int, tol: float) -> tuple[float, list[Tensor]]:
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError as e:  # pragma: no cover
        raise ImportError('method="lanczos" needs SciPy (pip install scipy); method="power" does not') from e
    shapes = [t.shape for t in v0]
    sizes = [t.numel() for t in v0]
    like = v0[0]

    def to_list(x):
        t = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=like.dtype).to(like.device)
        return [c.reshape(s) for c, s in zip(torch.split(t, sizes), shapes)]

    def mv(x):
        out = matvec(to_list(x))
        return torch.cat([o.reshape(-1) for o in out]).to("cpu", torch.float64).numpy()

    n = sum(sizes)
    op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    start = torch.cat([t.reshape(-1) for t in v0]).to("cpu", torch.float64).numpy()
    vals, vecs = eigsh(op, k=1, which="LA", v0=start, tol=tol, maxiter=iters)
    return float(vals[0]), to_list(vecs[:, 0])


def hessian_top_eigenvalue(closure: Callable[[], Tensor], params: Iterable[Tensor], *,
                           preconditioner: PreconditionerLike = None, v0: Optional[Sequence[Tensor]] = None,
                           iters: int = 100, tol: float = 1e-6, method: str = "lanczos", modules: ModulesLike = None,
                           generator: Optional[torch.Generator] = None) -> tuple[Tensor, list[Tensor]]:
    """Top Hessian eigenvalue ``lambda_max(H)`` (or ``lambda_max(P^-1 H)``) at the current parameters.

    ``closure`` follows the LBFGS convention (zeroes the gradients, computes the loss, calls ``backward``,
    returns the loss); it is called ``1 + (number of HVPs)`` times. ``preconditioner``: a ``torch.optim.Adam``
    / ``AdamW`` instance (``P`` from its state, DESIGN §3, both bias corrections) or a list of positive
    diagonal tensors ``P`` (one per parameter). ``v0``: a warm start (e.g. the eigenvector returned last
    time). ``method``: ``"lanczos"`` (default; restarted Lanczos in torch), ``"power"`` (power iteration)
    or ``"eigsh"`` (SciPy's ARPACK). ``iters``: the maximum number of products (``"lanczos"``, ``"power"``)
    or of ARPACK iterations (``"eigsh"``); ``tol``: relative tolerance on the eigenvalue.
    ``modules``: modules whose buffers (BatchNorm statistics) must not change.

    Returns ``(eigenvalue, eigenvector)``: a 0-d tensor and a unit vector as a list of tensors shaped like
    ``params``, the eigenvector of the symmetric ``P^-1/2 H P^-1/2`` (of ``H`` without preconditioner).
    The parameters are restored bit-exactly; their ``.grad`` holds the gradient at the parameters.
    """
    params = [p for p in params]
    if not params:
        raise ValueError("params is empty")
    if method not in ("lanczos", "power", "eigsh"):
        raise ValueError(f"method must be 'lanczos', 'power' or 'eigsh', got {method!r}")
    if method == "eigsh" and sum(p.numel() for p in params) < 3:
        method = "lanczos"
    guard = ProbeGuard(modules)
    before = BufferSnapshot(modules)
    before.take()
    with torch.no_grad():
        w0 = [p.detach().clone() for p in params]
    guard.main(closure)
    g0 = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    try:
        with torch.no_grad():
            scales = preconditioner_scales(preconditioner, params)
            hvp = FiniteDifferenceHVP(lambda: guard.probe(closure), params, w0, g0)
            matvec = _preconditioned(hvp, scales)
            start = list(v0) if v0 is not None else _random_like(params, generator)
            start = [s.detach().to(p.dtype).clone() for s, p in zip(start, params)]
            if method == "eigsh":
                lam, v = _lanczos(matvec, start, iters, tol)
            elif method == "lanczos":
                lam, v, _ = lanczos_top(matvec, start, iters=iters, tol=tol)
            else:
                lam, v, _ = top_eigenpair(matvec, start, iters=iters, tol=tol,
                                          fresh=lambda: _random_like(params, generator))
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
            for p, g in zip(params, g0):
                p.grad = g
            guard.finish()
            before.restore()
    return torch.tensor(lam, dtype=params[0].dtype), v


class OnlineSharpness:
    """Warm-started sharpness estimates inside a tuner (``SharpnessConfig``: every, iters, first_iters, tol).

    Keeps one eigenvector per space (``"plain"`` for ``H``, ``"preconditioned"`` for ``P^-1/2 H P^-1/2``) and
    the last eigenvalue; the first estimate runs up to ``first_iters`` products from a seeded random vector,
    later ones at most ``iters`` from the previous eigenvector. ``hvps`` counts all products so far.
    """

    SPACES = ("plain", "preconditioned")

    def __init__(self, config: SharpnessConfig, seed: int = 0) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(seed)
        self.vectors: dict[str, Optional[list[Tensor]]] = {s: None for s in self.SPACES}
        self.values: dict[str, float] = {s: float("nan") for s in self.SPACES}
        self.hvps = 0

    def due(self, step: int) -> bool:
        """Estimate on steps 1, 1 + every, 1 + 2 every, ... (1-indexed)."""
        k = self.config.every
        return k > 0 and (step - 1) % k == 0

    def estimate(self, space: str, matvec: MatVec, like: Sequence[Tensor]) -> float:
        v0 = self.vectors[space]
        if v0 is not None and [t.shape for t in v0] != [p.shape for p in like]:
            v0 = None
        first = v0 is None
        if first:
            v0 = _random_like(like, self.generator)
        lam, v, count = lanczos_top(
            matvec, v0, iters=self.config.first_iters if first else self.config.iters, tol=self.config.tol,
            previous=None if first else self.values[space])
        self.hvps += count
        if math.isfinite(lam):
            self.vectors[space] = v
            self.values[space] = lam
        return lam

    def state_dict(self) -> dict:
        return {
            "vectors": {k: None if v is None else [t.clone() for t in v] for k, v in self.vectors.items()},
            "values": dict(self.values),
            "hvps": self.hvps,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, like: Sequence[Tensor]) -> None:
        self.vectors = {
            k: None if v is None else [t.to(device=like[0].device, dtype=like[0].dtype).clone() for t in v]
            for k, v in state["vectors"].items()
        }
        self.values = dict(state["values"])
        self.hvps = int(state["hvps"])
        self.generator.set_state(state["generator"])

