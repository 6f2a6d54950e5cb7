"""Checkpoints and faults: kill-and-resume in a fresh process (PyTorch and Optax), the benchmark runner
killed mid-sweep, and load_state_dict refusing a state from a different model or tuner."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")


# ------------------------------------------------------------------------------------ PyTorch kill/resume
TORCH_SCRIPT = r"""
import os, random, signal, sys
import numpy as np, torch
from torch import nn
import torch.nn.functional as F
from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability

torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]
K, N = 6, 14
TUNERS = {
    "cdat_secant_adam_sharp": lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.1), sigma=1.0, ema=0.9,
                                            curvature="secant", sharpness=3, modules=m),
    "cdat_fd_mom": lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-3),
                                  curvature="fd", modules=m),
    "armijo_sgd": lambda m: ArmijoLineSearch(torch.optim.SGD(m.parameters(), lr=1.0), c=0.5, modules=m),
    "eos_adam": lambda m: EdgeOfStability(torch.optim.AdamW(m.parameters(), lr=1.0), sharpness=4,
                                          modules=m),
}
g = torch.Generator().manual_seed(123)
X, Y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 3))

def run(name, start, stop, m, opt, data_gen, lrs):
    for t in range(start, stop):
        idx = torch.randint(0, 256, (32,), generator=data_gen)
        jitter = float(np.random.rand()) * 1e-3 + random.random() * 1e-3  # numpy and python RNGs matter too
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(m(X[idx]), Y[idx]) * (1 + jitter)
            loss.backward()
            return loss
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))

def seed_all():
    torch.manual_seed(7); np.random.seed(7); random.seed(7)
    return torch.Generator().manual_seed(99)

result = {}
if mode in ("full", "part"):
    ckpt = {}
    for name, make in TUNERS.items():
        data_gen = seed_all()
        m = model(); opt = make(m); lrs = []
        run(name, 0, K if mode == "part" else N, m, opt, data_gen, lrs)
        ckpt[name] = {"model": m.state_dict(), "opt": opt.state_dict(), "lrs": lrs, "data": data_gen.get_state(),
                      "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(),
                      "py_rng": random.getstate()}
        # the next tuner's run starts from its own seeds; the RNG states were saved above
    if mode == "part":
        tmp = out + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, out)            # atomic: a kill can never leave half a checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    result = {k: {"lrs": v["lrs"], "model": v["model"]} for k, v in ckpt.items()}
else:  # resume in a fresh process
    ckpt = torch.load(sys.argv[3], weights_only=False)
    for name, make in TUNERS.items():
        c = ckpt[name]
        m = model(); opt = make(m)
        torch.manual_seed(1234); np.random.seed(1234); random.seed(1234)  # scrambled, then restored
        m.load_state_dict(c["model"]); opt.load_state_dict(c["opt"])
        data_gen = torch.Generator(); data_gen.set_state(c["data"])
        torch.set_rng_state(c["torch_rng"]); np.random.set_state(c["np_rng"]); random.setstate(c["py_rng"])
        lrs = list(c["lrs"])
        run(name, K, N, m, opt, data_gen, lrs)
        result[name] = {"lrs": lrs, "model": m.state_dict()}
torch.save(result, out if mode != "part" else out + ".result")
"""


def _run(args, **kw):
    return subprocess.run([sys.executable, "-c", TORCH_SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.mark.slow
def test_torch_kill_and_resume_in_fresh_process_is_bit_identical(tmp_path):
    full, ckpt, resumed = str(tmp_path / "full.pt"), str(tmp_path / "ckpt.pt"), str(tmp_path / "resumed.pt")
    p = _run(["full", full])
    assert p.returncode == 0, p.stderr[-4000:]
    p = _run(["part", ckpt])
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-4000:])  # really killed
    assert os.path.exists(ckpt) and not os.path.exists(ckpt + ".tmp")
    p = _run(["resume", resumed, ckpt])
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = torch.load(full, weights_only=False), torch.load(resumed, weights_only=False)
    assert set(a) == set(b) and len(a) == 4
    for name in a:
        assert a[name]["lrs"] == b[name]["lrs"], name  # bit-identical learning rates
        assert all(lr > 0 for lr in a[name]["lrs"][1:]), (name, a[name]["lrs"])
        for k, v in a[name]["model"].items():
            assert torch.equal(v, b[name]["model"][k]), (name, k)  # parameters and BatchNorm buffers


# --------------------------------------------------------------------------------------- Optax kill/resume
JAX_SCRIPT = r"""
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import serialization
from curvopt.optax import armijo, cdat

