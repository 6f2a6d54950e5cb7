"""Overhead of the curvopt tuners: ``python -m benchmarks.overhead [--quick] [--repeats N] [--backend B]
[--clock wall|cpu] [--baseline REV]``.

Three measurements, printed as markdown tables:

1. **Step time.** Per-step wall time of each tuner ÷ the bare base optimizer's step (closure + ``base.step()``)
   on a small CNN (pre-activation ResNet, width 16, on a 128-image batch of scikit-learn's 8x8 digits) and a
   small byte-level transformer LM (width 32, 2 blocks, 16 sequences of 32 bytes of ``pydoc_data.topics``);
   ``--tasks cnn-wide,lm-wide`` (torch only) times wider ones (:data:`TASKS`).
   Base and tuner blocks of steps are interleaved in one process (:mod:`benchmarks.timing`, shared with the
   JAX rows of :mod:`benchmarks.overhead_jax`), torch on one thread; the reported ratio is the median over
   repeats of (median tuner step ÷ median base step). The rows "no closure" time the closure-free step
   (``loss.backward(); opt.step()``, secant curvature; behind Adam with the secant's noise correction, on by default
   there, and once more without it: ``noise_correction=False``) against the same bare step. The rows "fd floor" time
   ``closure(); closure(); base.step()`` — what the fd oracle's step (one extra closure call) would cost if
   the tuner's own work took no time — against the same bare step: an fd row's ratio minus its floor is the
   tuner's own work in units of the bare step, and no fd step can go below its floor. The rows "closure-free floor" time
   a closure and ``base.step()`` wrapped in the vector work every closure-free CDAT step must do (``_least_secant_work``:
   the snapshot, the direction, three inner products, the write-back, the secant's memory) with none of the
   tuner's logic: no closure-free step can go below it. ``--clock cpu`` times
   the thread's CPU time instead of wall time (steadier on a shared machine).

   ``--baseline REV`` (torch rows only) measures a git revision and the working tree **in the same run**: the
   revision is checked out with ``git worktree`` into a temporary directory, and two worker processes — one
   importing the library (``curvopt``, ``torch_backend``) from that checkout, one from the working tree, both
   running this file's tasks and configurations — time interleaved blocks (base, tuner of one, base, tuner of
   the other, alternating which goes first), one worker at a time. Both ratio columns are printed.
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

from benchmarks.__main__ import _csv, _int_at_least, _one_of
from benchmarks.hessian import hvp_operator, top_eigenvalue
from benchmarks.timing import step_time_ratio
from curvopt.config import SharpnessConfig
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

# ------------------------------------------------------------------------------------------ tasks


def _cnn_task(batch: int = 128, width: int = 16):
    from benchmarks.data import load_digits
    from benchmarks.models_torch import build_model

    ds = load_digits()
    x = torch.from_numpy(ds.x_train[:batch])
    y = torch.from_numpy(ds.y_train[:batch])

    def make():
        return build_model("resnet", ds.input_shape, ds.num_classes, width=width, seed=0)

    def loss_fn(model):
        return nn.functional.cross_entropy(model(x), y)
    return make, loss_fn


def _lm_task(batch: int = 16, block: int = 32, width: int = 32, depth: int = 2):
    from benchmarks.data import lm_blocks, load_text_bytes
    from benchmarks.models_torch import build_model

    xs, ys = lm_blocks(load_text_bytes(), block, max_blocks=batch)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)

    def make():
        return build_model("lm", (block,), 256, width=width, seed=0, depth=depth, heads=2)

    def loss_fn(model):
        logits = model(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return make, loss_fn


#: ``cnn`` and ``lm`` (the default) are the benchmark's models; the wide ones (``--tasks cnn-wide,lm-wide``, torch
#: only) show how the tuner's own work scales with the parameter count: CNN width 64 (0.31M parameters), LM width
#: 128 with 4 blocks (0.60M), against 20k / 35k for the default pair; ``lm-wide-b64`` is the wide LM on 64 sequences
#: a step instead of 16 (the tuner's share falls with the work per parameter of a forward and backward pass)
TASKS = {"cnn": _cnn_task, "lm": _lm_task, "cnn-wide": lambda: _cnn_task(width=64),
         "lm-wide": lambda: _lm_task(width=128, depth=4), "lm-wide-b64": lambda: _lm_task(64, width=128, depth=4)}
TORCH_ONLY_TASKS = ("cnn-wide", "lm-wide", "lm-wide-b64")

# (tuner, oracle, base label, factory(base, model))
BASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1.0),
    "sgd+momentum": lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9),
}
#: the oracle column of the closure-free rows: ``loss.backward(); opt.step()`` (secant curvature, no probes)
NO_CLOSURE = "secant, no closure"
#: the oracle column of the floor rows: ``closure(); closure(); base.step()``, an fd step without the tuner's work
FD_FLOOR = "2 closures + base.step()"
#: the oracle column of the closure-free floor rows: a closure, ``base.step()`` and :func:`_least_secant_work`
CF_FLOOR = "1 closure + base.step() + the secant's vector work"
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
    ("CDAT", NO_CLOSURE, "adam", lambda b, m: CDAT(b, lr_max=1e-2, modules=m)),
    ("CDAT", NO_CLOSURE, "sgd+momentum", lambda b, m: CDAT(b, lr_max=0.05, modules=m)),
    ("fd floor", FD_FLOOR, "adam", None),
    ("fd floor", FD_FLOOR, "sgd+momentum", None),
    ("CDAT, noise_correction=False", NO_CLOSURE, "adam",
     lambda b, m: CDAT(b, lr_max=1e-2, modules=m, noise_correction=False)),
    ("closure-free floor", CF_FLOOR, "adam", None),
    ("closure-free floor", CF_FLOOR, "sgd+momentum", None),
]

# ------------------------------------------------------------------------------------------ timing


def _least_secant_work(params: list, base, memory: dict, lr: float = 1.0) -> None:
    """``base.step()`` wrapped in the vector work any closure-free CDAT step does around it, with none of the
    tuner's logic (the closure-free floor rows): keep ``w0``, step the base, ``u = w - w0``, the inner products
    ``g^T u``, ``g^T u_prev`` and ``u^T u`` read to the host at once, ``w = w0 + lr u``, and ``u`` kept for the
    next step's secant (its ``g_prev^T u_prev`` is this step's ``g^T u``, so no gradient is kept). Flat
    concatenations, one pass each: about ten passes over the parameters and one host read (``lr = 1`` keeps the
    base's trajectory)."""
    flat = [p.detach().reshape(-1) for p in params]
    w0 = torch.cat(flat)
    base.step()
    g = torch.cat([p.grad.reshape(-1) for p in params])
    u = torch.cat(flat) - w0
    dots = torch.stack([g @ u, g @ memory.get("u", u), u @ u]).tolist()
    moved = torch.split(w0 + lr * u, [p.numel() for p in params])
    torch._foreach_copy_(flat, list(moved))
    memory.update(u=u, dots=dots)


def _runner(make, loss_fn, base_name, factory, closure_free=False, calls=1, floor=False):
    """One step of the bare base (``factory`` None: ``calls`` closure calls, then ``base.step()``; with ``floor``
    one closure call and :func:`_least_secant_work`) or of the tuner ``factory(base, model)``
    (``opt.step(closure)``, or ``closure(); opt.step()`` if ``closure_free``)."""
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
        params, memory = list(model.parameters()), {}

        def step():
            for _ in range(calls):
                closure()
            if floor:
                _least_secant_work(params, base, memory)
            else:
                base.step()
    elif closure_free:
        def step():
            closure()
            opt.step()
    else:
        def step():
            opt.step(closure)
    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def _steps(task: str, config: int):
    """The bare and the tuned step of ``CONFIGS[config]`` on ``task``."""
    make, loss_fn = TASKS[task]()
    _, oracle, base_name, factory = CONFIGS[config]
    return (_runner(make, loss_fn, base_name, None),
            _runner(make, loss_fn, base_name, factory, closure_free=oracle == NO_CLOSURE,
                    calls=2 if oracle == FD_FLOOR else 1, floor=oracle == CF_FLOOR))


def _skipped(step) -> int:
    """Steps the tuner of ``step`` skipped (0 for a floor row's bare base)."""
    stats = getattr(step.optimizer, "stats", None)
    return 0 if stats is None else int(float(stats["skipped"]))


def measure_step_time(repeats: int, steps: int, tasks=("cnn", "lm"), clock: str = "wall",
                      configs=None) -> list[dict]:
    rows = []
    for task in tasks:
        for i, (tuner, oracle, base_name, _) in enumerate(CONFIGS):
            if configs is not None and i not in configs:
                continue
            base_step, tuned_step = _steps(task, i)
            ratio, tb = step_time_ratio(base_step, tuned_step, repeats=repeats, steps=steps, clock=clock)
            skipped = _skipped(tuned_step)
            rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name, backend="torch",
                             ratio=ratio, base_ms=1e3 * tb, skipped=skipped))
    return rows

