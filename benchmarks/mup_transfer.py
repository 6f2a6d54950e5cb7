"""μP transfer measurements: ``python -m benchmarks.mup_transfer [--quick] [--out results/mup]``.

Four experiments on the benchmark's own tasks (:mod:`benchmarks.tasks`: scikit-learn's digits, full batch on
a fixed training subset, the ``mlp`` and ``resnet`` models; CPU, PyTorch), each at widths 32 ... 512 (x2)
with base width 32 (where μP, SP and NTK coincide), parameterised by ``curvopt.torch.parameterize``:

1. **Sharpness across widths** (the MLP, and the ResNet with one stage at widths 32-128 for the CPU;
   full-batch GD at one fixed base learning rate): the top eigenvalue after the last step of
   ``D^1/2 H D^1/2`` with ``D`` the per-parameter learning-rate multipliers of the parameterisation
   (``D = I`` under SP/NTK). This is the curvature the GD step ``w <- w - lr * D g`` sees (it is stable iff
   ``lr * sharpness < 2``); it is computed by :mod:`benchmarks.hessian` (exact HVPs, ARPACK). Target:
   max/min - 1 <= 20 % under μP, >= 2x under SP or NTK.
2. **Learning-rate transfer** (MLP, Adam): training loss averaged over the run (the area under the loss
   curve; the final loss is ~1e-5 and dominated by Adam's late oscillations once the 512 examples are
   memorised) on a 7-point grid (factor 2); the best grid point per width (target: the same at the smallest
   and the largest width under μP, moves under SP).
3. **CDAT under μP** (MLP, GD base, the benchmark's ``cdat`` = ``CDAT`` at the library's defaults, seeds 0-4):
   the global learning rate CDAT picks, averaged over the last 10 % of steps, across widths: each seed's spread
   (target: <= 20 % under μP; SP contrast), their median and worst, the spread of the per-width median over
   seeds (the rate each width gets, with the seeds' scatter averaged out), and that median's width trend (the
   fitted power law's ratio between the widest and the narrowest width).
   ``--variant nocap|capA|capB``: the rule without its loss-bound cap (``loss_cap=inf``, the default before
   section 7's A was adopted), or that rule wrapped in a research start-up cap of
   :mod:`benchmarks.minibatch_study` (docs/minibatch_study.md, section 7); ``--seed`` sets the one seed of every
   experiment (default: 0, and seeds 0-4 here); ``--cdat-steps`` the horizon (default 100).
4. **γ sweep** (MLP width 128, GD, MSE on one-hot targets, output multiplier 1/γ on top of μP, output
   centred at its initial value): best global learning rate vs γ in [1e-2, 1] on a factor-2 grid (ascending,
   stopped after two diverged runs), refined at the best point's two √2 neighbours; the fitted log-log
   slope (target ≈ 2).

Writes PNG plots, ``results.md`` (tables) and ``results.json`` into ``--out``. A run of some experiments
(``--only``) into an ``--out`` that holds results keeps the experiments it did not run: its own are merged into
``results.json`` and ``results.md`` is written from the merged results; where a kept experiment was measured under
other settings than this run's (the preset, the seeds, the cdat variant or horizon) it refuses before anything runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from benchmarks import tasks, tuners
from benchmarks.__main__ import _csv, _int_at_least, _seed
from benchmarks.hessian import top_eigenvalue
from benchmarks.suites import Experiment
from curvopt.torch import parameterize


@dataclass
class Preset:
    widths: tuple = (32, 64, 128, 256, 512)
    n_train: int = 512
    sharp_steps: int = 100
    sharp_every: int = 25
    sharp_n_cnn: int = 64
    sharp_cnn_widths: tuple = (32, 64, 128)  # the ResNet at width 512 is too slow on a CPU
    sharp_lrs: tuple = (("mlp", 0.2), ("mlp", 0.05), ("resnet", 0.2))
    transfer_steps: int = 100
    transfer_grid: tuple = tuple(4e-3 * 2.0**k for k in range(7))
    cdat_steps: int = 100
    cdat_seeds: tuple = (0, 1, 2, 3, 4)
    gamma_width: int = 128
    gammas: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    gamma_steps: int = 100
    gamma_grid: tuple = tuple(2.0**k for k in range(-20, 5))
    parameterizations: tuple = ("mup", "sp", "ntk")
    seed: int = 0
    extra: dict = field(default_factory=dict)


PRESETS = {
    "default": Preset(),
    "quick": Preset(widths=(32, 128, 512), n_train=128, sharp_steps=30, sharp_every=10, sharp_n_cnn=32,
                    sharp_cnn_widths=(32, 64), sharp_lrs=(("mlp", 0.2), ("resnet", 0.2)), transfer_steps=30,
                    cdat_steps=30, cdat_seeds=(0, 1, 2), gammas=(0.01, 0.1, 1.0), gamma_steps=30,
                    parameterizations=("mup", "sp")),
}
BASE_WIDTH = 32
#: the models of the benchmark tasks (benchmarks.tasks): the MLP as is, the ResNet with one stage (CPU)
MODEL_OPTIONS = {"mlp": {}, "resnet": {"stages": 1, "depth": 1, "norm": "none"}}


# --------------------------------------------------------------------------------------------------- data/models
def experiment(arch: str, n_train: int) -> Experiment:
    """The full-batch digits experiment of ``benchmarks.tasks`` these measurements run on."""
    return Experiment(arch, "full", (BASE_WIDTH,), ("constant",), 1, full_batch_size=n_train, eval_size=64,
                      model=MODEL_OPTIONS[arch])


def digits(arch: str, n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training subset (NHWC float32 digits, normalised) and labels, as the benchmark tasks load them."""
    x, y, _, _ = tasks.train_eval_arrays(experiment(arch, n_train), seed=0)
    return torch.from_numpy(x), torch.from_numpy(y)


