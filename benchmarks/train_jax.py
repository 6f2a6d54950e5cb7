"""The JAX/Optax training loop of one run: one jitted step (value, gradient, transform, apply), recorded."""
from __future__ import annotations

import math
import time

from . import tasks as tasks_mod
from . import tuners as tuners_mod
from .plan import RunSpec
from .results import COLUMNS, STAT_COLUMNS, diverging, final_window, summarise

__all__ = ["run"]

_COMPILED: dict = {}  # compiled steps by structure: the grid of one cell shares one, the seeds of a tuner too
_KEEP = 8


def run(spec: RunSpec, progress=None) -> dict:
    import jax
    import optax

    exp = spec.exp
    if spec.param == "mup":
        raise NotImplementedError("muP rows are torch-only in this runner")
    prob = tasks_mod.jax_problem(exp, spec.width, spec.seed)
    kind = tuners_mod.TUNERS[spec.tuner].kind
    settings = dict(spec.settings)
    if kind == "constant":  # the lr lives in the state: one compilation serves the whole grid
        tx = optax.chain(tuners_mod.optax_direction(spec.base),
                         optax.inject_hyperparams(optax.scale)(step_size=-float(settings["lr"])))
        label = "constant"
    else:
        tx = tuners_mod.build_optax(spec.tuner, settings, spec.base, sharpness=exp.sharpness)
        label = spec.label
    # the step depends on the model's structure and the transform, not on the seed (weights, data are inputs)
    cache_key = (exp.settings_hash(), exp.task, exp.regime, spec.width, spec.base, label)
    loss_fn = prob.loss_fn
    get_stats = None
    if kind == "curvopt":
        from curvopt.optax import stats as get_stats

    def step_fn(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        if kind == "curvopt":
            updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=loss_fn, batch=batch)
            st = get_stats(state)
            st = st._asdict() if hasattr(st, "_asdict") else dict(st)
        else:
            updates, state = tx.update(grads, state, params)
            st = {}
        return optax.apply_updates(params, updates), state, loss, st

    params = prob.params
    state = tx.init(params)
    it = prob.batches()
    batch = next(it)
    t0 = time.perf_counter()
    compiled = _COMPILED.get(cache_key)
    if compiled is None:
        compiled = jax.jit(step_fn).lower(params, state, batch).compile()
        while len(_COMPILED) >= _KEEP:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[cache_key] = compiled
    compile_time = time.perf_counter() - t0
    cols: dict = {c: [] for c in COLUMNS}
    first = None
    for step in range(exp.steps):
        if step:
            batch = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        params, state, loss, st = compiled(params, state, batch)
        jax.block_until_ready((params, loss))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        lv = float(loss)
        first = lv if first is None else first
        cols["loss"].append(lv)
        cols["time"].append(dt)
        cols["cpu"].append(dc)
        if kind == "curvopt":
            for c in STAT_COLUMNS:
                v = st.get(c)
                cols[c].append(math.nan if v is None else float(v))
        else:
            cols["lr"].append(float(settings.get("lr", math.nan)))
            for c in STAT_COLUMNS[1:]:
                cols[c].append(1.0 if c == "closure_calls" else math.nan)
        if progress is not None:
            progress.update(1)
        if diverging(lv, first):
            break
    eval_params = params
    if spec.tuner == "schedulefree":
        eval_params = optax.contrib.schedule_free_eval_params(state, params)
    ev_loss, ev_acc = prob.evaluate(eval_params)
    extra = {"n_params": prob.n_params, "compile_time": compile_time}
    return {"steps": cols, "summary": summarise(cols, exp.steps, ev_loss, ev_acc, extra,
                                                final_window(exp.regime, exp.steps))}