# ------------------------------------------------------------------------------------------ baseline vs working tree


#: a worker's first lines: the library's top-level packages imported from LIB (their submodules follow them),
#: then this module from HERE
_WORKER_BOOT = ("import sys; sys.path.insert(0, {lib!r}); import curvopt.torch, torch_backend; sys.path.remove({lib!r}); "
                "sys.path.insert(0, {here!r}); from benchmarks.overhead import _worker; _worker({lib!r})")


def _worker(lib: str) -> None:
    """The loop of a ``--baseline`` worker process (started by :data:`_WORKER_BOOT`; JSON lines on
    stdin/stdout): the library comes from ``lib`` (a checkout of the baseline revision, or the working tree),
    this module and its tasks from the working tree. Commands: ``setup`` (task, config), ``block`` (which, n,
    clock), ``skipped``, ``quit``."""
    import json
    import os
    import sys

    import curvopt
    import torch_backend

    for mod in (curvopt, torch_backend):
        if not os.path.abspath(mod.__file__).startswith(os.path.abspath(lib) + os.sep):
            raise RuntimeError(f"{mod.__name__} was imported from {mod.__file__}, not from {lib}")
    overhead = sys.modules[__name__]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    steps = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the protocol stream
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "setup":
            steps["base"], steps["tuned"] = overhead._steps(cmd["task"], cmd["config"])
            for s in (steps["base"], steps["tuned"]):
                for _ in range(3):
                    s()
            reply: dict = {}
        elif op == "block":
            from benchmarks.timing import time_block
            reply = {"t": time_block(steps[cmd["which"]], cmd["n"], cmd["clock"])}
        elif op == "skipped":
            reply = {"skipped": _skipped(steps["tuned"])}
        else:
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    def __init__(self, lib: str, here: str) -> None:
        import os
        import subprocess
        import sys

        code = _WORKER_BOOT.format(lib=lib, here=here)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=here, env=env)

    def ask(self, **cmd) -> dict:
        import json

        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (code {self.proc.wait()}) on {cmd}")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=60)


