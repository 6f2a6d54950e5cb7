"""The shared base class of the PyTorch tuners: a ``torch.optim.Optimizer`` wrapped around a base optimizer.

One step (``step(closure)``):

1. the *main* closure call at ``w`` (the only one allowed to update module buffers), giving the loss and
   ``g``;
2. one host sync: if the loss or a gradient is NaN/Inf the step is skipped (parameters, the base's state,
   including Adam's step counter and moments, and the tuner's state untouched; ``stats["skipped"]`` + 1; a
   warning). This is the step's only host synchronisation apart from data-dependent loops (line-search
   trials, power iterations);
3. the base direction ``u`` (see :mod:`torch_backend.direction`) and ``numerator = -g^T u``;
4. on sharpness steps (1, 1 + k, 1 + 2k, ... with ``sharpness_every = k``), the online sharpness at ``w``
   (after the base stepped, so Adam's ``P`` is the one of this step's update);
5. the learning rate from the core rule (:mod:`curvopt.rules`, called with ``xp=torch``), using the curvature
   oracle where the rule needs ``u^T H u``;
6. ``w <- w + lr * u``.

The base's ``param_groups`` are the tuner's (same list, same dicts): an LR scheduler or μP groups act on the
per-group ``lr``, which is a *relative multiplier*; the tuner picks the global scale ``lr``. So the effective
learning rate of group ``i`` is ``stats["lr"] * param_groups[i]["lr"]``.

Memory: the tuner keeps two buffers the size of the parameters (``w`` and ``u``), plus one eigenvector per
estimated space when ``sharpness_every > 0`` (and, on sharpness steps only, the main gradient while the
products run). After ``step`` the ``.grad`` fields hold the gradient of the last closure call of the step,
which may be a probe; read gradients inside the closure.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from curvopt.config import SharpnessConfig
from curvopt.rules import eos_ratio as eos_ratio_rule
from curvopt.stats import STAT_DOCS, STAT_FIELDS
from curvopt.validation import check_positive

from .buffers import ModulesLike, ProbeGuard
from .distributed import DistributedLike, check_params
from .distributed import resolve as resolve_distributed
from .direction import base_stability_coefficient, direction_into, is_adam_like, snapshot_into
from .oracles import CurvatureOracle, make_oracle
from .preconditioning import preconditioner_scales
from .sharpness import FiniteDifferenceHVP, OnlineSharpness, _preconditioned
from .vectors import accumulator_dtype, axpy_into, dot, max_abs, reducing

__all__ = ["CurvatureTuner", "StepContext", "CLOSURE_CONVENTION"]

CLOSURE_CONVENTION = """step() needs a closure (the torch.optim.LBFGS convention): a function that zeroes the
gradients, computes the loss, calls backward and returns the loss, e.g.

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)

