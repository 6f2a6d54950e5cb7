"""Curvature oracles: ``u^T H u``, the second derivative of ``t -> f(w + t u)`` at 0.

Which one a step uses is :func:`curvopt.config.resolve_curvature` (``"auto"``: ``"fd"`` when the update gets
``value_fn``, ``"secant"`` otherwise), decided when the update is traced.

* ``"fd"``: one extra gradient at ``w + h u`` with ``h`` from :func:`curvopt.rules.finite_difference_step`
  (accurate to about the square root of the dtype's epsilon): ``(g(w + h u) - g(w))^T u / h``. The epsilon is
  the coarsest of the parameters' dtypes and of the floating dtypes ``value_fn`` computes in (read from its
  jaxpr when the update is traced): flax's mixed precision (``dtype=jnp.bfloat16``, float32 parameters) rounds
  a float32-sized displacement away.
* ``"exact"``: forward-over-forward JVP of ``value_fn`` along ``u`` (about three forward passes); where
  that cannot be traced (a ``jax.custom_vjp`` op in the loss: custom activations, fused kernels, which have no
  second forward-mode rule), forward-over-reverse instead (``u^T`` times the HVP along ``u``, as the online
  sharpness computes it), chosen when the update is traced. Both are exact.
* ``"secant"``: free: this step's gradient against the previous one along the previous direction
  (:func:`curvopt.rules.secant_curvature`), lagged by one step and rescaled to the current direction. It
  assumes the previous step moved the parameters by exactly ``lr u`` (nothing after the tuner in the chain
  changed the updates). Without a previous step to use (the first step, or a previous ``lr = 0``) there is no
  secant: with ``value_fn`` the step falls back to an ``"fd"`` probe; without one (closure-free:
  ``TrainState.apply_gradients``, ``nnx.Optimizer.update``) the step itself is the probe: it moves by the
  tiny ``lr = h`` of the fd oracle, so that the next step's secant is an fd estimate, and the rule's state is
  not touched; at a concave start, where the secant's curvature is not positive and the rule takes no step,
  the step probes again at twice the last probe (:func:`curvopt.config.concave_reprobe`, in
  :mod:`jax_backend.cdat`). With the noise correction (:mod:`jax_backend.noise`; CDAT's default behind Adam)
  the secant's mini-batch noise bias is removed.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import Var, jaxpr_as_fun

from curvopt import rules
from curvopt.config import (EXTERNAL_CLIP_STEPS, REPLAY_CHECKS, REPLAY_MISS_OPTAX, collapse_peak, collapse_run,
                            external_clip_suspected, in_direction_units, moved_outside, probe_reads_forward,
                            remember_probe, secant_collapsed, secant_probe_eps, secant_stall_reference,
                            secant_stalled, stall_window, watched_norms)
from curvopt.curvature import finite_difference_curvature, replay_judged, replay_mismatch
from curvopt.precision import gradient_compute_eps, sample_stride, within_budgets

from .control import cond
from .direction import add_scaled, flat, least_precise_eps, norm, vdot
from .noise import NoiseMemory, corrected_secant

__all__ = ["SecantMemory", "secant_init", "secant_remember", "secant_unwatched", "secant_watch_motion", "gradient_eps",
           "loss_reads_params",
           "fd_eps", "fd_step", "ReplayCheck", "replay_init", "replay_check",
           "curvature"]


class SecantMemory(NamedTuple):
    """What the secant oracle keeps from the previous step: its incoming direction ``d`` (``u = -d``: kept as
    handed over, a negated copy would be one more kernel per leaf), ``g^T u``, ``||u||^2`` and the learning rate
    it took (0: no secant next step); and the closure-free probing step's stall reference (``probe_lr``:
    :func:`curvopt.config.secant_stall_reference`, its rate where nothing coarser than float32 computed the
    gradient; NaN before one and once judged; the first of a run of probes is kept until then), the step its
    judgement window starts at and the window's first rate (NaN: none yet), and whether the rate was below it
    when last judged (:func:`curvopt.config.secant_stalled`), the largest rate since the last probe and the count of
    consecutive steps the rate has collapsed below it, kept once sustained (:func:`curvopt.config.collapse_run`,
    int32; both :func:`jax_backend.stats` warns); the gradient norms of
    the last steps that followed a step which moved the parameters (:func:`curvopt.config.watched_norms`), whether
    this one moved them, and whether the norms ever said that a clip before the tuner fixed them
    (:func:`curvopt.config.external_clip_suspected`; :func:`jax_backend.stats` warns); and the last probing step's
    rate until the rule moves (NaN: none; :func:`curvopt.config.concave_reprobe`); ``||w||^2`` of the parameters
    as the last step left them (NaN: not known) and whether a step ever started elsewhere (:func:`secant_watch_motion`;
    :func:`jax_backend.stats` warns)."""

    prev_incoming: Any
    prev_grad_dot_direction: Any
    prev_direction_sq: Any
    prev_lr: Any
    probe_lr: Any
    probe_step: Any
    window_lr: Any
    stalled: Any
    peak_lr: Any
    collapsed: Any
    grad_norms: Any
    moved: Any
    clip_suspected: Any
    last_probe: Any
    left_sq: Any
    moved_outside: Any


def secant_init(params: Any, dtype: Any) -> SecantMemory:
    return SecantMemory(optax.tree.zeros_like(params), jnp.zeros((), dtype), jnp.zeros((), dtype),
                        jnp.zeros((), dtype), jnp.full((), jnp.nan, dtype), jnp.zeros((), jnp.int32),
                        jnp.full((), jnp.nan, dtype), jnp.zeros((), bool), jnp.zeros((), dtype),
                        jnp.zeros((), jnp.int32), jnp.zeros(EXTERNAL_CLIP_STEPS, dtype),
                        jnp.zeros((), bool), jnp.zeros((), bool), jnp.full((), jnp.nan, dtype),
                        jnp.full((), jnp.nan, dtype), jnp.zeros((), bool))


def secant_remember(memory: SecantMemory, d: Any, numerator: Any, lr: Any, probe: Any, reference: Any, steps: Any,
                    dtype: Any, grad: Any, unit: Any, dominated: Any = False) -> SecantMemory:
    """The memory after a step of direction ``d`` (``-g^T u = numerator``) at rate ``lr``; ``probe``: the
    closure-free probing rate ``h`` if this step probed, else NaN, and ``reference`` the rate a later step's is
    judged against (:func:`curvopt.config.secant_stall_reference`); ``steps``: the steps taken before it;
    ``grad``: the gradient handed to the step; ``unit``: the direction's (:attr:`curvopt.rules.RuleInputs.unit`),
    in which the probe is kept and the rate judged (:func:`curvopt.config.in_direction_units`); ``dominated``: the noise
    dominates this step's curvature (:func:`curvopt.curvature.noise_dominated`; False without the correction)."""
    probing = ~jnp.isnan(probe)
    norms = watched_norms(memory.grad_norms, norm(grad, dtype), memory.moved, jnp)
    pending = ~jnp.isnan(memory.probe_lr)  # a probe not judged yet: the first of a run of probes is judged
    rate = in_direction_units(lr, unit, jnp)
    judged, stalled, recovering = secant_stalled(rate, memory.probe_lr, steps - memory.probe_step, memory.window_lr)
    judged, recovering = (pending & x & ~probing for x in (judged, recovering))
    start, window_lr = stall_window(rate, steps, memory.probe_step, memory.window_lr, recovering, jnp)
    window_lr = jnp.where(pending & ~probing, window_lr, memory.window_lr)
    new_probe = probing & ~pending
    moved = ~probing & (lr > 0)
    peak = collapse_peak(rate, memory.peak_lr, probing, moved, jnp)
    collapsed = collapse_run(memory.collapsed, secant_collapsed(rate, peak, dominated), probing, moved, jnp)
    reference = in_direction_units(reference, unit, jnp)
    return SecantMemory(d, -numerator, vdot(d, d, dtype), jnp.asarray(lr, dtype),
                        jnp.where(new_probe, reference, jnp.where(judged, jnp.nan, memory.probe_lr)),
                        jnp.where(new_probe, steps, start),
                        jnp.where(new_probe | judged, jnp.nan, window_lr).astype(dtype),
                        jnp.where(judged, stalled, memory.stalled), peak.astype(dtype), collapsed, norms, moved,
                        memory.clip_suspected | external_clip_suspected(norms, jnp),
                        remember_probe(memory.last_probe, jnp.where(probing, probe, lr), probing, jnp).astype(dtype),
                        memory.left_sq, memory.moved_outside)