def _git(args: list[str], cwd: str) -> str:
    """``git ARGS`` run in ``cwd``, its output stripped; a RuntimeError with git's own message if it fails."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"cannot run git: {e}") from None
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout.strip()


def resolve_revision(baseline: str) -> tuple[str, str]:
    """The top of the git work tree holding this file and the commit ``baseline`` names there (abbreviated);
    a RuntimeError with git's message if there is no such tree or commit."""
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = _git(["rev-parse", "--show-toplevel"], here)
    return root, _git(["rev-parse", "--verify", "--short", "--end-of-options", f"{baseline}^{{commit}}"], root)


def measure_against(baseline: str, repeats: int, steps: int, tasks=("cnn", "lm"), clock: str = "wall",
                    configs=None) -> list[dict]:
    """Step-time ratios of the revision ``baseline`` and of the working tree, measured in one run (see the
    module docstring): rows with ``ratio_baseline``, ``ratio`` (working tree) and their ``base_ms``."""
    import os
    import shutil
    import subprocess
    import tempfile

    root, rev = resolve_revision(baseline)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="curvopt-baseline-")
    tree = os.path.join(tmp, "tree")
    workers: dict[str, _Worker] = {}
    rows = []
    try:
        _git(["worktree", "add", "--detach", tree, rev], root)
        workers = {"baseline": _Worker(tree, here), "current": _Worker(here, here)}
        names = list(workers)
        for task in tasks:
            for i, (tuner, oracle, base_name, _) in enumerate(CONFIGS):
                if configs is not None and i not in configs:
                    continue
                for w in workers.values():
                    w.ask(op="setup", task=task, config=i)
                ratios: dict[str, list[float]] = {n: [] for n in names}
                base_s: dict[str, float] = {}
                for r in range(repeats):
                    for n in (names if r % 2 == 0 else names[::-1]):
                        tb = workers[n].ask(op="block", which="base", n=steps, clock=clock)["t"]
                        tt = workers[n].ask(op="block", which="tuned", n=steps, clock=clock)["t"]
                        ratios[n].append(tt / tb)
                        base_s[n] = tb
                skipped = sum(w.ask(op="skipped")["skipped"] for w in workers.values())
                rows.append(dict(task=task, tuner=tuner, oracle=oracle, base=base_name, backend="torch",
                                 ratio_baseline=statistics.median(ratios["baseline"]),
                                 ratio=statistics.median(ratios["current"]),
                                 base_ms_baseline=1e3 * base_s["baseline"], base_ms=1e3 * base_s["current"],
                                 skipped=skipped, baseline=rev))
    finally:
        for w in workers.values():
            w.close()
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=root, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Bytes of the distinct storages the optimizers' ``state`` tensors live in (a tuner's per-parameter
    buffers may be views of one flat buffer: each storage counts once, whole)."""
    seen, total = set(), 0
    for opt in optimizers:
        for t in _tensors(dict(opt.state)):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
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


def _row_of_configs(v: int) -> bool:
    return 0 <= v < len(CONFIGS)


_row_of_configs.__doc__ = f"a row number of CONFIGS, 0 to {len(CONFIGS) - 1}"
#: the measurements ``--skip`` can leave out
PARTS = ("time", "hvp", "memory")


def build_parser() -> argparse.ArgumentParser:
    """The command line, every value checked as it is parsed (a bad one: a usage error, exit status 2)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps, fewer sharpness samples")
    ap.add_argument("--repeats", type=_int_at_least(1), default=None,
                    help="timed repeats (>= 1; default 7, 3 with --quick)")
    ap.add_argument("--skip", type=_csv(str, "part", _one_of(PARTS)), default=(),
                    help=f"comma-separated parts to skip, of {','.join(PARTS)}")
    ap.add_argument("--backend", choices=("torch", "jax", "both"), default="both",
                    help="which backends' step-time rows (the other measurements are torch)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by wall time (default) or by the thread's CPU time (steadier when shared)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also time the git revision REV, interleaved with the working tree in this run (torch "
                         "step-time rows only; implies --backend torch --skip hvp,memory)")
    ap.add_argument("--tasks", type=_csv(str, "task", _one_of(tuple(TASKS))), default=("cnn", "lm"),
                    help="comma-separated step-time tasks (cnn,lm: both backends; cnn-wide,lm-wide,lm-wide-b64: "
                         "torch only)")
    ap.add_argument("--configs", type=_csv(int, "config row", _row_of_configs), default=None,
                    help="comma-separated row numbers of this module's CONFIGS, the torch rows, to time (default "
                         "all; 0 = CDAT fd Adam); the JAX rows (benchmarks.overhead_jax.CONFIGS) all run")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.baseline is not None:
        try:
            resolve_revision(args.baseline)
        except RuntimeError as e:
            ap.error(f"--baseline {args.baseline!r}: {e}")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # a skipped step is reported in the 'skipped' column
    repeats = args.repeats or (3 if args.quick else 7)
    steps = 5 if args.quick else 15
    skip, tasks = set(args.skip), args.tasks
    configs = None if args.configs is None else set(args.configs)

    if args.baseline is not None:
        rows = measure_against(args.baseline, repeats, steps, tasks, args.clock, configs)
        print("## Step time ÷ bare base step, %s vs working tree, one run (%s clock, median of %d repeats)\n"
              % (rows[0]["baseline"] if rows else args.baseline, args.clock, repeats))
        print(_table(rows, ["task", "tuner", "oracle", "base", "ratio_baseline", "ratio", "base_ms_baseline",
                            "base_ms", "skipped"]))
        print()
        return

    if "time" not in skip:
        rows = []
        if args.backend in ("torch", "both"):
            rows = measure_step_time(repeats, steps, tasks, args.clock, configs)
        if args.backend in ("jax", "both"):
            if importlib.util.find_spec("jax") is None:
                print("(no JAX rows: jax is not installed; pip install -e '.[jax]')\n")
            else:
                from benchmarks import overhead_jax  # installed: a real import error propagates

                rows += overhead_jax.measure(repeats, steps, tuple(t for t in tasks if t not in TORCH_ONLY_TASKS))
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
