"""Closure-free CDAT (``loss.backward(); opt.step()``, the secant of consecutive gradients) against CDAT with a
closure (the ``fd`` oracle): ``python -m benchmarks.closure_free [small|suite|widths|clip|dtype|probe|baseline]
[--seeds 0,1,2] [--steps 200] [--batches 32,128,512] [--tasks vit,lm]`` (docs/minibatch_study.md, section 10).

``baseline``: closure-free CDAT behind AdamW on a GRU character LM over ``--steps`` (2,000 in the study), and every
``--every`` steps the curvature along the last step and along the last ``--every`` steps' displacement, each from the
batch gradients' secant and from a central difference on fixed windows: can a secant over a longer baseline read a
curvature the one-step secant's noise hides (docs/minibatch_study.md, section 18)?

``probe``: the closure-free default (behind Adam, noise correction on; the suite's cells as they run it) with a
larger probing step than :func:`curvopt.config.secant_probe_eps` gives (sized by at least ``2^-16``, ``2^-12``,
``2^-8`` instead of float32's ``2^-23``; patched here), on the ``small`` field test's models and batches and on the
``suite`` cells: does a longer first step, whose secant the batch noise swamps less, train mini-batch runs
better without hurting full batch (docs/minibatch_study.md, section 10)?

``dtype``: the ``small`` field test's closure-free default (behind Adam, noise correction on) in float32 and in
float64, and in float64 with the probing step sized by float64's own epsilon (the library before
:func:`curvopt.config.secant_probe_eps`; patched here), against CDAT with a closure (``fd``) in float64
(docs/precision.md).

``clip``: a global-norm clip under CDAT behind plain SGD (PyTorch's ``max_grad_norm``; Optax's
``optax.clip_by_global_norm`` inside ``optax.identity()``) and behind AdamW (PyTorch), on a tanh MLP (6 -> 16 -> 2,
64 Gaussian examples, batches of 16 drawn with replacement, 300 steps; ``--steps`` and ``--batches`` not used):
final train loss on the 64 examples per seed, per clip (none, 3, 1, 0.3, 0.01), closure-free, with a closure
(``fd``) and closure-free with ``noise_correction=True`` (docs/pytorch.md, "Clipping"; docs/limits.md).

``widths``: the closure-free default (the noise correction on behind Adam, off behind gradient descent) against
CDAT with a closure (``fd``) on the default suite's full-batch cells of ``--tasks`` (``vit,lm``) at every width the
suite runs them at, judged as the benchmark's report judges (:data:`benchmarks.best_constant.FITTED`): per seed the
train-loss ratio to ``fd`` and the eval-loss ratio, the verdict on the eval loss where ``fd``'s median train loss
shows the training set fitted (docs/minibatch_study.md, section 10).

``suite``: the default suite's own cells (:func:`benchmarks.minibatch_study.run_variant`: the middle width, the
suite's data, batch and 500 steps), mini-batch LM and ResNet, full-batch LM, ResNet and ViT; per seed the final
train loss (the suite's definition), the eval loss and the ratio to ``fd`` of the closure-free step without the
secant's noise correction (``noise_correction=False``), of the same with it (``True``: the default behind Adam,
opt-in behind SGD) and of a research variant, ``weighted`` (not a library setting): the noise correction's averaging without its subtraction
(:func:`curvopt.curvature.secant_noise_corrected` with ``floor=1``), i.e. the secant's numerator and its scale
``lr ||u||^2`` averaged before dividing, so that a step counts in proportion to its length (the probing step
barely does).

``small`` (default): a field test of the secant's noise collapse on small models. Two small models trained with
Adam on 512 examples: the benchmark's MLP (width 64) on scikit-learn's digits, and a GELU MLP on a 3-class
Gaussian problem; per batch size and seed, ``--steps`` updates on reshuffled mini-batches (512: full batch). Compared: CDAT
closure-free (``loss.backward(); opt.step()``: the secant of consecutive gradients) without the noise correction
(``noise_correction=False``), the same with it (the default behind Adam), the research variant ``weighted`` (below), CDAT with a closure (the ``fd`` oracle on
each batch) and Adam at constant rates
(factor 2, 1e-3 ... 3.2e-2). Printed: final train loss on the 512 examples, eval loss on held-out examples, and
CDAT's last rate, per seed; for the constants, the best of the grid by median train loss.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import warnings

import numpy as np
import torch
import torch.nn.functional as F

CONSTANTS = tuple(1e-3 * 2 ** k for k in range(6))
N_TRAIN = 512


def _digits():
    from benchmarks.data import load_digits
    from benchmarks.models_torch import build_model

    ds = load_digits()
    x, y = torch.from_numpy(ds.x_train[:N_TRAIN]), torch.from_numpy(ds.y_train[:N_TRAIN])
    xe, ye = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    return x, y, xe, ye, lambda seed: build_model("mlp", ds.input_shape, ds.num_classes, width=64, seed=seed)


def _gaussian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * N_TRAIN, 20, generator=gen)
    y = (x @ torch.randn(20, 3, generator=gen)).argmax(1)

    def make(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], make


TASKS = {"digits MLP": _digits, "Gaussian GELU MLP": _gaussian}


def run(task, variant: str, batch: int, seed: int, steps: int, dtype: torch.dtype = torch.float32
        ) -> tuple[float, float, float]:
    """``(final train loss, eval loss, last rate)`` of one run in ``dtype``; ``variant``: ``secant``,
    ``secant+nc``, ``fd`` or a constant rate."""
    from curvopt.torch import CDAT

    x, y, xe, ye, make = task
    x, xe = x.to(dtype), xe.to(dtype)
    model = make(seed).to(dtype)
    if isinstance(variant, float):
        opt = torch.optim.Adam(model.parameters(), lr=variant)
    else:
        opt = CDAT(torch.optim.Adam(model.parameters(), lr=1.0), noise_correction=variant == "secant+nc")
    order = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < steps:
        perm = torch.randperm(len(x), generator=order)
        batches += [perm[i:i + batch] for i in range(0, len(x), batch)]
    for idx in batches[:steps]:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss
        if variant == "fd":
            opt.step(closure)
        else:
            closure()
            opt.step()
    with torch.no_grad():
        train, test = float(F.cross_entropy(model(x), y)), float(F.cross_entropy(model(xe), ye))
    return train, test, variant if isinstance(variant, float) else float(opt.stats["lr"])


CLIPS = (None, 3.0, 1.0, 0.3, 0.01)
CLIP_STEPS, CLIP_BATCH = 300, 16


def _clip_problem():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(64, 6, generator=gen), torch.randn(64, 2, generator=gen)


def _clip_init(seed: int) -> list:
    torch.manual_seed(seed)
    return [torch.randn(6, 16) * 0.5, torch.randn(16, 2) * 0.5]


def clip_torch(base: str, max_grad_norm, seed: int, closure: bool = False, **kw) -> float:
    """Final train loss of CDAT behind ``torch.optim.SGD`` (``base="sgd"``) or ``AdamW`` with ``max_grad_norm``."""
    from curvopt.torch import CDAT

    x, y = _clip_problem()
    w1, w2 = (w.requires_grad_() for w in _clip_init(seed))
    make = torch.optim.SGD if base == "sgd" else torch.optim.AdamW
    opt = CDAT(make([w1, w2], lr=1.0), max_grad_norm=max_grad_norm, **kw)
    rows = torch.from_numpy(np.random.default_rng(seed).integers(0, 64, (CLIP_STEPS, CLIP_BATCH)))

    def loss_of(idx):
        return ((torch.tanh(x[idx] @ w1) @ w2 - y[idx]) ** 2).mean()
    for idx in rows:
        def step_closure():
            opt.zero_grad()
            loss = loss_of(idx)
            loss.backward()
            return loss
        if closure:
            opt.step(step_closure)
        else:
            step_closure()
            opt.step()
    with torch.no_grad():
        return float(loss_of(torch.arange(64)))


def clip_optax(max_norm, seed: int) -> float:
    """The same closure-free behind ``optax.chain(optax.clip_by_global_norm(max_norm), optax.identity())``."""
    import jax
    import jax.numpy as jnp
    import optax

    from curvopt.optax import cdat

    x, y = (jnp.asarray(a.numpy()) for a in _clip_problem())
    params = [jnp.asarray(w.numpy()) for w in _clip_init(seed)]
    tx = cdat(optax.chain(*(() if max_norm is None else (optax.clip_by_global_norm(max_norm),)), optax.identity()))

    def loss_of(p, idx):
        return jnp.mean((jnp.tanh(x[idx] @ p[0]) @ p[1] - y[idx]) ** 2)

    @jax.jit
    def step(p, state, idx):
        updates, state = tx.update(jax.grad(loss_of)(p, idx), state, p)
        return optax.apply_updates(p, updates), state
    state = tx.init(params)
    for idx in np.random.default_rng(seed).integers(0, 64, (CLIP_STEPS, CLIP_BATCH)):
        params, state = step(params, state, jnp.asarray(idx))
    return float(loss_of(params, jnp.arange(64)))


def clip_table(seeds: list[int]) -> None:
    runs = {"PyTorch, SGD, closure-free": lambda c, s: clip_torch("sgd", c, s),
            "PyTorch, SGD, closure (fd)": lambda c, s: clip_torch("sgd", c, s, closure=True),
            "PyTorch, SGD, closure-free, noise_correction=True": lambda c, s: clip_torch("sgd", c, s,
                                                                                          noise_correction=True),
            "PyTorch, AdamW, closure-free": lambda c, s: clip_torch("adamw", c, s),
            "Optax, identity(), closure-free": clip_optax}
    print("| run | " + " | ".join("no clip" if c is None else f"clip {c:g}" for c in CLIPS) + " |")
    print("|---|" + "---|" * len(CLIPS))
    for label, fn in runs.items():
        cells = [" / ".join(f"{fn(c, s):.3g}" for s in seeds) for c in CLIPS]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


SUITE_CELLS = (("lm", "mini"), ("resnet", "mini"), ("lm", "full"), ("resnet", "full"), ("vit", "full"))


@contextlib.contextmanager
def _probe_sized_by(size):
    """The closure-free probing step sized by the epsilon ``size(eps, xp)`` instead of
    :func:`curvopt.config.secant_probe_eps` (PyTorch)."""
    import torch_backend.tuner as tuner_mod
    from curvopt.config import secant_probe_eps

    tuner_mod.secant_probe_eps = size
    try:
        yield
    finally:
        tuner_mod.secant_probe_eps = secant_probe_eps


PROBE_EPS_LOG2 = (-23, -16, -12, -8)  # float32's epsilon (the library's floor), then larger probing steps


def probe_table(seeds: list[int], steps: int, batches: list[int]) -> None:
    from benchmarks.minibatch_study import run_variant

    print("| task | batch | probe sized by at least | train loss per seed | eval loss per seed | last rate per seed |")
    print("|---|---|---|---|---|---|")
    for name, make_task in TASKS.items():
        task = make_task()
        for batch in batches:
            for k in PROBE_EPS_LOG2:
                with _probe_sized_by(lambda eps, xp, k=k: xp.maximum(eps, 2.0 ** k)):
                    rs = [run(task, "secant+nc", batch, s, steps) for s in seeds]
                cols = [" / ".join(f"{r[i]:.3g}" for r in rs) for i in range(3)]
                print(f"| {name} | {batch} | 2^{k} | " + " | ".join(cols) + " |", flush=True)
    for task, regime in SUITE_CELLS:
        for k in PROBE_EPS_LOG2:
            with _probe_sized_by(lambda eps, xp, k=k: xp.maximum(eps, 2.0 ** k)):
                rs = [run_variant(task, regime, s, "secant+nc") for s in seeds]
            print(f"| {task} {regime} (suite) | | 2^{k} | " + " / ".join(f"{r['final']:.4g}" for r in rs) + " | "
                  + " / ".join(f"{r['eval_loss']:.3g}" for r in rs) + " | |", flush=True)


def dtype_table(seeds: list[int], steps: int, batches: list[int]) -> None:
    print("| task | batch | run | train loss per seed | eval loss per seed | last rate per seed |")
    print("|---|---|---|---|---|---|")
    f64 = torch.float64
    for name, make_task in TASKS.items():
        task = make_task()
        for batch in batches:
            rows = {"closure-free, float32": [run(task, "secant+nc", batch, s, steps) for s in seeds],
                    "closure-free, float64": [run(task, "secant+nc", batch, s, steps, f64) for s in seeds]}
            with _probe_sized_by(lambda eps, xp: eps):
                rows["closure-free, float64, float64-sized probe (before)"] = [
                    run(task, "secant+nc", batch, s, steps, f64) for s in seeds]
            rows["closure (fd), float64"] = [run(task, "fd", batch, s, steps, f64) for s in seeds]
            for label, rs in rows.items():
                cols = [" / ".join(f"{r[k]:.3g}" for r in rs) for k in range(3)]
                print(f"| {name} | {batch} | {label} | " + " | ".join(cols) + " |", flush=True)


@contextlib.contextmanager
def _weighted_only():
    """The noise correction's averaging without its subtraction (the research variant ``weighted``)."""
    import torch_backend.tuner as tuner_mod
    from curvopt.curvature import secant_noise_corrected

    tuner_mod.secant_noise_corrected = functools.partial(secant_noise_corrected, floor=1.0)
    try:
        yield
    finally:
        tuner_mod.secant_noise_corrected = secant_noise_corrected