def build(arch, width, par, optimizer, lr, seed, gamma=1.0, zero_readout=False, n_train=64):
    """The task's model at ``width``, parameterised relative to width ``BASE_WIDTH``; returns (model, groups)."""
    exp = experiment(arch, n_train)
    model = tasks.torch_model(exp, width, seed)
    base, delta = tasks.torch_model(exp, BASE_WIDTH, seed), tasks.torch_model(exp, 2 * BASE_WIDTH, seed)
    groups = parameterize(model, base, optimizer=optimizer, parameterization=par, gamma=gamma, lr=lr,
                          delta_model=delta, zero_readout=zero_readout,
                          generator=torch.Generator().manual_seed(seed))
    return model, groups


# --------------------------------------------------------------------------------------------------- sharpness
def top_eig(params, mults, loss_fn, v0=None):
    """λ_max(D^1/2 H D^1/2) with D = diag(mults) (exact HVPs, ARPACK; warm-started from ``v0``)."""
    scales = [torch.full_like(p, math.sqrt(m)) for p, m in zip(params, mults)]
    return top_eigenvalue(loss_fn, params, scales=scales, tol=1e-4, v0=v0)


def param_mults(groups):
    params, mults = [], []
    for g in groups:
        for p in g["params"]:
            params.append(p)
            mults.append(g["lr"])
    return params, mults


def run_sharpness(arch, width, par, lr, steps, every, x, y, seed):
    model, groups = build(arch, width, par, "sgd", 1.0, seed, n_train=len(x))
    params, mults = param_mults(groups)  # relative multipliers
    for g in groups:
        g["lr"] *= lr
    opt = tuners.torch_base("gd", groups, lr)
    loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    hist, v, losses = [], None, []
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            lam, v = top_eig(params, mults, loss_fn, v0=v)
            hist.append((t, lam))
        if t == steps:
            break
        opt.zero_grad()
        loss = loss_fn()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            hist.append((t, float("nan")))
            break
        loss.backward()
        opt.step()
    return {"history": hist, "final": hist[-1][1], "loss": losses[-1] if losses else float("nan")}


