"""The shared base class of the PyTorch tuners: a ``torch.optim.Optimizer`` wrapped around a base optimizer.

A tuner is its rule value (``self.rule``, from :mod:`curvopt.rules`) plus this class's step. One step
(``step(closure)``) is a transaction:

1. the *main* closure call at ``w`` (the only one allowed to update module buffers), giving the loss and
   ``g``;
2. ``w0 <- w``, a snapshot of the base's state for the parameters it will step, ``base.step()``, the base
   direction ``u = w_new - w0`` (see :mod:`torch_backend.direction`) and ``numerator = -g^T u``;
3. one host sync: if the loss or ``-g^T u`` is not finite (a NaN/Inf loss or gradient, or a base direction
   that overflowed, e.g. fp16 Adam) the step is **skipped**: parameters and the base's state (Adam's step
   counter and moments included) are put back, and so are the module buffers (as before the main call: a NaN
   batch's BatchNorm statistics; the random generators stay where the main call left them, as in a bare loop),
   ``stats["skipped"]`` + 1, a warning; a
   closure-free step whose gradient is zero in every entry is skipped the same way
   (:func:`curvopt.config.has_gradient`);
4. on sharpness steps (``curvopt.config.sharpness_due``: steps 1, 1 + k, ...), the online sharpness at
   ``w0`` (after the base stepped, so Adam's ``P`` is the one of this step's update), by the core's power
   iteration on Hessian-vector products (finite differences; exact, by double backward, with
   ``functional_loss``); then ``u^T H u`` from the curvature oracle where
   the rule needs it;
5. the learning rate from the rule: ``apply_rule(self.rule, RuleInputs(...), rule state, torch)`` (the core
   owns the guard); the Armijo rule's trials run here; CDAT behind a watched base then holds it once
   its mini-batch watch has fired (:mod:`curvopt.minibatch_watch`);
6. commit: ``w <- w0 + lr * u``, the tuner's state and ``stats`` are written.

If anything raises before the commit — the closure at any of its calls (main, curvature probe, secant
fallback, sharpness product, line-search trial, exact oracle), ``KeyboardInterrupt`` included — the
parameters are restored bit-exactly, the base's state and the tuner's state are as before the step, module
buffers and random generators are as before the main call, and the exception propagates.

The base's ``param_groups`` and ``state`` are the tuner's (same objects): an LR scheduler or μP groups act on
the per-group ``lr``, which is a *relative multiplier* (the tuner picks the global scale ``lr``, so the
effective learning rate of group ``i`` is ``stats["lr"] * param_groups[i]["lr"]``; behind plain SGD CDAT's
averages follow the largest group lr, so a scheduler's factor cancels at once), and the tuner's own state
lives beside the base's (layout: :mod:`torch_backend.state`).

Memory: the tuner keeps ``w0`` and ``u`` (the size of the parameters), the snapshot of the base's state
(its size: two parameter-sized buffers for Adam, one for momentum SGD), a second ``u`` with the secant
oracle, the previous gradient with the secant's noise correction (closure-free behind Adam, by default), one
more (the predicted gradient) with ``numerator="paired"``, and one eigenvector per estimated space when the
sharpness is on; below :data:`torch_backend.vectors.CONCAT_BELOW` entries (one dtype and device), where these are
flat buffers, one more flat scratch vector (:mod:`torch_backend.workspace`). Within a step a probe's gradients sit
beside the main call's (one more, transient), and the Adam numerators' diagonal is formed over at most
:data:`torch_backend.vectors.CONCAT_BELOW` entries at a time.

After ``step`` the tuner's parameters' ``.grad`` hold the gradient of the last closure call of the step, which
may be a probe, or zeros (for a parameter the main call reached and that call did not, and after a sharpness
estimate, whose products consume their gradients: under ``zero_grad(set_to_none=False)`` the base keeps stepping
it, as torch's optimizers do); read gradients inside the closure. The other parameters keep the main call's
gradient (another optimizer steps them: :mod:`torch_backend.buffers`).
"""
from __future__ import annotations

import collections
import dataclasses
import math
import operator
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from curvopt.base import BaseMethod, carries_gradients, direction_unit, followed_rate
from curvopt.curvature import (SecantNoiseState, finite_difference_curvature, noise_correction_on, noise_dominated,
                               replay_judged, replay_mismatch, replay_mismatch_in_place, replay_slope_mismatch,
                               secant_noise_corrected)
from curvopt.config import (CURVATURE_ORACLES, DEFAULT_CURVATURE, EXTERNAL_CLIP_MESSAGE,
                            EXTERNAL_CLIP_MESSAGE_CLOSURE, EXTERNAL_CLIP_STEPS, GRADIENT_MISSING_MESSAGE,
                            OUTSIDE_MOTION_MESSAGE, REPLAY_CHECKS, REPLAY_SHORTER, SECANT_COLLAPSE_MESSAGE,
                            SECANT_STALL_MESSAGE,
                            ZeroRateWatch, skip_message, accumulator_dtype_name, collapse_peak, collapse_run,
                            collapse_sustained, concave_reprobe, probes_along,
                            external_clip_suspected, has_gradient, in_direction_units, moved_measurably,
                            moved_outside, probe_reads_forward, remember_probe, resolve_curvature,
                            power_iters, secant_caveat, secant_collapsed, secant_probe_eps, secant_stall_reference,
                            secant_stalled, sharpness_due, stall_window, watch_zero_rate, watched_norms,
                            zero_rate_message)
from curvopt.bound_watch import BoundWatch, bound_messages, watch_bound
from curvopt.minibatch_watch import MinibatchWatch, held_rate, holds, minibatch_message, watch_minibatch, watches
from curvopt.preconditioner import relative_rates
from curvopt.rules import ArmijoRule, CDATRule, RuleInputs, apply_rule
from curvopt.rules import eos_ratio as eos_ratio_rule
from curvopt.rules import finite_difference_step, secant_curvature, secant_stretch
from curvopt.rules import momentum_numerator, paired_numerator, paired_prediction_weight
from curvopt.stats import STAT_DOCS, STAT_FIELDS
from curvopt.validation import at_step, check_bool, check_choice, check_positive, check_positive_int

from . import state as layout
from .settings import resolve_sharpness, settings_in_groups
from .transaction import Transaction, fits
from .buffers import ModulesLike, ProbeGuard, is_probe
from .direction import base_method, check_base, check_group, check_listed_once, is_adam_like, kind_change
from .distributed import COMM_HOOK_MESSAGE, DistributedLike, check_params, comm_hooks
from .distributed import resolve as resolve_distributed
from .freshness import (ACCUMULATED_GRADIENT_MESSAGE, ACCUMULATED_MISSES, ACCUMULATED_WINDOW, STALE_GRADIENT_MESSAGE,
                        UNCONFIRMED_STALE_MESSAGE, GradientMarks)
from .oracles import check_functional_loss, exact, exact_hvp, finite_difference, functional_evidence
from .preconditioning import (adam_diagonal_by_group, adam_preconditioner_from_optimizer, adam_step_counts,
                              preconditioner_scales)
from .noise import knows_noise, noise_numerator
from .precision import gradient_eps
from .probe import Probe, move_flat
from .scalars import ScalarNamespace, ScalarStore, as_scalar, host_values
from .sharpness import FiniteDifferenceHVP, power_estimate, preconditioned, random_vector
from . import vectors
from .vectors import (axpy_into, can_concatenate, concatenating, dot, dots, flat_dots, joined, least_precise_eps,
                      local_sq_norm, max_abs, norm, reducing)
from .workspace import Workspace
from .workspace import build as build_workspace
from .warning import warn

__all__ = ["CurvatureTuner", "CLOSURE_CONVENTION"]

CLOSURE_CONVENTION = """step() needs a closure (the torch.optim.LBFGS convention): a function that zeroes the
gradients, computes the loss, calls backward and returns the loss, e.g.

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)

The tuner calls it once at the current parameters and, depending on the tuner, again at probe points."""

@dataclasses.dataclass(eq=False, slots=True)
class _Step:
    """One step's values, filled in phase by phase by :meth:`CurvatureTuner._step` and gone with the step: tensors,
    host scalars of the accumulator dtype (``S``) and the flags that say what the step computes."""

    # the main call (phase 1)
    closure: Optional[Callable[[], Tensor]]
    freshness: Optional[str]  # closure-free: "stale", "accumulated" or None (torch_backend.freshness)
    probe_free: bool  # closure-free or probes=False: the closure is called once at most
    method: Optional[BaseMethod]
    coefficient: Optional[float]
    loss: Any  # what the closure returned (None closure-free)
    loss_t: Optional[Tensor]
    all_params: list[Tensor]
    ws: Workspace
    params: list[Tensor]  # the parameters with a gradient (the workspace's)
    grads: list[Tensor]
    dev: torch.device
    S: ScalarNamespace
    p0: Tensor  # the first parameter, whose state holds the tuner's globals
    glob: dict
    count: int
    # the plan (:meth:`CurvatureTuner._plan`)
    oracle: Optional[str] = None
    secant: bool = False
    remember: bool = False  # the secant's memory is kept (u_sq read, the direction kept)
    target: int = 0  # the workspace's u buffer this step's direction goes to
    held: Optional[int] = None  # the one holding the previous direction
    prev_u: Optional[list[Tensor]] = None
    early: bool = False  # g^T u_prev read before the base steps
    g_dot_prev_u_t: Optional[Tensor] = None
    denoise: bool = False
    noise_b: Optional[Tensor] = None
    clip: Optional[Tensor] = None  # max_grad_norm's factor
    group_lr: float = 1.0  # the largest group lr (phase 2): u is the base's update at the group lrs
    # the direction (phase 2)
    w0: Any = None
    u: Any = None
    # the reads (phase 3)
    watch_clip: bool = False
    flat: Optional[tuple] = None  # the flat workspace's (w0, u, g, g views), or None
    fd: bool = False
    paired: bool = False
    u_sq: Any = None
    g_sq: Any = None
    loss_v: Any = None
    clip_v: Any = None
    grad_max: Any = None
    moved_outside: bool = False  # the parameters moved outside the optimizer since the last step
    fd_norms: Optional[tuple] = None
    numerator: Any = None  # -g^T u (the true slope under a clip)
    rule_numerator: Any = None  # the rule's numerator (momentum's, paired's)
    ok: bool = False
    secant_c: Any = None
    prev_u_sq: Any = None
    noise_state: Optional[SecantNoiseState] = None
    has_secant: bool = False
    # the curvature (phase 4)
    probe: Optional[Probe] = None
    sharp: dict = dataclasses.field(default_factory=dict)  # this step's estimates: space -> (value, vector, products)
    curvature: Any = None
    probing: bool = False
    lagged: bool = False
    stretch: Any = 1.0
    replay_scale: Optional[float] = None
    sharpness: dict = dataclasses.field(default_factory=dict)  # space -> this step's sharpness
    fresh_sharp: list = dataclasses.field(default_factory=list)
    # the rate (phase 5)
    lr: Any = None
    new_rule_state: Any = None
    trials: int = 0
    error: float = math.nan
    watch: Optional[MinibatchWatch] = None
    ratio: Any = None


#: the other cause of a step where no parameter has a gradient
_ORPHANED = (" (Or the optimizer holds parameters the model no longer uses: it was built before model.to_empty(), "
             "a reassignment of the model's parameters, or a conversion such as model.double() under "
             "torch.__future__.set_overwrite_module_params_on_conversion(True).)")


def _unhooked_step(base: torch.optim.Optimizer) -> Optional[Callable[[torch.optim.Optimizer], Any]]:
    """The base's ``step`` without torch's hook wrapper (``type(base).step.__wrapped__``), or None when its
    step is not torch's hooked one (a custom wrapper, or ``step`` patched on the instance other than by an LR
    scheduler built on the base, whose patch only records the call: :meth:`CurvatureTuner._base_step`)."""
    fn = getattr(type(base).step, "__wrapped__", None)
    patched = base.__dict__.get("step")
    if patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False):
        return None
    return fn


def _stats_doc() -> str:
    return "\n".join(f"    * ``{k}``: {v}" for k, v in STAT_DOCS.items())