def secant_unwatched(memory: SecantMemory, dtype: Any) -> SecantMemory:
    """The memory after a step that took its curvature elsewhere (``value_fn``: the fd oracle) in a run that may
    also take closure-free steps: the outside-motion check skips the next closure-free step (``left_sq`` NaN: this
    step did not record where it leaves the parameters; left as it was, :func:`jax_backend.stats` warned that
    something else had moved them). The secant's direction stays the last closure-free step's, so the next
    closure-free step reads a secant that can be several steps old (a field test, ``value_fn`` every third step:
    greedy rates 0.46, 1.11, 1.55 where a one-step-old secant gave 0.70, 0.92, 10.4). The two ways out cost more:
    forgetting it (the next closure-free step probes, ``lr = h``) trained heavy ball in full batch 10-450x worse in
    a follow-up field test (CDAT behind ``optax.trace(0.9)`` on the digits, ``value_fn`` every 2, 5, 10 steps), and
    keeping this step's direction made a parameter-sized temporary in every jitted step with ``value_fn`` (0.014
    -> 1.0 parameter sizes on ``tests/test_large_trees.py``'s MLP). PyTorch keeps the direction (no temporary to
    pay there: :meth:`torch_backend.tuner.CurvatureTuner._commit`)."""
    return memory._replace(left_sq=jnp.full((), jnp.nan, dtype))


