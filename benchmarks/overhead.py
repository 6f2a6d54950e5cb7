"""Overhead of the curvopt tuners: ``python -m benchmarks.overhead [--quick] [--repeats N] [--backend B]``.

Three measurements, printed as markdown tables:

1. **Step time.** Per-step wall time of each tuner ÷ the bare base optimizer's step (closure + ``base.step()``)
   on a small CNN (pre-activation ResNet, width 16, on a 128-image batch of scikit-learn's 8x8 digits) and a
   small byte-level transformer LM (width 32, 2 blocks, 16 sequences of 32 bytes of ``pydoc_data.topics``).
   Base and tuner blocks of steps are interleaved in one process (:mod:`benchmarks.timing`, shared with the
   JAX rows of :mod:`benchmarks.overhead_jax`), torch on one thread; the reported ratio is the median over
   repeats of (median tuner step ÷ median base step).
2. **Online sharpness.** 100 full-batch steps (256 digits, float64) of CDAT (GD base) on the CNN with the
   warm-started online estimate at every step (``SharpnessConfig(every=1, iters=20, tol=1e-3)``). At sampled
   steps an independent reference (:mod:`benchmarks.hessian`: exact HVPs, ARPACK) gives the top eigenvalue,
   and a cold-started power iteration (random start, exact HVPs) counts the products it needs to come within
   1% of it (capped at 500). The online products per estimate are the closure calls per step beyond those of
   the same tuner without the estimate. Reported: online HVPs per estimate, cold HVPs per estimate, their
   ratio, and the worst relative error of the online estimate at the samples.
3. **Peak memory.** The peak of live tensor bytes over three steps, from ``torch.profiler``'s memory
   timeline (CPU; model, optimizer and data created inside the profiled region so every tensor is seen),
   tuner ÷ base; also the tuner's own buffers (the state the tuner and its base keep beyond what the bare
   base keeps) plus the base's persistent tensors (parameters, gradients, optimizer state), ÷ the latter:
   the bound that holds when activations are negligible.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from benchmarks.hessian import hvp_operator, top_eigenvalue
from benchmarks.timing import step_time_ratio
from curvopt.config import SharpnessConfig
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

# ------------------------------------------------------------------------------------------ tasks


def _cnn_task(batch: int = 128):
    from benchmarks.data import load_digits
    from benchmarks.models_torch import build_model

    ds = load_digits()
    x = torch.from_numpy(ds.x_train[:batch])
    y = torch.from_numpy(ds.y_train[:batch])

    def make():
        return build_model("resnet", ds.input_shape, ds.num_classes, width=16, seed=0)

    def loss_fn(model):
        return nn.functional.cross_entropy(model(x), y)
    return make, loss_fn


def _lm_task(batch: int = 16, block: int = 32):
    from benchmarks.data import lm_blocks, load_text_bytes
    from benchmarks.models_torch import build_model

    xs, ys = lm_blocks(load_text_bytes(), block, max_blocks=batch)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)

    def make():
        return build_model("lm", (block,), 256, width=32, seed=0, depth=2, heads=2)

    def loss_fn(model):
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return make, loss_fn


TASKS = {"cnn": _cnn_task, "lm": _lm_task}

# (tuner, oracle, base label, factory(base, model))
BASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1.0),
    "sgd+momentum": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
}
CONFIGS: list[tuple[str, str, str, Callable]] = [
    ("CDAT", "fd", "adam", lambda b, m: CDAT(b, lr_max=1e-2, modules=m)),
    ("CDAT", "secant", "adam", lambda b, m: CDAT(b, curvature="secant", lr_max=1e-2, modules=m)),
    ("CDAT", "fd", "sgd+momentum", lambda b, m: CDAT(b, lr_max=0.05, modules=m)),
    ("CDAT", "secant", "sgd+momentum", lambda b, m: CDAT(b, curvature="secant", lr_max=0.05, modules=m)),
    ("QuadraticGreedy", "fd", "adam", lambda b, m: QuadraticGreedy(b, lr_max=1e-2, modules=m)),
    ("PolyakStep", "-", "adam", lambda b, m: PolyakStep(b, lr_max=1e-2, modules=m)),
    ("ArmijoLineSearch", "-", "adam", lambda b, m: ArmijoLineSearch(b, lr_max=1e-2, modules=m)),
    ("EdgeOfStability", "every 10", "adam", lambda b, m: EdgeOfStability(b, lr_max=1e-2, modules=m)),
    ("CDAT+sharpness", "fd, every 10", "adam", lambda b, m: CDAT(b, lr_max=1e-2, sharpness=10, modules=m)),
]

# ------------------------------------------------------------------------------------------ timing


def _runner(make, loss_fn, base_name, factory):
    model = make()
    base = BASES[base_name](model.parameters())
    if base_name == "adam":
        for g in base.param_groups:
            g["lr"] = 1.0
    opt = factory(base, model) if factory is not None else base

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    if factory is None:
        base.param_groups[0]["lr"] = 1e-3

        def step():
            closure()
            base.step()
    else:
        def step():
            opt.step(closure)
    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def measure_step_time(repeats: int, steps: int, tasks=("cnn", "lm")) -> list[dict]:
    rows = []
    for task in tasks:
        make, loss_fn = TASKS[task]()
        for tuner, oracle, base_name, factory in CONFIGS:
            base_step = _runner(make, loss_fn, base_name, None)
            tuned_step = _runner(make, loss_fn, base_name, factory)
            ratio, tb = step_time_ratio(base_step, tuned_step, repeats=repeats, steps=steps)
            skipped = int(float(tuned_step.optimizer.stats["skipped"]))
            rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name, backend="torch",
                             ratio=ratio, base_ms=1e3 * tb, skipped=skipped))
    return rows

# ------------------------------------------------------------------------------------------ sharpness HVPs


def measure_hvps(steps: int = 100, samples: int = 10, batch: int = 256, iters: int = 20) -> dict:
    """In float64, so that finite-difference HVPs (accurate to ~1e-8) do not blur the 1% criterion."""
    from benchmarks.data import load_digits
    from benchmarks.models_torch import build_model

    ds = load_digits()
    x, y = torch.from_numpy(ds.x_train[:batch]).double(), torch.from_numpy(ds.y_train[:batch])
    model = build_model("resnet", ds.input_shape, ds.num_classes, width=16, seed=0).double()
    params = list(model.parameters())

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    def make(sharpness):
        return CDAT(torch.optim.SGD(params, lr=1.0), sharpness=sharpness, modules=model, lr_max=1.0)

    opt = make(SharpnessConfig(every=1, iters=iters, tol=1e-3))

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    # closure calls of one step without the estimate (on a copy: the run itself is left alone)
    twin = copy.deepcopy(model)
    tw_params = list(twin.parameters())
    plain = CDAT(torch.optim.SGD(tw_params, lr=1.0), sharpness=0, modules=twin, lr_max=1.0)

    def tw_closure():
        plain.zero_grad()
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        return loss
    plain.step(tw_closure)
    calls_plain = float(plain.stats["closure_calls"])

    check = set(np.linspace(1, steps, samples).round().astype(int).tolist())
    online_hvps, cold_hvps, errors = [], [], []
    rng = np.random.default_rng(1)
    for t in range(1, steps + 1):
        truth = None
        if t in check:
            truth, _ = top_eigenvalue(loss_fn, params, tol=1e-9)
            cold_hvps.append(_cold_power_hvps(loss_fn, params, truth, rng))
        opt.step(closure)
        online_hvps.append(float(opt.stats["closure_calls"]) - calls_plain)
        if truth is not None:
            errors.append(abs(float(opt.stats["sharpness"]) - truth) / abs(truth))
    online = statistics.mean(online_hvps[1:])  # the first estimate is itself a cold start
    cold = statistics.mean(cold_hvps)
    return dict(online_per_estimate=online, first_estimate=online_hvps[0], cold_per_estimate=cold,
                ratio=cold / online if online > 0 else math.nan, max_rel_error=max(errors), steps=steps,
                samples=len(cold_hvps), total_online=sum(online_hvps), iters_cap=iters)


def _cold_power_hvps(loss_fn, params, truth: float, rng, cap: int = 500) -> int:
    """Exact HVPs a randomly started power iteration needs for |lambda_k - truth| <= 1% truth."""
    matvec, n, _ = hvp_operator(loss_fn, params)
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    for i in range(1, cap + 1):
        mv = matvec(v)
        if abs(float(v @ mv) - truth) <= 0.01 * abs(truth):
            return i
        v = mv / np.linalg.norm(mv)
    return cap

# ------------------------------------------------------------------------------------------ memory


def _peak_bytes(run: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(axis=1).max())


def _tensors(obj):
    """Every tensor reachable in nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _state_bytes(*optimizers) -> int:
    """Bytes of the distinct tensors (by storage) the optimizers keep in their ``state``."""
    seen, total = set(), 0
    for opt in optimizers:
        for t in _tensors(dict(opt.state)):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.numel() * t.element_size()
    return total


