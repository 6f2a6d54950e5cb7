"""``python -m benchmarks``: compare learning-rate tuners with a tuned constant and with peer optimizers.

Writes ``OUT/results.jsonl`` (one JSON object per finished run; a rerun resumes, skipping recorded runs)
and ``OUT/report.md`` with PNG plots beside it, then prints the summary table and the plot paths.
The command line is checked before anything runs; the exit status is 0 only if every run of the plan
finished (ok or diverged): 1 if a run failed, 2 for a bad command line, 3 if another runner holds OUT.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

EXIT_FAILED_RUNS, EXIT_USAGE, EXIT_LOCKED = 1, 2, 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def _csv(cast=str, what: str = "value", check=None):
    def parse(s: str):
        out = []
        for x in s.replace(" ", ",").split(","):
            if not x:
                continue
            try:
                v = cast(x)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{x!r} is not a valid {what}") from None
            if check is not None and not check(v):
                raise argparse.ArgumentTypeError(f"{x!r}: each {what} must be {check.__doc__}")
            out.append(v)
        if not out:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}s, got {s!r}")
        return tuple(out)
    return parse


def _positive(v):
    """> 0"""
    return v > 0


def _seed(v):
    """an integer from 0 to 2**64 - 1 (torch.manual_seed's range)"""
    return 0 <= v < 2 ** 64


def _positive_finite(v):
    """a positive finite number"""
    return v > 0 and v != float("inf")


def _one_of(choices):
    def check(v):
        return v in choices
    check.__doc__ = "one of " + ", ".join(choices)
    return check


def _int_at_least(minimum: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def _tuner_list(s: str) -> tuple[str, ...]:
    # tuners are separated by ',' (or spaces); the settings of one tuner by ';'
    out, cur = [], ""
    for part in s.replace(" ", ",").split(","):
        if not part:
            continue
        if ":" not in part and cur and "=" in part:  # "cdat:sigma=1,ema=0" (old form): ema=0 belongs to cdat
            cur += ";" + part
            out[-1] = cur
            continue
        cur = part
        out.append(cur)
    if not out:
        raise argparse.ArgumentTypeError("expected at least one tuner")
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    from .suites import SUITES
    from .tasks import TASKS
    from .tuners import TUNERS

    tuner_help = "; ".join(f"{n}: {s.doc}" for n, s in TUNERS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] + " Suites: " + "; ".join(
            f"{n}: {s.description}" for n, s in SUITES.items()) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="smoke",
                   help="preset of experiments, widths, tuners, seeds and sizes")
    p.add_argument("--out", default=None, help="output directory for results.jsonl, report.md and the "
                   "plots (default: results/SUITE); one runner at a time per directory")
    p.add_argument("--tasks", type=_csv(str, "task", _one_of(tuple(TASKS))), default=None,
                   help=f"comma-separated subset of the suite's tasks: {', '.join(TASKS)}")
    p.add_argument("--regimes", type=_csv(str, "regime", _one_of(("full", "mini"))), default=None,
                   help="comma-separated subset of regimes: full (fixed subset, full batch), mini (mini-batch)")
    p.add_argument("--widths", type=_csv(int, "width", _positive), default=None,
                   help="comma-separated positive widths overriding the suite's (base channels for resnet, embed "
                   "dim for vit/lm, hidden units for mlp)")
    p.add_argument("--tuners", type=_tuner_list, default=None,
                   help="comma-separated tuners overriding the suite's; each NAME or NAME:key=value;key=value "
                   "(';' between settings of one tuner, e.g. 'cdat:startup=paper;sigma=1.5'). " + tuner_help)
    p.add_argument("--backend", choices=("torch", "jax", "both"), default=None,
                   help="which framework(s) to run (default: the suite's)")
    p.add_argument("--params", type=_csv(str, "parameterisation", _one_of(("sp", "mup"))), default=None,
                   help="parameterisations: sp (standard), mup (torch only); an experiment the suite runs in "
                        "another one is left out where the suite has one in the asked one for its task and regime")
    p.add_argument("--seeds", type=_csv(int, "seed", _seed), default=None,
                   help="comma-separated non-negative seeds (default: the suite's)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="override the number of training steps per run (>= 1)")
    p.add_argument("--base", choices=("gd", "momentum", "adam"), default=None,
                   help="override the base optimizer (default: the paper's pairing: gd for resnet/mlp, "
                   "adam for vit/lm); the peers (prodigy, schedulefree, dadapt, sophia) are their own optimizers "
                   "and ignore it")
    p.add_argument("--grid", type=_csv(float, "learning rate", _positive_finite), default=None,
                   help="override the constant-lr grid of the bare 'constant' tuner (comma-separated positive "
                   "learning rates, at most 4 significant digits)")
    p.add_argument("--no-widen", action="store_true",
                   help="do not widen the constant grid when its best value sits at an edge")
    p.add_argument("--sharpness", "--sharpness-every", dest="sharpness", type=_int_at_least(0), default=None,
                   help="estimate the sharpness every k steps inside the curvopt tuners (0 = off; default: the "
                   "suite's)")
    p.add_argument("--data-dir", default=None,
                   help="folder with CIFAR-10 in its python-pickle format (data_batch_1..5, test_batch); "
                   "switches image tasks to CIFAR-10 (default images: scikit-learn digits)")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file for the lm task (e.g. Tiny Shakespeare; default: pydoc_data.topics)")
    p.add_argument("--jobs", type=_int_at_least(1), default=None,
                   help="runs trained at once, each in its own worker process with --threads threads (default: "
                   "the suite's, at most the number of CPUs)")
    p.add_argument("--threads", type=_int_at_least(1), default=1,
                   help="intra-op threads for torch and XLA (1 gives stable step times on a shared CPU; they change "
                   "the reductions' order, so another count is other runs, not a resume)")
    p.add_argument("--list", action="store_true", help="print the planned runs and exit")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md and plots from results.jsonl")
    p.add_argument("--retry-errors", action="store_true",
                   help="rerun the runs recorded as errors (their records are replaced)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def experiments_from_args(args):
    from .suites import at_widths, get_suite, narrow

    suite = get_suite(args.suite)
    exps = []
    for e in suite.experiments:
        if args.tasks and e.task not in args.tasks:
            continue
        if args.regimes and e.regime not in args.regimes:
            continue
        image_set = "cifar10" if args.data_dir else None
        exps.append(narrow(e, steps=args.steps, base=args.base, grid=args.grid,
                           sharpness=args.sharpness, data_dir=args.data_dir, image_set=image_set,
                           text_path=args.text, widen=0 if args.no_widen else None, threads=args.threads))
    if args.params:  # (the default suite's muP ViT under --params sp: a second SP ViT on other data, refused)
        asked = set(args.params)
        covered = {(e.task, e.regime) for e in exps if asked & set(e.params)}
        exps = [e for e in exps if asked & set(e.params) or (e.task, e.regime) not in covered]
    backends = None if args.backend is None else (("torch", "jax") if args.backend == "both" else (args.backend,))
    if args.widths:
        exps = at_widths(exps, args.widths, backends)
    return suite, exps, backends, args.tuners, args.seeds or suite.seeds, args.params


def _check_cells(parser, exps, backends, params) -> None:
    """Two experiments that would share one report cell (task, regime, backend, parameterisation) with
    different settings (e.g. ``--params sp`` turning the default suite's μP ViT into a second SP ViT on other
    data) are refused: the report would compare one's tuners with the other's best constant."""
    seen: dict = {}
    for e in exps:
        for backend in backends or e.backends:
            for param in params or e.params:
                cell = (e.task, e.regime, backend, param)
                other = seen.setdefault(cell, e)
                if other.settings_hash() != e.settings_hash():
                    parser.error(f"two experiments of this plan would share the report cell {' '.join(cell)} with "
                                 "different settings (data size, model, steps): narrow it with --tasks/--regimes, or "
                                 "leave --params/--backend at the suite's")


def _check_paths(parser, args) -> None:
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    if args.text is not None:
        if not os.path.isfile(args.text):
            parser.error(f"--text {args.text!r} is not a file")
        try:
            with open(args.text, "rb") as fh:
                fh.read().decode("utf-8")
        except UnicodeDecodeError as e:
            parser.error(f"--text {args.text!r} is not UTF-8 ({e})")


def _check_widths(parser, exps) -> None:
    """A transformer's width must split into its heads (width 3 with 2 heads was one failed run per cell)."""
    from .tasks import model_options

    for e in exps:
        heads = model_options(e).get("heads")
        bad = [w for w in e.widths if heads and w % heads]
        if bad:
            parser.error(f"--widths: {e.task} has {heads} heads, so its widths must be multiples of {heads} "
                         f"(got {bad})")


def _check_data_used(parser, args, exps) -> None:
    """``--text`` and ``--data-dir`` each feed one kind of task (the LM; the image tasks): given to a plan without
    such a task, they were ignored without a word."""
    from .tasks import TASKS

    kinds = {TASKS[e.task].kind for e in exps}
    for option, value, kind, tasks in (("--text", args.text, "text", "lm"),
                                       ("--data-dir", args.data_dir, "image", "mlp, resnet, vit")):
        if value is not None and kind not in kinds:
            parser.error(f"{option} feeds the {tasks} task(s), and this plan runs none of them "
                         f"({', '.join(sorted({e.task for e in exps}))}): add one with --tasks, or leave {option} out")


def _check_grid(parser, args, specs) -> None:
    """``--grid`` runs its values as given, where the plan runs the constant grid: a value past 4 significant digits
    (the precision a run's key keeps) ran rounded, two such values as one run, and a plan without the bare
    ``constant`` tuner ignored the option, each without a word."""
    from .plan import fmt_lr

    if args.grid is None:
        return
    rounded = [f"{v!r} -> {fmt_lr(v)}" for v in args.grid if float(fmt_lr(v)) != v]
    if rounded:
        parser.error(f"--grid: learning rates are kept to 4 significant digits ({', '.join(rounded)}): give them so")
    if not any(s.from_grid for s in specs):
        parser.error("--grid: no run of this plan uses the constant grid (it is the bare 'constant' of --tuners)")


def _check_runnable(parser, specs) -> None:
    """A plan none of whose runs can run here (``--params mup --backend jax``: μP rows run on torch only; a peer
    whose package is missing) is a usage error saying why: it wrote an empty report and exited 0."""
    from .runner import unavailable_reason

    reasons = {unavailable_reason(s) for s in specs}
    if None not in reasons:
        parser.error(f"no run of this plan can run here: {'; '.join(sorted(reasons))}")


def _check_data(parser, exps) -> None:
    """Every dataset the plan trains on loads (once per dataset, in this process): a --data-dir without CIFAR-10's
    files, or a --text too short for one block, is a usage error before anything runs (it was one failed run per
    cell, recorded as such)."""
    from .tasks import TASKS, dataset_for

    for e in {(TASKS[e.task].kind, e.image_set, e.data_dir, e.text_path, e.block_len): e for e in exps}.values():
        try:
            dataset_for(e)
        except (OSError, ValueError) as err:
            parser.error(f"the data of {e.task} ({e.regime}) does not load: {type(err).__name__}: {err}")


def _check_writable(parser, out: str) -> None:
    """OUT can be created and written in: a read-only place is a usage error before anything runs (it was a
    traceback from the runner's lock, or from the first plot of ``--report-only``)."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        parser.error(f"cannot write the results in {out!r}: {err}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    threads = args.threads  # for this process and the --jobs workers it spawns (a user's OMP_NUM_THREADS or
    # XLA_FLAGS once won over --threads in the workers: their step times came from another thread count)
    ours = ("xla_cpu_multi_thread_eigen=", "intra_op_parallelism_threads=")  # (spelt with or without "--")
    os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.lstrip("-").startswith(ours)]
        + [f"--{ours[0]}{'true' if threads > 1 else 'false'}", f"{ours[1]}{threads}"])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from . import plan as plan_mod
    from . import report, runner
    from .results import RESULTS, LockedError

    out = args.out or os.path.join("results", args.suite)
    suite, exps, backends, tuners, seeds, params = experiments_from_args(args)
    if not exps:
        parser.error(f"no experiment of suite {args.suite!r} matches --tasks/--regimes")
    _check_cells(parser, exps, backends, params)
    _check_widths(parser, exps)
    _check_data_used(parser, args, exps)
    if not (args.report_only or args.list):
        _check_data(parser, exps)
    if args.report_only and not os.path.isfile(os.path.join(out, RESULTS)):
        parser.error(f"--report-only: no {RESULTS} in {out!r} (run the suite first, or pass its --out)")
    try:
        specs = plan_mod.plan(exps, tuners=tuners, backends=backends, seeds=seeds, params=params)
    except ValueError as e:
        parser.error(str(e))
    _check_grid(parser, args, specs)
    _check_runnable(parser, specs)
    if args.list:
        for s in specs:
            print(s.key)
        widen = any(e.widen for e in exps) and any(s.from_grid for s in specs)
        print(f"{len(specs)} runs" + (" (plus grid widening while the best constant sits at an edge)"
                                      if widen else ""), file=sys.stderr)
        return 0
    _check_writable(parser, out)
    t0 = time.time()
    keys = {s.key for s in specs}
    failed = 0
    if not args.report_only:
        try:
            jobs = args.jobs or min(suite.jobs, os.cpu_count() or 1)
            counts = runner.run_all(specs, out, progress=not args.no_progress, retry_errors=args.retry_errors,
                                    jobs=jobs)
        except LockedError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_LOCKED
        except KeyboardInterrupt:  # the runs already recorded are whole (each line is written when its run ends)
            print(f"\ninterrupted: the finished runs are kept in {os.path.join(out, RESULTS)}; the same command "
                  "resumes (it skips them)", file=sys.stderr)
            return EXIT_INTERRUPTED
        keys = set(counts["keys"])
        failed = counts["failed"]
        print(f"{counts['ran']} runs in {time.time() - t0:.1f}s ({counts['skipped_done']} already done, "
              f"{counts['widened']} added by grid widening, {counts['unavailable']} unavailable, "
              f"{counts['errors']} errors) -> {out}/{RESULTS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged lines were reported by the runner already
        warnings.filterwarnings("default", message="skipping .* record")  # not the records the report skips
        if args.report_only:
            from .results import latest_by_key, load_results

            recs = latest_by_key(load_results(os.path.join(out, RESULTS), repair=False))
            if recs and not keys & recs.keys():  # another plan's results: its report is not overwritten by nothing
                parser.error(f"--report-only: none of the {len(recs)} runs in {os.path.join(out, RESULTS)} belong "
                             f"to this plan (suite {args.suite!r} and the other flags): pass the flags of the run "
                             "that wrote them (e.g. --suite default, --threads); or they "
                             "ran on other code (a run's key holds a "
                             "digest of the library, the benchmark's training modules and the packages' versions, "
                             "benchmarks.suites.code_digest: after an edit or an upgrade the runs are redone)")
            keys |= plan_mod.widened_keys(specs, recs)
            failed = sum(recs[k].get("status") == "error" for k in keys & recs.keys())
        keys -= {s.key for s in specs if runner.unavailable_reason(s)}  # never recorded here: not missing
        rep = report.write_report(out, keys=keys)
    print()
    print(rep["summary"])
    print(f"\nreport: {rep['path']}")
    for p in rep["plots"]:
        print(f"plot: {p}")
    print(f"total wall time: {time.time() - t0:.1f}s")
    if failed:
        print(f"error: {failed} run(s) of this plan failed (see 'Failed runs' in {rep['path']}; "
              "--retry-errors reruns them)", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return 0


if __name__ == "__main__":
    sys.exit(main())