def secant_watch_motion(memory: SecantMemory, params: Any, out: Any, dtype: Any) -> SecantMemory:
    """The memory after this step's check that nothing but the tuner moved the parameters since its last step,
    which the secant assumes (:func:`curvopt.config.moved_outside` of ``||params||^2``, this step's start, and the
    ``||w||^2`` the last step left); then the ``||w||^2`` this step leaves, of ``params`` plus its updates ``out`` as
    ``optax.apply_updates`` adds them. Unchanged without ``params``."""
    if params is None:
        return memory
    found = vdot(params, params, dtype)
    moved = moved_outside(found, memory.left_sq, least_precise_eps(params), jnp)
    # materialised, so that its norm is the same reduction over the same kind of array as the next step's (fused
    # into the sum, the order of the sum's terms may differ)
    after = jax.lax.optimization_barrier(optax.apply_updates(params, out))
    return memory._replace(left_sq=vdot(after, after, dtype), moved_outside=memory.moved_outside | moved)


def _float_dtypes(jaxpr: Any, found: set) -> set:
    """The floating dtypes of every value a jaxpr computes, nested jaxprs (jit, cond, remat, custom rules)
    included."""
    for eqn in jaxpr.eqns:
        _add_float_outputs(eqn, found)
        for inner in _inner_jaxprs(eqn):
            _float_dtypes(inner, found)
    return found


def _add_float_outputs(eqn: Any, found: set) -> None:
    for var in eqn.outvars:
        dt = getattr(var.aval, "dtype", None)
        if dt is not None and jnp.issubdtype(dt, jnp.floating):
            found.add(jnp.dtype(dt))


def _inner_jaxprs(eqn: Any) -> list:
    """The jaxprs nested in an equation's parameters (a ClosedJaxpr's Jaxpr)."""
    out = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                out.append(inner)
    return out


def _vars(atoms: Any) -> list:
    return [v for v in atoms if isinstance(v, Var)]


#: the call primitives whose one inner jaxpr maps the equation's inputs and outputs one to one (a loop's body
#: does not: its carry feeds itself)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call",
                    "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _path_float_dtypes(jaxpr: Any, varying: list, wanted: list, found: set) -> set:
    """The floating dtypes of the values on a path from the inputs marked ``varying`` to the outputs marked
    ``wanted``: what the loss's value at the parameters is computed in, leaving out what does not depend on the
    parameters (the batch's own preprocessing) and what does not reach the loss (an auxiliary output that
    ``value_fn`` returns and the tuner drops, a model's updated statistics). A call (:data:`_CALLS`: jit, remat,
    custom rules) is followed inside; any other nested jaxpr on the path (a loop, a conditional) counts whole."""
    live = {v for v, w in zip(jaxpr.outvars, wanted) if w and isinstance(v, Var)}
    needed = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            needed.append(eqn)
            live.update(_vars(eqn.invars))
    dep = {v for v, m in zip(jaxpr.invars, varying) if m}
    for eqn in reversed(needed):
        marks = [isinstance(v, Var) and v in dep for v in eqn.invars]
        if not any(marks):
            continue
        dep.update(eqn.outvars)
        inner = _inner_jaxprs(eqn)
        if (eqn.primitive.name in _CALLS and len(inner) == 1 and len(inner[0].invars) == len(eqn.invars)
                and len(inner[0].outvars) == len(eqn.outvars)):
            _path_float_dtypes(inner[0], marks, [v in live for v in eqn.outvars], found)
        else:
            _add_float_outputs(eqn, found)
            for sub in inner:
                _float_dtypes(sub, found)
    return found