def measure_memory(tasks=("cnn", "lm")) -> list[dict]:
    rows = []
    for task in tasks:
        for tuner, oracle, base_name, factory in CONFIGS[:4]:
            out = {}
            for label, fac in (("base", None), ("tuner", factory)):
                holder = {}

                def run():
                    make, loss_fn = TASKS[task]()
                    step = _runner(make, loss_fn, base_name, fac)
                    for _ in range(3):
                        step()
                    holder["step"] = step
                out[label] = _peak_bytes(run)
            # the tuner's own buffers vs the base's persistent tensors (no activations)
            make, loss_fn = TASKS[task]()
            model = make()
            base = BASES[base_name](model.parameters())
            opt = factory(base, model)

            def closure():
                opt.zero_grad()
                loss = loss_fn(model)
                loss.backward()
                return loss
            opt.step(closure)
            # the bare base after one step, on a twin model: what the base alone keeps
            twin = make()
            bare = BASES[base_name](twin.parameters())
            loss_fn(twin).backward()
            bare.step()
            params = list(model.parameters())
            base_state = _state_bytes(bare)
            persistent = 2 * sum(p.numel() * p.element_size() for p in params) + base_state
            own = _state_bytes(opt, base) - base_state  # wherever the tuner keeps its buffers
            rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name,
                             peak_ratio=out["tuner"] / out["base"], base_peak_mb=out["base"] / 2 ** 20,
                             buffer_ratio=(persistent + own) / persistent))
    return rows

