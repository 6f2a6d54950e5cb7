"""``python -m benchmarks``: compare learning-rate tuners on ResNet, ViT and LM training.

Writes ``OUT/results.jsonl`` (one JSON object per finished run; a rerun resumes, skipping finished runs)
and ``OUT/report.md`` with PNG plots beside it, then prints the summary table and the plot paths.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _csv(cast=str):
    def parse(s: str):
        return tuple(cast(x) for x in s.replace(" ", ",").split(",") if x)
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .suites import SUITES
    from .tuners import TUNERS

    tuner_help = "; ".join(f"{n}: {s.doc}" for n, s in TUNERS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] + " Suites: " + "; ".join(
            f"{n}: {s.description}" for n, s in SUITES.items()) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="smoke",
                   help="preset of experiments, widths, tuners and sizes")
    p.add_argument("--out", default=None, help="output directory for results.jsonl, report.md and the "
                   "plots (default: results/SUITE)")
    p.add_argument("--tasks", type=_csv(), default=None,
                   help="comma-separated subset of the suite's tasks: mlp, resnet, vit, lm")
    p.add_argument("--regimes", type=_csv(), default=None,
                   help="comma-separated subset of regimes: full (fixed subset, full batch), mini (mini-batch)")
    p.add_argument("--widths", type=_csv(int), default=None,
                   help="comma-separated widths overriding the suite's (base channels for resnet, embed dim "
                   "for vit/lm, hidden units for mlp)")
    p.add_argument("--tuners", type=_csv(), default=None,
                   help="comma-separated tuners overriding the suite's; each NAME or NAME:key=value;key=value "
                   "(use ';' between settings of one tuner, e.g. 'cdat:sigma=1.5;ema=0'). " + tuner_help)
    p.add_argument("--backend", choices=("torch", "jax", "both"), default=None,
                   help="which framework(s) to run (default: the suite's)")
    p.add_argument("--params", type=_csv(), default=None,
                   help="parameterisations: sp (standard), mup (needs the μP helpers; torch only)")
    p.add_argument("--seeds", type=_csv(int), default=None, help="comma-separated seeds (default: the suite's)")
    p.add_argument("--steps", type=int, default=None, help="override the number of training steps per run")
    p.add_argument("--base", choices=("gd", "momentum", "adam"), default=None,
                   help="override the base optimizer (default: the paper's pairing: gd for resnet/mlp, "
                   "adam for vit/lm)")
    p.add_argument("--grid", type=_csv(float), default=None,
                   help="override the constant-lr grid (comma-separated learning rates)")
    p.add_argument("--sharpness-every", type=int, default=None,
                   help="estimate the sharpness every k steps inside the tuners (0 = off)")
    p.add_argument("--data-dir", default=None,
                   help="folder with CIFAR-10 in its python-pickle format (data_batch_1..5, test_batch); "
                   "switches image tasks to CIFAR-10 (default images: scikit-learn digits)")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file for the lm task (e.g. Tiny Shakespeare; default: pydoc_data.topics)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for torch and XLA (1 gives stable step times on a shared CPU)")
    p.add_argument("--list", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and plots from results.jsonl")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def experiments_from_args(args):
    from .suites import get_suite, narrow

    suite = get_suite(args.suite)
    exps = []
    for e in suite.experiments:
        if args.tasks and e.task not in args.tasks:
            continue
        if args.regimes and e.regime not in args.regimes:
            continue
        image_set = "cifar10" if args.data_dir else None
        exps.append(narrow(e, widths=args.widths, steps=args.steps, base=args.base, grid=args.grid,
                           sharpness_every=args.sharpness_every, data_dir=args.data_dir, image_set=image_set,
                           text_path=args.text))
    backends = suite.backends if args.backend is None else (("torch", "jax") if args.backend == "both"
                                                             else (args.backend,))
    tuners = None
    if args.tuners:
        tuners = tuple(t.replace(";", ",") for t in args.tuners)
    return suite, exps, backends, tuners, args.seeds or suite.seeds, args.params or suite.params


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = max(1, args.threads)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                          f"intra_op_parallelism_threads={threads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    from . import report, runner

    out = args.out or os.path.join("results", args.suite)
    suite, exps, backends, tuners, seeds, params = experiments_from_args(args)
    if not exps:
        print("no experiment matches --tasks/--regimes in suite " + args.suite, file=sys.stderr)
        return 2
    specs = runner.plan(exps, tuners_filter=tuners, backends=backends, seeds=seeds, params=params)
    if args.list:
        for s in specs:
            print(s.key)
        print(f"{len(specs)} runs", file=sys.stderr)
        return 0
    t0 = time.time()
    if not args.report_only:
        counts = runner.run_all(specs, out, progress=not args.no_progress)
        print(f"{counts['ran']} runs in {time.time() - t0:.1f}s ({counts['skipped_done']} already done, "
              f"{counts['unavailable']} unavailable, {counts['errors']} errors) -> {out}/{runner.RESULTS}")
    rep = report.write_report(out, keys={s.key for s in specs})
    print()
    print(rep["summary"])
    print(f"\nreport: {rep['path']}")
    for p in rep["plots"]:
        print(f"plot: {p}")
    print(f"total wall time: {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
