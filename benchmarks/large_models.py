"""The PyTorch tuners on models far larger than the benchmark's: memory and step time (docs/performance.md, "Large
models: memory"): ``python -m benchmarks.large_models [--sizes 5M,25M,60M] [--rounds 10]``.

GELU MLPs of ~5M, ~25M and ~60M float32 parameters on a batch of 8 random inputs, behind AdamW: the bare base,
CDAT with a closure (``fd``) and closure-free, each with the default numerator and with ``numerator="direction"``.

* **Memory**: one fresh process per size and configuration (``MALLOC_MMAP_THRESHOLD_=65536``, so that freed
  tensors return to the system), 6 steps; resident memory after them (steady) and the process's peak, less the
  resident memory before the first step, in units of the parameters' size.
* **Time**: one process per size, the configurations interleaved step by step, median of ``--rounds`` steps
  after 3 warm-up steps ÷ the bare step's (CPU clock), 2 threads.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

SIZES = {"5M": (1024, 5), "25M": (2048, 6), "60M": (2048, 14)}  # (width, hidden layers)
CONFIGS = ("bare", "fd", "closure-free", "fd direction", "closure-free direction")


def size_list(text: str) -> list[str]:
    """``--sizes``'s comma-separated names, each one of ``SIZES`` (argparse's ``type``)."""
    sizes = text.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown size(s) {', '.join(map(repr, unknown))}: choose from "
                                         f"{', '.join(SIZES)}")
    return sizes


def _problem(size: str, config: str):
    import torch

    from curvopt.torch import CDAT

    width, depth = SIZES[size]
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, width, generator=g), torch.randint(0, 10, (8,), generator=g)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3 if config == "bare" else 1.0, weight_decay=0.0)
    opt = base if config == "bare" else CDAT(base, modules=model,
                                             numerator="direction" if "direction" in config else None)

    def step():
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if config.startswith("fd"):
            opt.step(closure)
        else:
            closure()
            opt.step()
    return model, step


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def _memory_worker(size: str, config: str) -> None:
    import torch

    torch.set_num_threads(2)
    model, step = _problem(size, config)
    size_mb = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    before = _rss_mb()
    for _ in range(6):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{(_rss_mb() - before) / size_mb:.2f} {(peak - before) / size_mb:.2f}")


def memory(size: str, config: str) -> tuple[float, float]:
    """(steady, peak) memory of ``config`` at ``size`` above the model, in parameter sizes (a fresh process)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=here)
    out = subprocess.run([sys.executable, "-c", f"from benchmarks.large_models import _memory_worker; "
                          f"_memory_worker({size!r}, {config!r})"], env=env, check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def interleaved_ratios(steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 3,
                       clock: Callable[[], float] = time.process_time) -> dict[str, float]:
    """Median time of a call of each of ``steps`` (one training step each, called in turn round by round) over
    ``rounds`` rounds after ``warmup``, ÷ the median of ``steps["bare"]``."""
    times: dict[str, list[float]] = {c: [] for c in steps}
    for r in range(rounds + warmup):
        for c, step in steps.items():
            t0 = clock()
            step()
            if r >= warmup:
                times[c].append(clock() - t0)
    bare = statistics.median(times["bare"])
    return {c: statistics.median(t) / bare for c, t in times.items()}


def step_times(size: str, rounds: int) -> dict[str, float]:
    """Median CPU time of a step of each configuration ÷ the bare step's, interleaved in this process."""
    import torch

    torch.set_num_threads(2)
    return interleaved_ratios({c: _problem(size, c)[1] for c in CONFIGS}, rounds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=size_list, default="5M,25M,60M")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = args.sizes
    print("| size | " + " | ".join(f"{c}: steady / peak" for c in CONFIGS) + " | time ÷ bare: "
          + ", ".join(CONFIGS[1:]) + " |")
    print("|---|" + "---|" * (len(CONFIGS) + 1))
    # every memory measurement first: a process spawned by a large one starts from its parent's peak (Linux
    # carries the peak resident size across fork and exec), and the timings below hold five models
    mem = {size: [memory(size, c) for c in CONFIGS] for size in sizes}
    for size in sizes:
        ratios = step_times(size, args.rounds)
        print(f"| {size} | " + " | ".join(f"{s:.2f} / {p:.2f}" for s, p in mem[size]) + " | "
              + ", ".join(f"{ratios[c]:.2f}" for c in CONFIGS[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