# ------------------------------------------------------------------------------------------ main


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps, fewer sharpness samples")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: time,hvp,memory")
    ap.add_argument("--backend", choices=("torch", "jax", "both"), default="both",
                    help="which backends' step-time rows (the other measurements are torch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # a skipped step is reported in the 'skipped' column
    repeats = args.repeats or (3 if args.quick else 7)
    steps = 5 if args.quick else 15
    skip = set(filter(None, args.skip.split(",")))

    if "time" not in skip:
        rows = measure_step_time(repeats, steps) if args.backend in ("torch", "both") else []
        if args.backend in ("jax", "both"):
            if importlib.util.find_spec("jax") is None:
                print("(no JAX rows: jax is not installed; pip install -e '.[jax]')\n")
            else:
                from benchmarks import overhead_jax  # installed: a real import error propagates

                rows += overhead_jax.measure(repeats, steps)
        print("## Step time ÷ bare base step (median of %d repeats)\n" % repeats)
        print(_table(rows, ["task", "tuner", "oracle", "base", "backend", "ratio", "base_ms", "skipped"]))
        print()
    if "hvp" not in skip:
        h = measure_hvps(samples=4 if args.quick else 10)
        print("## Online sharpness: Hessian-vector products per estimate (CNN, full batch, %d steps)\n" % h["steps"])
        print(_table([h], ["online_per_estimate", "first_estimate", "cold_per_estimate", "ratio",
                           "max_rel_error", "samples", "iters_cap"]))
        print()
    if "memory" not in skip:
        rows = measure_memory()
        print("## Peak memory ÷ base (torch.profiler live tensor bytes over 3 steps)\n")
        print(_table(rows, ["task", "tuner", "oracle", "base", "peak_ratio", "base_peak_mb", "buffer_ratio"]))
        print()


if __name__ == "__main__":
    main()
