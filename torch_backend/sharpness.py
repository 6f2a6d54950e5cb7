"""Sharpness: the top eigenvalue of the Hessian, or of Adam's preconditioned Hessian ``P^-1 H``.

Hessian-vector products (HVPs) are forward finite differences of closure gradients,
``H v ~ (g(w + h v) - g(w)) / h`` with ``h ||v|| = sqrt(eps) ||w||`` (the core's
:func:`curvopt.rules.finite_difference_step`): one closure call per product, any closure works (no double
backward needed), accurate to about ``sqrt(eps)`` of the dtype where the curvature changes over ``||w||``
(1e-8 relative in float64; more where it changes faster: :func:`curvopt.rules.finite_difference_step`). For ``P^-1 H``
the operator is the symmetric ``P^-1/2 H P^-1/2`` (:func:`curvopt.preconditioner.sandwich`), which has the
same eigenvalues.

* **Online** (inside a tuner, :func:`power_estimate`): the core's warm-started power iteration
  (:mod:`curvopt.eigen`), the same algorithm as the Optax backend, looped here ``while not bool(done)``, its
  estimate read from the span of the pass's last products (:func:`curvopt.eigen.krylov_estimate`).
* **Standalone** (:func:`hessian_top_eigenvalue`): SciPy's ARPACK (``eigsh``, ``which="LA"``), accurate to its
  ``tol`` as a relative error of the eigenvalue (up to the HVPs' own accuracy); ``method="power"`` runs the
  core's power iteration instead.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from curvopt.eigen import ARPACK_TOL, arpack_top_eigenpair, krylov_estimate, power_init, power_step
from curvopt.preconditioner import sandwich
from curvopt.rules import finite_difference_step

from .buffers import ModulesLike, ProbeGuard
from .preconditioning import PreconditionerLike, preconditioner_scales
from .vectors import ListOps, axpy_into, least_precise_eps, norm

__all__ = ["hessian_top_eigenvalue", "FiniteDifferenceHVP", "power_estimate", "random_vector", "preconditioned"]

MatVec = Callable[[list[Tensor]], list[Tensor]]


class FiniteDifferenceHVP:
    """``v -> H v`` at ``w0`` by forward differences of closure gradients.

    ``call()`` runs the closure at the parameters as moved (clearing ``.grad`` first, protecting buffers and
    RNG); ``g0`` is the gradient at ``w0``; ``eps`` sizes the displacement
    (:meth:`torch_backend.buffers.ProbeGuard.fd_eps`). The parameters are left at the last probe point: the
    caller restores them. ``count`` counts the products. A product whose probe left no gradient at all (no
    backward) is NaN, and so, with ``judge_loss``, is one whose probe's loss is not finite (as
    :func:`curvopt.curvature.finite_difference_curvature`: a failed probe has no gradient of the loss), which voids
    the estimate; ``judge_loss`` is off in a data-parallel run, whose probe losses are each rank's own (the ranks
    would judge apart, and part).
    """

    def __init__(self, call: Callable[[], object], params: Sequence[Tensor], w0: Sequence[Tensor],
                 g0: Sequence[Tensor], eps: float, judge_loss: bool = True) -> None:
        self.call, self.params, self.w0, self.g0 = call, list(params), list(w0), list(g0)
        self.eps, self.judge_loss = eps, judge_loss
        self.w_norm = norm(self.w0)
        self.count = 0

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        h = finite_difference_step(self.w_norm, norm(v), dtype_eps=self.eps, xp=torch)
        axpy_into(self.params, self.w0, h, v)
        for p in self.params:
            p.grad = None
        loss = self.call()
        self.count += 1
        gradless = all(p.grad is None for p in self.params)  # no backward ran (on every rank alike)
        g1 = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        torch._foreach_sub_(g1, self.g0)
        torch._foreach_div_(g1, h)
        if gradless:
            torch._foreach_mul_(g1, math.nan)
        elif self.judge_loss and isinstance(loss, (Tensor, int, float)):  # (None, (loss, aux): not judged)
            # times 1 where the probe's loss is finite (exactly: the product's bits stay), else NaN
            failed = ~torch.isfinite(torch.as_tensor(loss).detach().to(g1[0].device)).all()
            torch._foreach_mul_(g1, torch.where(failed, math.nan, 1.0).to(g1[0].dtype))
        return g1


def preconditioned(matvec: MatVec, scales: Optional[list[Tensor]]) -> MatVec:
    """``P^-1/2 H P^-1/2`` from ``H`` and the scales ``P^-1/2`` (``matvec`` itself without scales)."""
    if scales is None:
        return matvec
    return sandwich(matvec, scales, lambda a, b: list(torch._foreach_mul(list(a), list(b))))


def random_vector(like: Sequence[Tensor], generator: Optional[torch.Generator] = None) -> list[Tensor]:
    """A standard normal vector shaped like ``like`` (drawn on the CPU in float32, so a seed gives the same
    vector for every dtype and device)."""
    return [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
            for p in like]


def power_estimate(matvec: MatVec, v0: list[Tensor], previous: Tensor, *, iters: int, tol: float,
                   fresh: list[Tensor]) -> tuple[Tensor, list[Tensor], int]:
    """The core's power iteration (:func:`curvopt.eigen.power_step`) from ``v0`` (warm start when
    ``previous``, the last estimate, is finite); ``fresh`` starts the shifted second pass when the dominant
    eigenvalue is negative. Returns ``(eigenvalue, unit vector, products)``: the eigenvalue read from the pass's
    last iterates (:func:`curvopt.eigen.krylov_estimate`, at the precision of ``v0``'s least precise dtype), NaN
    when a product was not finite; the vector is the last iterate."""
    ops = ListOps()
    st = power_init(v0, previous, ops, torch)
    fresh = ops.scale(1 / torch.sqrt(ops.dot(fresh, fresh)), fresh)
    while not bool(st.done):
        st = power_step(st, matvec, fresh=fresh, iters=iters, tol=tol, ops=ops, xp=torch)
    return krylov_estimate(st, least_precise_eps(v0), torch), list(st.v), int(st.used)


def _eigsh(matvec: MatVec, start: list[Tensor], iters: int, tol: float) -> tuple[float, list[Tensor]]:
    import numpy as np

    shapes = [t.shape for t in start]
    sizes = [t.numel() for t in start]
    like = start[0]

    def to_list(x):
        t = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=like.dtype).to(like.device)
        return [c.reshape(s) for c, s in zip(torch.split(t, sizes), shapes)]

    def mv(x):
        out = matvec(to_list(x))
        return torch.cat([o.reshape(-1) for o in out]).to("cpu", torch.float64).numpy()

    v0 = torch.cat([t.reshape(-1) for t in start]).to("cpu", torch.float64).numpy()
    lam, vec = arpack_top_eigenpair(mv, sum(sizes), v0, tol=tol, maxiter=iters)
    return lam, to_list(vec)


def _data_parallel() -> bool:
    """Whether a process group of more than one rank is set up (each rank's closure loss is then its own)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def hessian_top_eigenvalue(closure: Callable[[], Tensor], params: Iterable[Tensor], *,
                           preconditioner: PreconditionerLike = None, v0: Optional[Sequence[Tensor]] = None,
                           iters: int = 100, tol: float = ARPACK_TOL, method: str = "eigsh",
                           modules: ModulesLike = None, generator: Optional[torch.Generator] = None
                           ) -> tuple[Tensor, list[Tensor]]:
    """Top Hessian eigenvalue ``lambda_max(H)`` (or ``lambda_max(P^-1 H)``) at the current parameters.

    ``closure`` follows the LBFGS convention (zeroes the gradients, computes the loss, calls ``backward``,
    returns the loss); it is called ``1 + (number of HVPs)`` times. ``preconditioner``: a ``torch.optim.Adam``
    / ``AdamW`` instance (``P`` from its state, both bias corrections) or a list of positive diagonal tensors
    ``P`` (one per parameter). ``v0``: a start vector (e.g. the eigenvector returned last time).

    ``method="eigsh"`` (default): SciPy's ARPACK on the HVPs; ``tol`` is the relative accuracy of the
    eigenvalue it stops at (the default ``1e-6`` gives an eigenvalue accurate to about 1e-6 relative in
    float64, where the HVPs are accurate to ~1e-8; in float32 the HVPs limit it to ~1e-3) and ``iters`` the
    maximum number of ARPACK restarts. ``method="power"``: the core's power iteration (the online
    solver, its estimate from the span of its last products), ``iters`` products at most, stopping when the
    eigenvalue changes by less than ``tol`` (relative) between products — cheaper per step but slow when the
    eigengap is small. ``modules``: modules whose
    buffers (BatchNorm statistics) must not change (None: those the closure runs). ``generator``: a CPU
    ``torch.Generator`` for the random vectors (drawn on the CPU): the start vector when ``v0`` is None, and with
    ``method="power"`` the start of the shifted second pass it takes when the dominant eigenvalue is negative
    (None: torch's default generator).

    Returns ``(eigenvalue, eigenvector)``: a 0-d tensor and a unit vector as a list of tensors shaped like
    ``params``, the eigenvector of the symmetric ``P^-1/2 H P^-1/2`` (of ``H`` without preconditioner); NaN and
    the start vector, normalised, where a probe failed (its loss not finite, in a single process, or no gradient).
    The parameters, module buffers and random state are restored (also when the closure raises, and then their
    ``.grad`` too); the parameters' ``.grad`` holds the gradient at the parameters. The gradients are cleared
    before the first call (a closure that does not zero them is then read right), and a closure that leaves no
    gradient (no ``backward``: the loss-only function :func:`curvopt.optax.hessian_top_eigenvalue` takes) is a
    ``ValueError``.
    """
    params = [p for p in params]
    if not params:
        raise ValueError("params is empty")
    if method not in ("eigsh", "power"):
        raise ValueError(f"method must be 'eigsh' or 'power', got {method!r}")
    guard = ProbeGuard(modules)
    with torch.no_grad():
        w0 = [p.detach().clone() for p in params]
    g0: Optional[list[Tensor]] = None
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        guard.main(closure, params)
        if all(p.grad is None for p in params):  # (read as zeros, the estimate was 3e7x too high: a field test)
            raise ValueError("hessian_top_eigenvalue: the closure left no gradient in the parameters: it must zero "
                             "the gradients, compute the loss, call loss.backward() and return the loss (the "
                             "LBFGS closure convention), not only return the loss")
        g0 = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            scales = preconditioner_scales(preconditioner, params)
            hvp = FiniteDifferenceHVP(lambda: guard.probe(closure), params, w0, g0, eps=guard.fd_eps(params),
                                      judge_loss=not _data_parallel())
            matvec = preconditioned(hvp, scales)
            start = list(v0) if v0 is not None else random_vector(params, generator)
            start = [s.detach().to(p.dtype).clone() for s, p in zip(start, params)]
            if method == "eigsh":
                lam, v = _eigsh(matvec, start, iters, tol)
            else:
                nan = torch.full((), float("nan"), dtype=torch.float64 if params[0].dtype == torch.float64
                                 else torch.float32, device=params[0].device)
                value, v, _ = power_estimate(matvec, start, nan, iters=iters, tol=tol,
                                             fresh=random_vector(params, generator))
                lam = float(value)
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
            for p, g in zip(params, kept if g0 is None else g0):
                p.grad = g
            guard.rollback()  # the module buffers and the generators as before the main call
    return torch.tensor(lam, dtype=params[0].dtype), v
