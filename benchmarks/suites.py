"""Suite presets: which (task, regime) experiments run, at which widths, with which tuners and sizes.

* ``smoke``   — every task, both backends, 2 widths, a few steps: checks the whole pipeline (CI).
* ``default`` — what ``make bench`` runs on a 2-core CPU: full-batch ResNet, ViT and LM at 3 widths,
  CDAT vs greedy vs line search vs the tuned constant grid, plus one mini-batch task (ResNet).
* ``paper``   — the scale of Roulet et al. (2024): CIFAR-10 4,096-sample subset (``--data-dir``), Tiny
  Shakespeare 2,048 blocks (``--text``), thousands of steps, all tuners, both parameterisations.
  Documented for a GPU; not run here.

Every field of :class:`Experiment` can be narrowed from the command line (``--tasks``, ``--widths``,
``--tuners``, ``--regimes``, ``--steps``, ...).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

__all__ = ["Experiment", "Suite", "SUITES", "get_suite", "grid"]


def grid(center: float, n: int = 7, factor: float = 2.0) -> tuple[float, ...]:
    """``n`` learning rates spaced by ``factor`` around ``center`` (log-centred)."""
    lo = -(n // 2)
    return tuple(float(center * factor ** (lo + i)) for i in range(n))


@dataclass(frozen=True)
class Experiment:
    """One task in one regime; runs = widths x tuners (constant: one run per grid value) x seeds x backends."""

    task: str
    regime: str  # "full" | "mini"
    widths: tuple[int, ...]
    tuners: tuple[str, ...]
    steps: int
    base: str | None = None  # None: the task's paper pairing (gd for resnet/mlp, adam for vit/lm)
    model: dict = field(default_factory=dict)
    full_batch_size: int = 512
    batch_size: int = 64
    eval_size: int = 512
    block_len: int = 32
    grid: tuple[float, ...] | None = None  # constant-lr grid; None: per-base default
    grid_factor: float = 2 ** 0.5  # spacing of the values the grid is widened by
    widen: int = 0  # at most this many values added beyond the grid's edges (benchmarks.plan.widening)
    sharpness: int = 10  # online sharpness every k steps inside the curvopt tuners (0 = off)
    image_set: str = "digits"
    data_dir: str | None = None
    text_path: str | None = None

    def settings_hash(self) -> str:
        """Hash of what changes a run's result (not the axes): resume only reuses runs with the same one."""
        d = asdict(self)
        for k in ("widths", "tuners", "grid", "grid_factor", "widen", "data_dir"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


#: default constant-lr grids (factor 2), per base optimizer; full batch (the paper's regime) and mini batch
DEFAULT_GRIDS = {
    "gd": grid(0.25, 9),         # 2^-6 .. 2^2 (x 0.25 centre)
    "momentum": grid(0.025, 9),
    "adam": grid(2e-3, 9),        # ~1.2e-4 .. 3.2e-2
}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    experiments: tuple[Experiment, ...]
    backends: tuple[str, ...] = ("torch",)
    seeds: tuple[int, ...] = (0,)
    params: tuple[str, ...] = ("sp",)


FULL_TUNERS = ("constant", "cdat", "greedy", "linesearch")
ALL_TUNERS = ("constant", "cdat", "greedy", "linesearch", "polyak", "eos", "prodigy", "schedulefree")

SMOKE = Suite(
    "smoke",
    "every task, both backends, 2 widths, a few steps (pipeline check, CI); every tuner on the MLP",
    (
        Experiment("mlp", "full", (16, 32), ALL_TUNERS, 6, full_batch_size=128, eval_size=128,
                   grid=grid(0.25, 7), sharpness=3),
        Experiment("resnet", "full", (4, 8), ("constant", "cdat"), 4, full_batch_size=64, eval_size=64,
                   grid=grid(0.25, 7), sharpness=0),
        Experiment("vit", "full", (8, 16), ("constant", "cdat"), 4, full_batch_size=64, eval_size=64,
                   model={"depth": 1}, grid=grid(2e-3, 7), sharpness=0),
        Experiment("lm", "full", (8, 16), ("constant", "cdat"), 4, full_batch_size=32, eval_size=32,
                   block_len=16, model={"depth": 1}, grid=grid(2e-3, 7), sharpness=0),
        Experiment("mlp", "mini", (16, 32), ("constant", "cdat"), 6, batch_size=32, eval_size=128,
                   grid=grid(0.1, 7), sharpness=0),
    ),
    backends=("torch", "jax"),
)

DEFAULT = Suite(
    "default",
    "full-batch resnet, vit, lm at 3 widths (CDAT vs greedy vs line search vs the tuned constant grid) "
    "plus mini-batch resnet; sized for a 2-core CPU",
    (
        Experiment("resnet", "full", (4, 8, 16), FULL_TUNERS, 150, full_batch_size=128, eval_size=359,
                   sharpness=10),
        Experiment("vit", "full", (16, 32, 64), FULL_TUNERS, 150, full_batch_size=128, eval_size=359,
                   sharpness=10),
        Experiment("lm", "full", (16, 32, 64), FULL_TUNERS, 150, full_batch_size=32, block_len=32,
                   eval_size=256, sharpness=10),
        Experiment("resnet", "mini", (16,), ("constant", "cdat"), 300, batch_size=64, eval_size=359,
                   grid=grid(0.25, 7), sharpness=0),
    ),
)

PAPER = Suite(
    "paper",
    "the paper's scale (GPU): CIFAR-10 4,096 subset (--data-dir), Tiny Shakespeare 2,048 blocks (--text), "
    "thousands of steps, every tuner, SP and muP",
    (
        Experiment("resnet", "full", (16, 32, 64, 128), ALL_TUNERS, 5000, model={"depth": 2, "stages": 3},
                   full_batch_size=4096, eval_size=10000, image_set="cifar10", sharpness=20),
        Experiment("vit", "full", (64, 128, 256), ALL_TUNERS, 5000,
                   model={"depth": 4, "heads": 4, "patch": 4}, full_batch_size=4096, eval_size=10000,
                   image_set="cifar10", sharpness=20),
        Experiment("lm", "full", (64, 128, 256), ALL_TUNERS, 5000, model={"depth": 4, "heads": 4},
                   full_batch_size=2048, block_len=128, eval_size=512, sharpness=20),
        Experiment("resnet", "mini", (32, 64, 128), ALL_TUNERS, 10000, model={"depth": 2, "stages": 3},
                   batch_size=256, eval_size=10000, image_set="cifar10", grid=grid(0.1, 9), sharpness=50),
        Experiment("lm", "mini", (128, 256), ALL_TUNERS, 10000, model={"depth": 4, "heads": 4},
                   batch_size=64, block_len=128, eval_size=512, sharpness=50),
    ),
    backends=("torch", "jax"),
    seeds=(0, 1, 2),
    params=("sp", "mup"),
)

SUITES = {s.name: s for s in (SMOKE, DEFAULT, PAPER)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return SUITES[name]


def narrow(exp: Experiment, **overrides) -> Experiment:
    """``exp`` with the given non-None fields replaced."""
    return replace(exp, **{k: v for k, v in overrides.items() if v is not None})
