"""Where the tuners keep their state, and checking and converting state dicts before they are loaded.

A tuner's ``state`` and ``param_groups`` *are* its base optimizer's (the way ``schedulefree``'s wrapper nests
its base), so ``opt.state_dict()`` is ``torch.optim.Optimizer.state_dict`` — torch's ``{"state",
"param_groups"}``, hooks run — holding the base's state and the tuner's side by side. Every key the tuner
adds starts with ``curvopt_``; the values are tensors and Python ints only (no custom classes, no strings,
so ``torch.load(weights_only=True)`` reads a checkpoint, and torch's own loading casts it):

* per parameter (``state[p]``, written only after the base stepped ``p``, so Adam's lazy initialisation
  ``if len(state) == 0`` still sees an empty dict): ``curvopt_w0`` (the step's start point; scratch between
  steps), ``curvopt_u`` (the last step's base direction; the secant oracle's memory), ``curvopt_prev_grad``
  (the last step's gradient, unclipped, with the secant's mini-batch noise correction), ``curvopt_predicted_grad``
  (``numerator="paired"``: the last batch's gradient predicted at the current point, see
  :func:`curvopt.rules.paired_numerator`),
  ``curvopt_eigvec`` / ``curvopt_eigvec_preconditioned`` (the online sharpness's warm starts);
* global, in the state of the **first parameter of the first group** (as ``torch.optim.LBFGS`` keeps its
  globals): ``curvopt_step`` (steps taken, int), ``curvopt_skipped`` (int), the rule's state fields
  (``curvopt_numerator_avg``, ``curvopt_denominator_avg``, ``curvopt_avg_weight``, ``curvopt_held_lr``,
  ``curvopt_search_lr``, CDAT's above-edge guard ``curvopt_gap_avg``, ``curvopt_gap_weight``,
  ``curvopt_gap_min``, the averages' unit ``curvopt_unit`` and the guard's ``curvopt_gap_lagged``,
  ``curvopt_gap_first``: 0-d tensors of the accumulator dtype; a CDAT state saved before the guard, the unit or
  the guard's lagged minimum existed loads with their start values, :data:`curvopt.rules.ADDED_START`: the unit not
  known, so its first step takes the averages as they are; the lagged minimum never set, so the guard keeps its
  first verdict alone), the latest sharpness estimates
  (``curvopt_sharpness``, ``curvopt_preconditioned_sharpness``) and the secant's scalars
  (``curvopt_secant_grad_dot_u``, ``curvopt_secant_lr``, ``curvopt_secant_u_sq``, the noise correction's
  averages ``curvopt_secant_numerator_avg``, ``curvopt_secant_noise_avg``, ``curvopt_secant_scale_avg`` and
  ``curvopt_prev_grad_scale``, the share of that gradient the base saw: ``max_grad_norm``'s factor;
  ``curvopt_secant_last_probe``, the closure-free probing step's rate until the rule moves (inf since); the stall and
  collapse warnings' memory :data:`SECANT_WATCH`, a state saved without it starts them afresh; ``curvopt_exit_sq``, the
  parameters' squared norm as the last secant step left them),
  ``curvopt_directions``, the number of parameters whose ``curvopt_u`` is the last step's direction),
  ``curvopt_replay_scale`` (the largest loss the first ``fd`` probes' replay checks have seen, the scale of the
  loss's rounding they allow: a run resumed near the loss's minimum checks its new closure with it), CDAT's
  mini-batch watch behind a watched base (:data:`WATCH`: ``curvopt_watch_share``,
  ``curvopt_watch_judged``, ``curvopt_watch_scale``, ``curvopt_watch_predicted``, ``curvopt_watch_change``,
  ``curvopt_watch_fired``, ``curvopt_watch_held``; a state saved without them starts the watch afresh; "none" there
  and in the secant's scalars is :data:`NONE`) and, with
  ``numerator="paired"``, ``curvopt_predicted`` (int: 1 when ``curvopt_predicted_grad`` holds a prediction). When
  that parameter has no base state of its own (frozen, or SGD without momentum), the tuner hides these keys
  from the base while it steps, so a lazily initialising base never mistakes them for its own state. When
  only that parameter's state is removed (``opt.state.pop(p)`` to free a frozen layer), the next step puts the
  globals back (the tuner keeps a reference to them after each step); a cleared state is a restart.
* ``state_dict()["param_groups"][0]`` also names the tuner and the base (``curvopt_tuner``,
  ``curvopt_base``), so that loading a state into another tuner or around another base fails clearly; the
  live param groups never hold these keys.

:func:`prepare` checks a state dict completely before anything is assigned (``load_state_dict`` is atomic)
and converts the ``{"base", "tuner"}`` checkpoints written by curvopt 0.1. :func:`without_ours` gives the
base's part alone (the tuners' ``base_state_dict()``, to go on with the bare base).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from curvopt.minibatch_watch import MinibatchWatch
from curvopt.rules import ADDED_START

__all__ = ["PREFIX", "W0", "U", "EIGVEC", "STEP", "SKIPPED", "SHARPNESS", "SECANT", "DIRECTIONS", "PREV_GRAD",
           "PREDICTED_GRAD", "PREDICTED", "PREV_GRAD_SCALE", "LAST_GROUP_LR", "LAST_PROBE", "REPLAY_SCALE",
           "SECANT_WATCH", "EXIT_SQ", "WATCH", "META_TUNER", "META_BASE", "TEMPLATE_MESSAGE", "rule_key", "is_ours",
           "without_ours", "drop_ours", "is_template_call", "prepare", "NONE", "kept"]

#: how the state keeps a scalar that means "none" (the core's NaN: no probe, no open window, not judged, not to be
#: checked): inf, since FSDP's optimizer state dict compares the scalar states with ``==``, which a NaN never passes
#: (its load refused every closure-free state); a reader takes any non-finite value as none (a NaN saved before too)
NONE = math.inf


def kept(value: Any) -> Any:
    """``value`` (a host scalar) as the state keeps it: NaN as :data:`NONE`."""
    return NONE if value != value else value


PREFIX = "curvopt_"
W0, U = "curvopt_w0", "curvopt_u"
EIGVEC = {"plain": "curvopt_eigvec", "preconditioned": "curvopt_eigvec_preconditioned"}
STEP, SKIPPED = "curvopt_step", "curvopt_skipped"
SHARPNESS = {"plain": "curvopt_sharpness", "preconditioned": "curvopt_preconditioned_sharpness"}
SECANT = ("curvopt_secant_grad_dot_u", "curvopt_secant_lr", "curvopt_secant_u_sq")
DIRECTIONS = "curvopt_directions"
#: the previous step's (unclipped) gradient, kept by the secant's noise correction (torch_backend.noise)
PREV_GRAD = "curvopt_prev_grad"
#: the share of the previous step's gradient its base saw (the tuner's clip factor; global)
PREV_GRAD_SCALE = "curvopt_prev_grad_scale"
#: the largest group lr of the last step taken (global): the rate the secant's direction was taken at,
#: and the reference a scheduler's change of the group lr is measured from (curvopt.base.direction_unit)
LAST_GROUP_LR = "curvopt_last_group_lr"
#: the closure-free probing step's rate, until the rule moves (curvopt.config.concave_reprobe; global)
LAST_PROBE = "curvopt_secant_last_probe"
#: ``numerator="paired"``: the previous batch's gradient predicted at the current point, and whether it is kept
PREDICTED_GRAD, PREDICTED = "curvopt_predicted_grad", "curvopt_predicted"
#: the largest main-call loss the fd replay checks have seen: the scale of the loss's rounding (global)
REPLAY_SCALE = "curvopt_replay_scale"
#: the closure-free warnings' memory (global): the stall's open judgement window (its reference rate, first step and
#: first rate, inf while none is open: :func:`curvopt.config.secant_stalled`) and the collapse watch's peak rate
#: (:func:`curvopt.config.secant_collapsed`), so that a resumed run goes on judging; the keys stay from step to step
SECANT_WATCH = ("curvopt_stall_reference", "curvopt_stall_start", "curvopt_stall_first", "curvopt_secant_peak")
#: ``||w||^2`` of the parameters as the last secant step left them (global; inf when not to be checked: after the
#: warning, or loaded from a coarser dtype than the parameters'), which the next secant step compares with its
#: start's (:func:`curvopt.config.moved_outside`): anything else that moved them spoils the secant, a run resumed
#: from other parameters than the saved step's included
EXIT_SQ = "curvopt_exit_sq"
#: CDAT's mini-batch watch behind heavy ball, Nesterov and unknown bases with momentum, one key per field (global)
WATCH = tuple(PREFIX + f for f in MinibatchWatch._fields)
META_TUNER, META_BASE = "curvopt_tuner", "curvopt_base"
PER_PARAM = (W0, U, PREV_GRAD, PREDICTED_GRAD, *EIGVEC.values())
#: base-state keys whose tensors have the parameter's shape (checked on load)
_BASE_PER_PARAM = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


#: what a step called to build a state template does (:func:`is_template_call`), and why
TEMPLATE_MESSAGE = (
    "{tuner}.step() was called before the first step with every gradient zero and every group lr 0, as "
    "torch.distributed.checkpoint does to create an optimizer's state (get_state_dict, get_optimizer_state_dict, "
    "set_optimizer_state_dict): nothing was done. A state dict loaded next (set_optimizer_state_dict with the "
    "unflattened dict, load_state_dict) is unaffected. But a template taken now for dcp.load holds none of the "
    "tuner's state, which its steps create, so dcp.load restores nothing of the tuner into it (with "
    "StateDictOptions(strict=False) the tuner silently starts over): take the template after the tuner's first two "
    "steps (the load overwrites them), or save and load opt.state_dict() as it is.")


def is_template_call(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> bool:
    """Whether a closure-free step looks like ``torch.distributed.checkpoint``'s ``_init_optim_state``, which
    steps an optimizer that has no state yet once with zero gradients at lr 0 to make its state's keys: no state
    (empty entries, which reading a ``defaultdict`` makes, count as none), every group's lr 0, and every gradient
    present and zero (read only when the first two hold)."""
    if any(optimizer.state.values()) or any(float(g.get("lr", 0.0)) != 0.0 for g in optimizer.param_groups):
        return False
    grads = [p.grad for p in params if p.requires_grad]
    return bool(grads) and all(g is not None and not bool(g.any()) for g in grads)


def rule_key(field: str) -> str:
    return PREFIX + field


def is_ours(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(PREFIX)


def without_ours(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` as the base alone would have written it: the tuner's ``curvopt_*`` keys dropped from every
    parameter's state and from the param groups, and a parameter whose state held nothing else (the globals on a
    frozen first parameter) left out, as torch leaves out a parameter its optimizer never stepped (a bare Adam
    reads a non-empty state as its own and looks for ``"step"``)."""
    state = {}
    for i, entry in state_dict["state"].items():
        kept = {k: v for k, v in entry.items() if not is_ours(k)}
        if kept:
            state[i] = kept
    groups = [{k: v for k, v in g.items() if not is_ours(k)} for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups}