class CurvatureTuner(torch.optim.Optimizer):
    """Base class; see the module docstring for the step and :attr:`stats` for the logged numbers.

    Subclasses set ``self.rule`` (a rule value of :mod:`curvopt.rules`) before calling ``__init__``."""

    rule: Any
    #: CDAT's numerator (``"direction"``: ``-g^T u``; ``"momentum"``: :func:`curvopt.rules.momentum_numerator`;
    #: ``"paired"``: :func:`curvopt.rules.paired_numerator`)
    numerator: str = "direction"

    #: the watch on the loss against the rule's ``f_star`` (:mod:`curvopt.bound_watch`; not saved: after a load,
    #: the next steps' distance and slope are its references, the warnings already given stay given)
    _bound_watch = BoundWatch.start(0.0)
    #: the watch on runs of steps at rate 0 (:class:`curvopt.config.ZeroRateWatch`; likewise; a class default, as
    #: the other watches': a tuner pickled before it existed loads without it)
    _zero_watch = ZeroRateWatch.start(0.0, 0)
    #: the once-per-tuner warnings that a closure-free step found the gradients unzeroed, or unchanged without the
    #: values to confirm it (:mod:`.freshness`), were given; whether the last accumulated steps' secants were not
    #: positive
    _accumulation_warned = False
    _stale_warned = False
    _accumulated: tuple = ()
    #: consecutive secant steps at a collapsed rate (:func:`curvopt.config.collapse_run`; not saved)
    _collapse_run = 0
    #: what one step's watches remember from step to step (the checks still to run, the norms and runs watched):
    #: put back when a step raises (:class:`torch_backend.transaction.Transaction`)
    STEP_MEMORY = ("_replay_checks", "_functional_checks", "_clip_norms", "_moved_last", "_zero_watch", "_bound_watch",
                   "_probed", "_peak", "_collapse_run", "_accumulated")
    #: the once-per-tuner warning that a closure-free step found no previous direction for its parameters was given
    _regrouped_warned = False
    #: the positions (in the step's parameters) of those with ``requires_grad=False`` when last checked for motion
    #: (:meth:`_watch_frozen`); None once it warned
    _frozen_checked: Optional[tuple[int, ...]] = ()
    #: whether the once-per-tuner warning that a param group holds a key named like a tuner setting was given
    #: (:func:`~torch_backend.settings.settings_in_groups`)
    _group_settings_warned = False
    #: whether the modules the closure runs were searched for DDP communication hooks (once, after a main call)
    _hooks_checked: bool = False
    #: ``_probed`` and ``_peak`` as the state holds them (:data:`torch_backend.state.SECANT_WATCH`; None for none):
    #: written when they change (a class default: a tuner pickled by an earlier build has none)
    _watch_saved: tuple[Optional[float], ...] = ()

    def __init__(self, base: torch.optim.Optimizer, *, curvature: str = DEFAULT_CURVATURE, sharpness: Any = None,
                 modules: ModulesLike = None, functional_loss: Optional[Callable] = None,
                 stability_coefficient: Optional[float] = None, seed: int = 0, distributed: DistributedLike = "auto",
                 allow_any_base: bool = False, legacy: Optional[dict] = None, max_grad_norm: Optional[float] = None,
                 probes: bool = True, noise_correction: Optional[bool] = None) -> None:
        name = type(self).__name__
        if not hasattr(self, "rule"):  # (was an AttributeError on 'rule' further down)
            raise TypeError(f"{name} sets no rule: CurvatureTuner is the tuners' base class; use CDAT, "
                            "QuadraticGreedy, ArmijoLineSearch, PolyakStep or EdgeOfStability, or set self.rule "
                            "(a rule value of curvopt.rules) before calling CurvatureTuner.__init__")
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer instance, got {type(base).__name__}: a tuner "
                            f"wraps an optimizer, {name}(torch.optim.AdamW(model.parameters(), lr=1.0)), and "
                            "cannot be given parameters (nor be another optimizer's optimizer_class)")
        if isinstance(base, CurvatureTuner):
            raise TypeError("base must be a plain torch.optim optimizer, not another curvopt tuner")
        check_base(base, check_bool("allow_any_base", allow_any_base), name)
        self.__dict__["_initializing"] = True
        self.__dict__["base"] = base
        super().__init__([p for g in base.param_groups for p in g["params"]], {})
        self.__dict__["_initializing"] = False
        self.__dict__.pop("_init_groups", None)
        params = self._all_params()
        if not any(p.requires_grad for p in params):
            raise ValueError(f"{name}: none of the base optimizer's parameters requires_grad "
                             "(all frozen): there is nothing to tune")
        self._adopt_layout()
        self._distributed_setting = distributed
        #: the reducer of a data-parallel run (None in a single process): see torch_backend.distributed
        self.distributed = resolve_distributed(distributed, params)
        needs = self.rule.needs
        if "curvature" in needs:
            check_choice("curvature", curvature, CURVATURE_ORACLES)
            if curvature == "exact":
                check_functional_loss(functional_loss)
        check_params(params, name, self.distributed, curvature if "curvature" in needs else None)
        #: the curvature oracle setting (None when the rule needs no curvature); "auto" is resolved per step
        self.curvature: Optional[str] = curvature if "curvature" in needs else None
        self.functional_loss = functional_loss
        #: the online sharpness setting (the rule's default unless given)
        self.sharpness_config = resolve_sharpness(sharpness, self.rule.default_sharpness, legacy or {}, name)
        if "sharpness" in needs and not self.sharpness_config.enabled:
            raise ValueError(f"{name} needs the online sharpness: sharpness must estimate every k >= 1 steps "
                             "(sharpness=k or SharpnessConfig(every=k))")
        if functional_loss is not None and self.curvature != "exact" and not self.sharpness_config.enabled:
            oracle = f"curvature={self.curvature!r}" if self.curvature is not None else "no curvature oracle"
            warn(f"{name}: functional_loss is not used: it serves curvature=\"exact\" and the online sharpness's "
                 f"Hessian-vector products, and this tuner has {oracle} and the sharpness off")
        #: the base as the core describes it at construction (None for a base outside SGD/Adam/AdamW): its kind
        #: and the defaults chosen from it; each step reads its momentum/betas afresh (:meth:`current_method`)
        self.method = base_method(base)
        self._kind_warned = False  # (kind_change: warned once)
        #: the settings left to their default by the kind of base (set by the tuners that have such defaults)
        self.kind_defaults: tuple[str, ...] = ()
        #: the stability coefficient given (None: the base's, see :attr:`coefficient`)
        self.given_coefficient = (None if stability_coefficient is None
                                  else check_positive("stability_coefficient", stability_coefficient))
        self.preconditioned = self.method is not None and self.method.preconditioned
        # below 2**63, where the start vectors' seeds (seed * 1_000_003 + ...) mod 2**63 stay distinct per seed
        self.seed = check_positive_int("seed", seed, minimum=0, maximum=2 ** 63 - 1)
        #: clip the main call's gradient to this norm inside the step (None: no clipping); see :meth:`step`
        self.max_grad_norm = None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
        check_bool("noise_correction", noise_correction, none=True)
        #: False: the closure is called once per step (no probes); see :meth:`step`
        self.probes = check_bool("probes", probes)
        if noise_correction and not knows_noise(base):
            raise ValueError(
                f"{name}: noise_correction=True needs the base's noise metric, known for SGD (with or without "
                f"momentum), Adam and AdamW, not {type(base).__name__}. Without it the closure-free secant is not "
                "corrected, and in mini-batch training its rate collapses (the stall warning says so): pass a "
                "closure there (the fd oracle)")
        #: the secant's mini-batch noise correction (None: behind Adam only, curvopt.curvature.noise_correction_on)
        self.noise_correction = noise_correction
        if not probes:
            self._require_probe_free(has_closure=True, error=ValueError)
        #: fd probes still to check against the main call (:meth:`_check_replay`); 0 once it warned
        self._replay_checks = REPLAY_CHECKS
        #: steps still to check functional_loss against the closure (:meth:`_check_functional`); 0 once it warned
        self._functional_checks = REPLAY_CHECKS
        self._secant_warned = False
        self._stall_warned = False
        #: ||g|| of the last closure-free secant steps after steps that moved the parameters (not a probe's, not
        #: at rate 0; :func:`curvopt.config.watched_norms`), and whether the last step was such a step
        self._clip_norms = np.zeros(EXTERNAL_CLIP_STEPS)
        self._moved_last = False
        self._clip_warned = False
        self._motion_warned = False
        self.probe_guard = ProbeGuard(modules)
        self._ws: Optional[Workspace] = None
        self._store: Optional[ScalarStore] = None
        #: the global entries of the first parameter's state after the last step (restored if only that
        #: parameter's state is removed)
        self._kept_globals: Optional[dict] = None
        #: the gradient tensors and their versions as the last step left them (:mod:`torch_backend.freshness`)
        self._marks = GradientMarks()
        #: (the stall reference of its rate, the step its judgement window starts at, the window's first rate or
        #: NaN) of the last closure-free probing step, until judged (``secant_stalled``)
        self._probed: Optional[tuple[float, int, float]] = None
        #: the largest closure-free secant rate since the last probing step, in stall units (``secant_collapsed``)
        self._peak = 0.0
        self._collapse_warned = False
        #: trials of the last step and the decrease error of its last trial (Armijo; 0 = accepted)
        self.last_trials = 0
        self.last_decrease_error = math.nan
        #: Hessian-vector products spent by the last step's sharpness estimate
        self.sharpness_products = 0
        self._stats_device = params[0].device
        self._stats: dict[str, Any] = self._nan_stats(skipped=0)
        # a tuner starts afresh: another tuner's state left in the base (it wrapped this base before, or its state
        # dict was loaded into the base) would go on as this one's (a stale secant, another rule's averages)
        if layout.drop_ours(base):
            warn(f"{name}: the base optimizer holds a curvopt tuner's state (a tuner wrapped it before, or a tuner's "
                 f"state dict was loaded into it); this {name} starts afresh without it (its start-up, no secant "
                 "memory; the base's own state is kept). To resume a tuner, load its state dict into the new tuner: "
                 f"{name}(base).load_state_dict(saved)")
        self.register_state_dict_pre_hook(_put_back_globals, prepend=True)
        self.register_state_dict_post_hook(_name_the_tuner, prepend=True)
        base.register_state_dict_post_hook(_compact_buffers, prepend=True)

    # -- param_groups and state are the base's --------------------------------------------------------------
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

    @property
    def state(self) -> Any:  # type: ignore[override]
        if self.__dict__.get("_initializing"):
            return self.__dict__.setdefault("_init_state", {})
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        if not self.__dict__.get("_initializing"):
            self.base.state = value

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the base (the tuner's ``param_groups`` are the base's), refusing what the tuners cannot
        handle (``maximize=True``, complex parameters) before the base sees it."""
        if self.__dict__.get("_initializing"):
            return super().add_param_group(param_group)
        check_group(param_group, type(self).__name__)
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # listed once, as torch's add_param_group does (a set: its
            # error): a generator (module.parameters()) read by the checks below would reach the base empty
            param_group["params"] = params = list(params)
            # the tensors of named_parameters()' (name, tensor) pairs, whose names the base records
            params = [p[1] if isinstance(p, tuple) else p for p in params]
            check_listed_once(params, type(self).__name__)
        accumulator_dtype_name(str(p.dtype) for p in ([params] if isinstance(params, Tensor) else params))
        self.base.add_param_group(param_group)
        self._adopt_layout()

    def _adopt_layout(self) -> None:
        """What the parameters' dtypes, devices and sizes decide, read again whenever they may have changed (a new
        group; the step's workspace rebuilt, e.g. after ``model.double()`` converted them in place)."""
        params = self._all_params()
        #: dtype of the tuner's own scalars (at least float32, the widest parameter dtype; complex refused)
        self.acc_dtype = getattr(torch, accumulator_dtype_name(str(p.dtype) for p in params))
        self._concat = can_concatenate(params)

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        """The base's ``defaults`` (LR schedulers such as ``OneCycleLR``/``CyclicLR`` read momentum/betas here)."""
        if self.__dict__.get("_initializing"):
            return self.__dict__.get("_init_defaults", {})
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        if self.__dict__.get("_initializing"):
            self.__dict__["_init_defaults"] = value
        else:
            self.base.defaults = value

    @property
    def probing(self) -> bool:
        """True while the closure runs as a probe (:func:`torch_backend.buffers.is_probe`)."""
        return is_probe()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's ``zero_grad`` (the same parameters)."""
        self.base.zero_grad(set_to_none=set_to_none)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- stats ---------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """The latest step's numbers (copies; tensors are 0-d, NaN when not computed)."""
        out = {}
        for k, v in self._stats.items():
            if isinstance(v, Tensor):
                v = v.clone()
            elif isinstance(v, np.generic):  # the step keeps its host scalars; made tensors when read
                v = torch.tensor(float(v), dtype=self.acc_dtype, device=self._stats_device)
            out[k] = v
        return out

    def _nan_stats(self, **ints: int) -> dict[str, Any]:
        """The stats of a step that chose no rate (skipped, or none yet): NaN but for the sharpness estimates
        held (as between estimates; the Optax backend's skip keeps them too) and the counters ``ints``."""
        p = self._all_params()[0]
        nan = torch.full((), math.nan, dtype=self.acc_dtype, device=p.device)
        out: dict[str, Any] = {k: nan for k in STAT_FIELDS}
        glob = self._globals()
        for field, space in (("sharpness", "plain"), ("preconditioned_sharpness", "preconditioned")):
            held = glob.get(layout.SHARPNESS[space])
            if held is not None:
                out[field] = torch.as_tensor(held).to(nan)
        out.update(skipped=0, closure_calls=0)
        out.update(ints)
        return out

    def current_method(self) -> Optional[BaseMethod]:
        """The base as the core describes it now (:func:`~torch_backend.direction.base_method`): its momentum
        (SGD) or betas and eps (Adam) as they are at this step (schedulers such as ``OneCycleLR`` and ``CyclicLR``
        change them); None for a base outside SGD/Adam/AdamW. A base no longer of the kind the tuner took
        defaults from (:attr:`kind_defaults`) warns once (:func:`~torch_backend.direction.kind_change`)."""
        if self.method is None:
            return None
        method = base_method(self.base)
        if not getattr(self, "_kind_warned", False):
            message = kind_change(method, self.method.kind, getattr(self, "kind_defaults", ()), type(self).__name__)
            if message:
                self._kind_warned = True
                warn(message)
        return method

    def _unknown_momentum(self, method: Optional[BaseMethod]) -> float:
        """A base outside SGD/Adam/AdamW (``method`` None): its first group's ``momentum`` or ``betas[0]`` (0 if it
        has neither), for the mini-batch watch (:func:`curvopt.minibatch_watch.watches`) and the rate-0 warning
        (:func:`curvopt.base.carries_gradients`); 0 for a known base."""
        if method is not None:
            return 0.0
        group = self.base.param_groups[0]
        betas = group.get("betas")
        value = group.get("momentum", betas[0] if isinstance(betas, (tuple, list)) and betas else 0.0)
        try:
            return float(value)
        except (TypeError, ValueError):
            return 0.0

    @property
    def coefficient(self) -> Optional[float]:
        """The stability coefficient ``c`` (the edge of stability is ``lr = c / sharpness``): the one given,
        else the base's at this step (:meth:`current_method`: its describing group's); None for an unknown
        base without one."""
        return self._coefficient_of(self.current_method())

    def _coefficient_of(self, method: Optional[BaseMethod]) -> Optional[float]:
        if self.given_coefficient is not None:
            return self.given_coefficient
        return None if method is None else method.coefficient

    def _globals(self) -> dict:
        """The state dict entry holding the tuner's global scalars (see :mod:`torch_backend.state`)."""
        st = self.state.get(next(p for g in self.param_groups for p in g["params"]))  # not a list of them all
        return st if st is not None else {}

    # -- the step ------------------------------------------------------------------------------------------
    # eager under torch.compile(opt.step) too: the step's rule and state writes run on the host
    @torch.compiler.disable(reason="curvopt's tuner step runs eagerly (its rule runs on the host): compile the "
                            "model and the loss, not opt.step")
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # torch.optim's signature
        """One step, the transaction of the module docstring; returns the main call's loss (what the closure
        returned; None closure-free).

        ``closure``: zeroes the gradients, computes the loss, calls backward and returns the loss
        (:data:`CLOSURE_CONVENTION`); called once at the current parameters (the main call) and, by tuner and
        settings, again at probe points (the fd curvature, the online sharpness, Armijo's trials); with
        ``probes=False`` only once. ``closure=None`` (``loss.backward(); opt.step()``): the gradients in
        ``.grad`` are the main call's and the curvature is the secant of consecutive gradients (the first such
        step takes the probing step ``lr = h``); only for CDAT and QuadraticGreedy with ``curvature="auto"`` or
        ``"secant"`` and the sharpness off (a ``TypeError`` otherwise). A closure that returns None and leaves
        the parameters with the gradient tensors they had (Lightning's manual optimization hands ``opt.step()``
        such a closure; its hooks may change the values in place) is called once and the step is then a
        closure-free one. ``max_grad_norm``: the main call's
        gradient is clipped in place by ``torch.nn.utils.clip_grad_norm_``'s factor
        ``min(1, max_grad_norm / (||g|| + 1e-6))`` before the base steps, so ``u`` is the clipped direction; the
        rules see the unclipped slope (``-g^T u`` over the factor) and the probes' gradients are the loss's own,
        never clipped."""
        if closure is not None and not callable(closure):
            raise TypeError(f"{type(self).__name__}.{CLOSURE_CONVENTION}")
        if getattr(self, "_stepping", False):  # (a field test: its rate fell to 1e-9 and stayed ~1e-6 for 30 steps)
            raise RuntimeError(f"{type(self).__name__}.step() was called while a step of it runs (from its closure): "
                               "the closure computes the loss and the gradients and returns the loss; the step is "
                               "the one opt.step(closure) outside it")
        if torch.is_inference_mode_enabled():  # the step's cached buffers would become inference tensors
            raise RuntimeError(f"{type(self).__name__}.step() was called under torch.inference_mode(), where "
                               "parameters cannot be updated in place for training; step outside it")
        if closure is None:
            if layout.is_template_call(self, self._all_params()):
                warn(layout.TEMPLATE_MESSAGE.format(tuner=type(self).__name__))
                return None
            self._require_probe_free(has_closure=False, error=TypeError)
        for group in self.param_groups:  # refused at construction, but a group can be edited since
            check_group(group, type(self).__name__)
        if not self._group_settings_warned:
            message = settings_in_groups(self)
            if message:
                self._group_settings_warned = True
                warn(message)
        if self.distributed is None and self._distributed_setting == "auto":  # a process group set up since
            # (the model and the tuner built before init_process_group, DDP after: the ranks drifted apart)
            self.distributed = resolve_distributed("auto", self._all_params())
        base_hooks = self._base_hooks()
        for hook in list(base_hooks[0].values()):  # the base's own step hooks, around the whole step
            hook(self.base, (), {})
        # sharded parameters (FSDP1 FULL_SHARD): every dot product and norm of the step is summed over ranks
        with reducing(self.distributed), concatenating(self._concat):
            tx = Transaction(self)
            self._stepping = True
            try:
                loss = self._step(closure, tx)
            except BaseException:
                tx.rollback()
                raise
            finally:
                self._stepping = False
        self._marks.take(self._all_params())
        self._kept_globals = {k: v for k, v in self._globals().items()
                              if layout.is_ours(k) and k not in layout.PER_PARAM}
        for hook in list(base_hooks[1].values()):
            hook(self.base, (), {})
        return loss

    def _base_hooks(self) -> tuple[dict, dict]:
        """The base's own step pre- and post-hooks that :meth:`step` runs around the tuner's whole step: an EMA
        or logging hook registered on the base sees the step's result, not the intermediate point of
        :meth:`_base_step` (the base's step at its own lr, before the tuner rescales it). Empty when the base's
        ``step`` is not torch's hooked one (then :meth:`_base_step` calls it as it is, hooks and all)."""
        base = self.base
        if _unhooked_step(base) is None:
            return {}, {}
        return base._optimizer_step_pre_hooks, base._optimizer_step_post_hooks

    def _step(self, closure: Optional[Callable[[], Tensor]], tx: Transaction) -> Optional[Tensor]:
        """The transaction's phases (the module docstring's 1-6), each filling in the step's record :class:`_Step`;
        returns the main call's loss."""
        st = self._main_call(closure)  # 1. the main call, its gradients and loss checked
        if st.freshness == "stale":
            if self._unchanged(st.params, st.grads):
                return self._skip(st.loss, st.p0, STALE_GRADIENT_MESSAGE)
            if not self._stale_warned:
                self._stale_warned = True
                warn(UNCONFIRMED_STALE_MESSAGE.format(tuner=type(self).__name__))
        self._plan(st)
        if not self._take_direction(st, tx):  # 2. w0, the base's step, u (no parameter to tune: done)
            self.probe_guard.finish()
            return st.loss
        self._read(st)  # 3. the step's one host sync
        if not st.ok:
            tx.undo_base()
            return self._skip(st.loss, st.p0, skip_message(
                loss_finite=None if st.loss is None else bool(st.S.isfinite(st.loss_v)),
                gradient_finite=all(bool(torch.isfinite(g).all()) for g in st.grads)))
        if st.grad_max is not None and not has_gradient(st.grad_max):
            tx.undo_base()
            return self._skip(st.loss, st.p0, GRADIENT_MISSING_MESSAGE)
        self._watch_reads(st)
        self._curvature(st)  # 4. the online sharpness and the curvature along u
        self._rate(st)  # 5. the rule's rate
        self._commit(st)  # 6. w <- w0 + lr u, the tuner's state, the stats
        return st.loss

    def _unchanged(self, params: list[Tensor], grads: list[Tensor]) -> bool:
        """Whether the gradients are those the last step kept (behind Adam, for the noise correction), value for
        value; False where it kept none (:mod:`torch_backend.freshness`: a count that says "unchanged" is confirmed
        here before a step is skipped)."""
        kept = [self.state[p].get(layout.PREV_GRAD) if p in self.state else None for p in params]
        return all(b is not None and torch.equal(b, g) for b, g in zip(kept, grads))

    def _main_call(self, closure: Optional[Callable[[], Tensor]]) -> _Step:
        """Phase 1: the main closure call (closure-free: the gradients already in ``.grad``), its gradients and loss
        checked; the step's record with the workspace, the loss as a scalar tensor and the tuner's globals."""
        method = self.current_method()
        coefficient = self._coefficient_of(method)
        if getattr(self.rule, "coefficient", coefficient) != coefficient:  # the edge-of-stability rule: the base's
            self.rule = dataclasses.replace(self.rule, coefficient=coefficient)
        all_params = self._all_params()
        if closure is None:  # closure-free: the gradients are in .grad already (loss.backward(); opt.step())
            self.probe_guard.no_main()
            loss = None
        else:
            loss = self.probe_guard.main(closure, all_params)
            if not self._hooks_checked and self.probe_guard.modules_run:  # (once: the DDP model is among the
                # modules the first main call found, or outside those passed as modules=)
                self._hooks_checked = True
                hooks = comm_hooks(self.probe_guard.modules_run)
                if hooks:
                    warn(COMM_HOOK_MESSAGE.format(tuner=type(self).__name__, hooks=", ".join(hooks)))
            if loss is None and not self.probe_guard.idle:
                raise TypeError(f"the closure returned None. {CLOSURE_CONVENTION}")
            if self.probe_guard.idle:  # it computed nothing (Lightning's manual optimization: opt.step()): closure-free
                self._require_probe_free(has_closure=False, error=TypeError, idle=True)
                closure = None
        all_grads = [p.grad for p in all_params]
        has_grad = [g is not None for g in all_grads]
        for i, g in enumerate(all_grads):
            if g is not None and g.layout != torch.strided:
                raise NotImplementedError(
                    f"{type(self).__name__}: parameter {i} (shape {tuple(g.shape)}) has a sparse gradient "
                    f"({g.layout}); the tuners need dense gradients (e.g. nn.Embedding(..., sparse=False))")
        if not any(has_grad):
            if closure is None:
                raise RuntimeError("no parameter has a gradient: call loss.backward() (Lightning: "
                                   "self.manual_backward(loss)) before opt.step()" + _ORPHANED)
            raise RuntimeError("no parameter has a gradient after the closure: did it call loss.backward()?"
                               + _ORPHANED)
        ws = self._ws
        if ws is None or not ws.matches(self.state, all_params, has_grad):
            self._adopt_layout()
            ws = self._ws = build_workspace(ws, self.state, all_params, has_grad, self._concat)
        dev = (ws.params or ws.stepped)[0].device
        S = self._scalars()
        loss_t = self._loss_tensor(loss, dev)
        p0 = all_params[0]
        glob = self._step_globals(p0)
        return _Step(closure=closure, freshness=self._marks.compare(all_params) if closure is None else None,
                     probe_free=closure is None or not self.probes, method=method,
                     coefficient=coefficient, loss=loss, loss_t=loss_t, all_params=all_params, ws=ws,
                     params=ws.params, grads=[all_grads[i] for i in ws.index], dev=dev, S=S, p0=p0, glob=glob,
                     count=glob.get(layout.STEP, 0))

    def _loss_tensor(self, loss: Any, dev: torch.device) -> Optional[Tensor]:
        """The closure's loss as a 0-d tensor of the accumulator dtype on ``dev`` (None closure-free), checked to be
        a scalar; the mean over the ranks under data parallelism (the closure's loss is rank-local, the gradients
        already averaged: one all_reduce makes it global before the NaN check, so every rank skips together)."""
        if loss is None:
            return None
        if isinstance(loss, (tuple, list, dict)):
            raise TypeError(f"the closure must return the scalar loss, got a {type(loss).__name__}: return the "
                            "loss alone and keep other outputs (logits, metrics) in a variable outside the closure")
        try:
            loss_t = loss if isinstance(loss, Tensor) else torch.as_tensor(loss)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"the closure must return the scalar loss (a tensor or a number), got a "
                            f"{type(loss).__name__}") from err
        if loss_t.numel() != 1:
            raise ValueError(f"the closure must return the scalar loss, got a tensor of shape {tuple(loss_t.shape)}")
        loss_t = as_scalar(loss_t, self.acc_dtype, dev)
        return loss_t if self.distributed is None else self.distributed.mean(loss_t)

    def _step_globals(self, p0: Tensor) -> dict:
        """The tuner's globals (in the first parameter's state). Where that state was removed and not the tuner's
        state of the rest (a frozen layer's state freed to save memory), the globals there are not that
        parameter's, and the tuner does not restart: the last step's are put back. Where no parameter's state
        holds the tuner's entries any more (``opt.base.load_state_dict`` of a bare optimizer's state dict, a reset)
        the tuner starts afresh, as a new tuner over that state would (a field test: put back, the stale globals
        kept the closure-free rate 28x below a fresh tuner's for 30 steps)."""
        state = self.state
        glob = state.get(p0) or {}
        if layout.STEP not in glob and self._kept_globals and any(
                layout.is_ours(k) for p, st in state.items() if p is not p0 for k in st):
            glob = state[p0]
            glob.update(self._kept_globals)
        return glob

    def _plan(self, st: _Step) -> None:
        """What the step computes besides the rule: the curvature oracle, the secant's memory and previous
        direction, the secant's noise estimate, the clip (``max_grad_norm``)."""
        glob, params, grads, ws = st.glob, st.params, st.grads, st.ws
        st.oracle = resolve_curvature(self.curvature, not st.probe_free) if self.curvature is not None else None
        st.secant = st.oracle == "secant"
        if st.secant and not self._secant_warned:
            self._secant_warned = True
            caveat = secant_caveat(st.method)
            if caveat is not None:
                warn(caveat)
        # once the run has taken secant steps every step keeps the secant's memory, so that a closure-free step
        # after a closure step has its secant, and its u goes to the buffer the memory does not hold (a failed step
        # leaves the previous direction as it was)
        st.remember = st.secant or glob.get(layout.SECANT[0]) is not None
        st.target, st.held = ws.u_for_step(st.remember) if params else (0, None)
        if (st.secant and st.held is not None and glob.get(layout.SECANT[0]) is not None
                and glob.get(layout.DIRECTIONS) == len(params)):
            st.prev_u = ws.u[st.held].views
        # g^T u_prev is read after the base step, with g^T u and ||u||^2 in one reduction, where the base leaves
        # the gradients alone (SGD/Adam/AdamW); another base might change them in place
        st.early = st.prev_u is not None and st.method is None
        st.g_dot_prev_u_t = dot(grads, st.prev_u) if st.early else None
        st.denoise = st.secant and self._noise_on()
        st.noise_b = (self._noise(params, grads, st.prev_u, ws.u[st.held].flat)
                      if st.denoise and st.prev_u is not None else None)
        st.clip = self._clip(grads) if self.max_grad_norm is not None else None

    def _take_direction(self, st: _Step, tx: Transaction) -> bool:
        """Phase 2: ``w0 <- w`` and the snapshot of the base's state (in ``tx``), the base's step, and its direction
        ``u = w - w0``. False when only zero-size parameters have gradients: nothing to tune."""
        ws, params, state = st.ws, st.params, self.state
        tx.workspace, tx.entries = ws, ws.take_start()
        if params:
            st.w0, st.u = ws.w0, ws.u[st.target]
            tx.params, tx.w0 = params, st.w0.views
        tx.base_stepped = True
        tx.hidden = self._hide_globals(st.p0)
        top = st.group_lr = self._group_lr()
        groups = self.param_groups
        lrs = [g["lr"] for g in groups]
        # the base steps at its group lrs over the largest (the largest at 1), and u is scaled back: at a small
        # group lr (a scheduler's factor of 1e-8) a step taken at that lr is within the weights' rounding, and
        # w - w0 read noise (float32: the rate 83x too high behind Adam). The bases are linear in lr.
        rescale = 0.0 < top != 1.0 and math.isfinite(top)
        if rescale:
            for g in groups:
                g["lr"] = g["lr"] / top
        try:
            self._base_step()
        finally:
            if rescale:
                for g, lr in zip(groups, lrs):
                    g["lr"] = lr
        if tx.hidden is not None:
            state[st.p0].update(tx.hidden[1])
            tx.hidden = None
        if not params:
            return False
        u, w0 = st.u, st.w0
        ws.read_params(u)  # u <- w - w0
        if u.flat is not None:
            u.flat.sub_(w0.flat)
            if rescale:
                u.flat.mul_(top)
        else:
            torch._foreach_sub_(u.views, w0.views)
            if rescale:
                torch._foreach_mul_(u.views, top)
        return True

    def _read(self, st: _Step) -> None:
        """Phase 3: every reduction of the step read to the host at once (``-g^T u``, ``||u||^2``, the secant's
        ``g^T u_prev``, the loss, the clip's factor, ...), the rule's numerator and the secant's curvature from
        them, and whether the step can go on (``st.ok``: a finite loss and ``-g^T u``)."""
        ws, params, grads, u, w0, glob, S = st.ws, st.params, st.grads, st.u, st.w0, st.glob, st.S
        late = st.prev_u is not None and not st.early
        # ||g|| is watched for a norm clip outside the tuner (external_clip_suspected): before a closure-free
        # secant step, or inside a closure that no fd probe checks (Polyak, the line search, the sharpness alone);
        # under max_grad_norm, as it was before the tuner's own clip (read clipped, divided by the clip's factor)
        st.watch_clip = st.oracle != "fd" and not self._clip_warned
        # did the parameters move outside the optimizer since the last step? (a closure-free secant assumes not:
        # ||w0||^2 against ||w||^2 as the last commit left them)
        exit_sq = glob.get(layout.EXIT_SQ)
        motion = (exit_sq, local_sq_norm([w0.flat] if ws.flat else w0.views)) if (
            st.secant and exit_sq is not None and st.prev_u is not None and not self._motion_warned) else ()
        if ws.flat:
            scratch = ws.scratch
            torch._foreach_copy_(scratch.views, grads)
            pairs = [(scratch.flat, u.flat)]
            if st.remember:
                pairs.append((u.flat, u.flat))
            if late:
                pairs.append((scratch.flat, ws.u[st.held].flat))
            if st.watch_clip:
                pairs.append((scratch.flat, scratch.flat))
            reductions = flat_dots(pairs)
            st.flat = (w0.flat, u.flat, scratch.flat, scratch.views)
        else:
            pairs = [(grads, u.views)]
            if st.remember:
                pairs.append((u.views, u.views))
            if late:
                pairs.append((grads, st.prev_u))
            if st.watch_clip:
                pairs.append((grads, grads))
            reductions = [dots(pairs)]
        st.fd = st.oracle == "fd"
        momentum = self.numerator == "momentum"
        st.paired = self.numerator == "paired"
        predicted = st.paired and self._has_prediction(params, glob)
        # closure-free: was a gradient handed over? (in flat mode from the scratch copy: one kernel)
        grad_max_t = max_abs([ws.scratch.flat] if ws.flat else grads) if st.closure is None else None
        extra = [t for t in (st.loss_t, st.g_dot_prev_u_t, st.clip, st.noise_b, grad_max_t, *motion) if t is not None]
        momentum_keys, momentum_sums = (self._momentum_terms(params, grads, w0.views, ws.scratch.flat if ws.flat
                                                             else None) if momentum else ([], []))
        paired_keys, paired_sums = self._paired_terms(params, grads, st.clip) if predicted else ([], [])
        fd_norms = ws.displacement_norms(w0, u) if st.fd else []
        it = iter(host_values(reductions + extra + fd_norms + momentum_sums + paired_sums, S))
        g_dot_u = next(it)
        st.u_sq = next(it) if st.remember else None
        g_dot_prev_u = next(it) if late else None
        st.g_sq = next(it) if st.watch_clip else None
        st.loss_v = next(it) if st.loss_t is not None else S(math.nan)
        if st.early:
            g_dot_prev_u = next(it)
        st.clip_v = next(it) if st.clip is not None else None
        noise_v = next(it) if st.noise_b is not None else None
        st.grad_max = next(it) if grad_max_t is not None else None
        if motion:
            left, found = next(it), next(it)
            st.moved_outside = bool(moved_outside(found, left, least_precise_eps(params), S))
        st.fd_norms = (next(it), next(it), next(it)) if st.fd else None
        with S.errstate():
            numerator = -g_dot_u
            rule_numerator = numerator
            if momentum:  # the core's formula, once per (beta1, Adam's count after the update) the parameters share
                for beta1, adam_count, derived in momentum_keys:
                    self_term = next(it)
                    momentum_term = numerator if derived else next(it)
                    rule_numerator = momentum_numerator(rule_numerator, self_term, momentum_term, beta1=beta1,
                                                        step=S(adam_count), xp=S)
            for beta1 in paired_keys:  # the core's formula, once per beta1 the parameters share
                rule_numerator = paired_numerator(rule_numerator, next(it), beta1=beta1, has=True, xp=S)
            if st.clip_v is not None:  # the rules see the true slope -g^T u (the clipped g is clip * g)
                numerator = numerator / st.clip_v
                rule_numerator = rule_numerator / st.clip_v
                if late:
                    g_dot_prev_u = g_dot_prev_u / st.clip_v
                if st.g_sq is not None:
                    st.g_sq = st.g_sq / (st.clip_v * st.clip_v)
            st.numerator, st.rule_numerator = numerator, rule_numerator
            st.ok = (st.loss is None or S.isfinite(st.loss_v)) and S.isfinite(numerator)
            st.secant_c = S(math.nan)
            if st.secant and g_dot_prev_u is not None:
                prev = [glob.get(k) for k in layout.SECANT]
                if all(t is not None for t in prev):
                    prev = [self._host(t, S) for t in prev]
                    st.prev_u_sq = prev[2]
                    if noise_v is not None:  # mini-batch: the secant's noise bias removed (curvopt.curvature)
                        seen = glob.get(layout.PREV_GRAD_SCALE)
                        last = self._last_group_lr(glob, st, S)
                        # A was read at this step's group lr; u_{t-1}'s noise went through the last step's
                        noise_v = noise_v * (last / S(st.group_lr)) if st.group_lr > 0 else noise_v
                        st.secant_c, st.noise_state = secant_noise_corrected(
                            g_dot_prev_u - prev[0], noise_v, prev[1], prev[2], st.u_sq, self._noise_state(glob, S),
                            input_scale=S(1.0) if seen is None else self._host(seen, S), rate=S(last), xp=S)
                    else:
                        st.secant_c = secant_curvature(g_dot_prev_u, prev[0], prev[1], prev[2], st.u_sq, xp=S)
            st.has_secant = bool(S.isfinite(st.secant_c))

    def _watch_reads(self, st: _Step) -> None:
        """The checks on the step's reads that warn: a norm clip outside a closure-free step
        (:meth:`_watch_clip`), a loss below the rule's lower bound ``f_star`` or pressing on it
        (:mod:`curvopt.bound_watch`, each once)."""
        if st.watch_clip:
            self._watch_clip(st.g_sq, after_move=self._moved_last and (st.prev_u is not None or not st.secant),
                             closure=not st.secant)
        if st.moved_outside:
            self._motion_warned = True
            warn(OUTSIDE_MOTION_MESSAGE)
        if st.freshness == "accumulated" and st.has_secant and not self._accumulation_warned:
            self._accumulated = (*self._accumulated[1 - ACCUMULATED_WINDOW:], not st.secant_c > 0)
            if sum(self._accumulated) >= ACCUMULATED_MISSES:
                self._accumulation_warned = True
                warn(ACCUMULATED_GRADIENT_MESSAGE.format(tuner=type(self).__name__))
        self._watch_frozen(st)
        if math.isfinite(float(st.loss_v)):  # (a closure-free step's loss is not known: nothing to watch)
            before = self._bound_watch
            bound = getattr(self.rule, "loss_bound", lambda xp: -math.inf)  # (none: the line search)
            self._bound_watch = watch_bound(before, float(st.loss_v), float(st.numerator), bound(np), np)
            for message in bound_messages(self._bound_watch, type(self).__name__, since=before):
                warn(message)

    def _watch_frozen(self, st: _Step) -> None:
        """Warn once when the base moves a parameter with ``requires_grad=False`` that still has a gradient
        (``zero_grad(set_to_none=False)`` keeps a zero one, which the base's momentum and weight decay act on, as a
        bare torch optimizer's do): no closure call differentiates it, so the slope and curvature the tuner reads
        miss that motion. Read (one host sync per such parameter) when the set of them changes."""
        if self._frozen_checked is None:
            return
        frozen = tuple(k for k, p in enumerate(st.params) if not p.requires_grad)
        if frozen == self._frozen_checked:
            return
        self._frozen_checked = frozen
        if any(bool(st.u.views[k].any()) for k in frozen):
            self._frozen_checked = None
            warn(f"{type(self).__name__}: the base moves parameters with requires_grad=False: they still have a "
                 "gradient (zero_grad(set_to_none=False) keeps a zero one) and the base's momentum or weight decay "
                 "moves them, as a bare torch optimizer would. No backward pass differentiates them, so the slope "
                 "and curvature the tuner reads miss that motion and the rate can be too high (measured: a greedy "
                 "rate 5x the exact one at the step after freezing a layer behind AdamW). When you freeze "
                 "parameters, set their .grad to None (optimizer.zero_grad() does by default) or take them out of "
                 "the optimizer")

    def _probe(self, st: _Step) -> Probe:
        """The step's probe (made on first use: closure calls at points along ``u``,
        :class:`torch_backend.probe.Probe`). Its gradients are the loss's own, never clipped: the sharpness
        differences the unclipped ``g``."""
        if st.probe is None:
            grads = st.grads
            if st.clip is not None and self.sharpness_config.enabled:
                grads = list(torch._foreach_div(grads, st.clip))
            lt = (st.loss_t if st.loss_t is not None
                  else torch.full((), math.nan, dtype=self.acc_dtype, device=st.dev))
            st.probe = Probe(st.closure, st.params, grads, st.w0.views, st.u.views, lt, st.numerator, self.probe_guard,
                             self.distributed, st.all_params, st.ws.index, st.flat)
        return st.probe

    def _curvature(self, st: _Step) -> None:
        """Phase 4: the online sharpness on its steps, and ``u^T H u`` from the oracle: exact, fd, the secant's (a
        step old: lagged, with the stretch to this direction), or none on a closure-free probing step."""
        glob, S, cfg = st.glob, st.S, self.sharpness_config
        nan = S(math.nan)
        so_far = {space: nan if glob.get(key) is None else self._host(glob[key], S)  # the estimates, read once
                  for space, key in layout.SHARPNESS.items()}
        due = cfg.enabled and sharpness_due(st.count, cfg.every,
                                            so_far["preconditioned" if self.preconditioned else "plain"])
        if due:
            probe = self._probe(st)
            if self._replay_checks and not st.fd:  # once: the sharpness's probes leave .grad zeroed
                self._check_replay_in_place(probe)
                self._replay_checks = 0
            if self.functional_loss is not None:
                self._check_functional(probe)
            st.sharp = self._estimate_sharpness(probe, glob, st.count)
        st.curvature = nan
        if st.oracle == "exact":
            if not due:  # else checked above, at the same point
                self._check_functional(self._probe(st))
            st.curvature = S(exact(self._probe(st), self.functional_loss))
        st.probing = st.secant and not st.has_secant and st.probe_free
        if (st.probing and st.prev_u is None and glob.get(layout.SECANT[0]) is not None
                and not self._regrouped_warned):
            self._regrouped_warned = True
            warn(f"{type(self).__name__}: the parameters with a gradient are not the previous step's, or their "
                 "state was removed, so the secant has no previous direction for them and this step only probes "
                 "(lr = h). The closure-free secant compares consecutive gradients of the same parameters. A one-off "
                 "change (a parameter group added, a part unfrozen, del opt.state[p]) costs this step only; when "
                 "parameters take part on "
                 "alternate steps (several heads, experts), pass a closure (the fd oracle)")
        # the curvature is the secant's (a step old): the rule keeps the rate on the edge and caps the step's length
        if st.probing:  # no secant and no probes: this step is the probe (a tiny step lr = h, rule state untouched)
            st.curvature = nan
        elif st.fd or (st.secant and not st.has_secant):
            probe = self._probe(st)
            with S.errstate():  # the secant's fallback when there is no secant
                norms = (st.fd_norms if st.fd_norms is not None else
                         tuple(host_values(st.ws.displacement_norms(st.w0, st.u), S)))
                st.curvature = finite_difference(probe, S, st.numerator, norms)
            if self._replay_checks:
                st.replay_scale = self._check_replay(probe, st.curvature, glob)
        elif st.secant:
            st.curvature, st.lagged, st.stretch = st.secant_c, True, secant_stretch(st.prev_u_sq, st.u_sq, S)
        for space in layout.SHARPNESS:
            if space in st.sharp:  # a failed estimate (NaN) is this step's sharpness too: retried next step
                st.sharpness[space] = S(st.sharp[space][0])
                if S.isfinite(st.sharpness[space]):
                    st.fresh_sharp.append(space)  # its eigenvector is kept for the next warm start
            else:
                st.sharpness[space] = so_far[space]

    def _rate(self, st: _Step) -> None:
        """Phase 5: the rule's rate (the Armijo rule's trials; CDAT's mini-batch hold behind heavy ball and
        Nesterov), or the probing step's ``h``; the stall and zero-rate watches; the edge-of-stability ratio."""
        rule, S, glob, count = self.rule, st.S, st.glob, st.count
        nan = S(math.nan)
        reference = st.sharpness["preconditioned" if self.preconditioned else "plain"]
        # the direction's unit, which CDAT's averages follow: behind SGD the group rate (a scheduler's factor) times
        # the clip's factor; behind other bases the group rate followed from the last step (curvopt.base)
        rule_state = self._rule_state(glob, S)
        rate = followed_rate(getattr(rule_state, "unit", 0.0), S(st.group_lr), self._saved_group_lr(glob, S))
        unit = direction_unit(st.method, S(st.group_lr) if st.clip_v is None else S(st.group_lr) * st.clip_v, S,
                              rate=S(rate))
        # the rule's sigma at this step, a schedule's 0-d tensor (torch.cos(...)) read as a number
        sigma = at_step(rule.sigma, count, "sigma") if getattr(rule, "sigma", None) is not None else None
        inputs = RuleInputs(st.rule_numerator, st.curvature, st.loss_v, reference, count, st.lagged, st.stretch,
                            unit, sigma=sigma.item() if isinstance(sigma, Tensor) else sigma)
        with S.errstate():
            if self._replay_checks and "value" in rule.needs:  # the line search, Polyak: no fd probe checks them
                self._check_replay_in_place(self._probe(st))
            if isinstance(rule, ArmijoRule):
                lr, st.new_rule_state, st.trials, st.error = self._line_search(self._probe(st), inputs, rule_state, S)
            else:
                lr, st.new_rule_state = apply_rule(rule, inputs, rule_state, S)
            # CDAT behind heavy ball, Nesterov or another base with momentum: the watch for mini-batch training
            # (curvopt.minibatch_watch)
            watch = (self._watch_state(glob, S) if isinstance(rule, CDATRule)
                     and watches(st.method, self._unknown_momentum(st.method)) else None)
            if watch is not None:
                lr = held_rate(watch, lr, unit, S)
            st.probing = st.probing and bool(probes_along(st.numerator))  # (else the rule's 0: no curvature)
            if st.probing:
                lr = self._probing_rate(st, unit)
            elif st.lagged and st.probe_free and layout.LAST_PROBE in glob:  # a concave start probes farther
                lr, reprobe = concave_reprobe(lr, st.numerator, st.curvature, self._host(glob[layout.LAST_PROBE], S),
                                              rule.lr_max, xp=S)
                st.probing = bool(reprobe)
            if st.lagged and not st.probing and self._probed is not None:
                stall_reference, start, first = self._probed  # (not the sharpness' reference: eos_ratio reads it)
                rate = float(in_direction_units(lr, unit, S))
                judged, stalled, recovering = secant_stalled(rate, stall_reference, count - start, first)
                if stalled and not self._stall_warned:  # once per tuner
                    self._stall_warned = True
                    warn(SECANT_STALL_MESSAGE)
                if judged:
                    self._probed = None
                else:  # (NumPy: float64 holds the step count exactly)
                    self._probed = (stall_reference,
                                    *map(float, stall_window(rate, count, start, first, recovering, np)))
            moved = st.lagged and not st.probing and st.noise_state is not None and lr > 0  # (the watched steps)
            if st.probing or moved:
                rate = float(in_direction_units(lr, unit, S))
                self._peak = float(collapse_peak(rate, self._peak, st.probing, moved, np))
                collapsed = moved and secant_collapsed(rate, self._peak, noise_dominated(st.noise_state))
                self._collapse_run = int(collapse_run(self._collapse_run, collapsed, st.probing, moved, np))
                if collapse_sustained(self._collapse_run) and not self._collapse_warned:
                    self._collapse_warned = True
                    warn(SECANT_COLLAPSE_MESSAGE)
            if not st.probing and not st.lagged:  # (the secant's: secant_stalled)
                self._watch_zero_rate(lr, st.numerator, st.loss_v)
            if watch is not None:
                watch = self._watch_minibatch(watch, st.loss_v, lr, st.numerator,
                                              nan if st.probing or st.lagged else st.curvature,
                                              torch.finfo(st.loss_t.dtype).eps if st.loss_t is not None else nan,
                                              holds(rule), unit, S)
            st.ratio = (eos_ratio_rule(lr * st.group_lr, reference, st.coefficient)
                        if st.coefficient is not None else nan)
        st.lr, st.watch = lr, watch

    def _probing_rate(self, st: _Step, unit: Any) -> Any:
        """A closure-free probing step's rate ``h`` (:func:`curvopt.rules.finite_difference_step`), sized for the
        parameters' dtype and, without the noise correction (:func:`curvopt.config.probe_reads_forward`), the
        forward pass's precision (an autocast forward's gradients show it: :func:`gradient_eps`, averaged over the
        data-parallel ranks), at least float32's (:func:`curvopt.config.secant_probe_eps`); the first probe of a
        run of probes is kept to be judged (:func:`curvopt.config.secant_stalled`), in the units of the
        direction's ``unit`` of this step (:func:`curvopt.config.in_direction_units`)."""
        S = st.S
        nw, nu, moved = host_values(st.ws.displacement_norms(st.w0, st.u), S)
        terms = 1 if self.distributed is None else self.distributed.world_size
        forward = gradient_eps(st.grads, terms) if probe_reads_forward(self._noise_on()) else 0.0
        eps = float(secant_probe_eps(max(least_precise_eps(st.params), forward), np))
        lr = finite_difference_step(nw, nu, dtype_eps=eps, xp=S, moved_norm=moved)
        if self._probed is None:
            self._probed = (float(in_direction_units(secant_stall_reference(lr, eps, S), unit, S)), st.count, math.nan)
        return lr

    def _commit(self, st: _Step) -> None:
        """Phase 6: every new scalar made a tensor at once, ``w <- w0 + lr u``, and the tuner's state and stats
        written (the rule's, the watch's and the secant's memory, the eigenvectors, the prediction)."""
        state, params, glob, S, dev, lr = self.state, st.params, st.glob, st.S, st.dev, st.lr
        remember, noise_state, watch = st.remember, st.noise_state, st.watch
        if remember and st.denoise and noise_state is None:  # no secant yet: the averages as they are (their
            # keys written from the first step on, as a torch.distributed.checkpoint template needs)
            noise_state = self._noise_state(glob, S)
        values = [lr, *st.new_rule_state, *(layout.kept(v) for v in (watch if watch is not None else ()))]
        seen_kept = remember and st.denoise and st.clip_v is not None  # the share of the gradient the base saw
        if remember:
            values += [-st.numerator, st.u_sq]
            if noise_state is not None:
                values += list(noise_state)
            if seen_kept:
                values.append(st.clip_v)
        values.append(st.group_lr)
        acc = self.acc_dtype
        store = self._store
        store_key = (type(st.new_rule_state), watch is not None, remember, noise_state is not None, seen_kept, acc,
                     dev)
        if store is None or store.key != store_key:
            store = self._store = ScalarStore(store_key, len(values), acc, dev)
        *tensors, group_lr_t = store.write(values)
        lr_t = tensors[0]
        if st.flat is not None:
            move_flat(params, *st.flat, lr_t)
        else:
            axpy_into(params, st.w0.views, lr_t, st.u.views)
        self.probe_guard.finish()
        self._moved_last = moved_measurably(float(lr), float(st.numerator), float(st.loss_v)) and not (
            st.secant and st.probing)
        st.ws.install(state, layout.W0, st.w0)
        st.ws.install(state, layout.U, st.u)
        # exactly this step's parameters hold a direction (the secant's invariant) and a prediction (paired's)
        stale = [layout.U] * bool(remember and st.prev_u is None) + [layout.PREDICTED_GRAD] * st.paired
        if stale:
            mine = {id(p) for p in params}
            for p in st.all_params:
                pst = state.get(p) if id(p) not in mine else None
                for key in stale if pst else ():
                    pst.pop(key, None)
        for space, (value, vec, used) in st.sharp.items():
            if space in st.fresh_sharp:
                for p, t in zip(params, vec):
                    state[p][layout.EIGVEC[space]] = t
        glob = state[st.p0]
        if st.paired:
            glob[layout.PREDICTED] = int(self._commit_prediction(params, st.grads, st.clip, st.probe, lr))
        glob[layout.STEP] = st.count + 1
        glob[layout.LAST_GROUP_LR] = group_lr_t
        if st.secant:  # the parameters as this step leaves them, for the next (none: not checked; the key stays)
            glob[layout.EXIT_SQ] = (local_sq_norm(params if st.flat is None else [st.flat[2]]) if not
                                    self._motion_warned else torch.tensor(layout.NONE, dtype=acc, device=dev))
        else:
            glob.pop(layout.EXIT_SQ, None)
        last_probe = remember_probe(self._host(glob[layout.LAST_PROBE], S) if layout.LAST_PROBE in glob
                                    else S(math.nan), S(float(lr)), st.probing, S)  # (concave_reprobe's)
        if S.isfinite(last_probe) or st.secant or layout.LAST_PROBE in glob:  # none once the rule moves: the key
            # stays (the state's keys the same from step to step, as a torch.distributed.checkpoint template needs)
            glob[layout.LAST_PROBE] = torch.tensor(layout.kept(float(last_probe)), dtype=acc, device=dev)
        glob.setdefault(layout.SKIPPED, 0)
        if st.replay_scale is not None:
            glob[layout.REPLAY_SCALE] = torch.tensor(st.replay_scale, dtype=acc, device=dev)
        n_rule = len(st.new_rule_state)
        glob.update(zip(self._rule_layout(S)[1], tensors[1:1 + n_rule]))
        if watch is not None:
            glob.update(zip(layout.WATCH, tensors[1 + n_rule:1 + n_rule + len(watch)]))
            n_rule += len(watch)
        for space, key in layout.SHARPNESS.items():
            if space in st.sharp:
                glob[key] = S.tensor(st.sharpness[space], dev)
        if remember:
            rest = tensors[1 + n_rule:]
            for key, v in zip(layout.SECANT, (rest[0], lr_t, rest[1])):
                glob[key] = v
            glob[layout.DIRECTIONS] = len(params)
            if noise_state is not None:
                for f, v in zip(noise_state._fields, rest[2:]):
                    glob[layout.rule_key(f)] = v
            self._commit_secant_watch(glob, acc, dev)
            if st.denoise:
                self._commit_gradients(params, st.grads, st.clip)
                if seen_kept:
                    glob[layout.PREV_GRAD_SCALE] = rest[-1]
                else:
                    glob.pop(layout.PREV_GRAD_SCALE, None)
        self.last_trials, self.last_decrease_error = st.trials, st.error
        self.sharpness_products = sum(used for _, _, used in st.sharp.values())
        self._stats_device = dev
        self._stats = {"lr": lr_t, "numerator": st.numerator, "curvature": st.curvature,
                       "sharpness": st.sharpness["plain"], "preconditioned_sharpness": st.sharpness["preconditioned"],
                       "eos_ratio": st.ratio, "skipped": glob[layout.SKIPPED], "closure_calls": self.probe_guard.calls}
        if self.probe_guard.calls > 1:  # the probes set .grad = None: where the closure left it so, a zeroed gradient
            for p, g in zip(params, st.grads):  # (every g is a main-call gradient: params are those that had one)
                if p.grad is None:
                    p.grad = g.zero_()

    def _commit_secant_watch(self, glob: dict, dtype: torch.dtype, dev: torch.device) -> None:
        """The stall window and the collapse peak into the globals (:data:`torch_backend.state.SECANT_WATCH`; none
        while no window is open, the window's first rate until it has one: the keys stay the same from step to step,
        as a ``torch.distributed.checkpoint`` template needs), so a resumed run goes on judging them; written only
        when they changed (no transfer on most steps)."""
        values = (*(self._probed or (math.nan,) * 3), self._peak)
        now = tuple(None if math.isnan(v) else float(v) for v in values)
        if now == self._watch_saved and all(k in glob for k in layout.SECANT_WATCH):
            return
        self._watch_saved = now
        glob.update(zip(layout.SECANT_WATCH, torch.tensor([layout.kept(v) for v in values], dtype=dtype,
                                                          device=dev).unbind()))

    def _host(self, t: Tensor, S: ScalarNamespace) -> Any:
        """A 0-d state tensor as a host scalar: the value the last step made it from while it is still that
        tensor, unmodified; else read (a transfer)."""
        v = None if self._store is None else self._store.host(t)
        return S(t) if v is None else v

    def _scalars(self) -> ScalarNamespace:
        """The namespace of the step's host scalars (:mod:`torch_backend.scalars`), of the accumulator dtype."""
        ns = self.__dict__.get("_ns")
        if ns is None or ns.dtype != self.acc_dtype:
            ns = self.__dict__["_ns"] = ScalarNamespace(self.acc_dtype)
            self._store = None
        return ns

    # -- probe-free steps, clipping, the secant's noise ---------------------------------------------------------
    def _require_probe_free(self, has_closure: bool, error: type, idle: bool = False) -> None:
        """Refuse what a step without probes cannot do (no closure: also nothing that needs the loss). The
        settings last accepted are remembered (the rule and the sharpness setting are frozen values, so the
        same objects mean the same answer). ``idle``: the step's closure returned None and computed nothing
        (:attr:`torch_backend.buffers.ProbeGuard.idle`: Lightning's manual optimization, ``opt.step()``), which
        the messages say, with Lightning's fix in place of the closure convention."""
        settings = (self.rule, self.sharpness_config, self.curvature, has_closure)
        accepted = self.__dict__.get("_probe_free_ok")
        if accepted is not None and all(map(operator.is_, accepted, settings)):
            return
        name, needs = type(self).__name__, self.rule.needs
        where = "without a closure (loss.backward(); opt.step())" if not has_closure else "with probes=False"
        convention = CLOSURE_CONVENTION
        if idle:
            where = ("with a closure that returns None and computes nothing (what Lightning's manual optimization "
                     "passes for opt.step())")
            convention = ("Pass opt.step(closure=closure), with a closure that zeroes the gradients, computes the "
                          "loss, calls self.manual_backward(loss) (or loss.backward()) and returns the loss.")
        if not has_closure and "value" in needs:
            raise error(f"{name} needs the loss at the current parameters: it cannot step {where}. "
                        f"{convention}\nClosure-free steps (loss.backward(); opt.step()) work with CDAT "
                        "and QuadraticGreedy (curvature from the secant of consecutive gradients).")
        if isinstance(self.rule, ArmijoRule) or "sharpness" in needs or self.sharpness_config.enabled:
            what = "a line search" if isinstance(self.rule, ArmijoRule) else "the online sharpness"
            raise error(f"{name} runs {what}, which calls the closure at probe points: it cannot step {where}. "
                        f"{convention}\nSteps without probes work with CDAT and QuadraticGreedy "
                        "(curvature=\"secant\" or \"auto\", sharpness off).")
        if self.curvature is not None:
            try:
                resolve_curvature(self.curvature, False)
            except ValueError as e:
                raise error(f"{name} cannot step {where}: {e}" + (f" {convention}" if idle else "")) from None
        self.__dict__["_probe_free_ok"] = settings

    def _noise_on(self) -> bool:
        """Whether the secant's noise correction runs (on, and the base's noise metric known)."""
        return noise_correction_on(self.noise_correction, is_adam_like(self.base)) and knows_noise(self.base)

    def _noise(self, params: list[Tensor], grads: list[Tensor], prev_u: list[Tensor],
               prev_u_flat: Optional[Tensor]) -> Tensor:
        """The secant numerator's noise estimate (NaN when the previous gradient is not kept: no secant)."""
        prev = [self.state[p].get(layout.PREV_GRAD) if p in self.state else None for p in params]
        if not all(fits(b, p) for b, p in zip(prev, params)):
            return torch.full((), math.nan, dtype=self.acc_dtype, device=params[0].device)
        return noise_numerator(self.base, params, grads, prev, prev_u, self.acc_dtype, prev_u_flat)

    def _commit_gradients(self, params: list[Tensor], grads: list[Tensor], clip: Optional[Tensor],
                          key: str = layout.PREV_GRAD) -> list[Tensor]:
        """Keep this step's (unclipped) gradient in ``state[p][key]`` (by default for the next step's noise
        estimate); returns the buffers."""
        out = []
        for p in params:
            st = self.state[p]
            b = st.get(key)
            if not fits(b, p):
                b = st[key] = torch.empty_like(p, memory_format=torch.preserve_format)
            out.append(b)
        torch._foreach_copy_(out, grads)
        if clip is not None:
            torch._foreach_div_(out, clip)
        return out

    def _saved_group_lr(self, glob: dict, S: ScalarNamespace) -> Any:
        """The largest group lr the last step took, 0 where none is kept (a new run, an older state), in the
        accumulator dtype it is kept in: compare it with ``S(group_lr)``, so that an unchanged rate (0.001 as a
        Python float, its float32 rounding as kept) gives the ratio 1 exactly."""
        saved = glob.get(layout.LAST_GROUP_LR)
        return S(0.0) if saved is None else S(self._host(saved, S))

    def _last_group_lr(self, glob: dict, st: _Step, S: ScalarNamespace) -> Any:
        """The largest group lr the last step took (this step's where none is known or it was 0; 1 if both are),
        in the accumulator dtype."""
        last = self._saved_group_lr(glob, S)
        return last if last > 0 else S(st.group_lr if st.group_lr > 0 else 1.0)

    def _noise_state(self, glob: dict, S: ScalarNamespace) -> SecantNoiseState:
        return self._saved(glob, [layout.rule_key(f) for f in SecantNoiseState._fields], SecantNoiseState,
                           lambda: SecantNoiseState(*(S(0.0) for _ in SecantNoiseState._fields)), S)

    def _saved(self, glob: dict, keys: Sequence[str], kind: type, start: Callable[[], Any],
               S: ScalarNamespace) -> Any:
        """The named tuple ``kind`` held in the globals under ``keys`` (host values), or ``start()`` where any is
        missing (a new run, or a state saved by a build without them)."""
        vals = [glob.get(k) for k in keys]
        if any(v is None for v in vals):
            return start()
        return kind(*(self._host(v, S) for v in vals))

    def _clip(self, grads: list[Tensor]) -> Tensor:
        """Clip the main call's gradient in place to ``max_grad_norm`` (``torch.nn.utils.clip_grad_norm_``'s
        factor ``min(1, max_norm / (norm + 1e-6))``); returns the factor."""
        total = norm(grads).to(self.acc_dtype)
        factor = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, factor.to(grads[0].dtype))
        return factor

    def _adam_diagonal(self, params: list[Tensor]) -> list[tuple[dict, Tensor]]:
        """Each parameter's group and Adam's ``D = lr_group / P`` after its step (``P`` the core's
        preconditioner), in the accumulator dtype: the diagonal of the Adam numerators."""
        base = self.base
        group_of = {p: g for g in base.param_groups for p in g["params"]}
        acc = self.acc_dtype
        return [(group_of[p], float(group_of[p]["lr"]) / d.to(acc))
                for p, d in zip(params, adam_preconditioner_from_optimizer(base, params))]

    def _momentum_terms(self, params: list[Tensor], grads: list[Tensor], w0: list[Tensor],
                        flat_grads: Optional[Tensor]) -> tuple[list[tuple[float, float, bool]], list[Tensor]]:
        """The sums :func:`curvopt.rules.momentum_numerator` needs, read after Adam's step, once per set of
        parameters sharing Adam's ``beta1`` and step count (one set unless param groups differ in ``beta1`` or
        parameters joined at different steps, e.g. a group added mid-training): ``keys`` ``(beta1, count,
        derived)`` and the 0-d tensors ``g^T D g_in``, then ``g^T D m_t`` unless ``derived``, for each.

        ``D`` from :func:`torch_backend.preconditioning.adam_diagonal_by_group` (flat per param group, in runs
        of at most :data:`torch_backend.vectors.CONCAT_BELOW` entries, each computed and used in turn; per
        parameter from :meth:`_adam_diagonal` when a group's step counts differ), ``g_in`` the gradient Adam
        averaged (``g + weight_decay w`` under Adam's L2 decay, ``g`` under AdamW's decoupled one), ``m_t =
        exp_avg``. Adam's direction is ``u = -D m_t`` exactly unless a group decays its weights decoupled
        (AdamW: ``u`` also holds ``-lr weight_decay w``), so with one set ``g^T D m_t`` is the step's ``-g^T u``
        (``derived``) and is computed only under decoupled decay (:meth:`_decoupled_decay`). ``flat_grads``:
        the gradients already concatenated in ``params`` order (the flat workspace's scratch), or None. Global
        sums (one collective on sharded parameters, like every inner product of the step)."""
        base = self.base
        acc = self.acc_dtype
        runs = adam_diagonal_by_group(base, params, acc, vectors.CONCAT_BELOW)
        if runs is None:
            runs = [(group, [i], count, lambda d=d: d.reshape(-1)) for i, ((group, d), count)
                    in enumerate(zip(self._adam_diagonal(params), adam_step_counts(base, params)))]
        derived = (len({(float(group["betas"][0]), count) for group, _, count, _ in runs}) == 1
                   and not self._decoupled_decay())
        exp_avgs = None if derived else [base.state[p]["exp_avg"] for p in params]
        totals: dict[tuple[float, float], Tensor] = {}
        for group, pos, count, diagonal in runs:  # one run's D at a time: the transient memory of one run
            wd = float(group.get("weight_decay", 0.0))
            coupled = wd and not _decouples(base, group)

            def flat(ts: list[Tensor]) -> Tensor:
                return joined([ts[i] for i in pos]).to(acc)
            whole = flat_grads is not None and len(pos) == len(params)
            g = flat_grads.to(acc) if whole else flat(grads)
            scaled = g * diagonal()
            inputs = g + wd * flat(w0) if coupled else g
            pairs = [([scaled], [inputs])]
            if exp_avgs is not None:
                pairs.append(([scaled], [flat(exp_avgs)]))
            part = dots(pairs)
            key = (float(group["betas"][0]), count)
            totals[key] = part if key not in totals else totals[key] + part
        keys = [(beta1, count, derived) for beta1, count in totals]
        return keys, [s for total in totals.values() for s in total.unbind()]

    def _decoupled_decay(self) -> bool:
        """Some group of the Adam base decays its weights decoupled (AdamW), so its direction is not ``-D m_t``."""
        return any(float(g.get("weight_decay", 0.0)) and _decouples(self.base, g) for g in self.base.param_groups)

    def _has_prediction(self, params: list[Tensor], glob: dict) -> bool:
        """The previous step left :func:`curvopt.rules.paired_numerator`'s prediction for these parameters."""
        return bool(glob.get(layout.PREDICTED)) and all(
            fits(self.state[p].get(layout.PREDICTED_GRAD), p) for p in params)

    def _paired_terms(self, params: list[Tensor], grads: list[Tensor], clip: Optional[Tensor]
                      ) -> tuple[list[float], list[Tensor]]:
        """``r^T D r`` for :func:`curvopt.rules.paired_numerator`, once per ``beta1`` of the base's param groups
        (``keys``, and a 0-d tensor for each): ``r = g - ghat`` (the loss's gradients; weight decay carries no
        noise), ``D`` from :meth:`_adam_diagonal`; under ``max_grad_norm`` both in the clipped gradient's units
        (``g`` is clipped in place, ``ghat`` is kept unclipped and scaled by this step's factor)."""
        ghat = [self.state[p][layout.PREDICTED_GRAD] for p in params]
        r = torch._foreach_sub(grads, ghat if clip is None else torch._foreach_mul(ghat, clip.to(ghat[0].dtype)))
        sets: dict[float, list[int]] = {}
        diagonal = self._adam_diagonal(params)
        for i, (group, _) in enumerate(diagonal):
            sets.setdefault(float(group["betas"][0]), []).append(i)
        scaled = torch._foreach_mul(r, [d for _, d in diagonal])
        sums = dots([([scaled[i] for i in pos], [r[i] for i in pos]) for pos in sets.values()])
        return list(sets), list(sums.unbind())

    def _commit_prediction(self, params: list[Tensor], grads: list[Tensor], clip: Optional[Tensor],
                           probe: Optional[Probe], lr: Any) -> bool:
        """Keep the next step's ``ghat = g + lr (g_probe - g) / h``, this batch's gradient predicted at the next
        point to first order from this step's fd probe (``g_probe`` its gradient at ``w + h u``; ``g`` unclipped),
        one buffer per parameter (:data:`torch_backend.state.PREDICTED_GRAD`). False (no prediction) without an
        fd probe or a step (``lr = 0``; :func:`curvopt.rules.paired_prediction_weight`)."""
        if probe is None or probe.fd_step is None:
            return False
        weight = paired_prediction_weight(lr, probe.fd_step, self._scalars())
        if not weight > 0:
            return False
        out = self._commit_gradients(params, grads, clip, layout.PREDICTED_GRAD)
        torch._foreach_lerp_(out, probe.gradient(), float(weight))
        return True

    def _watch_clip(self, g_sq: Any, after_move: bool, closure: bool) -> None:
        """Keeps ``||g||`` of consecutive watched steps that follow a step which moved the parameters
        (``after_move``: :func:`curvopt.config.watched_norms`) and warns once when they say that a norm clip
        outside the tuner produced them (:func:`curvopt.config.external_clip_suspected`): before a closure-free
        step, or (``closure``) inside the closure."""
        self._clip_norms = watched_norms(self._clip_norms, math.sqrt(max(float(g_sq), 0.0)), after_move, np)
        if external_clip_suspected(self._clip_norms, np):
            self._clip_warned = True
            warn(EXTERNAL_CLIP_MESSAGE_CLOSURE if closure else EXTERNAL_CLIP_MESSAGE)

    def _watch_zero_rate(self, lr: Any, numerator: Any, loss: Any = None) -> None:
        """Warn once when the rate has been 0 for :data:`curvopt.config.ZERO_RATE_STEPS` steps of a run that has not
        converged, saying why (:func:`curvopt.config.watch_zero_rate`, :func:`curvopt.config.zero_rate_message`)."""
        lr, numerator = float(lr), float(numerator)
        eps = least_precise_eps(self._all_params()) if lr == 0 else math.nan  # (read only where it is judged)
        before = self._zero_watch
        self._zero_watch = watch_zero_rate(before, lr, numerator, math.nan if loss is None else float(loss), eps, np)
        if math.isnan(float(before.zero_rising)) and not math.isnan(float(self._zero_watch.zero_rising)):
            decays = any(float(g.get("weight_decay", 0.0)) for g in self.base.param_groups)
            method = self.current_method()
            carries = carries_gradients(method, self._unknown_momentum(method))
            warn(zero_rate_message(numerator < 0, decays, carries))

    def _watch_state(self, glob: dict, S: ScalarNamespace) -> MinibatchWatch:
        """The mini-batch watch's memory in the state (its start where the state has none; a non-finite value there
        is none: :data:`torch_backend.state.NONE`)."""
        saved = self._saved(glob, layout.WATCH, MinibatchWatch, lambda: MinibatchWatch.start(S(0.0)), S)
        return MinibatchWatch(*(v if S.isfinite(v) else S(math.nan) for v in saved))

    @staticmethod
    def _watch_minibatch(watch: MinibatchWatch, value: Any, lr: Any, numerator: Any, curvature: Any,
                         loss_eps: float, hold: bool, unit: Any, S: ScalarNamespace) -> MinibatchWatch:
        """CDAT behind a watched base (:func:`curvopt.minibatch_watch.watches`): the watch's new memory
        (:func:`curvopt.minibatch_watch.watch_minibatch`; a closure-free step, whose loss is not known, judges
        nothing), and a warning on the step it fires."""
        new = watch_minibatch(watch, S(value), S(lr), S(numerator), S(curvature), loss_eps, hold, unit, S)
        if not S.isfinite(watch.watch_fired) and S.isfinite(new.watch_fired):
            warn(minibatch_message(new, float(unit)))
        return new

    def _check_replay(self, probe: Probe, curvature: Tensor, glob: dict) -> Optional[float]:
        """At the tuner's first :data:`REPLAY_CHECKS` fd probes: the probe's loss at ``w + h u`` must be the main
        call's loss moved along the quadratic model (:func:`curvopt.curvature.replay_mismatch`, its rounding
        allowance at the largest main-call loss checked so far, ``glob``'s :data:`torch_backend.state.REPLAY_SCALE`
        (saved with the state: a run resumed near the loss's minimum keeps it); returns the new largest loss,
        None where nothing was checked). Where it is not,
        the closure is called again at the unchanged parameters (:meth:`_replay_evidence`): a closure that draws a
        new batch, or randomness the probe does not replay, gives another loss there, and one that does not zero
        the gradients another slope (from its second step on: the probes start from none, the main call adds to
        the previous step's); one that replays there computes a gradient that does not predict its loss (a clip
        inside it), told only of a probe small enough to judge the model by (:func:`curvopt.curvature.replay_judged`;
        a probe sized for a bf16 forward pass is often not) and not where a shorter probe fits its own model
        (:meth:`_fits_shorter`: the loss is merely far from quadratic over the probe's step). Warns once, with the
        fix."""
        self._replay_checks -= 1
        if probe.fd_loss is None or probe.fd_step is None or self.distributed is not None:
            return None
        f, h, got = float(probe.loss), float(probe.fd_step), float(probe.fd_loss)
        c, numerator = float(curvature), float(probe.numerator)
        if not all(map(math.isfinite, (f, got, c, numerator))):
            return None
        seen = glob.get(layout.REPLAY_SCALE)
        scale = max(0.0 if seen is None else float(seen), abs(f))
        mismatch, model = map(float, replay_mismatch(f, got, h, numerator, c, torch.finfo(probe.loss.dtype).eps,
                                                     scale, np))
        if mismatch <= 1:
            return scale
        at_probe = (f"at a probe point {h:.2g} * u away from the parameters its loss is {got:.9g}, the main call's "
                    f"model predicts {model:.9g} (off by {got - model:.3g}, {mismatch:.3g}x what rounding and the "
                    "model's error allow)")
        evidence = self._replay_evidence(probe)
        if evidence is None:
            if replay_judged(h, numerator, scale) and not self._fits_shorter(probe, h, scale):
                self._warn_unpredicted(at_probe)
        else:
            self._warn_no_replay(f"{at_probe}; {evidence}")
        return scale

    def _check_functional(self, probe: Probe) -> None:
        """On the first :data:`REPLAY_CHECKS` steps that use ``functional_loss`` (the exact curvature, the online
        sharpness's products): its loss and slope at the step's parameters must be the closure's main call's
        (:func:`torch_backend.oracles.functional_evidence`; one more forward and backward of it each), else a warning,
        once. Not under data parallelism, where the functional loss is the rank's own and the gradient the ranks'
        average."""
        if not self._functional_checks or self.distributed is not None:
            return
        self._functional_checks -= 1
        evidence = probe.protected(lambda: functional_evidence(probe, self.functional_loss))
        if evidence is not None:
            self._functional_checks = 0
            warn(f"{type(self).__name__}: functional_loss does not compute the closure's loss: {evidence}. The exact "
                 "curvature and the sharpness come from functional_loss and the step from the closure; make it the "
                 "same loss on the same batch, its parameters taken in param_groups order (zip them with the "
                 "names of the params in that order, not model.named_parameters() when the groups list them "
                 "otherwise)")

    def _check_replay_in_place(self, probe: Probe) -> None:
        """Before the first sharpness estimate, or on the first :data:`REPLAY_CHECKS` steps of a rule that reads
        the loss (the line search, Polyak's step), of a tuner that takes no ``fd`` probes (whose probes
        :meth:`_check_replay` covers): the closure called again at the unchanged parameters must give the main
        call's loss and slope (:meth:`_replay_evidence`). There a closure that does not zero the gradients gives
        another slope from its second step on (the main call adds to what the last step left in ``.grad``, the
        probe starts from none), and one that computes only the last micro-batch of an accumulated gradient
        (Lightning's ``accumulate_grad_batches``) another slope from its first; the sharpness's probes leave
        ``.grad`` zeroed, so there one check suffices. One more closure call each."""
        self._replay_checks -= 1
        if self.distributed is None and (evidence := self._replay_evidence(probe)) is not None:
            self._warn_no_replay(evidence)

    @staticmethod
    def _replay_evidence(probe: Probe) -> Optional[str]:
        """The closure called again at the unchanged parameters (:meth:`torch_backend.probe.Probe.call_at` at 0): None
        where its loss and its slope along ``u`` are the main call's
        (:func:`curvopt.curvature.replay_mismatch_in_place`, :func:`curvopt.curvature.replay_slope_mismatch`),
        else what differs."""
        f, numerator = float(probe.loss), float(probe.numerator)
        got, slope = map(float, probe.call_at(0.0))
        if math.isfinite(f) and math.isfinite(got) and \
                replay_mismatch_in_place(f, got, torch.finfo(probe.loss.dtype).eps) > 1:
            return f"called again at the same parameters its loss is {got:.9g}, the main call's was {f:.9g}"
        if math.isfinite(numerator) and math.isfinite(slope) and replay_slope_mismatch(numerator, slope) > 1:
            return (f"called again at the same parameters its gradient's slope along the update is {slope:.6g}, the "
                    f"main call's was {-numerator:.6g}")
        return None

    @staticmethod
    def _fits_shorter(probe: Probe, h: float, scale: float) -> bool:
        """Whether the closure's loss at a shorter probe, :data:`curvopt.config.REPLAY_SHORTER` times the fd step
        ``h`` along ``u``, agrees with the main call's quadratic model through that probe's own gradient
        (:func:`curvopt.curvature.replay_mismatch`, its rounding allowance at ``scale``): a loss far from quadratic
        over the fd step does, a gradient changed inside the closure does not. One more closure call."""
        a = REPLAY_SHORTER * h
        f, numerator = float(probe.loss), float(probe.numerator)
        got, slope = map(float, probe.call_at(a))
        if not (math.isfinite(got) and math.isfinite(slope)):
            return False
        c = finite_difference_curvature(slope, -numerator, a, np)
        mismatch, _ = replay_mismatch(f, got, a, numerator, c, torch.finfo(probe.loss.dtype).eps, scale, np)
        return bool(mismatch <= 1)

    def _warn_no_replay(self, evidence: str) -> None:
        """The warning of a closure that does not replay (:meth:`_check_replay`, :meth:`_check_replay_in_place`),
        once: no further checks. It offers the step without probes only where the tuner, as configured, can take
        one (:meth:`_require_probe_free`)."""
        self._replay_checks = 0
        try:
            self._require_probe_free(has_closure=False, error=ValueError)
            instead = ("Or step without probes: loss.backward(); opt.step() (or probes=False), curvature from the "
                       "secant.")
        except ValueError:
            instead = (f"{type(self).__name__}, as configured, needs the closure each step (the loss, a line search "
                       "or the online sharpness): it has no step without probes.")
        warn(
            f"{type(self).__name__}: the closure does not replay: {evidence}. The probes evaluate "
            "the closure again at nearby points and need the same function each time: zero the gradients "
            "inside it (opt.zero_grad() first), compute the batch outside the closure (no next(loader) inside), "
            "draw randomness from torch's default generators (the tuner replays them; a private "
            "torch.Generator is not replayed), do not clip gradients inside the closure (use max_grad_norm=), "
            "with gradient accumulation compute every micro-batch inside the closure, and name in modules= "
            "any module whose buffers the closure updates other than by calling it (a normalizer's "
            f"update(x): the probes restore the buffers of the modules they see called, and of those). {instead}")

    def _warn_unpredicted(self, at_probe: str) -> None:
        """The warning of a closure that replays at the unchanged parameters but whose gradient does not predict
        its loss at the fd probe point (:meth:`_check_replay`), once: no further checks."""
        self._replay_checks = 0
        warn(
            f"{type(self).__name__}: the closure's gradient does not predict its loss: {at_probe}, while called "
            "again at the same parameters it gives the main call's loss and slope (it replays). Either it changes "
            "the gradient it computes (clip_grad_norm_ or a scaling of the gradients inside the closure: clip "
            "with max_grad_norm= instead; a gradient hook, p.register_hook, that rescales them: a factor common to "
            "all cancels in the greedy rule's rate, not in CDAT's default or PolyakStep's), or its loss holds a term "
            "computed from the parameters without a gradient (a TD/Bellman target under torch.no_grad() or "
            ".detach() from the network trained, which the probe moves: compute it once, before the closure), or "
            "its forward pass runs in a "
            "lower precision than the probe was sized for (a bf16/fp16 torch.autocast that began after the tuner's "
            "first step: the probe is sized for the "
            "precision the first call computed in), or the loss is far from quadratic over the probe's "
            "displacement, sqrt(eps) times the norm of the parameters it moves, and over a quarter of it too (a few "
            "parameters far larger than the rest, e.g. 1e4 against 1, on a loss that is rough at that scale), or it "
            "makes a discrete choice from the parameters that the probe's displacement flips (top-k routing, an "
            "adversarial attack run inside the closure: run it once before the closure, docs/limits.md), or it "
            "leaves other gradients in .grad (an attack's backward() for the input's gradient: use "
            "torch.autograd.grad(loss, inputs)). The "
            "fd curvature of such steps is not the local one; "
            "curvature='exact' (with functional_loss=) avoids it, and so does the secant (loss.backward(); "
            "opt.step()) in full batch; not over long mini-batch runs, where the secant's rate can collapse "
            "(docs/limits.md).")

    def _base_step(self) -> None:
        """``base.step()`` without torch's step hooks: the global ones fire once, for the tuner's step, and the
        base's own ones around the tuner's whole step (:meth:`_base_hooks`)."""
        fn = _unhooked_step(self.base)
        if fn is None:
            self.base.step()
            return
        if "step" in self.base.__dict__:  # an LR scheduler's patch (see _unhooked_step): what it records
            self.base._opt_called = True
        fn(self.base)

    def _group_lr(self) -> float:
        """The largest group lr (the relative multiplier): effective lr = tuner lr x group lr."""
        return relative_rates([g["lr"] for g in self.param_groups])[0]

    def _rate_scales(self, params: list[Tensor]) -> Optional[list[float]]:
        """``sqrt(lr_g / top)`` of each parameter's group (:func:`curvopt.preconditioner.relative_rates`), the
        scales that put the groups' relative rates into the sharpness; None when the groups' rates are equal."""
        _, ratios = relative_rates([g["lr"] for g in self.param_groups])
        if ratios is None:
            return None
        of_group = {id(g): math.sqrt(r) for g, r in zip(self.param_groups, ratios)}
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        return [of_group[id(group_of[p])] for p in params]

    def _hide_globals(self, p0: Tensor) -> Optional[tuple[Tensor, dict]]:
        """While the base steps, take the tuner's keys out of ``state[p0]`` if the base has not initialised
        that parameter's state (so ``if len(state) == 0`` still sees an empty dict)."""
        st = self.state.get(p0)
        if not st or p0.grad is None or not all(layout.is_ours(k) for k in st):
            return None
        hidden = dict(st)
        st.clear()
        return p0, hidden

    def _rule_layout(self, S: ScalarNamespace) -> tuple[type, list[str]]:
        """The type of the rule's state and the state keys of its fields (remembered for the current rule)."""
        known = self.__dict__.get("_rule_layout_of")
        if known is None or known[0] is not self.rule:
            init = self.rule.init(S(0.0))
            known = self.__dict__["_rule_layout_of"] = (self.rule, type(init),
                                                        [layout.rule_key(f) for f in init._fields])
        return known[1], known[2]

    def _rule_state(self, glob: dict, S: ScalarNamespace) -> Any:
        kind, keys = self._rule_layout(S)
        return self._saved(glob, keys, kind, lambda: kind(*(S(v) for v in self.rule.init(S(0.0)))), S)

    def _line_search(self, probe: Probe, inputs: RuleInputs, state: Any, S: ScalarNamespace
                     ) -> tuple[Any, Any, int, float]:
        """The Armijo rule's trials (:class:`curvopt.rules.ArmijoRule`): ``f(w0 + lr u)`` from the first trial
        down by ``decrease_factor`` until accepted or ``max_trials`` closure calls; an ascent direction gets
        no trial (no step can satisfy the test)."""
        rule = self.rule
        lr = S(rule.first_trial(state, S))
        err = S(math.inf)
        new_value = S(math.nan)
        trials = 0
        if inputs.numerator > 0:
            for k in range(rule.max_trials):
                if k:
                    lr = lr * rule.decrease_factor
                new_value = S(probe.loss_at(S.tensor(lr, probe.loss.device)))
                err = S(rule.decrease_error(new_value, inputs, lr, S))
                trials += 1
                if err <= 0.0:
                    break
        lr_take, new_state = rule.finish(inputs, state, lr, err, new_value, S)
        return lr_take, new_state, trials, float(err)

    def _estimate_sharpness(self, probe: Probe, glob: dict, count: int) -> dict[str, tuple[Tensor, list, int]]:
        """The online sharpness at ``w0`` (and the preconditioned one for Adam-like bases): the core's power
        iteration warm-started from the stored eigenvector, cold from a seeded random vector the first time. With
        param groups at different rates, of the operator the step applies, relative to the largest group's rate
        (:meth:`_rate_scales`; a frozen group drops out). The products are exact (double backward) when the
        tuner has a ``functional_loss``, else finite differences of closure gradients."""
        if self.functional_loss is not None:  # one evaluation; the products are backward passes through its graph
            return probe.protected(
                lambda: self._power_estimates(probe, glob, count, exact_hvp(probe, self.functional_loss)))
        return self._power_estimates(probe, glob, count, FiniteDifferenceHVP(
            probe.call, probe.params, probe.w0, probe.grads, eps=probe.guard.fd_eps(probe.params),
            judge_loss=probe.reducer is None))

    def _power_estimates(self, probe: Probe, glob: dict, count: int, hvp: Callable
                         ) -> dict[str, tuple[Tensor, list, int]]:
        """:meth:`_estimate_sharpness`'s power iterations with the products ``hvp``."""
        cfg = self.sharpness_config
        rates = self._rate_scales(probe.params)
        spaces = [("plain", preconditioned(hvp, None if rates is None else
                                           [p.new_full(p.shape, r) for p, r in zip(probe.params, rates)]))]
        if self.preconditioned:
            scales = preconditioner_scales(self.base, probe.params)
            if rates is not None:
                torch._foreach_mul_(scales, rates)
            spaces.append(("preconditioned", preconditioned(hvp, scales)))
        out = {}
        like = probe.loss  # the accumulator dtype, on the parameters' device
        for k, (space, matvec) in enumerate(spaces):
            key = layout.EIGVEC[space]
            v0 = [self.state[p].get(key) if p in self.state else None for p in probe.params]
            warm = all(fits(v, p) for v, p in zip(v0, probe.params))
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 2 * count + k) % (2 ** 63))
            previous = glob.get(layout.SHARPNESS[space]) if warm else None
            previous = torch.full_like(like, math.nan) if previous is None else previous.to(like)
            if not warm:
                v0 = random_vector(probe.params, gen)
            value, v, used = power_estimate(matvec, v0, previous, iters=int(power_iters(cfg, previous)),
                                            tol=cfg.tol, fresh=random_vector(probe.params, gen))
            out[space] = (value.to(like), v, used)
        return out

    def _skip(self, loss: Any, p0: Tensor, why: str) -> Any:
        skipped = self._globals().get(layout.SKIPPED, 0) + 1
        warn(f"{type(self).__name__}: {why.rstrip('.')}; opt.stats['skipped'] counts the skipped steps")  # one text
        self.state[p0][layout.SKIPPED] = skipped
        # module buffers as before the main call (a NaN batch's BN statistics), generators where it left them
        self.probe_guard.rollback(skipped=True)
        self._stats = self._nan_stats(skipped=skipped, closure_calls=self.probe_guard.calls)
        return loss

    # -- state_dict ------------------------------------------------------------------------------------------
    def base_state_dict(self, lr: Optional[float] = None) -> dict[str, Any]:
        """The base's state dict as the bare base would write it, to go on without the tuner
        (``torch.optim.AdamW(model.parameters()).load_state_dict(opt.base_state_dict())``; the tuner's own
        ``state_dict()`` in its place raised ``KeyError: 'step'`` when the first parameter was frozen): the
        tuner's keys dropped (:func:`torch_backend.state.without_ours`) and each group's ``lr`` set to the
        effective rate, ``lr`` (default: the last step's, ``stats["lr"]``) times the group's own. Raises
        ``ValueError`` when ``lr`` is not given and the last step chose none (no step since the tuner was built or
        loaded: ``load_state_dict`` does not bring ``stats`` back; or a skipped step) or
        was a closure-free probing step (its rate the tiny finite-difference step, not one to go on with)."""
        last_probe = self.state.get(self._all_params()[0], {}).get(layout.LAST_PROBE)
        if lr is None and last_probe is not None and math.isfinite(float(last_probe)):
            raise ValueError(f"{type(self).__name__}.base_state_dict: the last step was a closure-free probing step "
                             "(its rate is the tiny finite-difference step that measures the curvature, as after a "
                             "change of the parameters with a gradient), not a rate to go on with: pass lr= (e.g. "
                             "an earlier step's stats['lr']), or take the state after the next step")
        rate = float(self.stats["lr"]) if lr is None else float(lr)
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"{type(self).__name__}.base_state_dict: " + (
                f"lr must be a finite number >= 0, got {lr!r}" if lr is not None else
                f"the last step chose no learning rate (stats['lr'] is {rate}: no step since the tuner was built or "
                "loaded, load_state_dict does not restore stats, or a skipped one); pass lr="))
        sd = layout.without_ours(self.state_dict())
        for group in sd["param_groups"]:
            group["lr"] = group["lr"] * rate
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state from :meth:`state_dict` (or a curvopt 0.1 ``{"base", "tuner"}`` checkpoint). Everything
        is checked before anything is assigned; tensors are cast like torch does (to each parameter's device
        and floating dtype), the tuner's own scalars to its accumulator dtype."""
        groups = self.param_groups
        init = self.rule.init(torch.zeros(()))
        sd, saved_globals = layout.prepare(
            state_dict, tuner=type(self).__name__, base=type(self.base).__name__, params=self._all_params(),
            group_sizes=[len(g["params"]) for g in groups], rule_fields=init._fields,
            ema=float(getattr(self.rule, "ema", 0.0)))
        for group in sd["param_groups"]:
            check_group(group, type(self).__name__)
        torch.optim.Optimizer.load_state_dict(self, sd)
        glob = self.state[self._all_params()[0]]
        p0 = self._all_params()[0]
        for key, v in saved_globals.items():  # the saved values, not torch's cast to the parameter's dtype
            glob[key] = v if isinstance(v, int) else v.detach().to(device=p0.device, dtype=self.acc_dtype).reshape(())
        self._ws = None
        self._store = None
        self._kept_globals = None
        self._marks.clear()
        reference, start, first, peak = (float(glob[k]) if k in glob and math.isfinite(glob[k]) else math.nan
                                         for k in layout.SECANT_WATCH)  # (a non-finite value: none)
        self._probed = None if math.isnan(reference) or math.isnan(start) else (reference, start, first)
        self._peak = 0.0 if math.isnan(peak) else peak  # (a state saved without them starts them afresh)
        self._collapse_run = 0
        self._zero_watch = ZeroRateWatch.start(0.0, 0)._replace(  # (not saved: the loaded run's next ones)
            zero_rising=self._zero_watch.zero_rising)
        self._bound_watch = BoundWatch.start(0.0)._replace(bound_below=self._bound_watch.bound_below,
                                                           bound_pressed=self._bound_watch.bound_pressed)
        self._watch_saved = ()
        if layout.EXIT_SQ in saved_globals and torch.finfo(saved_globals[layout.EXIT_SQ].dtype).eps > float(
                least_precise_eps(self._all_params())):  # (saved in a coarser dtype: it would read as motion)
            glob[layout.EXIT_SQ] = torch.tensor(layout.NONE, dtype=self.acc_dtype, device=p0.device)
        self._stats = self._nan_stats(skipped=glob.get(layout.SKIPPED, 0))

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("_curvopt_pickle"):  # pickle / deepcopy (see __getstate__)
            state = dict(state)
            del state["_curvopt_pickle"]
            cls, base_state, ours_only = state.pop("_base")
            base = cls.__new__(cls)
            base.__setstate__(base_state)
            base.state.update(ours_only)
            state["base"] = base
            if isinstance(state.get("_clip_norms"), list):  # pickled by an earlier build: a list of the last norms
                state["_clip_norms"] = np.zeros(EXTERNAL_CLIP_STEPS)
            state.pop("_replay_scale", None)  # an earlier build's: the scale is in the state now (REPLAY_SCALE)
            state.pop("_minibatch_watch", None)  # an earlier build's: the watch's memory is in the state now
            if "guard" in state:  # an earlier build's name of the probe guard (now the rule's setting's, CDAT's guard)
                state["probe_guard"] = state.pop("guard")
            self.__dict__.update(state)
            self._ws = None
            self._store = None
            self._kept_globals = None
            self._marks = GradientMarks()
            self.distributed = resolve_distributed(self._distributed_setting, self._all_params())
            if hasattr(self, "_patch_step_function"):
                self._patch_step_function()
            return
        # torch.optim.Optimizer.load_state_dict hands over {"state", "param_groups"}: they are the base's
        self.base.__setstate__(_without_ours_only(state))
        self.base.state.update(_ours_only(state["state"]))

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d.get("_distributed_setting") not in ("auto", None, False, True):
            raise TypeError("a tuner with distributed=<process group> cannot be pickled (process groups cannot)")
        for k in ("_ws", "_ns", "_store", "_kept_globals", "_marks", "_probe_free_ok", "_rule_layout_of", "distributed",
                  "step", "base", "_stepping"):
            # scratch, memos, the live reducer, the patched step, a step running
            d.pop(k, None)
        base = self.base
        # the base is rebuilt through its own __setstate__, which must not see a state holding only our keys
        # (Adam's reads state["step"] of every non-empty entry)
        d["_base"] = (type(base), _without_ours_only(base.__getstate__()), _ours_only(base.state))
        d["_curvopt_pickle"] = True
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rule={self.rule!r}, base={self.base!r})"