mode, out = sys.argv[1], sys.argv[2]
K, N = 5, 12
TUNERS = {
    "cdat_secant_adam_sharp": lambda: cdat(optax.scale_by_adam(), sigma=1.0, ema=0.9, curvature="secant",
                                           sharpness=3),
    "cdat_exact_mom": lambda: cdat(optax.trace(0.9), sigma=2.0, ema=0.9, curvature="exact"),
    "armijo_sgd": lambda: armijo(optax.identity()),
}
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(256, 10)), jnp.float32); Y = jnp.asarray(rng.integers(0, 3, 256))

def init_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w1": 0.3 * jax.random.normal(k1, (10, 24)), "b1": jnp.zeros(24), "w2": 0.3 * jax.random.normal(k2, (24, 3))}

def loss_fn(p, xb, yb, key):
    h = jax.nn.relu(xb @ p["w1"] + p["b1"])
    keep = jax.random.bernoulli(key, 0.8, h.shape)  # dropout: the key is part of the training state
    h = jnp.where(keep, h / 0.8, 0.0)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"], yb).mean()

def make_step(opt):
    @jax.jit
    def step(params, state, key):
        key, k_data, k_drop = jax.random.split(key, 3)
        idx = jax.random.randint(k_data, (32,), 0, 256)
        xb, yb = X[idx], Y[idx]
        value, grad = jax.value_and_grad(loss_fn)(params, xb, yb, k_drop)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss_fn,
                                    xb=xb, yb=yb, key=k_drop)
        return optax.apply_updates(params, updates), state, key
    return step

def lr_of(state):
    return float(state[1].stats.lr)

result = {}
if mode in ("full", "part"):
    ckpt = {}
    for name, make in TUNERS.items():
        opt = make(); params = init_params(); state = opt.init(params); key = jax.random.PRNGKey(42)
        step = make_step(opt); lrs = []
        for t in range(K if mode == "part" else N):
            params, state, key = step(params, state, key); lrs.append(lr_of(state))
        ckpt[name] = {"params": params, "state": state, "key": key, "lrs": np.asarray(lrs)}
    if mode == "part":
        with open(out + ".tmp", "wb") as fh:
            fh.write(serialization.to_bytes(ckpt))
        os.replace(out + ".tmp", out)
        os.kill(os.getpid(), signal.SIGKILL)
    result = ckpt
else:
    targets = {}
    for name, make in TUNERS.items():
        opt = make(); params = init_params()
        targets[name] = {"params": params, "state": opt.init(params), "key": jax.random.PRNGKey(0),
                         "lrs": np.zeros(K)}
    with open(sys.argv[3], "rb") as fh:
        ckpt = serialization.from_bytes(targets, fh.read())
    for name, make in TUNERS.items():
        c = ckpt[name]; opt = make(); step = make_step(opt)
        params, state, key = c["params"], c["state"], c["key"]
        lrs = list(np.asarray(c["lrs"]))
        for t in range(K, N):
            params, state, key = step(params, state, key); lrs.append(lr_of(state))
        result[name] = {"params": params, "state": state, "key": key, "lrs": np.asarray(lrs)}
with open(out, "wb") as fh:
    fh.write(serialization.to_bytes(result))
