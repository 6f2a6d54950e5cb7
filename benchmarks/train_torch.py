"""The PyTorch training loop of one run: build the problem and the optimizer, take the steps, record them."""
from __future__ import annotations

import contextlib
import math
import time
import warnings

from . import tasks as tasks_mod
from . import tuners as tuners_mod
from .plan import RunSpec
from .results import COLUMNS, STAT_COLUMNS, diverging, final_window, summarise

__all__ = ["run", "native_kernels"]


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _mup_groups(model, spec: RunSpec):
    """μP (Tensor Programs V) relative to the experiment's base width (``mup_base_width``), via ``curvopt.torch``'s μP
    helper: re-initialises ``model`` in place and returns its param groups (lr = the relative multipliers
    for the tuners, the grid lr times the multipliers for the constant baseline)."""
    import torch

    from torch_backend.mup import parameterize

    base_model = tasks_mod.torch_model(spec.exp, spec.exp.mup_base_width, spec.seed, param="mup")
    lr = float(dict(spec.settings)["lr"]) if spec.tuner == "constant" else 1.0
    gen = torch.Generator().manual_seed(spec.seed)
    overrides = {"pos_emb": "embedding"} if spec.exp.task in ("vit", "lm") else None  # a raw Parameter
    return parameterize(model, base_model, optimizer="adam" if spec.base == "adam" else "sgd", lr=lr,
                        generator=gen, overrides=overrides)


def _peer_lr(opt) -> float:
    """The bare base's lr, or a peer's effective one (Prodigy and D-Adaptation scale theirs by ``d``)."""
    g = opt.param_groups[0]
    return _f(g.get("lr")) * _f(g.get("d", 1.0))


@contextlib.contextmanager
def native_kernels():
    """torch's native CPU kernels instead of oneDNN's (mkldnn): torch 2.13's oneDNN convolution backward corrupts
    the heap on this CPU build when torch runs single-threaded (reproduced with the plain ResNet and a manual
    loop). Leaving the flags' context restores oneDNN's TF32 setting, which makes a CPU-only torch 2.13 print a
    notice about Intel GPUs; it is silenced."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def run(spec: RunSpec, progress=None) -> dict:
    import torch

    # The global generator is seeded per run (models, data and the tuners' probes use their own generators; a
    # peer that draws from the global one, Sophia-H's Hutchinson probes, then gives the same run in any order).
    with native_kernels(), warnings.catch_warnings(), torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        # Sophia-H's backward(create_graph=True): the reference cycle is broken by zero_grad(set_to_none)
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        return _run(spec, progress)


def _run(spec: RunSpec, progress=None) -> dict:
    import torch

    exp = spec.exp
    settings = dict(spec.settings)
    prob = tasks_mod.torch_problem(exp, spec.width, spec.seed, param=spec.param)
    model = prob.model
    model.train()
    params = _mup_groups(model, spec) if spec.param == "mup" else None
    names = {id(p): n for n, p in model.named_parameters()}
    batch: dict = {}

    def functional_loss(ps):  # the step's loss over the tuner's parameters (param_groups order)
        order = (p for g in opt.param_groups for p in g["params"])
        values = {names[id(p)]: q for p, q in zip(order, ps)}
        return prob.loss(torch.func.functional_call(model, values, (batch["x"],)), batch["y"])

    opt = tuners_mod.build_torch(spec.tuner, settings, spec.base, model, sharpness=exp.sharpness, params=params,
                                 functional_loss=functional_loss)
    kind = tuners_mod.TUNERS[spec.tuner].kind
    create_graph = spec.tuner == "sophia"  # Sophia-H's Hutchinson estimate differentiates the gradient
    cols: dict = {c: [] for c in COLUMNS}
    it = prob.batches()
    first = None
    for _ in range(exp.steps):
        xb, yb = next(it)
        batch.update(x=xb, y=yb)

        def closure():
            model.zero_grad(set_to_none=True)
            loss = prob.loss(model(xb), yb)
            loss.backward(create_graph=create_graph)
            return loss

        t0, c0 = time.perf_counter(), time.process_time()
        loss = opt.step(closure)
        lv = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        first = lv if first is None else first
        cols["loss"].append(lv)
        cols["time"].append(dt)
        cols["cpu"].append(dc)
        st = tuners_mod.torch_stats(opt) if kind == "curvopt" else {"lr": _peer_lr(opt), "closure_calls": 1}
        for c in STAT_COLUMNS:
            cols[c].append(_f(st.get(c, math.nan)))
        if progress is not None:
            progress.update(1)
        if diverging(lv, first):
            break
    if hasattr(opt, "eval"):  # schedule-free evaluates at its averaged point
        opt.eval()
    ev_loss, ev_acc = prob.evaluate()
    extra = {"n_params": prob.n_params, "torch_threads": torch.get_num_threads()}
    return {"steps": cols, "summary": summarise(cols, exp.steps, ev_loss, ev_acc, extra,
                                                final_window(exp.regime, exp.steps))}
