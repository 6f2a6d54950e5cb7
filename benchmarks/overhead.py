"""Overhead of the curvopt tuners: ``python -m benchmarks.overhead [--quick] [--repeats N]``.

Three measurements (issue 2 §5), printed as markdown tables:

1. **Step time.** Per-step wall time of each tuner ÷ the bare base optimizer's step (closure + ``base.step()``)
   on a small CNN (pre-activation ResNet, width 16, on a 128-image batch of scikit-learn's 8x8 digits) and a
   small byte-level transformer LM (width 32, 2 blocks, 16 sequences of 32 bytes of ``pydoc_data.topics``).
   Base and tuner blocks of steps are interleaved in one process, torch on one thread; the reported ratio is
   the median over repeats of (median tuner step ÷ median base step). JAX rows are added when
   ``benchmarks.overhead_jax.measure(repeats) -> list[dict]`` (keys task, tuner, oracle, backend, ratio)
   is importable.
2. **Online sharpness.** 100 full-batch steps (256 digits, float64) of CDAT (sigma 2, ema 0.9, GD base) on
   the CNN with the warm-started online estimate at every step (at most 20 products, tol 1e-3); at sampled steps the converged top eigenvalue (Lanczos, tol 1e-7) is the
   reference, and a cold-started power iteration (random start) counts the Hessian-vector products it needs
   to come within 1% of it (capped at 500), as does a cold-started Lanczos run (the online method without
   the warm start; products counted on a grid 2, 4, ..., 200). Reported: online HVPs per estimate, cold
   HVPs per estimate, their ratios, and the worst relative error of the online estimate at the samples.
3. **Peak memory.** The peak of live tensor bytes over three steps, from ``torch.profiler``'s memory
   timeline (CPU; model, optimizer and data created inside the profiled region so every tensor is seen),
   tuner ÷ base; also the tuner's own buffers ÷ the base's persistent tensors (parameters, gradients,
   optimizer state), the bound that holds when activations are negligible.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy, hessian_top_eigenvalue
from torch_backend.sharpness import FiniteDifferenceHVP
from torch_backend.vectors import dot, norm

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
    ("CDAT+sharpness", "fd, every 10", "adam", lambda b, m: CDAT(b, lr_max=1e-2, sharpness_every=10, modules=m)),
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


def _time_block(step, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_step_time(repeats: int, steps: int, tasks=("cnn", "lm")) -> list[dict]:
    rows = []
    for task in tasks:
        make, loss_fn = TASKS[task]()
        for tuner, oracle, base_name, factory in CONFIGS:
            base_step = _runner(make, loss_fn, base_name, None)
            tuned_step = _runner(make, loss_fn, base_name, factory)
            for s in (base_step, tuned_step):  # warm-up
                for _ in range(3):
                    s()
            ratios = []
            for _ in range(repeats):
                tb = _time_block(base_step, steps)
                tt = _time_block(tuned_step, steps)
                ratios.append(tt / tb)
            skipped = tuned_step.optimizer.stats["skipped"]
            rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name, backend="torch",
                             ratio=statistics.median(ratios), base_ms=1e3 * tb, skipped=skipped))
    return rows

# ------------------------------------------------------------------------------------------ sharpness HVPs


def measure_hvps(steps: int = 100, samples: int = 10, batch: int = 256, iters: int = 20) -> dict:
    """In float64, so that finite-difference HVPs (accurate to ~1e-8) do not blur the 1% criterion."""
    from benchmarks.data import load_digits
    from benchmarks.models_torch import build_model

    ds = load_digits()
    x, y = torch.from_numpy(ds.x_train[:batch]).double(), torch.from_numpy(ds.y_train[:batch])
    model = build_model("resnet", ds.input_shape, ds.num_classes, width=16, seed=0).double()

    def loss_fn(m):
        return nn.functional.cross_entropy(m(x), y)
    params = list(model.parameters())
    opt = CDAT(torch.optim.SGD(params, lr=1.0), sigma=2.0, ema=0.9, sharpness_every=1, sharpness_iters=iters,
               sharpness_tol=1e-3, modules=model, lr_max=1.0)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    check = set(np.linspace(1, steps, samples).round().astype(int).tolist())
    online_hvps, cold_hvps, cold_lanczos, errors = [], [], [], []
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        if t in check:
            truth, _ = hessian_top_eigenvalue(closure, params, tol=1e-9, iters=300)
            truth = float(truth)
            cold_hvps.append(_cold_power_hvps(closure, params, truth, gen))
            cold_lanczos.append(_cold_lanczos_hvps(closure, params, truth, gen))
        before = opt.sharpness.hvps
        opt.step(closure)
        online_hvps.append(opt.sharpness.hvps - before)
        if t in check:
            errors.append(abs(float(opt.stats["sharpness"]) - truth) / abs(truth))
    online = statistics.mean(online_hvps[1:])  # the first estimate is itself a cold start
    cold = statistics.mean(cold_hvps)
    return dict(online_per_estimate=online, first_estimate=online_hvps[0], cold_per_estimate=cold,
                ratio=cold / online, cold_lanczos_per_estimate=statistics.mean(cold_lanczos),
                ratio_vs_lanczos=statistics.mean(cold_lanczos) / online, max_rel_error=max(errors), steps=steps, samples=len(cold_hvps),
                total_online=sum(online_hvps), iters_cap=iters)


def _cold_lanczos_hvps(closure, params, truth: float, gen, cap: int = 200) -> int:
    """Products a cold (random-start) Lanczos run needs to come within 1% of ``truth``."""
    from torch_backend.sharpness import lanczos_top

    with torch.no_grad():
        w0 = [p.detach().clone() for p in params]
    closure()
    g0 = [p.grad.detach().clone() for p in params]
    calls = []

    def probe():
        with torch.enable_grad():
            closure()

    hvp = FiniteDifferenceHVP(probe, params, w0, g0)
    v0 = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    found = cap
    with torch.no_grad():
        for k in (2, 4, 6, 8, 10, 15, 20, 30, 40, 60, 80, 120, 160, 200):
            lam, _, used = lanczos_top(hvp, v0, iters=k, tol=0.0, window=k)
            calls.append(used)
            if abs(lam - truth) <= 0.01 * abs(truth):
                found = k
                break
        torch._foreach_copy_(params, w0)
    return found


def _cold_power_hvps(closure, params, truth: float, gen, cap: int = 500) -> int:
    """HVPs a randomly started power iteration needs for |lambda_k - truth| <= 1% truth."""
    with torch.no_grad():
        w0 = [p.detach().clone() for p in params]
    closure()
    g0 = [p.grad.detach().clone() for p in params]

    def probe():
        with torch.enable_grad():
            closure()

    hvp = FiniteDifferenceHVP(probe, params, w0, g0)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    n0 = norm(v)
    v = [t / n0 for t in v]
    k = cap
    with torch.no_grad():
        for i in range(1, cap + 1):
            mv = hvp(v)
            lam = float(dot(v, mv))
            if abs(lam - truth) <= 0.01 * abs(truth):
                k = i
                break
            n = norm(mv)
            v = [t / n for t in mv]
        torch._foreach_copy_(params, w0)
    return k

# ------------------------------------------------------------------------------------------ memory


def _peak_bytes(run: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(axis=1).max())


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
            nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
            params = list(model.parameters())
            persistent = nbytes(params) * 2 + nbytes(
                t for st in base.state.values() for t in st.values() if isinstance(t, torch.Tensor))
            own = nbytes(list(opt._w0.values()) + list(opt._u.values()))
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
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)  # a skipped step is reported in the 'skipped' column
    repeats = args.repeats or (3 if args.quick else 7)
    steps = 5 if args.quick else 15
    skip = set(filter(None, args.skip.split(",")))

    if "time" not in skip:
        rows = measure_step_time(repeats, steps)
        try:
            from benchmarks.overhead_jax import measure as measure_jax  # type: ignore
        except ImportError:
            measure_jax = None
        if measure_jax is not None:
            rows += measure_jax(repeats)
        print("## Step time ÷ bare base step (median of %d repeats)\n" % repeats)
        print(_table(rows, ["task", "tuner", "oracle", "base", "backend", "ratio", "base_ms", "skipped"]))
        print()
    if "hvp" not in skip:
        h = measure_hvps(samples=4 if args.quick else 10)
        print("## Online sharpness: Hessian-vector products per estimate (CNN, full batch, %d steps)\n" % h["steps"])
        print(_table([h], ["online_per_estimate", "first_estimate", "cold_per_estimate", "ratio",
                           "cold_lanczos_per_estimate", "ratio_vs_lanczos", "max_rel_error", "samples", "iters_cap"]))
        print()
    if "memory" not in skip:
        rows = measure_memory()
        print("## Peak memory ÷ base (torch.profiler live tensor bytes over 3 steps)\n")
        print(_table(rows, ["task", "tuner", "oracle", "base", "peak_ratio", "base_peak_mb", "buffer_ratio"]))
        print()


if __name__ == "__main__":
    main()