"""


def _run_jax(args):
    return subprocess.run([sys.executable, "-c", JAX_SCRIPT, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=400)


@pytest.mark.slow
def test_optax_kill_and_resume_in_fresh_process_is_bit_identical(tmp_path):
    import numpy as np
    from flax import serialization

    full, ckpt, resumed = str(tmp_path / "full.msgpack"), str(tmp_path / "ckpt.msgpack"), str(tmp_path / "res")
    p = _run_jax(["full", full])
    assert p.returncode == 0, p.stderr[-4000:]
    p = _run_jax(["part", ckpt])
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-4000:])
    p = _run_jax(["resume", resumed, ckpt])
    assert p.returncode == 0, p.stderr[-4000:]
    with open(full, "rb") as fh:
        a = serialization.msgpack_restore(fh.read())
    with open(resumed, "rb") as fh:
        b = serialization.msgpack_restore(fh.read())
    assert set(a) == set(b) and len(a) == 3
    for name in a:
        assert np.array_equal(a[name]["lrs"], b[name]["lrs"]), (name, a[name]["lrs"], b[name]["lrs"])
        assert (np.asarray(a[name]["lrs"])[1:] > 0).all(), (name, a[name]["lrs"])

        def flat(tree, prefix=""):
            if isinstance(tree, dict):
                for k, v in tree.items():
                    yield from flat(v, f"{prefix}/{k}")
            else:
                yield prefix, np.asarray(tree)

        fa, fb = dict(flat(a[name])), dict(flat(b[name]))
        assert set(fa) == set(fb)
        for k in fa:  # params, the whole optimizer state (moments, EMAs, eigenvectors, counters) and the key
            assert np.array_equal(fa[k], fb[k], equal_nan=fa[k].dtype.kind == "f"), (name, k)


# ---------------------------------------------------------------------------- benchmark runner SIGKILL
# Ways a results file is damaged between runs: a record cut short by the kill, a line cut short and left
# without its newline, a line that is not JSON, JSON that is not an object, an object without a key.
def _cut_last_record(raw):
    body = raw.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    return raw[:start + (len(body) - start) // 2] if len(body) > start else raw


def _line(raw, line):
    """Append a complete line (after a line left open by a killed runner that never got to repair it)."""
    return (raw if not raw or raw.endswith(b"\n") else raw + b"\n") + line + b"\n"


_HALF = b'{"key": "torch|half a rec'
_CORRUPTIONS = [
    _cut_last_record,
    lambda raw: raw + _HALF if not raw or raw.endswith(b"\n") else raw,  # (one open line at most: a runner
    # killed before it repaired the last damage left it open, and a runner appends only after repairing)
    lambda raw: _line(raw, b"this line is not JSON"),
    lambda raw: _line(raw, b"[1, 2, 3]"),
    lambda raw: _line(raw, b'{"no_key": true}'),
    lambda raw: _line(raw, b"42"),
]
_GARBAGE = {b"this line is not JSON", b"[1, 2, 3]", b'{"no_key": true}', b"42"}


#: imported at start-up by every Python process of the failing sweep: an lm run's torch training raises
_FAIL_LM_RUNS = '''
import importlib.abc
import importlib.util
import sys


class _FailLM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "benchmarks.train_torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            run = module.run

            def failing(spec, progress=None):
                if spec.exp.task == "lm":
                    raise RuntimeError("an lm run fails")
                return run(spec, progress)
            module.run = failing
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _FailLM())
'''


@pytest.mark.slow
@pytest.mark.parametrize("failing,jobs", [(False, 1), (True, 1), (True, 2)],
                         ids=["all-ok", "some-fail", "some-fail-2-jobs"])
def test_benchmark_runner_killed_mid_sweep_resumes_each_run_exactly_once(tmp_path, failing, jobs):
    """SIGKILL the runner at random points, damage the results file in each known way, resume: every run is
    recorded exactly once, the damaged lines are kept, and the exit status is non-zero exactly when a run
    failed (the lm runs fail at run time: a sitecustomize on the path makes the torch training of an lm run
    raise, in the runner and in its workers); also with two worker processes (the runner alone writes; its
    workers die with it)."""
    import random

    rng = random.Random(20261130 + failing)
    out = tmp_path / "sweep"
    results = out / "results.jsonl"
    env = ENV
    if failing:
        (tmp_path / "sitecustomize.py").write_text(_FAIL_LM_RUNS)
        env = dict(ENV, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    args = [sys.executable, "-m", "benchmarks", "--suite", "smoke", "--tasks", "mlp,lm" if failing else "mlp",
            "--regimes", "full", "--backend", "torch", "--widths", "8", "--steps", "12", "--tuners",
            "constant:lr=0.05,constant:lr=0.1,constant:lr=0.2,prodigy,schedulefree", "--seeds", "0,1",
            "--no-progress", "--out", str(out), "--jobs", str(jobs)]
    listed = subprocess.run(args + ["--list"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert listed.returncode == 0, listed.stderr[-3000:]
    keys = [ln for ln in listed.stdout.splitlines() if ln.strip()]
    assert len(keys) == (20 if failing else 10), listed.stdout
    kills = 0
    for i in range(len(_CORRUPTIONS)):
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5, 6.0))  # lands anywhere: start-up, mid-run, mid-write
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        raw = results.read_bytes() if results.exists() else b""
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_bytes(_CORRUPTIONS[i](raw))
    assert kills >= 2, "the sweep finished before it could be killed: make it longer"
    final = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert final.returncode == (1 if failing else 0), final.stderr[-3000:]
    if failing:
        assert "run(s) of this plan failed" in final.stderr
    raw = results.read_bytes()
    assert raw.endswith(b"\n")
    records, garbage = [], []
    for line in raw.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "key" in obj:
            records.append(obj)
        else:
            garbage.append(line)
    # damage skipped and kept, not lost (the half line is cut off by the next runner, or kept if it never ran; a
    # record cut by a kill is cut off too, or kept as a damaged line when the next damage closed it before a
    # runner got to it: its run is recorded again below)
    cut = {g for g in garbage if g.startswith(b'{"key":"')}
    assert _GARBAGE <= set(garbage) and set(garbage) - cut <= _GARBAGE | {_HALF}
    assert len(garbage) == len(set(garbage))
    got = [_record_key(r) for r in records]
    assert sorted(got) == sorted(keys), (len(got), len(keys))  # each run exactly once
    statuses = {r["status"] for r in records}
    assert ("error" in statuses) == failing and statuses - {"error"} <= {"ok", "diverged"}
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == final.returncode and results.read_bytes() == raw  # nothing rerun or appended


def _record_key(rec):
    return rec["key"]


# ------------------------------------------------------------------------------ load_state_dict mismatches
DT = torch.float64


def _trained(make_model, make_tuner, steps=2):
    torch.manual_seed(0)
    m = make_model()
    opt = make_tuner(m)
    x = torch.randn(8, 4, dtype=DT)

    def closure():
        opt.zero_grad()
        loss = (m(x) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return m, opt


def _mlp(hidden=5):
    return lambda: nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(DT)


def _cdat(m):
    from curvopt.torch import CDAT

    return CDAT(torch.optim.Adam(m.parameters(), lr=0.1), curvature="secant", sharpness=1)


def test_load_state_dict_from_a_different_model_raises_clearly():
    _, opt = _trained(_mlp(5), _cdat)
    sd = opt.state_dict()
    _, other = _trained(_mlp(6), _cdat, steps=0)  # same number of tensors, other shapes
    with pytest.raises(ValueError, match=r"(?i)shape"):
        other.load_state_dict(sd)
    _, fewer = _trained(lambda: nn.Linear(4, 1).to(DT), _cdat, steps=0)  # fewer tensors
    with pytest.raises(ValueError, match=r"(?i)parameter"):
        fewer.load_state_dict(sd)


def test_load_state_dict_from_a_different_tuner_or_base_raises_clearly():
    from curvopt.torch import ArmijoLineSearch, CDAT, EdgeOfStability, PolyakStep, QuadraticGreedy

    makers = {
        "CDAT": _cdat,
        "QuadraticGreedy": lambda m: QuadraticGreedy(torch.optim.SGD(m.parameters(), lr=1.0)),
        "PolyakStep": lambda m: PolyakStep(torch.optim.Adam(m.parameters(), lr=0.1)),
        "ArmijoLineSearch": lambda m: ArmijoLineSearch(torch.optim.SGD(m.parameters(), lr=1.0)),
        "EdgeOfStability": lambda m: EdgeOfStability(torch.optim.Adam(m.parameters(), lr=0.1), sharpness=1),
    }
    states = {k: _trained(_mlp(), mk)[1].state_dict() for k, mk in makers.items()}
    for src, sd in states.items():
        for dst, mk in makers.items():
            _, opt = _trained(_mlp(), mk, steps=0)
            if src == dst:
                opt.load_state_dict(sd)  # the right state loads
                continue
            with pytest.raises(ValueError, match=src):
                opt.load_state_dict(sd)
    # the same tuner around a different base optimizer
    _, sgd_cdat = _trained(_mlp(), lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=1.0)), steps=0)
    with pytest.raises(ValueError, match="Adam"):
        sgd_cdat.load_state_dict(states["CDAT"])
    # a bare optimizer's state is not a tuner's
    _, opt = _trained(_mlp(), _cdat, steps=0)
    with pytest.raises(ValueError, match="curvopt"):
        opt.load_state_dict(torch.optim.Adam(_mlp()().parameters()).state_dict())