def widths_table(seeds: list[int], tasks: list[str]) -> None:
    from benchmarks import suites, tasks as tasks_mod
    from benchmarks.best_constant import FITTED
    from benchmarks.minibatch_study import experiment, run_variant

    print("| cell | width | `fd`: train loss per seed | closure-free ÷ `fd`: train loss | eval loss | judged on |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        exp = experiment(task, "full")
        variant = "secant+nc" if (exp.base or tasks_mod.TASKS[task].base) == "adam" else "secant"
        widths = sorted({w for e in suites.DEFAULT.experiments if (e.task, e.regime, e.backends, e.params) ==
                         (task, "full", ("torch",), ("sp",)) for w in e.widths})
        for w in widths:
            fd = [run_variant(task, "full", s, "fd", width=w) for s in seeds]
            free = [run_variant(task, "full", s, variant, width=w) for s in seeds]
            fitted = statistics.median(r["final"] for r in fd) < FITTED
            train = " / ".join(f"{a['final'] / b['final']:.3g}" for a, b in zip(free, fd))
            evals = " / ".join(f"{a['eval_loss'] / b['eval_loss']:.3g}" for a, b in zip(free, fd))
            print(f"| {task} full | {w} | " + " / ".join(f"{r['final']:.3g}" for r in fd) + f" | {train} | {evals} | "
                  + ("eval loss (fitted)" if fitted else "train loss") + " |", flush=True)


def suite(seeds: list[int]) -> None:
    from benchmarks.minibatch_study import run_variant

    names = ("noise_correction=False", "noise_correction=True (Adam's default)", "weighted (research)")
    print("| cell | `fd`: train loss per seed | " + " | ".join(f"{n}: train loss ÷ `fd`'s" for n in names)
          + " | eval loss: " + ", ".join(names + ("`fd`",)) + " |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for task, regime in SUITE_CELLS:
        runs = {v: [run_variant(task, regime, s, v) for s in seeds] for v in ("fd", "secant", "secant+nc")}
        with _weighted_only():
            runs["weighted"] = [run_variant(task, regime, s, "secant+nc") for s in seeds]
        fd = runs["fd"]
        cols = [" / ".join(f"{a['final'] / b['final']:.3g}" for a, b in zip(runs[v], fd))
                for v in ("secant", "secant+nc", "weighted")]
        evals = " / ".join(", ".join(f"{runs[v][i]['eval_loss']:.3g}" for v in ("secant", "secant+nc", "weighted", "fd"))
                           for i in range(len(seeds)))
        print(f"| {task} {regime} | " + " / ".join(f"{r['final']:.4g}" for r in fd) + " | " + " | ".join(cols)
              + f" | {evals} |", flush=True)


class _GRULM(torch.nn.Module):
    """The long-run field test's character LM (docs/limits.md): embedding 32, one GRU layer of 64, a linear head."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed, self.gru, self.head = torch.nn.Embedding(vocab, 32), torch.nn.GRU(32, 64, batch_first=True), \
            torch.nn.Linear(64, vocab)

    def forward(self, x):
        return self.head(self.gru(self.embed(x))[0])


def baseline_run(seed: int, steps: int, every: int, window: int = 32, batch: int = 32) -> tuple[list, list]:
    """Closure-free CDAT behind AdamW (rate 1) on the GRU LM (the bytes of ``pydoc_data.topics`` as symbols, batches
    of 32 windows of 32 from the first 90 %), and every ``every`` steps the Rayleigh quotient ``d^T H d / ||d||^2``
    along two displacements: the last step's and the last ``every`` steps' (a secant over a longer baseline).
    Each is read twice: the secant of the batch gradients at its two ends (what a closure-free rule can see) and a
    central difference of the gradient on 1,024 fixed training windows (the curvature it should see). Returns
    ``(rows, rates)``: per reading ``(step, lr, (secant, fd) along the last step, (secant, fd) along the last
    every steps)`` and the rate of every step; the readings leave the run as it would be without them."""
    from torch.nn.utils import parameters_to_vector as to_vec

    from benchmarks.data import load_text_bytes
    from curvopt.torch import CDAT

    symbols, text = np.unique(np.frombuffer(load_text_bytes(), dtype=np.uint8), return_inverse=True)
    text = torch.as_tensor(text[: int(0.9 * len(text))], dtype=torch.long)

    def windows(n, gen):
        start = torch.randint(0, len(text) - window - 1, (n,), generator=gen)
        rows = torch.stack([text[i:i + window + 1] for i in start])
        return rows[:, :-1], rows[:, 1:]

    torch.manual_seed(seed)
    model = _GRULM(len(symbols))
    params = list(model.parameters())
    opt = CDAT(torch.optim.AdamW(params, lr=1.0))
    fixed, gen = windows(1024, torch.Generator().manual_seed(7)), torch.Generator().manual_seed(1000 + seed)

    def grad_at(w, x, y):
        with torch.no_grad():  # copied in: torch's vector_to_parameters would make the parameters views of w
            for p, v in zip(params, w.split([p.numel() for p in params])):
                p.copy_(v.view_as(p))
        model.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        return to_vec([p.grad for p in params])

    def rayleigh(w, g, w_then, g_then):
        d = w - w_then
        u, h = d / d.norm(), 1e-3 * float(w.norm())
        fd = float((grad_at(w + h * u, *fixed) - grad_at(w - h * u, *fixed)) @ u) / (2 * h)
        return float((g - g_then) @ d) / float(d @ d), fd

    rows, rates, last, start = [], [], None, None
    for t in range(steps):
        x, y = windows(batch, gen)
        w = to_vec(params).detach().clone()
        g = grad_at(w, x, y)
        if t % every == 0 and t > 0:
            rows.append((t, float(opt.stats["lr"]), rayleigh(w, g, *last), rayleigh(w, g, *start)))
            grad_at(w, x, y)  # the parameters and the batch gradient back for the step
        if t % every == 0:
            start = (w, g)
        last = (w, g)
        opt.step()
        rates.append(float(opt.stats["lr"]))
    return rows, rates


def baseline_trace(seeds: list[int], steps: int, every: int) -> None:
    """:func:`baseline_run`'s readings per seed, as a table."""
    print("| seed | step | lr | last step: secant / fd | last %d steps: secant / fd |" % every)
    print("|---|---|---|---|---|")
    for seed in seeds:
        for t, lr, short, long in baseline_run(seed, steps, every)[0]:
            print(f"| {seed} | {t} | {lr:.3g} | {short[0]:.3g} / {short[1]:.3g} | {long[0]:.3g} / {long[1]:.3g} |",
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", nargs="?", default="small",
                    choices=("small", "suite", "widths", "clip", "dtype", "probe", "baseline"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=200,
                    help="steps per run of small, dtype, probe and baseline (suite and clip run their own horizons)")
    ap.add_argument("--batches", default="32,128,512", help="batch sizes of small, dtype and probe")
    ap.add_argument("--every", type=int, default=100, help="baseline: the longer secant's span, in steps")
    ap.add_argument("--tasks", default="vit,lm", help="widths: the full-batch cells to run")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the closure-free stall warning fires in the collapsing runs; the table shows it
    if args.part == "suite":
        suite(seeds)
        return
    if args.part == "widths":
        widths_table(seeds, args.tasks.split(","))
        return
    if args.part == "baseline":
        baseline_trace(seeds, args.steps, args.every)
        return
    if args.part == "clip":
        clip_table(seeds)
        return
    if args.part in ("dtype", "probe"):
        table = dtype_table if args.part == "dtype" else probe_table
        table(seeds, args.steps, [int(b) for b in args.batches.split(",")])
        return
    print("| task | batch | run | train loss per seed | eval loss per seed | last rate per seed |")
    print("|---|---|---|---|---|---|")
    for name, make_task in TASKS.items():
        task = make_task()
        for batch in (int(b) for b in args.batches.split(",")):
            rows = {v: [run(task, v, batch, s, args.steps) for s in seeds] for v in ("secant", "secant+nc", "fd")}
            with _weighted_only():
                rows["weighted (research)"] = [run(task, "secant+nc", batch, s, args.steps) for s in seeds]
            grid = {c: [run(task, c, batch, s, args.steps) for s in seeds] for c in CONSTANTS}
            best = min(grid, key=lambda c: statistics.median(r[0] for r in grid[c]))
            rows[f"constant {best:.3g} (best of the grid)"] = grid[best]
            for label, rs in rows.items():
                cols = [" / ".join(f"{r[k]:.3g}" for r in rs) for k in range(3)]
                print(f"| {name} | {batch} | {label} | " + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()