def drop_ours(optimizer: torch.optim.Optimizer) -> bool:
    """Remove the tuner's keys from a live optimizer, in place: from each parameter's state (an entry that held
    nothing else goes, as :func:`without_ours` leaves it out of a state dict) and from the param groups (a tuner's
    state dict loaded into a bare optimizer puts them there). Whether there were any."""
    found = False

    def strip(entry: dict) -> bool:
        ours = [k for k in entry if is_ours(k)]
        for k in ours:
            del entry[k]
        return bool(ours)

    for p in list(optimizer.state):
        if strip(optimizer.state[p]):
            found = True
            if not optimizer.state[p]:
                del optimizer.state[p]
    for group in optimizer.param_groups:
        found = strip(group) or found
    return found


def _shape_error(i: int, here: Sequence[int], there: Sequence[int]) -> ValueError:
    return ValueError(f"parameter {i} has shape {tuple(here)} here but shape {tuple(there)} in the state dict: "
                      "it comes from a different model")


def prepare(state_dict: Any, *, tuner: str, base: str, params: Sequence[Tensor], group_sizes: Sequence[int],
            rule_fields: Sequence[str], ema: float) -> tuple[dict, dict]:
    """``(state dict for torch.optim.Optimizer.load_state_dict, the tuner's global scalars as saved)``.

    Raises ``ValueError`` (nothing assigned yet) when the state dict is not a tuner's, belongs to another
    tuner or base, or to another model. ``ema``: the loading tuner's, to weight a 0.1 CDAT average.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"not a curvopt tuner state dict: a {type(state_dict).__name__}")
    if set(state_dict) == {"base", "tuner"}:
        state_dict = _from_v01(state_dict, rule_fields, ema)
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not a curvopt tuner state dict (expected torch's keys 'state' and 'param_groups')")
    groups = state_dict["param_groups"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError("not a curvopt tuner state dict: 'param_groups' is not a list of dicts")
    kind = groups[0].get(META_TUNER)
    if kind is None:
        raise ValueError("not a curvopt tuner state dict (param_groups[0] does not name a tuner): a bare "
                         "torch.optim state dict goes to opt.base.load_state_dict. (A tuner's state dict loses its "
                         "names, and its state, on the way through torch.distributed.checkpoint's "
                         "flatten_optimizer_state_dict=True, which keeps only the keys the live optimizer has: save "
                         "and load opt.state_dict() unflattened.)")
    if kind != tuner:
        raise ValueError(f"this state dict belongs to a {kind} tuner, not to a {tuner}: load it into a {kind}")
    saved_base = groups[0].get(META_BASE)
    if saved_base != base:
        raise ValueError(f"this {tuner} state dict was saved around a {saved_base} base optimizer, not around a "
                         f"{base}")
    saved_sizes = [len(g.get("params", ())) for g in groups]
    if saved_sizes != list(group_sizes):
        raise ValueError(f"this {tuner} state dict has parameter groups of sizes {saved_sizes} ({sum(saved_sizes)} "
                         f"parameter tensors), this tuner {list(group_sizes)}: it comes from a different model")
    saved_ids = [i for g in groups for i in g["params"]]
    position = {pid: k for k, pid in enumerate(saved_ids)}
    state = state_dict["state"]
    if not isinstance(state, dict):
        raise ValueError("not a curvopt tuner state dict: 'state' is not a dict")
    for pid, st in state.items():
        if pid not in position:
            continue
        k = position[pid]
        p = params[k]
        if not isinstance(st, dict):
            raise ValueError(f"the state of parameter {k} is not a dict")
        for key, v in st.items():
            if key in PER_PARAM or key in _BASE_PER_PARAM:
                if not isinstance(v, Tensor):
                    raise ValueError(f"state[{k}][{key!r}] must be a tensor, got {type(v).__name__}")
                if v.shape != p.shape:
                    raise _shape_error(k, p.shape, v.shape)
    globals_: dict = {}
    first = state.get(saved_ids[0], {}) if saved_ids else {}
    for key, v in first.items():
        if not is_ours(key) or key in PER_PARAM:
            continue
        if key in (STEP, SKIPPED, DIRECTIONS, PREDICTED):
            if isinstance(v, Tensor) and v.numel() == 1:
                v = int(v.item())
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"state[0][{key!r}] must be a non-negative int, got {v!r}")
        elif not isinstance(v, Tensor) or v.numel() != 1 or not v.is_floating_point():
            raise ValueError(f"state[0][{key!r}] must be a 0-d floating tensor, got {v!r}")
        globals_[key] = v
    if STEP in globals_ and globals_[STEP] > 0:
        missing = [f for f in rule_fields if rule_key(f) not in globals_]
        saved = [globals_[rule_key(f)] for f in rule_fields if rule_key(f) in globals_]
        if saved:  # a CDAT state saved before the above-edge guard or the unit existed: they start afresh
            for f in [f for f in missing if f in ADDED_START]:
                globals_[rule_key(f)] = torch.tensor(ADDED_START[f], dtype=saved[0].dtype)
            missing = [f for f in missing if f not in ADDED_START]
        if missing:
            raise ValueError(f"this {tuner} state dict has no rule state {missing}: it comes from another tuner")
    groups = [dict(g) for g in groups]
    groups[0].pop(META_TUNER, None)
    groups[0].pop(META_BASE, None)
    return {"state": state, "param_groups": groups}, globals_


def _from_v01(sd: dict, rule_fields: Sequence[str], ema: float) -> dict:
    """A curvopt 0.1 ``{"base": torch state dict, "tuner": {...}}`` in the current layout."""
    base, tuner = sd["base"], sd["tuner"]
    if not isinstance(base, dict) or not isinstance(tuner, dict) or "state" not in base:
        raise ValueError("not a curvopt tuner state dict (malformed 'base'/'tuner')")
    groups = [dict(g) for g in base["param_groups"]]
    ids = [i for g in groups for i in g["params"]]
    saved = tuner.get("params")
    if saved is not None and len(saved) != len(ids):
        raise ValueError(f"this state dict was saved with {len(saved)} parameter tensors but its base with "
                         f"{len(ids)}")
    state = {k: dict(v) for k, v in base["state"].items()}

    def at(k: int) -> dict:
        return state.setdefault(ids[k], {})

    kind = tuner.get("kind")
    groups[0][META_TUNER] = kind
    groups[0][META_BASE] = tuner.get("base_kind")
    first = at(0)
    step = int(tuner.get("step", 0))
    first[STEP] = step
    first[SKIPPED] = int(tuner.get("skipped", 0))
    rule = tuner.get("rule", {})
    values: dict[str, Tensor] = {}
    if "cdat" in rule:
        n_avg, d_avg, last_lr = rule["cdat"][0], rule["cdat"][1], rule["cdat"][2]
        values = {"numerator_avg": n_avg, "denominator_avg": d_avg, "cdat_lr": last_lr,
                  "avg_weight": torch.tensor(1 - ema ** step, dtype=n_avg.dtype)}
    elif "lr" in rule:
        values = {"held_lr": rule["lr"], "search_lr": rule["lr"]}
    for f in rule_fields:
        if f in values:
            first[rule_key(f)] = values[f].clone()
    sharp = tuner.get("sharpness", {})
    for space, key in SHARPNESS.items():
        v = sharp.get("values", {}).get(space, math.nan)
        if not math.isnan(float(v)):
            first[key] = torch.tensor(float(v), dtype=torch.float64)
        vec = sharp.get("vectors", {}).get(space)
        if vec is not None:
            for k, t in enumerate(vec):
                at(k)[EIGVEC[space]] = t
    prev = tuner.get("oracle", {}).get("prev")
    if prev is not None:
        for key, name in zip(SECANT, ("grad_dot_u", "lr", "u_sq")):
            first[key] = prev[name]
        last = tuner.get("last_index") or []
        u = {int(k): t for k, t in tuner.get("u", {}).items()}
        if all(k in u for k in last):  # the directions of the last step's parameters (0.1 kept older ones too)
            for k in last:
                at(k)[U] = u[k]
            first[DIRECTIONS] = len(last)
    return {"state": state, "param_groups": groups}