def computation_eps(f: Callable[[Any], Any], params: Any) -> float:
    """Machine epsilon of the coarsest floating dtype ``f`` computes its value with from ``params`` (0.0: none),
    from its jaxpr (traced once, when the update is traced; :func:`_path_float_dtypes`)."""
    jaxpr = jax.make_jaxpr(f)(params).jaxpr
    found = _path_float_dtypes(jaxpr, [True] * len(jaxpr.invars), [True] * len(jaxpr.outvars), set())
    return max((float(jnp.finfo(dt).eps) for dt in found), default=0.0)


def loss_reads_params(traced: Any) -> bool:
    """Whether a loss depends on its argument at all, from its jaxpr ``traced`` (``jax.make_jaxpr(f)(params)``,
    traced when the update is traced): False for a ``value_fn`` that ignores its argument and closes over the model
    instead (an easy slip with ``nnx``), whose every probe then reads the same loss and a zero gradient."""
    jaxpr = traced.jaxpr
    wanted = [True] * len(jaxpr.outvars)
    return (any(v in jaxpr.invars for v in _vars(jaxpr.outvars))
            or bool(_path_float_dtypes(jaxpr, [True] * len(jaxpr.invars), wanted, set())))


def gradient_eps(grad: Any) -> Any:
    """The precision the forward pass behind ``grad`` computed in, as the core reads it from the gradient
    (:func:`curvopt.precision.gradient_compute_eps`; a flax module with ``dtype=bfloat16`` over float32
    parameters leaves bfloat16 values cast up): a traced machine epsilon, 0 when nothing shows a half dtype. Read from
    at most :data:`curvopt.precision.SAMPLE_ENTRIES` entries of each float32/float64 leaf, one reduction per run of
    them (:func:`jax_backend.direction.flat`); none is raveled (:func:`_sample`)."""
    wide = [_sample(x) for x in jax.tree.leaves(grad) if jnp.result_type(x) in (jnp.float32, jnp.float64)]
    if not wide:
        return jnp.float32(0.0)
    counts = 0
    for g in flat(wide, jnp.float64 if any(jnp.result_type(x) == jnp.float64 for x in wide) else jnp.float32):
        nz = g != 0
        counts = counts + jnp.stack([nz] + [w & nz for w in within_budgets(g, 1, jnp)]).sum(
            axis=tuple(range(1, g.ndim + 1)), dtype=jnp.int32)
    # the core's shares are floats (of JAX's default float dtype, as an int count times 0.0 made them): explicit,
    # for strict dtype promotion
    counts = counts.astype(jnp.result_type(float))
    return gradient_compute_eps(counts[0], list(counts[1:]), jnp)


def _sample(x: Any) -> Any:
    """``x`` whole, in its shape, when :func:`curvopt.precision.sample_stride` reads every entry, else its sample:
    every ``sample_stride``-th entry of the flattened ``x``, read by index. A ravel gathers an array split across
    devices whole on every device (:func:`jax_backend.direction.runs_vdot`; with every leaf a run of its own, a
    2-device test gathered a 1024x1280 split weight for its sample); indexing reads each device's entries and sums
    the sample across devices."""
    stride = sample_stride(jnp.size(x))
    return x if stride == 1 else x[jnp.unravel_index(jnp.arange(0, jnp.size(x), stride), jnp.shape(x))]


def fd_eps(params: Any, f: Callable[[Any], Any] | None = None, grad: Any = None) -> Any:
    """The machine epsilon a finite-difference step is sized by: the coarsest of the parameters' dtypes and,
    given the loss ``f``, of the dtypes it computes in, or given only the gradient ``grad`` (closure-free), of the
    dtype it shows (:func:`gradient_eps`)."""
    eps = least_precise_eps(params)
    if f is not None:
        return max(eps, computation_eps(f, params))
    if grad is not None:
        return jnp.maximum(eps, gradient_eps(grad))
    return eps


def fd_step(params: Any, d: Any, dtype: Any, f: Callable[[Any], Any] | None = None, grad: Any = None,
            eps: Any = None) -> Any:
    """The finite-difference step ``h`` (displacement ``h ||u|| = sqrt(eps) ||w||``, ``||w||`` over the entries ``d``
    moves where they are not all 0: :func:`curvopt.rules.finite_difference_step`; ``||u|| = ||d||``), ``eps`` given
    or :func:`fd_eps` of ``params``, ``f`` and ``grad``."""
    eps = fd_eps(params, f, grad) if eps is None else eps
    moved = jax.tree.map(lambda w, u: rules.moved_entries(w, u, jnp), params, d)
    return rules.finite_difference_step(norm(params, dtype), norm(d, dtype), dtype_eps=eps, xp=jnp,
                                        moved_norm=norm(moved, dtype)).astype(dtype)