The tuner calls it once at the current parameters and, depending on the tuner, again at probe points."""


def _stats_doc() -> str:
    return "\n".join(f"    * ``{k}``: {v}" for k, v in STAT_DOCS.items())


@dataclass
class StepContext:
    """What one step knows, handed to the learning-rate rule and the curvature oracle."""

    tuner: "CurvatureTuner"
    closure: Callable[[], Tensor]
    loss: Tensor
    params: list[Tensor]
    index: list[int]
    grads: Optional[list[Tensor]]
    w0: list[Tensor]
    u: list[Tensor]
    previous_u: Optional[list[Tensor]]
    numerator: Tensor = field(default=None)  # type: ignore[assignment]

    def probe(self, a: Tensor) -> Tensor:
        """Call the closure at ``w + a u`` (buffers and RNG protected); the parameters stay there."""
        axpy_into(self.params, self.w0, a, self.u)
        for p in self.params:
            p.grad = None
        loss = self.tuner.guard.probe(self.closure)
        return torch.as_tensor(loss).detach().to(self.loss.dtype)

    def global_mean(self, x: Tensor) -> Tensor:
        """A rank-local scalar (a probe's loss, a torch.func curvature) made global: the mean over the ranks
        of a data-parallel run (one all_reduce), unchanged in a single process."""
        d = self.tuner.distributed
        return x if d is None else d.mean(x)

    def protected(self, fn: Callable[[], Tensor]) -> Tensor:
        """Run ``fn`` (not a closure call, e.g. a functional loss) protected like a probe."""
        return self.tuner.guard.protect(fn)

    def all_points_and_directions(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(w, u)`` over all the tuner's parameters in ``param_groups`` order (``u = 0`` where no gradient)."""
        all_params = self.tuner._all_params()
        pos = {i: k for k, i in enumerate(self.index)}
        ws, us = [], []
        for i, p in enumerate(all_params):
            if i in pos:
                ws.append(self.w0[pos[i]].detach())
                us.append(self.u[pos[i]])
            else:
                ws.append(p.detach())
                us.append(torch.zeros_like(p))
        return tuple(ws), tuple(us)


class CurvatureTuner(torch.optim.Optimizer):
    """Base class; see the module docstring for the step and :attr:`stats` for the logged numbers."""

    #: whether the rule uses a curvature oracle
    uses_curvature = False

    def __init__(self, base: torch.optim.Optimizer, *, sharpness: SharpnessConfig, modules: ModulesLike = None,
                 curvature: Optional[str] = None, functional_loss: Optional[Callable] = None,
                 stability_coefficient: Optional[float] = None, seed: int = 0,
                 distributed: DistributedLike = "auto") -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}")
        if isinstance(base, CurvatureTuner):
            raise TypeError("base must be a plain torch.optim optimizer, not another curvopt tuner")
        self.__dict__["_initializing"] = True
        self.__dict__["base"] = base
        super().__init__([p for g in base.param_groups for p in g["params"]], {})
        self.__dict__["_initializing"] = False
        self.__dict__.pop("_init_groups", None)
        params = self._all_params()
        if not any(p.requires_grad for p in params):
            raise ValueError(f"{type(self).__name__}: none of the base optimizer's parameters requires_grad "
                             "(all frozen): there is nothing to tune")
        #: the reducer of a data-parallel run (None in a single process): see torch_backend.distributed
        self.distributed = resolve_distributed(distributed, params)
        check_params(params, type(self).__name__, self.distributed, curvature if self.uses_curvature else None)
        #: dtype of the tuner's own scalars (at least float32, the widest parameter dtype)
        self.acc_dtype = accumulator_dtype(params)
        self.sharpness_config = sharpness
        if stability_coefficient is not None:
            self.coefficient: Optional[float] = check_positive("stability_coefficient", stability_coefficient)
        else:
            self.coefficient = base_stability_coefficient(base)
        self.adam_like = is_adam_like(base)
        self.guard = ProbeGuard(modules)
        self.oracle: Optional[CurvatureOracle] = (
            make_oracle(curvature, functional_loss) if self.uses_curvature else None)
        self.sharpness = OnlineSharpness(sharpness, seed)
        self._step_count = 0
        self._skipped = 0
        self._w0: dict[int, Tensor] = {}
        self._u: dict[int, Tensor] = {}
        self._last_index: Optional[list[int]] = None
        like = self._acc_like()
        nan = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
        self._stats: dict[str, Any] = {k: nan for k in STAT_FIELDS}
        self._stats.update(skipped=0, closure_calls=0)

    # -- param_groups are the base's -----------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        if self.__dict__.get("_initializing"):
            return self.__dict__["_init_groups"]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        if self.__dict__.get("_initializing"):
            self.__dict__["_init_groups"] = value
        else:
            self.base.param_groups = value

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_initializing"):
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _acc_like(self) -> Tensor:
        """A 0-d tensor of the accumulator dtype on the parameters' device."""
        return torch.zeros((), dtype=self.acc_dtype, device=self._all_params()[0].device)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- stats ---------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """The latest step's numbers (a fresh dict; tensors are 0-d, NaN when not computed)."""
        return dict(self._stats)

    # -- the step ------------------------------------------------------------------------------------------
    def _buffers(self, index: Sequence[int], params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        w0, u = [], []
        for i, p in zip(index, params):
            for store, out in ((self._w0, w0), (self._u, u)):
                b = store.get(i)
                if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                    b = torch.zeros_like(p, memory_format=torch.preserve_format)
                    store[i] = b
                out.append(b)
        return w0, u

    def _learning_rate(self, ctx: StepContext, flags: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        """``(lr, curvature or None)`` for this step; subclasses implement their rule."""
        raise NotImplementedError

    def _rule_state(self) -> dict:
        return {}

    def _load_rule_state(self, state: dict, like: Tensor) -> None:
        pass

    def _skip(self, loss: Tensor) -> Tensor:
        self._skipped += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite loss or gradient, step skipped (parameters, base state and "
            f"tuner state unchanged; {self._skipped} skipped so far)", RuntimeWarning, stacklevel=4)
        like = self._acc_like()
        nan = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
        self._stats.update(lr=nan, numerator=nan, curvature=nan, eos_ratio=nan, skipped=self._skipped,
                           closure_calls=self.guard.calls)
        self.guard.finish()
        return loss

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:  # type: ignore[override]
        if closure is None or not callable(closure):
            raise TypeError(f"{type(self).__name__}.{CLOSURE_CONVENTION}")
        # sharded parameters (FSDP1 FULL_SHARD): every dot product and norm of the step is summed over ranks
        with reducing(self.distributed):
            return self._step(closure)

    def _step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = self.guard.main(closure)
        if loss is None:
            raise TypeError(f"the closure returned None. {CLOSURE_CONVENTION}")
        all_params = self._all_params()
        index = [i for i, p in enumerate(all_params) if p.grad is not None]
        if not index:
            raise RuntimeError("no parameter has a gradient after the closure: did it call loss.backward()?")
        params = [all_params[i] for i in index]
        grads = [p.grad for p in params]
        loss_t = torch.as_tensor(loss).detach().to(device=params[0].device, dtype=self.acc_dtype).reshape(())
        if self.distributed is not None:
            # the closure's loss is rank-local under DDP (the gradients are already averaged): one all_reduce
            # makes it global before the NaN check (so every rank skips together) and the rules use it
            loss_t = self.distributed.mean(loss_t)

        previous_u = None
        if self._last_index == index and self._u:
            previous_u = [self._u[i] for i in index]
        ctx = StepContext(self, closure, loss_t, params, index, grads, [], [], previous_u)
        extra = self.oracle.before_direction(ctx) if self.oracle is not None else []
        finite = torch.isfinite(loss_t) & torch.isfinite(max_abs(grads))
        checks = [finite] + [torch.as_tensor(e, device=finite.device) for e in extra]
        flags = [bool(f) for f in torch.stack(checks).tolist()]  # the step's host sync
        if not flags[0]:
            return self._skip(loss)

        self._step_count += 1
        w0, u = self._buffers(index, params)
        ctx.w0, ctx.u = w0, u
        snapshot_into(w0, params)
        self.base.step()
        direction_into(u, params, w0)
        ctx.numerator = -dot(grads, u).to(self.acc_dtype)

        sharp = self._sharpness(ctx) if self.sharpness.due(self._step_count) else None
        ctx.grads = None
        del grads
        lr, curvature = self._learning_rate(ctx, flags[1:])
        axpy_into(params, w0, lr, u)
        self.guard.finish()
        if self.oracle is not None:
            self.oracle.after_update(ctx, lr)
        self._last_index = index
        self._record(ctx, lr, curvature, sharp)
        return loss

    def _sharpness(self, ctx: StepContext) -> dict[str, float]:
        g0 = ctx.grads
        assert g0 is not None
        hvp = FiniteDifferenceHVP(lambda: self.guard.probe(ctx.closure), ctx.params, ctx.w0, g0)
        out = {"plain": self.sharpness.estimate("plain", hvp, ctx.params)}
        if self.adam_like:
            scales = preconditioner_scales(self.base, ctx.params)
            out["preconditioned"] = self.sharpness.estimate("preconditioned", _preconditioned(hvp, scales),
                                                            ctx.params)
        return out

    def current_sharpness(self) -> float:
        """The sharpness the stability threshold refers to: ``lambda_max(P^-1 H)`` for Adam-like bases,
        ``lambda_max(H)`` otherwise (latest estimate, NaN before the first)."""
        return self.sharpness.values["preconditioned" if self.adam_like else "plain"]

    def _record(self, ctx: StepContext, lr: Tensor, curvature: Optional[Tensor],
                sharp: Optional[dict[str, float]]) -> None:
        like = lr
        nan = torch.full((), float("nan"), dtype=like.dtype, device=like.device)
        s = self._stats
        s["lr"] = lr
        s["numerator"] = ctx.numerator
        s["curvature"] = curvature if curvature is not None else nan
        if sharp is not None:
            s["sharpness"] = torch.tensor(sharp["plain"], dtype=like.dtype, device=like.device)
            if "preconditioned" in sharp:
                s["preconditioned_sharpness"] = torch.tensor(sharp["preconditioned"], dtype=like.dtype,
                                                             device=like.device)
        ref = self.current_sharpness()
        if self.coefficient is not None and not math.isnan(ref):
            s["eos_ratio"] = eos_ratio_rule(lr, ref, self.coefficient)
        else:
            s["eos_ratio"] = nan
        s["skipped"] = self._skipped
        s["closure_calls"] = self.guard.calls

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base's state dict and the tuner's (rule state, counters, eigenvectors, secant memory)."""
        tuner: dict[str, Any] = {
            "step": self._step_count,
            "skipped": self._skipped,
            "last_index": None if self._last_index is None else list(self._last_index),
            "sharpness": self.sharpness.state_dict(),
            "rule": self._rule_state(),
            "stats": {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self._stats.items()},
            # what the state belongs to, checked by load_state_dict
            "kind": type(self).__name__,
            "base_kind": type(self.base).__name__,
            "params": [[list(p.shape), str(p.dtype).replace("torch.", "")] for p in self._all_params()],
        }
        if self.oracle is not None:
            tuner["oracle"] = self.oracle.state_dict()
            if self.oracle.name == "secant":
                tuner["u"] = {i: t.clone() for i, t in self._u.items()}
        return {"base": self.base.state_dict(), "tuner": tuner}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"base", "tuner"}:
            raise ValueError("not a curvopt tuner state dict (expected keys 'base' and 'tuner'; "
                             "a bare torch.optim state dict goes to opt.base.load_state_dict)")
        self._check_compatible(state_dict["tuner"])
        self.base.load_state_dict(state_dict["base"])
        st = state_dict["tuner"]
        all_params = self._all_params()
        like = self._acc_like()
        self._step_count = int(st["step"])
        self._skipped = int(st["skipped"])
        self._last_index = None if st["last_index"] is None else list(st["last_index"])
        self.sharpness.load_state_dict(st["sharpness"], all_params)
        self._load_rule_state(st["rule"], like)
        self._stats = {k: (v.to(like.device) if isinstance(v, Tensor) else v) for k, v in st["stats"].items()}
        if self.oracle is not None:
            self.oracle.load_state_dict(st.get("oracle", {"prev": None}), like)
            self._u = {int(i): t.to(device=all_params[int(i)].device, dtype=all_params[int(i)].dtype).clone()
                       for i, t in st.get("u", {}).items()}

    def _check_compatible(self, st: dict[str, Any]) -> None:
        """A clear ValueError when the state comes from another tuner, base or model."""
        me = type(self).__name__
        kind = st.get("kind")
        if kind is not None and kind != me:
            raise ValueError(f"this state dict belongs to a {kind} tuner, not to a {me}: load it into a {kind}")
        base_kind = st.get("base_kind")
        if base_kind is not None and base_kind != type(self.base).__name__:
            raise ValueError(f"this {me} state dict was saved around a {base_kind} base optimizer, not around a "
                             f"{type(self.base).__name__}")
        saved = st.get("params")
        if saved is None:
            return
        mine = [[list(p.shape), str(p.dtype).replace("torch.", "")] for p in self._all_params()]
        if len(saved) != len(mine):
            raise ValueError(f"this {me} state dict was saved with {len(saved)} parameter tensors, this tuner "
                             f"has {len(mine)}: it comes from a different model")
        for i, (a, b) in enumerate(zip(saved, mine)):
            if list(a[0]) != list(b[0]):
                raise ValueError(f"parameter {i} has shape {tuple(b[0])} here but shape {tuple(a[0])} in the state "
                                 f"dict: it comes from a different model")
            if a[1] != b[1]:
                raise ValueError(f"parameter {i} has dtype {b[1]} here but {a[1]} in the state dict")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base!r})"


CurvatureTuner.stats.__doc__ = (
    "The latest step's numbers, for logging (a fresh dict each access; keys ``curvopt.stats.STAT_FIELDS``).\n\n"
    "Values are 0-d tensors (no host sync in the step; call ``float()`` when logging), NaN when not computed "
    "this step, except the two counters, which are ints:\n\n" + _stats_doc() + "\n"
)
