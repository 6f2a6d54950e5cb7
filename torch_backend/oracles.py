"""Curvature oracles: ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0, for the tuner's step.

* ``"fd"`` (default) — one extra closure call at ``w + h u`` with ``h ||u|| = sqrt(eps) (1 + ||w||)``
  (:func:`curvopt.rules.finite_difference_step`), curvature ``(g(w + h u) - g(w))^T u / h``
  (:func:`curvopt.curvature.finite_difference_curvature`). Works with any closure (DDP, autocast); accurate
  to about the square root of the dtype's epsilon; costs one forward + backward.
* ``"secant"`` — free: the next step's gradient along the previous direction,
  ``u_prev^T H u_prev ~ (g_t - g_{t-1})^T u_prev / lr_{t-1}`` (:func:`curvopt.rules.secant_curvature`),
  rescaled by ``||u_t||^2 / ||u_prev||^2``. Approximations: the curvature is *lagged* by one step (it is
  measured between ``w_{t-1}`` and ``w_t``, along ``u_{t-1}``, not along ``u_t`` at ``w_t``); in mini-batch
  training ``g_t`` and ``g_{t-1}`` come from different batches, so the secant also sees the gradient noise.
  Exact on a quadratic in full batch when the direction does not change. The first step (and any step after
  a zero learning rate) has no secant and falls back to one ``fd`` probe.
* ``"exact"`` — automatic differentiation, reverse-over-reverse (double backward: ``u^T grad(g^T u)``), from
  a functional view of the loss ``functional_loss(params: list[Tensor]) -> Tensor`` over the tuner's parameters in ``param_groups`` order (e.g. built with ``torch.func.functional_call``). Used to
  validate the others; about two gradients. Not forward-over-forward: torch's nested JVP of ``layer_norm``
  and ``batch_norm`` returns wrong second derivatives (pytorch/pytorch#196700, #196699; torch 2.13: 18.6
  instead of 23.7 on the benchmark LM), while their double backward is right; and unlike ``torch.func``
  transforms, double backward accepts modules that update buffers in place (BatchNorm in training mode).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor

from curvopt.curvature import finite_difference_curvature
from curvopt.rules import finite_difference_step, secant_curvature

from .vectors import dot, least_precise_eps, norm, sq_norm

if TYPE_CHECKING:  # pragma: no cover
    from .tuner import StepContext

__all__ = ["CurvatureOracle", "FiniteDifference", "Secant", "Exact", "make_oracle"]


class CurvatureOracle:
    """Interface. ``before_direction`` runs after the main gradient, before the base steps (it may read the
    previous direction, still in the tuner's buffer) and returns flags fetched in the step's single host
    sync; ``curvature`` returns ``u^T H u`` (0-d tensor); ``after_update`` sees the chosen learning rate."""

    name = ""

    def before_direction(self, ctx: "StepContext") -> list[Any]:
        return []

    def curvature(self, ctx: "StepContext", flags: list[bool]) -> Tensor:
        raise NotImplementedError

    def after_update(self, ctx: "StepContext", lr: Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, like: Tensor) -> None:
        pass


def fd_curvature(ctx: "StepContext") -> Tensor:
    """One probe at ``w + h u``; the parameters are left there (the tuner writes the update next)."""
    eps = least_precise_eps(ctx.params)  # the displacement must show in the coarsest parameter dtype
    h = finite_difference_step(norm(ctx.w0), norm(ctx.u), dtype_eps=eps, xp=torch)
    ctx.probe(h)
    probe_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ctx.params]
    return finite_difference_curvature(dot(probe_grads, ctx.u), -ctx.numerator, h, xp=torch)


class FiniteDifference(CurvatureOracle):
    name = "fd"

    def curvature(self, ctx: "StepContext", flags: list[bool]) -> Tensor:
        return fd_curvature(ctx)


class Secant(CurvatureOracle):
    """Keeps ``g_{t-1}^T u_{t-1}``, ``lr_{t-1}``, ``||u_{t-1}||^2``; ``u_{t-1}`` itself is the tuner's
    direction buffer (saved in the tuner's state dict when this oracle is used)."""

    name = "secant"

    def __init__(self) -> None:
        self.prev: Optional[dict[str, Tensor]] = None
        self._new_grad_dot_prev_u: Optional[Tensor] = None

    def before_direction(self, ctx: "StepContext") -> list[Any]:
        self._new_grad_dot_prev_u = None
        if self.prev is None or ctx.previous_u is None:
            return [False]
        self._new_grad_dot_prev_u = dot(ctx.grads, ctx.previous_u)
        return [self.prev["lr"] > 0]

    def curvature(self, ctx: "StepContext", flags: list[bool]) -> Tensor:
        self._u_sq = sq_norm(ctx.u)
        if not flags[0]:
            return fd_curvature(ctx)
        p = self.prev
        return secant_curvature(self._new_grad_dot_prev_u, p["grad_dot_u"], p["lr"], p["u_sq"], self._u_sq,
                                xp=torch)

    def after_update(self, ctx: "StepContext", lr: Tensor) -> None:
        self.prev = {"grad_dot_u": -ctx.numerator, "lr": lr, "u_sq": self._u_sq}

    def state_dict(self) -> dict:
        return {"prev": None if self.prev is None else {k: v.clone() for k, v in self.prev.items()}}

    def load_state_dict(self, state: dict, like: Tensor) -> None:
        prev = state["prev"]
        self.prev = None if prev is None else {k: v.to(like) for k, v in prev.items()}


class Exact(CurvatureOracle):
    name = "exact"

    def __init__(self, functional_loss: Callable[[list[Tensor]], Tensor]) -> None:
        if functional_loss is None or not callable(functional_loss):
            raise ValueError(
                'curvature="exact" needs functional_loss=f, a function f(params: list[Tensor]) -> Tensor '
                "computing the loss from the tuner's parameters in param_groups order (for example "
                "lambda ps: loss_fn(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y))")
        self.functional_loss = functional_loss

    def curvature(self, ctx: "StepContext", flags: list[bool]) -> Tensor:
        primals, tangents = ctx.all_points_and_directions()
        f = self.functional_loss

        def run() -> Tensor:
            with torch.enable_grad():
                ps = [w.detach().requires_grad_(True) for w in primals]
                gs = torch.autograd.grad(f(ps), ps, create_graph=True, allow_unused=True)
                used = [(p, g, u) for p, g, u in zip(ps, gs, tangents) if g is not None]
                gu = dot([g for _, g, _ in used], [u for _, _, u in used])
                if not gu.requires_grad:  # the loss is at most linear in the parameters
                    return torch.zeros_like(gu)
                hs = torch.autograd.grad(gu, [p for p, _, _ in used], allow_unused=True)
            return dot([torch.zeros_like(u) if h is None else h for h, (_, _, u) in zip(hs, used)],
                       [u for _, _, u in used])

        try:
            out = ctx.protected(run)
        except RuntimeError as e:
            raise RuntimeError(
                'curvature="exact": autograd could not differentiate functional_loss twice (double backward) '
                f"({type(e).__name__}: {e}). Some modules and compiled graphs do not support it; use "
                'curvature="fd" (one extra gradient, works with any closure, DDP, autocast and torch.compile) '
                'or "secant".') from e
        # a functional loss bypasses DDP's gradient averaging: the curvature of the rank-local loss is made global
        return ctx.global_mean(out.detach().to(ctx.loss.dtype).reshape(()))


def make_oracle(curvature: str, functional_loss: Optional[Callable] = None) -> CurvatureOracle:
    if curvature == "fd":
        return FiniteDifference()
    if curvature == "secant":
        return Secant()
    if curvature == "exact":
        return Exact(functional_loss)
    raise ValueError(f"curvature must be one of ('fd', 'secant', 'exact'), got {curvature!r}")

