"""Suite presets: which (task, regime) experiments run, at which widths, with which tuners, seeds and sizes.

* ``smoke``    — every task, torch and jax, 2 widths, a few steps: checks the whole pipeline (CI, ~2 min).
* ``default``  — what ``make bench`` runs, sized for 30 minutes on 2 CPU cores (two runs at once): 3 seeds x 500
  steps; full-batch ViT (1,024 training digits), ResNet (384 digits) and LM (256 blocks of 32 bytes), each at 3
  widths (CDAT against the constant grid at every width, and on the ViT the paper-exact rule too; the
  paper-exact rule, greedy and the peers Prodigy and schedule-free at the middle width, D-Adaptation and
  Sophia-H also on the ViT's; the line search on the ResNet's narrowest, cheapest width), mini-batch ResNet
  and LM (the LM also with CDAT's paper numerator ``"direction"``, the Adam default before the momentum numerator,
  and the opt-in ``"paired"``), JAX rows (ViT: CDAT and
  the constant grid) and muP rows (ViT, 3 widths). The constant grid is √2-spaced and widened while its best
  value sits at an edge (the full-batch SP cells start from 3 values per width around the best constant of earlier
  runs, the muP cell from 3 values shared by its widths, the mini-batch ones from 5; at most 2 added for the ViT,
  whose digits are separable: Adam's loss keeps falling with the lr, so the grid would widen to divergence).
  Online sharpness every 25 steps (100 on the full-batch ResNet and LM, whose closures cost the most).
* ``cpu-long`` — what ``default`` cuts to fit its 30 minutes: 5 seeds, 1,000 full-batch / 2,000 mini-batch
  steps, every tuner (line search, Polyak, edge of stability) and peer, 3 widths of every full-batch task on
  all training digits / 1,024 LM blocks with deeper models, 2 widths in mini-batch, JAX and muP rows for ViT
  and LM. Hours on a CPU.
* ``paper``    — the scale of Roulet et al. (2024): CIFAR-10 4,096-sample subset (``--data-dir``), Tiny
  Shakespeare 2,048 blocks (``--text``), thousands of steps, all tuners, both parameterisations.
  Documented for a GPU; not run here.

Every field of :class:`Experiment` can be narrowed from the command line (``--tasks``, ``--widths``,
``--tuners``, ``--regimes``, ``--steps``, ``--backend``, ``--params``, ...).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from .data import CIFAR10_TEST_FILE, cifar10_files
from .tasks import TASKS

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
    backends: tuple[str, ...] = ("torch",)  # --backend overrides
    params: tuple[str, ...] = ("sp",)  # parameterisations ("sp", "mup"); --params overrides
    #: μP's base width; None: the narrowest of ``widths`` (a cell split by width, :func:`_per_width`: its narrowest)
    mup_base: int | None = None
    #: intra-op threads of torch and XLA (``--threads``): the reductions' order, so the runs' bits (a field test: a
    #: float32 MLP's CDAT losses 6.6e-4 apart between 1 and 2 threads, where a resume had reused the other's runs)
    threads: int = 1

    @property
    def mup_base_width(self) -> int:
        return self.mup_base if self.mup_base is not None else min(self.widths)

    def data_read(self) -> dict:
        """The data the task reads, as a run's record names it: an image task's set and, for CIFAR-10, the absolute
        path of its directory; the LM's text file by its absolute path (None: the bundled ``pydoc_data.topics``)."""
        if TASKS[self.task].kind == "text":
            return {"text": None if self.text_path is None else os.path.abspath(self.text_path)}
        cifar = self.image_set == "cifar10" and self.data_dir is not None
        return {"image_set": self.image_set, "data_dir": os.path.abspath(self.data_dir) if cifar else None}

    def settings_hash(self, param: str | None = None) -> str:
        """Hash of what changes a run's result (not the axes): resume only reuses runs with the same one. The
        widths are an axis, except that μP's base model (:attr:`mup_base_width`) counts (for the experiment's μP runs,
        and for a run of parameterisation ``param`` "mup", as ``--params mup`` makes of an SP experiment). Only the
        data the task reads counts: a local data directory for an image task on CIFAR-10, a text file for the LM,
        each by its absolute path and its contents (:func:`content_digest`: an edited file or a replaced batch
        file is other data, where a resume once mixed runs on the old text with runs on the new in one cell);
        unset or unread, they are left out, so the embedded defaults keep their hashes. So are the threads
        (``--threads``) where they are 1, the default. The code counts too
        (:func:`code_digest`): a resume after an edit of the library or of the code a run executes redoes the runs
        (it once pooled the old seeds with the new in one cell, silently)."""
        d = asdict(self)
        d["code"] = code_digest()
        for k in ("widths", "tuners", "grid", "grid_factor", "widen", "backends", "params", "mup_base"):
            d.pop(k)
        if "mup" in self.params or param == "mup":
            d["mup_base_width"] = self.mup_base_width
        if self.threads == 1:
            d.pop("threads")
        text = TASKS[self.task].kind == "text"
        if text:
            d["image_set"] = "digits"  # (as left unset)
        if d["data_dir"] is None or text or self.image_set != "cifar10":
            d.pop("data_dir")
        else:
            root, train = cifar10_files(d["data_dir"])
            files = train + [os.path.join(root, CIFAR10_TEST_FILE)] if root is not None else []
            d["data_dir"] = os.path.abspath(d["data_dir"]) + "#" + content_digest(files)
        if d["text_path"] is not None and text:
            d["text_path"] = os.path.abspath(d["text_path"]) + "#" + content_digest([d["text_path"]])
        else:
            d["text_path"] = None
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