def _probing_step(params: Any, d: Any, dtype: Any, grad: Any, denoised: bool) -> tuple[Any, Any]:
    """The closure-free probing step ``h`` and the rate its stall is judged against
    (:func:`curvopt.config.secant_stall_reference`); ``denoised``: the secant's noise correction is on, and the
    forward pass's precision does not size the probe (:func:`curvopt.config.probe_reads_forward`)."""
    eps = secant_probe_eps(fd_eps(params, grad=grad if probe_reads_forward(denoised) else None), jnp)
    h = fd_step(params, d, dtype, eps=eps)
    return h, secant_stall_reference(h, eps, jnp).astype(dtype)


class ReplayCheck(NamedTuple):
    """The check of the first :data:`curvopt.config.REPLAY_CHECKS` fd probes (:func:`replay_check`): the scale of
    the loss's rounding, the largest loss checked so far and at least 1 (a float32 cross-entropy fitted to 3e-6
    rounds like the O(1) logits it cancels: a ``value_fn`` that replays missed the model by 23 allowances at its own
    scale), and whether a probe's loss ever missed the step's quadratic model (:func:`jax_backend.stats` warns:
    :data:`curvopt.config.REPLAY_MESSAGE_OPTAX`). The field is ``rounding_scale``, not ``scale``: the state's
    field names are unique in a chain (``optax.tree_utils.tree_get(state, "scale")`` reads ``reduce_on_plateau``'s
    factor)."""

    rounding_scale: Any
    missed: Any


def replay_init(dtype: Any) -> ReplayCheck:
    return ReplayCheck(jnp.ones((), dtype), jnp.zeros((), bool))


def replay_check(memory: ReplayCheck, value: Any, numerator: Any, curvature: Any, fd_probe: tuple[Any, Any, Any],
                 steps: Any, dtype: Any) -> ReplayCheck:
    """``memory`` after this step's check (on the first :data:`curvopt.config.REPLAY_CHECKS` steps, where the loss
    ``value`` is known): the loss ``value_fn`` gives at the fd probe point against the one the step's value,
    slope ``-numerator`` and fd ``curvature`` predict (:func:`curvopt.curvature.replay_mismatch`), missed when by
    more than :data:`curvopt.config.REPLAY_MISS_OPTAX` allowances, where the probe is small enough to judge
    (:func:`curvopt.curvature.replay_judged`). A ``value_fn`` that draws other dropout masks
    than the gradient's, or reads another batch, misses it by far."""
    _, h, loss = fd_probe
    checked = (steps < REPLAY_CHECKS) & jnp.isfinite(value) & jnp.isfinite(loss)
    scale = jnp.where(checked, jnp.maximum(memory.rounding_scale, abs(value)), memory.rounding_scale)
    mismatch, _ = replay_mismatch(value, loss.astype(dtype), h, numerator, curvature,
                                  float(jnp.finfo(jnp.result_type(loss)).eps), scale, jnp)
    judged = checked & replay_judged(h, numerator, scale)
    return ReplayCheck(scale.astype(dtype), memory.missed | (judged & (mismatch > REPLAY_MISS_OPTAX)))


def _exact(f: Callable[[Any], Any], params: Any, d: Any, dtype: Any) -> Any:
    """``u^T H u = d^T H d`` by a JVP of the directional derivative ``w -> grad f(w)^T d`` (itself a JVP), or,
    where tracing that raises (forward-over-forward through a ``jax.custom_vjp`` op: "Differentiation rule for
    'custom_lin' not implemented"), by forward-over-reverse: ``d^T`` times the HVP ``jax.jvp(jax.grad(f))``
    along ``d``. The forward-over-forward attempt is traced on its own (``jax.make_jaxpr``) and replayed into
    the caller's trace only if it succeeds: a failed attempt leaves nothing behind (no dead equations, no
    second run of the loss's effects such as ``jax.debug.print``). An error of the fallback too (a broken loss)
    is raised with the first one as its context."""
    def forward(w: Any, v: Any) -> Any:
        directional = lambda x: jax.jvp(f, (x,), (v,))[1]  # noqa: E731
        return jax.jvp(directional, (w,), (v,))[1]

    try:
        traced = jax.make_jaxpr(forward)(params, d)
    except Exception:  # noqa: BLE001 -- any failure to trace forward mode: the fallback raises if f itself fails
        hvp = jax.jvp(jax.grad(f), (params,), (d,))[1]
        return jnp.asarray(vdot(d, hvp, dtype)).astype(dtype)
    return jnp.asarray(jaxpr_as_fun(traced)(*jax.tree.leaves((params, d)))[0]).astype(dtype)