def _ours_only(state: dict) -> dict:
    """The entries of a state dict that hold only the tuner's keys (no base state)."""
    return {p: st for p, st in state.items() if st and all(layout.is_ours(k) for k in st)}


def _without_ours_only(optimizer_state: dict) -> dict:
    """``{"state", "param_groups", ...}`` with the entries of :func:`_ours_only` left out of ``state``."""
    out = dict(optimizer_state)
    st = out["state"]
    hidden = _ours_only(st)
    kept = type(st)() if not isinstance(st, collections.defaultdict) else collections.defaultdict(dict)
    kept.update({p: v for p, v in st.items() if p not in hidden})
    out["state"] = kept
    return out


def _put_back_globals(opt: CurvatureTuner) -> None:
    """state_dict pre-hook: the globals go back into the first parameter's state where it was freed (a frozen
    layer's), as the next step would put them (:meth:`CurvatureTuner._step_globals`), so that a state dict saved
    before that step resumes the tuner instead of restarting it."""
    opt._step_globals(opt._all_params()[0])


def _name_the_tuner(opt: CurvatureTuner, state_dict: dict) -> dict:
    """state_dict post-hook: the first packed group names the tuner and the base (checked on load), and our
    per-parameter buffers are saved compact (:func:`_compact_buffers`)."""
    state_dict["param_groups"][0][layout.META_TUNER] = type(opt).__name__
    state_dict["param_groups"][0][layout.META_BASE] = type(opt.base).__name__
    return _compact_buffers(opt, state_dict)