#: the code a run's result depends on: the library's packages (every ``.py`` file below them) ...
CODE_PACKAGES = ("curvopt", "torch_backend", "jax_backend")
#: ... the benchmark's modules a run executes (not the report, the plan, the command line or the study scripts:
#: an edit there changes no run, and ``--report-only`` still finds the runs) ...
TRAINING_MODULES = ("benchmarks/data.py", "benchmarks/tasks.py", "benchmarks/models_torch.py",
                    "benchmarks/models_flax.py", "benchmarks/tuners.py", "benchmarks/train_torch.py",
                    "benchmarks/train_jax.py", "benchmarks/results.py", "benchmarks/runner.py")
#: ... and the installed distributions it runs on (a version not installed counts as such)
DISTRIBUTIONS = ("torch", "numpy", "scikit-learn", "jax", "jaxlib", "optax", "flax", "prodigyopt", "schedulefree",
                 "dadaptation", "pytorch-optimizer")


@functools.lru_cache(maxsize=4)
def code_digest(root: str = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) -> str:
    """A digest of the code a run executes: the sources of :data:`CODE_PACKAGES` and :data:`TRAINING_MODULES` below
    ``root`` (the repository this file is in; by path, ``/``-separated, and contents) and the versions of
    :data:`DISTRIBUTIONS`; read once per process."""
    modules = {os.path.join(root, *m.split("/")) for m in TRAINING_MODULES}
    packages = {f for pkg in CODE_PACKAGES for f in glob.glob(os.path.join(root, pkg, "**", "*.py"), recursive=True)}
    files = sorted(packages | {f for f in modules if os.path.isfile(f)})
    h = hashlib.sha1()
    for f in files:
        h.update(os.path.relpath(f, root).replace(os.sep, "/").encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    for name in DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        h.update(f"{name}={version}\0".encode())
    return h.hexdigest()[:12]


def content_digest(files: Sequence[str]) -> str:
    """A digest of the names and bytes of the data files a task reads (``"missing"`` for those that are not
    there), read once per process for each file's size and modification time."""
    stamps = []
    for f in files:
        f = os.path.abspath(f)
        st = os.stat(f) if os.path.isfile(f) else None
        stamps.append((f, None if st is None else (st.st_size, st.st_mtime_ns)))
    return _digest(tuple(stamps))


@functools.lru_cache(maxsize=16)
def _digest(stamps: tuple) -> str:
    h = hashlib.sha1()
    for f, stamp in stamps:
        h.update(os.path.basename(f).encode() + b"\0")
        if stamp is None:
            h.update(b"missing\0")
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


#: default constant-lr grids (factor √2, 9 values), per base optimizer, when an experiment gives none
DEFAULT_GRIDS = {
    "gd": grid(0.25, 9, 2 ** 0.5),
    "momentum": grid(0.025, 9, 2 ** 0.5),
    "adam": grid(2e-3, 9, 2 ** 0.5),
}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    experiments: tuple[Experiment, ...]
    seeds: tuple[int, ...] = (0,)
    jobs: int = 1  # runs at once (worker processes); --jobs overrides


R2 = 2 ** 0.5
PEERS = ("prodigy", "schedulefree", "dadapt", "sophia")  # at their own defaults
CDATS = ("cdat", "cdat:startup=paper")  # the library default beside the paper-exact start-up
ALL_TUNERS = ("constant",) + CDATS + ("greedy", "linesearch", "polyak", "eos") + PEERS

SMOKE = Suite(
    "smoke",
    "every task, 2 widths in torch and 1 in jax, a few steps (pipeline check, CI); every tuner on the MLP",
    (
        Experiment("mlp", "full", (16, 32), ALL_TUNERS, 6, full_batch_size=128, eval_size=128,
                   grid=grid(0.25, 3, 2), sharpness=3),
        Experiment("mlp", "full", (16,), ALL_TUNERS, 6, full_batch_size=128, eval_size=128,
                   grid=grid(0.25, 3, 2), sharpness=3, backends=("jax",)),
        Experiment("resnet", "full", (4, 8), ("constant",) + CDATS, 4, full_batch_size=64, eval_size=64,
                   grid=grid(0.25, 3, 2), sharpness=0),
        Experiment("vit", "full", (8, 16), ("constant",) + CDATS, 4, full_batch_size=64, eval_size=64,
                   model={"depth": 1}, grid=grid(2e-3, 3, 2), sharpness=0),
        Experiment("lm", "full", (8, 16), ("constant",) + CDATS, 4, full_batch_size=32, eval_size=32,
                   block_len=16, model={"depth": 1}, grid=grid(2e-3, 3, 2), sharpness=0),
        Experiment("resnet", "full", (4,), ("constant", "cdat"), 4, full_batch_size=64, eval_size=64,
                   grid=grid(0.25, 3, 2), sharpness=0, backends=("jax",)),
        Experiment("vit", "full", (8,), ("constant", "cdat"), 4, full_batch_size=64, eval_size=64,
                   model={"depth": 1}, grid=grid(2e-3, 3, 2), sharpness=0, backends=("jax",)),
        Experiment("lm", "full", (8,), ("constant", "cdat"), 4, full_batch_size=32, eval_size=32,
                   block_len=16, model={"depth": 1}, grid=grid(2e-3, 3, 2), sharpness=0, backends=("jax",)),
        Experiment("mlp", "mini", (16, 32), ("constant", "cdat"), 6, batch_size=32, eval_size=128,
                   grid=grid(0.1, 3, 2), sharpness=0, params=("sp", "mup")),
    ),
)

MINI = ("constant",) + CDATS + ("prodigy", "schedulefree")
VIT = {"depth": 1, "heads": 2, "patch": 4, "mlp_ratio": 2}
LM = {"depth": 1, "heads": 2, "mlp_ratio": 2}
DIGITS_TRAIN = 1438  # every training digit (the other 359 of the 1,797 are the eval split)


def _per_width(exp: Experiment, centres: dict[int, float], every: tuple[str, ...],
               middle: tuple[str, ...]) -> tuple[Experiment, ...]:
    """``exp`` once per width of ``centres`` (width -> the centre of that width's 3-value √2 constant grid), with
    the tuners ``every`` at each width and ``middle`` too at the middle one. The centres are where the best
    constant sat in earlier runs of the suite; the widening (``exp.widen``) follows the best wherever it lies, so
    a centre only saves the runs the widening would add (one shared grid for 3 widths widened by 3-4 values).
    μP's base is the narrowest of the widths (``--params mup``; each width its own base had no μP scaling)."""
    widths = sorted(centres)
    return tuple(replace(exp, widths=(w,), grid=grid(centres[w], 3, R2), mup_base=widths[0],
                         tuners=every + (middle if w == widths[len(widths) // 2] else ()))
                 for w in widths)


DEFAULT = Suite(
    "default",
    "3 seeds x 500 steps, √2 constant grid per width widened at its edges: full-batch ViT (1,024 digits), ResNet "
    "(384 digits) and LM (256 blocks), 3 widths each (CDAT at every width; the paper rule, greedy and the peers at "
    "the middle one, the ViT's paper rule at every width, the ResNet's line search at the narrowest); mini-batch "
    "ResNet and LM; JAX rows (ViT) and "
    "muP rows (ViT, 3 widths, 256 digits); sized for 30 minutes on 2 CPU cores (the rest: --suite cpu-long)",
    _per_width(Experiment("vit", "full", (), (), 500, model=VIT, full_batch_size=1024, eval_size=359,
                          widen=2, sharpness=25),
               {4: 0.09051, 8: 0.128, 16: 0.128}, ("constant",) + CDATS,
               ("greedy",) + PEERS)
    + _per_width(Experiment("resnet", "full", (), (), 500, full_batch_size=384, eval_size=359, widen=4,
                            sharpness=100),
                 {2: 0.5006, 4: 0.2503, 8: 0.1771}, ("constant", "cdat"),
                 ("cdat:startup=paper", "greedy", "prodigy", "schedulefree"))
    + (Experiment("resnet", "full", (2,), ("constant", "linesearch"), 500, full_batch_size=384, eval_size=359,
                  grid=grid(0.5006, 3, R2), widen=4, sharpness=100),)  # the line search at the cheapest width
    + _per_width(Experiment("lm", "full", (), (), 500, model=LM, full_batch_size=256, block_len=32, eval_size=256,
                            widen=4, sharpness=100),
                 {4: 0.06399, 8: 0.032, 16: 0.032}, ("constant", "cdat"),
                 ("cdat:startup=paper", "prodigy", "schedulefree"))
    + (
        Experiment("resnet", "mini", (8,), MINI, 500, batch_size=64, eval_size=359,
                   grid=grid(0.5, 5, R2), widen=4, sharpness=25),
        Experiment("lm", "mini", (16,), MINI + ("cdat:numerator=direction", "cdat:numerator=paired"), 500, model=LM,
                   batch_size=16, block_len=32, eval_size=256,
                   grid=grid(0.032, 5, R2), widen=4, sharpness=25),
        Experiment("vit", "full", (8,), ("constant", "cdat"), 500, model=VIT,
                   full_batch_size=1024, eval_size=359, grid=grid(0.128, 3, R2), widen=2, sharpness=25,
                   backends=("jax",)),
        Experiment("vit", "full", (8, 16, 32), ("constant",) + CDATS, 500, model=VIT, full_batch_size=256,
                   eval_size=359, grid=grid(0.064 * R2, 3, R2), widen=2, sharpness=25, params=("mup",)),
    ),
    seeds=(0, 1, 2),
    jobs=2,
)

VIT_LONG = {"depth": 2, "heads": 2, "patch": 2, "mlp_ratio": 2}
LM_LONG = {"depth": 2, "heads": 2, "mlp_ratio": 2}
CPU_LONG = Suite(
    "cpu-long",
    "what the default suite cuts, for a long CPU run (hours): 5 seeds x 1,000 full-batch steps (2,000 "
    "mini-batch), every tuner and peer, 3 widths of every task on all 1,438 training digits / 1,024 LM "
    "blocks, deeper ViT (patch 2) and LM, mini-batch at 2 widths, JAX and muP rows for ViT and LM",
    (
        Experiment("resnet", "full", (4, 8, 16), ALL_TUNERS, 1000, full_batch_size=DIGITS_TRAIN, eval_size=359,
                   grid=grid(0.25, 7, R2), widen=6),
        Experiment("vit", "full", (16, 32, 64), ALL_TUNERS, 1000, model=VIT_LONG, full_batch_size=DIGITS_TRAIN,
                   eval_size=359, grid=grid(0.008, 7, R2), widen=6, backends=("torch", "jax"),
                   params=("sp", "mup")),
        Experiment("lm", "full", (16, 32, 64), ALL_TUNERS, 1000, model=LM_LONG, full_batch_size=1024,
                   block_len=32, eval_size=512, grid=grid(0.016, 7, R2), widen=6, backends=("torch", "jax"),
                   params=("sp", "mup")),
        Experiment("resnet", "mini", (8, 16), ALL_TUNERS, 2000, batch_size=64, eval_size=359,
                   grid=grid(0.5, 7, R2), widen=6),
        Experiment("lm", "mini", (16, 32), ALL_TUNERS, 2000, model=LM_LONG, batch_size=32, block_len=32,
                   eval_size=512, grid=grid(0.016, 7, R2), widen=6),
    ),
    seeds=(0, 1, 2, 3, 4),
    jobs=2,
)

PAPER = Suite(
    "paper",
    "the paper's scale (GPU): CIFAR-10 4,096 subset (--data-dir), Tiny Shakespeare 2,048 blocks (--text; without it "
    "the bundled pydoc text), "
    "thousands of steps, every tuner, SP and muP",
    (
        Experiment("resnet", "full", (16, 32, 64, 128), ALL_TUNERS, 5000, model={"depth": 2, "stages": 3},
                   full_batch_size=4096, eval_size=10000, image_set="cifar10", sharpness=20, widen=6,
                   backends=("torch", "jax"), params=("sp", "mup")),
        Experiment("vit", "full", (64, 128, 256), ALL_TUNERS, 5000, model={"depth": 4, "heads": 4, "patch": 4},
                   full_batch_size=4096, eval_size=10000, image_set="cifar10", sharpness=20, widen=6,
                   backends=("torch", "jax"), params=("sp", "mup")),
        Experiment("lm", "full", (64, 128, 256), ALL_TUNERS, 5000, model={"depth": 4, "heads": 4},
                   full_batch_size=2048, block_len=128, eval_size=512, sharpness=20, widen=6,
                   backends=("torch", "jax"), params=("sp", "mup")),
        Experiment("resnet", "mini", (32, 64, 128), ALL_TUNERS, 10000, model={"depth": 2, "stages": 3},
                   batch_size=256, eval_size=10000, image_set="cifar10", grid=grid(0.1, 9, R2), sharpness=50,
                   widen=6, backends=("torch", "jax")),
        Experiment("lm", "mini", (128, 256), ALL_TUNERS, 10000, model={"depth": 4, "heads": 4},
                   batch_size=64, block_len=128, eval_size=512, sharpness=50, widen=6, backends=("torch", "jax")),
    ),
    seeds=(0, 1, 2),
)

SUITES = {s.name: s for s in (SMOKE, DEFAULT, CPU_LONG, PAPER)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return SUITES[name]


def narrow(exp: Experiment, **overrides) -> Experiment:
    """``exp`` with the given non-None fields replaced."""
    return replace(exp, **{k: v for k, v in overrides.items() if v is not None})


def at_widths(experiments: Sequence[Experiment], widths: Sequence[int],
              backends: Sequence[str] | None = None) -> list[Experiment]:
    """The experiments at the given widths (``--widths``). Experiments that split one report cell by width (the
    default suite's, each width with its own constant grid, :func:`_per_width`) become one experiment per width
    asked for, with the grid of the suite's nearest width (on a log scale), the tuners of them all and μP's base
    at the narrowest of the cell's and the asked widths (``--widths 64`` alone: μP scaled from the cell's base, not
    a base of its own, where μP and SP coincide); setting
    every one of them to the asked width instead merged their grids into one of near-duplicate values (0.177 and
    0.1771), each widened on its own. Other experiments take the widths as they are (μP's base: the narrower of
    theirs and the asked). ``backends``: the backends
    every experiment runs on (``--backend``; None: each its own), so that a JAX row run in PyTorch joins its cell."""
    cells: dict[tuple, list[Experiment]] = {}
    for e in experiments:
        on = tuple(backends) if backends is not None else e.backends
        cells.setdefault((e.settings_hash(), on, e.params, e.widen, e.grid_factor), []).append(e)
    out: list[Experiment] = []
    for group in cells.values():
        if len(group) == 1:
            out.append(replace(group[0], widths=tuple(widths), mup_base=min(min(widths), group[0].mup_base_width)))
            continue
        tuners = tuple(dict.fromkeys(t for e in group for t in e.tuners))
        for w in widths:
            nearest = min(group, key=lambda e: min(abs(math.log(w / x)) for x in e.widths))
            out.append(replace(nearest, widths=(w,), tuners=tuners,
                               mup_base=min(min(widths), *(e.mup_base_width for e in group))))
    return out