def _fd(f: Callable[[Any], Any], params: Any, grad_dot_u: Any, d: Any, dtype: Any
        ) -> tuple[Any, tuple[Any, Any, Any]]:
    """``(u^T H u, (the gradient at the probe point w + h u, h, the loss there))``."""
    h = fd_step(params, d, dtype, f)
    # The barrier materialises w + h u: fused into a convolution's weight operand it would push XLA:CPU off
    # its fast convolution path (a 30x slower step on a small CNN).
    loss, probe = jax.value_and_grad(f)(jax.lax.optimization_barrier(add_scaled(params, -h, d)))
    curvature = finite_difference_curvature(-vdot(probe, d, dtype), grad_dot_u, h, jnp, probe_loss=loss)
    return curvature.astype(dtype), (probe, h, loss)


def curvature(oracle: str, f: Callable[[Any], Any] | None, params: Any, grad: Any, d: Any, numerator: Any,
              memory: SecantMemory | None, dtype: Any, noise: tuple[NoiseMemory, Any, Any] | None = None
              ) -> tuple[Any, Any, Any, Any, Any, Any, Any, NoiseMemory | None]:
    """``(u^T H u, extra loss evaluations, probe lr, its stall reference, lagged, stretch, fd probe, noise memory)``
    with the named (resolved) oracle, for the incoming direction ``d`` (``u = -d``) and ``numerator = -g^T u``.
    ``probe lr`` is the closure-free secant's probing step ``h`` when it has no secant (else NaN): the step then
    takes ``lr = h`` and leaves the rule alone; the stall reference is what the rate is judged against later
    (:func:`curvopt.config.secant_stall_reference`; NaN with ``probe lr``). ``lagged``: the curvature is the secant's (:attr:`curvopt.rules.RuleInputs.lagged`);
    ``stretch``: the secant's ``||u||^2 / ||u_prev||^2`` (:attr:`curvopt.rules.RuleInputs.stretch`; 1 with a fresh
    curvature). ``fd probe``: ``(gradient at w + h u, h, the loss there)`` of the ``"fd"`` oracle, None with the
    others.
    ``noise``: ``(memory, metric, seen)`` of the secant's noise correction (:mod:`jax_backend.noise`), whose new memory
    the secant returns (else the memory is returned as given)."""
    nan = jnp.full((), jnp.nan, dtype)
    grad_dot_u = -numerator
    kept = None if noise is None else noise[0]
    if oracle == "exact":
        return _exact(f, params, d, dtype), jnp.int32(1), nan, nan, False, 1.0, None, kept
    if oracle == "fd":
        curv, fd_probe = _fd(f, params, grad_dot_u, d, dtype)
        return curv, jnp.int32(1), nan, nan, False, 1.0, fd_probe, kept
    d_sq = vdot(d, d, dtype)
    secant = (memory.prev_incoming, memory.prev_grad_dot_direction, memory.prev_lr, memory.prev_direction_sq, d_sq)
    if noise is None:
        estimate = rules.secant_curvature(-vdot(grad, memory.prev_incoming, dtype), *secant[1:], jnp)
    else:
        estimate, kept = corrected_secant(*noise, grad, *secant, dtype)
    available = ~jnp.isnan(estimate)
    stretch = rules.secant_stretch(memory.prev_direction_sq, d_sq, jnp)
    if f is None:
        # the probe's size only where it probes (the first step, a re-probe): its reductions over the parameters
        # and the gradient are not needed on a step that has its secant
        probe_lr, reference = cond(available, lambda: (nan, nan),
                                   lambda: _probing_step(params, d, dtype, grad, noise is not None))
        return estimate, jnp.int32(0), probe_lr, reference, available, stretch, None, kept
    curv, calls = cond(available, lambda: (estimate, jnp.int32(0)),
                       lambda: (_fd(f, params, grad_dot_u, d, dtype)[0], jnp.int32(1)))
    return curv, calls, nan, nan, available, stretch, None, kept