def _compact_buffers(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """state_dict post-hook of the tuner and of its base (whose state holds our buffers, so its own
    ``state_dict()`` carries them too): our per-parameter buffers are saved as compact copies. They are views of
    the workspace's flat buffers (``w0``'s also holds the base's state snapshot behind it), and ``torch.save``
    writes a view's whole storage."""
    packed = state_dict["state"]
    for i, st in packed.items():
        if not isinstance(st, dict):
            continue
        views = {k: t.clone() for k, t in st.items() if layout.is_ours(k) and isinstance(t, Tensor)
                 and t._base is not None}
        if views:  # a new dict: the packed entries are the live state's own
            packed[i] = {**st, **views}
    return state_dict


CurvatureTuner.stats.__doc__ = (
    "The latest step's numbers, for logging (a fresh dict of copies each access; keys "
    "``curvopt.stats.STAT_FIELDS``).\n\n"
    "Values are 0-d tensors (no host sync in the step; call ``float()`` when logging), NaN when not computed "
    "this step, except the two counters, which are ints:\n\n" + _stats_doc() + "\n"
)


def _decouples(base: torch.optim.Optimizer, group: dict) -> bool:
    """The Adam base's ``group`` decays its weights decoupled (AdamW) rather than as an L2 term in the gradient."""
    return isinstance(base, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
