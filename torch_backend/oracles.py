"""Curvature oracles: ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0, from a :class:`Probe`.

* ``"fd"`` — one extra closure call at ``w + h u`` with ``h ||u|| = sqrt(eps) ||w||``
  (:func:`curvopt.rules.finite_difference_step`), curvature ``(g(w + h u) - g(w))^T u / h``
  (:func:`curvopt.curvature.finite_difference_curvature`). Works with any closure (DDP); accurate to about
  the square root of ``eps``, the epsilon of the least precise dtype among the parameters and the closure's own
  computation (a bf16 ``torch.autocast``, read on the tuner's first call: :mod:`torch_backend.precision`);
  costs one forward + backward.
* ``"secant"`` — free: the next step's gradient along the previous direction,
  ``u_prev^T H u_prev ~ (g_t - g_{t-1})^T u_prev / lr_{t-1}`` (:func:`curvopt.rules.secant_curvature`),
  rescaled by ``||u_t||^2 / ||u_prev||^2``. Approximations: the curvature is *lagged* by one step (it is
  measured between ``w_{t-1}`` and ``w_t``, along ``u_{t-1}``, not along ``u_t`` at ``w_t``); in mini-batch
  training ``g_t`` and ``g_{t-1}`` come from different batches, so the secant also sees the gradient noise.
  Exact on a quadratic in full batch when the direction does not change. When there is no secant (the first
  step, a step after ``lr = 0``, a changed set of parameters with gradients) the core's formula gives NaN and
  the step falls back to one ``fd`` probe. The tuner keeps the secant's memory in its state.
* ``"exact"`` — automatic differentiation, reverse-over-reverse (double backward: ``u^T grad(g^T u)``), from
  a functional view of the loss ``functional_loss(params: list[Tensor]) -> Tensor`` over the tuner's
  parameters in ``param_groups`` order (e.g. built with ``torch.func.functional_call``). Used to validate
  the others; about two gradients. Not forward-over-forward: torch's nested JVP of ``layer_norm`` and
  ``batch_norm`` returns wrong second derivatives (pytorch/pytorch#196700, #196699), while their double
  backward is right; and double backward accepts modules that update buffers in place (BatchNorm in
  training mode).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from curvopt.curvature import finite_difference_curvature, replay_mismatch_in_place, replay_slope_mismatch
from curvopt.rules import finite_difference_step

from .probe import Probe
from .scalars import host_values
from .vectors import dot

__all__ = ["finite_difference", "exact", "exact_hvp", "check_functional_loss", "functional_evidence"]


def finite_difference(probe: Probe, xp: Any, numerator: Any, norms: tuple[Any, Any]) -> Any:
    """One probe at ``w + h u``; the parameters are left there (the tuner writes the update next).

    The step's scalars are host scalars (``xp`` is the tuner's :class:`torch_backend.scalars.ScalarNamespace`):
    ``numerator = -g^T u``, ``norms = (||w0||, ||u||, ||w0|| over the entries u moves)``; returns ``u^T H u``."""
    h = finite_difference_step(norms[0], norms[1], dtype_eps=probe.guard.fd_eps(probe.params), xp=xp,
                               moved_norm=norms[2])
    probe.move(xp.tensor(h, probe.loss.device))
    probe.fd_step, probe.fd_loss = h, probe.call()  # kept for the tuner's replay check
    # a probe that left no gradient at all (no backward: on every rank alike) failed; its loss is judged in a single
    # process only: in a data-parallel run it is the rank's own, judged per rank the ranks' rates would part (and a
    # reduction of it would cost a collective a step)
    probe_dot, *loss = host_values([probe.gradient_dot_u()] + ([probe.fd_loss] if probe.reducer is None else []), xp)
    judged = math.nan if all(p.grad is None for p in probe.params) else loss[0] if loss else 0.0
    return finite_difference_curvature(probe_dot, -numerator, h, xp=xp, probe_loss=judged)


def check_functional_loss(functional_loss: Optional[Callable]) -> Callable:
    if functional_loss is None or not callable(functional_loss):
        raise ValueError(
            'curvature="exact" needs functional_loss=f, a function f(params: list[Tensor]) -> Tensor '
            "computing the loss from the tuner's parameters in param_groups order (for example "
            "lambda ps: loss_fn(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y))")
    return functional_loss


def exact(probe: Probe, functional_loss: Callable[[list[Tensor]], Tensor]) -> Tensor:
    """``u^T H u`` by double backward of ``functional_loss`` at ``w0`` (made global under DDP)."""
    def run() -> Tensor:
        return dot(exact_hvp(probe, functional_loss, reduce=False)(probe.u), probe.u)

    out = probe.protected(run)
    # a functional loss bypasses DDP's gradient averaging: the curvature of the rank-local loss is made global
    return probe.global_mean(out.detach().to(probe.loss.dtype).reshape(()))


def exact_hvp(probe: Probe, functional_loss: Callable[[list[Tensor]], Tensor],
              reduce: bool = True) -> Callable[[list[Tensor]], list[Tensor]]:
    """``v -> H v`` at ``w0`` for vectors over ``probe.params``, by double backward of ``functional_loss``: its
    gradient's graph is built once (a forward and a backward), each product is one backward through that graph.
    Build it and take its products inside one ``probe.protected`` call (the graph holds the module buffers the
    forward pass read, which the protection puts back afterwards). An error of ``functional_loss`` itself reaches
    the caller as it is; a failure of the products to differentiate it twice is explained
    (:func:`_explain_double_backward`).
    With ``reduce``, a data-parallel run's product is averaged over the ranks (the functional loss bypasses
    DDP's gradient averaging). Where the loss is piecewise linear (ReLU) this is the Hessian almost everywhere,
    as Optax's products are; a finite difference of gradients also sees the kinks it crosses
    (:class:`torch_backend.sharpness.FiniteDifferenceHVP`)."""
    _, mine = _functional_gradient(probe, functional_loss, create_graph=True)
    used = [k for k, (_, g) in enumerate(mine) if g is not None and g.requires_grad]  # (not: linear in it)

    def hvp(v: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(x) for x in v]
        if used:
            with torch.enable_grad():
                gv = dot([mine[k][1] for k in used], [v[k].detach() for k in used])
                hs = _explain_double_backward(lambda: torch.autograd.grad(
                    gv, [mine[k][0] for k in used], retain_graph=True, allow_unused=True))
            for k, h in zip(used, hs):
                if h is not None:
                    out[k] = h.detach().to(out[k].dtype)
        if reduce and probe.reducer is not None:
            flat = probe.reducer.mean(torch.cat([o.reshape(-1) for o in out]))
            out = [c.view_as(o) for c, o in zip(torch.split(flat, [o.numel() for o in out]), out)]
        return out

    return hvp


def _functional_gradient(probe: Probe, functional_loss: Callable[[list[Tensor]], Tensor], create_graph: bool
                         ) -> tuple[Tensor, list[tuple[Tensor, Optional[Tensor]]]]:
    """``(loss, [(parameter, gradient or None)])``: ``functional_loss`` at ``w0`` and its gradient for the parameters
    with a gradient this step. The module's own parameters are put at ``w0`` too: a functional loss may read them
    besides the list it is handed (``torch.utils.checkpoint``'s recomputation in the backward pass does, after
    ``functional_call`` has put them back), and they were where the last probe or the base's trial step left them
    (a field test: an exact curvature 10x off behind Adam, a sharpness 3.4x, blamed on the function). A
    ``ValueError`` names the mistake when the function returns no scalar tensor or a loss that does not depend on
    the parameters it is handed (one that closes over the module: its probes read a curvature and a sharpness of
    0, silently, in a field test); an error it raises goes on as it is, with a note saying how it is called (Python
    3.11+; a wrong parameter order was reported as a failure to differentiate twice, with advice to use ``fd``)."""
    primals, _ = probe.all_points_and_directions()
    call = ("functional_loss(params) is called with the tuner's parameters as a list in param_groups order "
            f"({len(primals)} tensors; not the model's order where the groups list them otherwise) and returns the "
            "loss computed from them as a 0-d tensor, e.g. lambda ps: loss_fn(torch.func.functional_call(model, "
            "dict(zip(names, ps)), (x,)), y) with names in the same order")
    probe.at_start()
    with torch.enable_grad():
        ps = [w.detach().requires_grad_(True) for w in primals]
        try:
            loss = functional_loss(ps)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(f"(curvopt) raised by functional_loss: {call}")
            raise
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"functional_loss returned {got}, not the loss as one number. {call}")
        gs = _explain_double_backward(lambda: torch.autograd.grad(
            loss.reshape(()), ps, create_graph=create_graph, allow_unused=True)) \
            if loss.requires_grad else (None,) * len(ps)
    mine = [(ps[i], gs[i]) for i in probe.index]
    if all(g is None for _, g in mine):
        raise ValueError("functional_loss's loss does not depend on the parameters it is handed (one that closes "
                         f"over the module, or computes under torch.no_grad, reads a curvature of 0). {call}")
    # (a module pruned or re-parametrised since: the names it zips no longer reach the forward). Not where the
    # gradient is averaged over ranks: a rank's batch may not reach a parameter another's does (an expert)
    ignored = [] if probe.reducer is not None else [
        i for i, (_, g), g0 in zip(probe.index, mine, probe.grads) if g is None and bool(g0.any())]
    if ignored:
        raise ValueError(f"functional_loss's loss does not depend on the parameter(s) at {ignored} of the list it is "
                         "handed, where the closure's gradient is not 0: it is not the closure's loss (a module "
                         "pruned or re-parametrised after the names were taken renames its parameters: take them "
                         f"again). {call}")
    return loss.detach().reshape(()), mine


def functional_evidence(probe: Probe, functional_loss: Callable[[list[Tensor]], Tensor]) -> Optional[str]:
    """``functional_loss`` at the step's parameters against the closure's main call: None where its loss and its
    gradient's slope along ``u`` are the main call's (:func:`curvopt.curvature.replay_mismatch_in_place`,
    :func:`curvopt.curvature.replay_slope_mismatch`, the closure replay's tolerances), else what differs. A
    function that is not the closure's loss (two same-shape weights swapped, param groups in another order than
    the names it zips them with, a scaled loss, a stale batch) gave exact rates 1.2-100x off, silently, in a field
    test. The loss is allowed the rounding of the closure's own computation (a closure under a bf16 autocast with a
    float32 ``functional_loss``, the exact curvature the docs advise there, differs by ~1e-4 relative). Host
    floats; one forward and backward of ``functional_loss``."""
    loss, mine = _functional_gradient(probe, functional_loss, create_graph=False)
    slope = dot([g for _, g in mine if g is not None], [u for (_, g), u in zip(mine, probe.u) if g is not None])
    f, got, numerator, slope = float(probe.loss), float(loss), float(probe.numerator), float(slope)
    loss_eps = max(torch.finfo(probe.loss.dtype).eps, probe.guard.fd_eps(probe.params))  # a bf16 closure: bf16's
    if math.isfinite(f) and math.isfinite(got) and replay_mismatch_in_place(f, got, loss_eps) > 1:
        return f"its loss at the step's parameters is {got:.9g}, the closure's was {f:.9g}"
    if math.isfinite(numerator) and math.isfinite(slope) and replay_slope_mismatch(numerator, slope) > 1:
        return f"its gradient's slope along the update is {slope:.6g}, the closure's was {-numerator:.6g}"
    return None


def _explain_double_backward(fn: Callable[[], Any]) -> Any:
    """``fn()``, a backward through ``functional_loss``'s graph (its gradient's, or a product's through that),
    autograd's failure explained."""
    try:
        return fn()
    except RuntimeError as e:
        raise RuntimeError(
            'curvature="exact": autograd could not differentiate functional_loss twice (double backward) '
            f"({type(e).__name__}: {e}). Some modules and compiled graphs do not support it; use "
            'curvature="fd" (one extra gradient, works with any closure, DDP and torch.compile) '
            'or "secant".') from e