# --------------------------------------------------------------------------------------------------- training
def train_loss(arch, width, par, optimizer, lr, steps, x, y, seed):
    model, groups = build(arch, width, par, optimizer, lr, seed, n_train=len(x))
    opt = tuners.torch_base("adam" if optimizer == "adam" else "gd", groups, lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            return float("inf")
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    return float(np.mean(losses))  # area under the training curve / steps


def run_cdat(width, par, steps, x, y, seed, variant=""):
    """The benchmark's ``cdat`` tuner (library defaults) on GD over the μP param groups; ``variant``: empty for
    the library's rule, else a start-up variant of ``benchmarks.minibatch_study.startup_variant`` (``nocap``,
    ``capA``, ``capB``; docs/minibatch_study.md section 7)."""
    from benchmarks.minibatch_study import startup_variant

    model, groups = build("mlp", width, par, "sgd", 1.0, seed, n_train=len(x))
    opt = startup_variant(tuners.build_torch("cdat", {}, "gd", model, params=groups), variant)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    lrs, losses = [], []
    for _ in range(steps):
        loss = opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
        losses.append(float(loss.detach()))
    tail = max(1, steps // 10)
    return {"lrs": lrs, "final_lr": float(np.mean(lrs[-tail:])), "loss": losses[-1], "losses": losses}


def run_gamma(gamma, width, grid, steps, x, y_onehot, seed):
    """Final centred MSE per global lr on ``grid`` (the table's γ² scale divided out), then at the best
    point's √2 neighbours; returns (losses on grid, best lr)."""
    out = []
    for lr in grid:
        out.append(_gamma_loss(gamma, width, lr, steps, x, y_onehot, seed) if out[-2:] != [math.inf] * 2
                   else math.inf)
    i = int(np.argmin(out))
    cand = {grid[i]: out[i]}
    for f in (2**-0.5, 2**0.5):
        cand[grid[i] * f] = _gamma_loss(gamma, width, grid[i] * f, steps, x, y_onehot, seed)
    return out, min(cand, key=cand.get)


def _gamma_loss(gamma, width, lr, steps, x, y_onehot, seed):
    from curvopt.mup import gamma_lr_scale

    model, groups = build("mlp", width, "mup", "sgd", 1.0, seed, gamma=gamma, n_train=len(x))
    scale = gamma_lr_scale(gamma, "sgd")
    for g in groups:
        g["lr"] = g["lr"] / scale * lr
    opt = tuners.torch_base("gd", groups, lr)
    with torch.no_grad():
        f0 = model(x)
    centred_mse = lambda: 0.5 * ((model(x) - f0 - y_onehot) ** 2).sum(1).mean()  # noqa: E731
    for _ in range(steps):
        opt.zero_grad()
        loss = centred_mse()
        if not torch.isfinite(loss) or float(loss) > 1e6:
            return math.inf
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(centred_mse())
    return final if math.isfinite(final) else math.inf


# --------------------------------------------------------------------------------------------------- report
def cdat_summary(runs: dict, widths) -> dict:
    """The CDAT experiment's figures from ``runs[seed][width]`` (:func:`run_cdat`): the final lr per seed and
    width, each seed's spread across widths with their median and worst, the per-width median over seeds with
    its spread and width trend, the seeds' scatter at one width (their spread, median over widths: what a
    seed's spread reads where the rate does not depend on the width), the worst seed's final train loss per
    width, and the start-up's overshoot (the highest loss of steps 1-14 over the initial one, worst over seeds)."""
    final = {seed: {w: r[w]["final_lr"] for w in widths} for seed, r in runs.items()}
    per_seed = {seed: spread(list(f.values())) for seed, f in final.items()}
    worst = max(per_seed, key=per_seed.get)
    median_lr = {w: float(np.median([f[w] for f in final.values()])) for w in widths}
    return {"final_lr": final, "spread_per_seed": per_seed, "spread_median": float(np.median(list(per_seed.values()))),
            "spread_worst": per_seed[worst], "worst_seed": worst, "median_lr": median_lr,
            "spread": spread(list(median_lr.values())), "trend": width_trend(widths, list(median_lr.values())),
            "seed_scatter": float(np.median([spread([f[w] for f in final.values()]) for w in widths])),
            "loss": {w: max(r[w]["loss"] for r in runs.values()) for w in widths},
            "early_peak": {w: max(max(r[w]["losses"][1:15]) / r[w]["losses"][0] for r in runs.values())
                           for w in widths}}


def spread(values):
    v = [a for a in values if math.isfinite(a) and a > 0]
    if len(v) < len(values):
        return float("inf")
    return max(v) / min(v) - 1.0


def width_trend(widths, values):
    """The least-squares power law ``value ~ width^a`` through ``values``, as the ratio it predicts between the
    widest and the narrowest width (1 = no trend). Unlike :func:`spread`, which one chaotic run at one width
    sets, it separates a drift with the width (what μP removes) from run-to-run scatter."""
    if not all(math.isfinite(a) and a > 0 for a in values):
        return float("inf")
    a = np.polyfit(np.log(widths), np.log(values), 1)[0]
    return float((max(widths) / min(widths)) ** a)


#: the experiments of this module, in the order they run (``--only``)
EXPERIMENTS = ("sharpness", "transfer", "cdat", "gamma")
#: the settings of results.json each experiment's results depend on (all of them on the preset and its widths)
SETTINGS = {"sharpness": ("seed",), "transfer": ("seed",), "cdat": ("cdat_seeds", "variant", "cdat_steps"),
            "gamma": ("seed",)}
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


def _numeric_keys(obj):
    """``obj`` read back from JSON with the keys JSON turned into strings (widths, seeds, γ) numbers again."""
    if isinstance(obj, list):
        return [_numeric_keys(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for k, v in obj.items():
        if re.fullmatch(r"-?\d+", k):
            k = int(k)
        else:
            try:
                k = float(k) if math.isfinite(float(k)) else k
            except ValueError:
                pass
        out[k] = _numeric_keys(v)
    return out


def load_results(out: str) -> dict | None:
    """The results.json in ``out`` (None if there is none); a ValueError if it cannot be read."""
    path = os.path.join(out, RESULTS_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            res = _numeric_keys(json.load(fh))
        if not isinstance(res, dict) or res.get("preset") not in PRESETS:
            raise ValueError("it does not hold the results of this module")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); remove it or pass another --out, so "
                         "that its results are not overwritten") from None
    # a file written before the cdat horizon was recorded: the preset's
    res.setdefault("cdat_steps", PRESETS[res["preset"]].cdat_steps)
    return res


def merge_results(old: dict | None, new: dict, ran) -> dict:
    """The results of this run (``new``: its settings and the sections of the experiments in ``ran``) merged into
    those read back from results.json (``old``, None if none): the sections of ``old`` this run did not redo are
    kept, each with the settings it was measured under. A ValueError, naming the setting, if a kept section and
    one of this run were measured under different settings (one report cannot describe both); ``seconds`` adds
    up the runs' times."""
    if old is None:
        return new
    kept = [e for e in EXPERIMENTS if e in old and e not in ran]
    merged = {k: v for k, v in new.items() if k not in EXPERIMENTS}
    for e in kept:
        for key in ("preset", "widths", *SETTINGS[e]):
            users = [r for r in ran if key in ("preset", "widths", *SETTINGS[r])]
            if users and old.get(key) != new.get(key):
                raise ValueError(f"the {e} results in results.json were measured with {key} {old.get(key)!r}, this "
                                 f"run's {', '.join(users)} with {new.get(key)!r}; pass another --out, or rerun "
                                 f"{e} too (--only)")
            if not users:
                merged[key] = old.get(key)
    merged["seconds"] = old.get("seconds", 0.0) + new.get("seconds", 0.0)
    for e in EXPERIMENTS:
        if e in new or e in kept:
            merged[e] = new[e] if e in new else old[e]
    return merged


def write_results(out: str, res: dict, P: Preset) -> str:
    """Write ``res`` to results.json and its report to results.md in ``out`` (each replaced whole, never left
    half-written); returns the report, read with the cdat horizon ``res`` records."""
    text = report(res, replace(P, cdat_steps=res["cdat_steps"]))
    for name, body in ((RESULTS_JSON, json.dumps(res, indent=1, default=str)), (RESULTS_MD, text)):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(body)
        os.replace(path + ".tmp", path)
    return text


def _one_seed(s: str) -> int:
    seeds = _csv(int, "seed", _seed)(s)
    if len(seeds) != 1:
        raise argparse.ArgumentTypeError(f"expected one seed, got {s!r}")
    return seeds[0]


#: the least --cdat-steps: the start-up figure reads the losses of steps 0 and 1 on
MIN_CDAT_STEPS = 2


def build_parser() -> argparse.ArgumentParser:
    """The command line, each number checked as it is parsed (a bad one: a usage error, exit status 2)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mup_transfer", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small preset (about a minute)")
    ap.add_argument("--out", default="results/mup")
    ap.add_argument("--only", default=",".join(EXPERIMENTS),
                    help=f"comma-separated experiments, of {', '.join(EXPERIMENTS)} (default: all)")
    ap.add_argument("--seed", type=_one_seed, default=None,
                    help="the seed of every experiment (default: the preset's, 0; the cdat experiment's 0-4)")
    ap.add_argument("--variant", default="", help="cdat: a start-up variant of benchmarks.minibatch_study (nocap, "
                    "capA, capB; docs/minibatch_study.md section 7) (default: the library's rule)")
    ap.add_argument("--cdat-steps", type=_int_at_least(MIN_CDAT_STEPS), default=None,
                    help=f"cdat: the horizon in steps (>= {MIN_CDAT_STEPS}; default: the preset's, 100; 30 with "
                    "--quick)")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    if not only or only - set(EXPERIMENTS):
        ap.error(f"--only: expected some of {', '.join(EXPERIMENTS)}, got {args.only!r}")
    if args.variant:
        from benchmarks.minibatch_study import STARTUP_CAPS

        if args.variant != "nocap" and args.variant not in STARTUP_CAPS:
            ap.error(f"--variant: expected nocap or one of {', '.join(sorted(STARTUP_CAPS))}, got {args.variant!r}")
    P = PRESETS["quick" if args.quick else "default"]
    if args.seed is not None:
        P = replace(P, seed=args.seed, cdat_seeds=(args.seed,))
    if args.cdat_steps is not None:
        P = replace(P, cdat_steps=args.cdat_steps)
    res: dict = {"preset": "quick" if args.quick else "default", "widths": list(P.widths), "seed": P.seed,
                 "cdat_seeds": list(P.cdat_seeds), "variant": args.variant, "cdat_steps": P.cdat_steps}
    try:  # refused now, not after the runs: results already written are never lost
        old = load_results(args.out)
        merge_results(old, res, only)
    except ValueError as e:
        ap.error(f"--out {args.out!r}: {e}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = digits("mlp", P.n_train)
    t0 = time.time()
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(P.widths)))

    if "sharpness" in only:
        res["sharpness"] = {}
        for arch_name, lr in P.sharp_lrs:
            xs, ys = (x, y) if arch_name == "mlp" else digits(arch_name, P.sharp_n_cnn)
            ws = P.widths if arch_name == "mlp" else P.sharp_cnn_widths
            key = f"{arch_name} lr={lr:g}"
            r = {par: {w: run_sharpness(arch_name, w, par, lr, P.sharp_steps, P.sharp_every, xs, ys, P.seed)
                       for w in ws} for par in P.parameterizations}
            res["sharpness"][key] = {
                "model": arch_name, "lr": lr, "n": len(xs),
                "widths": list(ws),
                **{par: {"final": {w: r[par][w]["final"] for w in ws},
                         "spread": spread([r[par][w]["final"] for w in ws]),
                         "loss": {w: r[par][w]["loss"] for w in ws},
                         "history": {w: r[par][w]["history"] for w in ws}} for par in r}}
            fig, axes = plt.subplots(1, len(r), figsize=(4.2 * len(r), 3.4), sharey=True)
            for ax, par in zip(np.atleast_1d(axes), r):
                for c, w in zip(colors, ws):
                    t, lam = zip(*r[par][w]["history"])
                    ax.plot(t, lam, "o-", ms=3, color=c, label=f"width {w}")
                ax.axhline(2 / lr, color="k", ls=":", lw=1, label="2/lr")
                ax.set(title=f"{arch_name.upper()} {par}, GD lr {lr:g}", xlabel="step", yscale="log")
            np.atleast_1d(axes)[0].set_ylabel("sharpness  λmax(D½ H D½)")
            np.atleast_1d(axes)[-1].legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, f"sharpness_{arch_name}_lr{lr:g}.png"), dpi=110)
            plt.close(fig)
            print(f"[{time.time() - t0:6.0f}s] sharpness {key}: "
                  + ", ".join(f"{p} spread {res['sharpness'][key][p]['spread']:.2f}" for p in r), flush=True)

    if "transfer" in only:
        res["transfer"] = {"grid": list(P.transfer_grid)}
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
        for ax, par in zip(axes, ("mup", "sp")):
            losses = {w: [train_loss("mlp", w, par, "adam", lr, P.transfer_steps, x, y, P.seed)
                          for lr in P.transfer_grid] for w in P.widths}
            best = {w: int(np.argmin(losses[w])) for w in P.widths}
            res["transfer"][par] = {"loss": losses, "best_index": best,
                                    "best_lr": {w: P.transfer_grid[best[w]] for w in P.widths}}
            for c, w in zip(colors, P.widths):
                ax.plot(P.transfer_grid, np.minimum(losses[w], 10.0), "o-", color=c, ms=3, label=f"width {w}")
            ax.set(title=f"MLP Adam, {par}", xscale="log", yscale="log", xlabel="learning rate (base)")
            print(f"[{time.time() - t0:6.0f}s] transfer {par}: best index {best}", flush=True)
        axes[0].set_ylabel(f"mean train loss over {P.transfer_steps} steps")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "lr_transfer.png"), dpi=110)
        plt.close(fig)

    if "cdat" in only:
        res["cdat"] = {}
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), sharey=True)
        for ax, par in zip(axes, ("mup", "sp")):
            runs = {seed: {w: run_cdat(w, par, P.cdat_steps, x, y, seed, args.variant) for w in P.widths}
                    for seed in P.cdat_seeds}
            res["cdat"][par] = cdat_summary(runs, P.widths)
            for c, w in zip(colors, P.widths):
                for k, seed in enumerate(P.cdat_seeds):
                    ax.plot(runs[seed][w]["lrs"], color=c, lw=0.8, label=f"width {w}" if k == 0 else None)
            ax.set(title=f"CDAT (library defaults) on GD, MLP, {par}", yscale="log", xlabel="step")
            r = res["cdat"][par]
            print(f"[{time.time() - t0:6.0f}s] cdat {par}: spread per seed {r['spread_median']:.2f} median, "
                  f"{r['spread_worst']:.2f} worst; of the seeds' median {r['spread']:.2f}, "
                  f"width trend x{r['trend']:.2f}", flush=True)
        axes[0].set_ylabel("global learning rate")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "cdat_lr.png"), dpi=110)
        plt.close(fig)

    if "gamma" in only:
        eye = torch.eye(10)[y]
        runs = {g: run_gamma(g, P.gamma_width, P.gamma_grid, P.gamma_steps, x, eye, P.seed) for g in P.gammas}
        losses = {g: r[0] for g, r in runs.items()}
        best = {g: r[1] for g, r in runs.items()}
        slope, intercept = np.polyfit(np.log(list(best)), np.log(list(best.values())), 1)
        res["gamma"] = {"grid": list(P.gamma_grid), "loss": losses, "best_lr": best, "slope": float(slope)}
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
        gc = plt.cm.plasma(np.linspace(0, 0.85, len(P.gammas)))
        for c, g in zip(gc, P.gammas):
            axes[0].plot(P.gamma_grid, np.minimum(losses[g], 10.0), "o-", ms=3, color=c, label=f"γ={g:g}")
        axes[0].set(xscale="log", yscale="log", xlabel="learning rate (γ² scale divided out)",
                    ylabel=f"centred MSE after {P.gamma_steps} steps", title=f"μP MLP width {P.gamma_width}, GD")
        axes[0].legend(fontsize=7)
        gs = np.array(P.gammas)
        axes[1].loglog(gs, list(best.values()), "o", label="best lr")
        axes[1].loglog(gs, np.exp(intercept) * gs**slope, "-", label=f"fit slope {slope:.2f}")
        axes[1].set(xlabel="γ", ylabel="best learning rate", title="best lr vs γ")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "gamma_sweep.png"), dpi=110)
        plt.close(fig)
        print(f"[{time.time() - t0:6.0f}s] gamma: best {best}, slope {slope:.2f}", flush=True)

    res["seconds"] = time.time() - t0
    res = merge_results(old, res, only)
    print(write_results(args.out, res, P))
    return res


def _fmt(v):
    return "diverged" if not math.isfinite(v) else f"{v:.3g}"


def report(res: dict, P: Preset) -> str:
    lines = [f"μP transfer ({res['preset']} preset, widths {', '.join(map(str, P.widths))}, base width "
             f"{BASE_WIDTH}, digits n={P.n_train}, full batch, {res.get('seconds', 0):.0f} s)", ""]
    if "sharpness" in res:
        lines += [f"**Sharpness after {P.sharp_steps} GD steps** (λmax of D½HD½; target μP ≤ 20 %, SP/NTK ≥ 2x "
                  "= spread ≥ 100 %)", "",
                  "| model | param | lr | " + " | ".join(f"w={w}" for w in P.widths) + " | spread max/min−1 |",
                  "|---|---|---|" + "---|" * len(P.widths) + "---|"]
        for r in res["sharpness"].values():
            for par in P.parameterizations:
                vals = r[par]["final"]
                lines.append(f"| {r['model']} (n={r['n']}) | {par} | {r['lr']:g} | " + " | ".join(_fmt(vals[w]) if w in vals else "—" for w in P.widths)
                             + (" (" + ", ".join(f"w={w}: {_fmt(v)}" for w, v in vals.items() if w not in P.widths)
                                + ")" if set(vals) - set(P.widths) else "")
                             + f" | {r[par]['spread'] * 100:.0f} % |")
        lines.append("")
    if "transfer" in res:
        g = res["transfer"]["grid"]
        lines += [f"**LR transfer** (MLP, Adam, mean train loss over {P.transfer_steps} steps, grid {g[0]:g}…{g[-1]:g} ×2): best grid "
                  "index (0-6) per width", "", "| param | " + " | ".join(f"w={w}" for w in P.widths) + " |",
                  "|---|" + "---|" * len(P.widths)]
        for par in ("mup", "sp"):
            b = res["transfer"][par]["best_index"]
            lines.append(f"| {par} | " + " | ".join(f"{b[w]} ({g[b[w]]:g})" for w in P.widths) + " |")
        lines.append("")
    if "cdat" in res:
        how = f"start-up cap {res['variant']}" if res.get("variant") else "library defaults"
        seeds = res["cdat_seeds"]
        lines += [f"**CDAT ({how}) on GD** (MLP, {P.cdat_steps} steps, seeds {', '.join(map(str, seeds))}): global "
                  "lr, mean of the last 10 % of steps, median over seeds per width; spread = max/min − 1 across "
                  "widths, per seed (median, worst) and of the medians; width trend = the fitted power law's ratio "
                  f"between w={max(P.widths)} and w={min(P.widths)} (of the medians); the seeds' scatter at one "
                  "width = max/min − 1 over seeds, median over widths", "",
                  "| param | " + " | ".join(f"w={w}" for w in P.widths)
                  + " | spread per seed: median (worst) | spread of the medians | width trend | seeds' scatter at "
                  "one width |", "|---|" + "---|" * len(P.widths) + "---|---|---|---|"]
        for par in ("mup", "sp"):
            r = res["cdat"][par]
            lines.append(f"| {par} | " + " | ".join(_fmt(r["median_lr"][w]) for w in P.widths)
                         + f" | {r['spread_median'] * 100:.0f} % ({r['spread_worst'] * 100:.0f} %, seed "
                         f"{r['worst_seed']}) | {r['spread'] * 100:.0f} % | ×{r['trend']:.2f} | "
                         f"{r['seed_scatter'] * 100:.0f} % |")
        lines.append("")
        for par in ("mup", "sp"):
            r = res["cdat"][par]
            lines.append(f"{par}: spread per seed " + ", ".join(f"{s}: {v * 100:.0f} %"
                                                               for s, v in r["spread_per_seed"].items()) + ".")
            over = [f"w={w}: ×{r['early_peak'][w]:.3g}" for w in P.widths if r["early_peak"][w] > 1]
            lines.append(f"{par}: final train loss, worst seed per width, {min(r['loss'].values()):.3g}-"
                         f"{max(r['loss'].values()):.3g}; the highest loss of steps 1-14 over the initial one, where above 1 (worst seed): "
                         + ("; ".join(over) if over else "none"))
        lines.append("")
    if "gamma" in res:
        r = res["gamma"]
        lines += [f"**γ sweep** (μP MLP width {P.gamma_width}, GD, centred MSE, {P.gamma_steps} steps): best lr "
                  f"per γ: " + ", ".join(f"γ={g:g}: {v:.3g}" for g, v in r["best_lr"].items())
                  + f"; fitted log-log slope **{r['slope']:.2f}** (target ≈ 2)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
