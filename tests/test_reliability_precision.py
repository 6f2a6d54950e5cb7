"""Mixed precision and compilation: bf16 autocast (PyTorch), bf16 parameters (JAX), torch.compile.

The tuners' own accumulators (CDAT's moving averages, -g^T u, u^T H u, the learning rate) must stay in
float32 when the model computes (autocast) or stores (JAX bf16 params) in bfloat16; 200 steps of the small
byte LM must run without a NaN. A torch.compile'd model gives the eager learning rates under the fd and
secant oracles.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK, VOCAB, WIDTH = 32, 256, 32


def lm_data(blocks=64):
    from benchmarks.data import lm_blocks, load_text_bytes

    x, y = lm_blocks(load_text_bytes(), BLOCK, max_blocks=blocks)
    return torch.as_tensor(x).long(), torch.as_tensor(y).long()


def torch_lm(seed=0):
    from benchmarks.models_torch import build_model

    return build_model("lm", (BLOCK,), VOCAB, width=WIDTH, depth=1, seed=seed)


def _accumulators(opt):
    """Every floating tensor the tuner keeps for itself (not the base's state)."""
    out = {k: v for k, v in opt.stats.items() if isinstance(v, torch.Tensor)}
    for i, t in enumerate(getattr(opt, "_cdat", ())):
        out[f"cdat{i}"] = t
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["cdat_fd", "cdat_secant", "armijo"])
def test_torch_bf16_autocast_200_steps_no_nan_float32_accumulators(tuner):
    from curvopt.torch import CDAT, ArmijoLineSearch

    torch.set_num_threads(1)
    x, y = lm_data()
    model = torch_lm()
    base = torch.optim.Adam(model.parameters(), lr=1.0)
    if tuner == "armijo":
        opt = ArmijoLineSearch(base, c=0.5, max_trials=10, init_lr=1e-2)
    else:
        opt = CDAT(base, sigma=1.0, ema=0.9, curvature=tuner.split("_")[1], modules=model)
    g = torch.Generator().manual_seed(0)
    losses, lrs = [], []
    steps = 200 if tuner != "armijo" else 120
    for _ in range(steps):
        # the secant oracle differences gradients of consecutive steps: it is meant for full batch (fixed
        # batch here); in mini-batch it also sees the gradient noise (documented)
        idx = torch.arange(16) if tuner == "cdat_secant" else torch.randint(0, x.shape[0], (16,), generator=g)

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x[idx])
            assert logits.dtype == torch.bfloat16  # the model really computes in bf16
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y[idx].reshape(-1))
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
        lrs.append(float(opt.stats["lr"]))
    assert all(math.isfinite(v) for v in losses), losses
    assert all(math.isfinite(v) and v >= 0 for v in lrs)
    assert opt.stats["skipped"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-20:]) / 20 < losses[0] - 1.0  # it trains
    for name, t in _accumulators(opt).items():
        assert t.dtype == torch.float32, (name, t.dtype)


JAX_BF16 = r"""
import json, math
import jax, jax.numpy as jnp, numpy as np, optax
from benchmarks.data import lm_blocks, load_text_bytes
from benchmarks.models_flax import build_model
from curvopt.optax import cdat

x, y = lm_blocks(load_text_bytes(), 32, max_blocks=64)
model = build_model("lm", (32,), 256, width=32, depth=1)
params32 = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32), jnp.int32), train=False)["params"]
params = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params32)

def loss_fn(p, xb, yb):
    logits = model.apply({"params": p}, xb)
    assert logits.dtype == jnp.bfloat16
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb).mean()

OPTS = {
    "cdat_exact": lambda: cdat(optax.scale_by_adam(), sigma=1.0, ema=0.9, curvature="exact"),
    "cdat_secant": lambda: cdat(optax.scale_by_adam(), sigma=1.0, ema=0.9, curvature="secant"),
    # no "fd" here: with bf16 parameters the probe's displacement and both gradients are bf16, so the
    # difference quotient has about two significant digits at best (documented; use exact or secant)
}
out = {}
for name, make in OPTS.items():
    opt = make()
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        value, grad = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss_fn, xb=xb, yb=yb)
        return optax.apply_updates(p, updates), s, value

    rng = np.random.default_rng(0)
    p, losses, lrs = params, [], []
    for t in range(200):
        # secant differences consecutive gradients: full batch (a fixed batch) as it is meant to be used
        idx = np.arange(16) if name == "cdat_secant" else rng.integers(0, x.shape[0], 16)
        p, state, value = step(p, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        tstate = state[1]
        losses.append(float(value)); lrs.append(float(tstate.stats.lr))
    floats = {k: str(v.dtype) for k, v in tstate.stats._asdict().items()
              if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating)}
    rule = [str(t.dtype) for t in jax.tree_util.tree_leaves(tstate.rule)] if hasattr(tstate, "rule") else []
    out[name] = {"losses": losses, "lrs": lrs, "skipped": int(tstate.stats.skipped), "floats": floats, "rule": rule,
                 "param_dtypes": sorted({str(t.dtype) for t in jax.tree_util.tree_leaves(p)}),
                 "finite": bool(all(bool(jnp.all(jnp.isfinite(t.astype(jnp.float32))))
                                    for t in jax.tree_util.tree_leaves(p)))}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_jax_bf16_params_200_steps_no_nan_float32_accumulators():
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", JAX_BF16], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    for name, r in out.items():
        assert r["param_dtypes"] == ["bfloat16"], name  # the parameters stay bf16
        assert r["finite"], name
        assert all(math.isfinite(v) for v in r["losses"]), name
        assert all(math.isfinite(v) and v >= 0 for v in r["lrs"]), name
        assert r["skipped"] == 0, name
        assert sum(r["losses"][-20:]) / 20 < r["losses"][0] - 1.0, (name, r["losses"][::20])
        assert set(r["floats"].values()) == {"float32"}, (name, r["floats"])
        assert set(r["rule"]) <= {"float32"}, (name, r["rule"])


# ----------------------------------------------------------------------------------------- torch.compile
def _mlp(seed=0):
    torch.manual_seed(seed)
    # float64: the fd curvature is accurate to sqrt(eps) of the dtype, and inductor's fused kernels round
    # differently from eager; in float32 that alone is ~1e-4 relative, in float64 ~1e-8
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()


def _run_compile(oracle, compiled, steps=15):
    from curvopt.torch import CDAT

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (64,), generator=g)
    model = _mlp()
    fwd = torch.compile(model, backend="inductor", dynamic=False) if compiled else model
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9), sigma=1.0, ema=0.9, curvature=oracle)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        return loss

    lrs = []
    for _ in range(steps):
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
    return lrs


@pytest.mark.slow
@pytest.mark.parametrize("oracle", ["fd", "secant"])
def test_torch_compile_same_learning_rates_as_eager(oracle):
    torch.set_num_threads(1)
    torch._dynamo.reset()
    eager = _run_compile(oracle, False)
    compiled = _run_compile(oracle, True)
    assert all(lr > 0 for lr in eager)
    rel = max(abs(a - b) / abs(b) for a, b in zip(compiled, eager))
    assert rel <= 1e-5, (rel, compiled, eager)


@pytest.mark.slow
def test_torch_compile_exact_oracle_is_right_or_refuses_clearly():
    """The exact oracle differentiates ``functional_loss`` with torch.func (forward over forward); through a
    compiled module that either works (torch 2.13 runs it, falling back from the compiled graph) and then
    agrees with the fd curvature, or fails with a message that names the exact mode and the fd alternative."""
    from curvopt.torch import CDAT

    torch.set_num_threads(1)
    model = _mlp()
    fwd = torch.compile(model, backend="inductor", dynamic=False)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]

    def functional_loss(ps):
        return F.cross_entropy(torch.func.functional_call(fwd, dict(zip(names, ps)), (x,)), y)

    curv = {}
    for oracle in ("fd", "exact"):
        with torch.no_grad():
            for p, w in zip(model.parameters(), w0):
                p.copy_(w)
        opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0), curvature=oracle,
                   functional_loss=functional_loss if oracle == "exact" else None)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            return loss

        try:
            opt.step(closure)
        except Exception as e:  # noqa: BLE001 - the message is what matters
            assert oracle == "exact" and "exact" in str(e) and "fd" in str(e), str(e)[:2000]
            return
        curv[oracle] = float(opt.stats["curvature"])
    assert abs(curv["exact"] - curv["fd"]) <= 1e-6 * abs(curv["exact"]), curv


def test_adam_preconditioner_of_bfloat16_parameters_is_finite_in_both_backends():
    """Adam's ``P`` from bfloat16 moments is computed in float32 (in bfloat16 ``0.999`` rounds to 1, so
    ``1 - beta2^t`` is 0 and ``P`` was infinite everywhere: the edge-of-stability rate stayed 0, the momentum
    numerator's correction vanished); it equals ``P`` from the same moments in float32 to bfloat16's precision."""
    import jax.numpy as jnp
    import optax

    from curvopt.optax import preconditioner_from_adam_state
    from curvopt.torch import adam_preconditioner_from_optimizer

    w = torch.linspace(-1, 1, 12).reshape(3, 4)
    ps = {dt: w.clone().to(dt).requires_grad_() for dt in (torch.bfloat16, torch.float32)}
    opts = {dt: torch.optim.Adam([p], lr=1e-3) for dt, p in ps.items()}
    tx = optax.scale_by_adam()
    states = {dt: tx.init(jnp.asarray(w.numpy(), dt)) for dt in (jnp.bfloat16, jnp.float32)}
    for t in range(5):
        g = torch.sin(w * (t + 1))
        for dt, p in ps.items():
            p.grad = g.to(dt)
            opts[dt].step()
        for dt in states:
            _, states[dt] = tx.update(jnp.asarray(g.numpy(), dt), states[dt])
    want = adam_preconditioner_from_optimizer(opts[torch.float32])[0]
    got = adam_preconditioner_from_optimizer(opts[torch.bfloat16])[0]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    want_j = preconditioner_from_adam_state(states[jnp.float32])
    got_j = preconditioner_from_adam_state(states[jnp.bfloat16])
    assert got_j.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got_j)))
    assert float(jnp.max(jnp.abs(got_j / want_j - 1))) < 2e-2


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_jax_fd_probe_sized_for_the_precision_value_fn_computes_in(compute):
    """flax's mixed precision (float32 parameters, a model computing in bf16/fp16): the fd displacement is
    sized from the coarsest dtype in value_fn's jaxpr, not only the parameters'. A float32-sized probe rounded
    away in bf16 (curvature 0, greedy rate 0); now the greedy rate on a quadratic is g^T g / g^T A g to the
    compute precision's accuracy."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from curvopt.optax import quadratic_greedy, stats

    cdt = jnp.dtype(compute)
    a = jnp.diag(jnp.array([1.0, 3.0, 10.0, 2.0]))

    def loss(p):
        w = p["w"].astype(cdt)
        return (0.5 * w @ a.astype(cdt) @ w).astype(jnp.float32)

    p = {"w": jnp.array([1.0, 1.0, 1.0, 0.5], jnp.float32)}
    opt = quadratic_greedy(optax.identity(), curvature="fd")
    v, g = jax.value_and_grad(loss)(p)
    _, s = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v, value_fn=loss))(g, opt.init(p), p, v)
    gf = np.asarray(g["w"], np.float64)
    expected = gf @ gf / (gf @ np.asarray(a, np.float64) @ gf)
    assert float(stats(s)["lr"]) == pytest.approx(expected, rel=3e-2)


@pytest.mark.parametrize("sized", [True, False])
def test_torch_fd_probe_sized_for_the_precision_the_closure_computes_in(sized, monkeypatch):
    """PyTorch's counterpart of the test above: float32 parameters, a closure computing in bf16 under
    torch.autocast. The tuner reads the closure's precision on its first call (torch_backend.precision) and sizes
    the fd displacement for it; sized for float32 (``sized=False``: what it did before) the probe is rounded away
    and the greedy rate is noise."""
    import torch_backend.buffers as buffers
    from curvopt.torch import QuadraticGreedy

    if not sized:
        monkeypatch.setattr(buffers, "computation_eps", lambda fn: (fn(), 0.0))
    a = torch.diag(torch.tensor([1.0, 3.0, 10.0, 2.0]))
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 0.5]))
    opt = QuadraticGreedy(torch.optim.SGD([w], lr=1.0), curvature="fd")

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = 0.5 * (w @ a @ w)
        assert loss.dtype == torch.bfloat16
        loss.float().backward()
        return loss.float()

    opt.step(closure)
    g = w.detach().new_tensor([1.0, 3.0, 10.0, 1.0]).double()  # a w at the start
    expected = float(g @ g / (g @ a.double() @ g))
    got = float(opt.stats["lr"])
    if sized:
        assert opt.probe_guard.compute_eps == torch.finfo(torch.bfloat16).eps
        assert got == pytest.approx(expected, rel=3e-2)
    else:
        assert got != pytest.approx(expected, rel=3e-2)


def test_torch_fd_probe_ignores_a_low_precision_metric_beside_the_loss():
    """A low-precision field test: a float32 loss with a bfloat16 metric of the weights logged in the closure (a
    parameter-dependent op that never reaches the loss) sized the probe for bfloat16 (256x too large; greedy rates
    up to 36 % off), where Optax reads only what the loss is computed through. Only the loss's graph counts; a
    closure whose loss has no graph is read whole, as before."""
    from torch_backend.precision import computation_eps

    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    log = []

    def closure():
        loss = (w ** 2).sum()
        log.append(w.to(torch.bfloat16).norm())
        loss.backward()
        return loss
    assert computation_eps(closure)[1] == torch.finfo(torch.float32).eps
    assert computation_eps(lambda: closure().detach())[1] == torch.finfo(torch.bfloat16).eps

    def autocast_closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (w @ torch.ones(2, 2) @ w).float()
        loss.backward()
        return loss
    assert computation_eps(autocast_closure)[1] == torch.finfo(torch.bfloat16).eps


def _autocast_mlp_run(dtype, steps=2, noise_correction=False):
    """Closure-free CDAT behind Adam on a small GELU MLP, the forward pass under ``torch.autocast(dtype)`` (None:
    float32): ``(lrs, curvatures)`` of the first ``steps`` steps. Without the noise correction, which on the step
    after the probe reads the bf16 rounding as noise and holds that step's curvature at its floor
    (curvopt.curvature.gradient_weight; over 100 steps the run ends as float32's does)."""
    from curvopt.torch import CDAT

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=gen)
    y = (x @ torch.randn(20, 3, generator=gen)).argmax(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 3))
    opt = CDAT(torch.optim.Adam(model.parameters(), lr=1.0), noise_correction=noise_correction)
    lrs, curvatures = [], []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        lrs.append(float(opt.stats["lr"]))
        curvatures.append(float(opt.stats["curvature"]))
    return lrs, curvatures


@pytest.mark.parametrize("sized", [True, False])
def test_torch_closure_free_probe_sized_for_an_autocast_forward(sized, monkeypatch):
    """Closure-free, the first step only probes (lr = h) and the next step's secant differences the gradients
    across it. Sized for the float32 parameters (``sized=False``: what it did before) the probe moves the
    weights less than a bfloat16 cast resolves, and the secant reads bf16 rounding: curvature 34 where float32
    reads 92, the next rate 2.7x float32's. The bf16-representable gradients show the autocast forward
    (torch_backend.precision.gradient_eps): the probe is sized for bf16 (2^8 x longer) and the secant is float32's
    within 25 %."""
    import torch_backend.tuner as tuner_mod

    if not sized:
        monkeypatch.setattr(tuner_mod, "gradient_eps", lambda grads, terms: 0.0)
    (h32, lr32), (_, c32) = _autocast_mlp_run(None)
    (h16, lr16), (_, c16) = _autocast_mlp_run(torch.bfloat16)
    if sized:
        assert h16 / h32 == pytest.approx(2.0 ** 8, rel=1e-3)  # sqrt(eps_bf16 / eps_f32)
        assert c16 == pytest.approx(c32, rel=0.25) and lr16 == pytest.approx(lr32, rel=0.25)
    else:
        assert h16 == pytest.approx(h32, rel=1e-3)
        assert c16 != pytest.approx(c32, rel=0.25)


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_closure_free_probe_under_the_noise_correction_ignores_a_bf16_forward():
    """With the noise correction on (the default behind Adam) the forward's precision does not size the probing
    step (``curvopt.config.probe_reads_forward``), in both backends: a bf16-sized probe (6 % of ``||w||``) spanned
    a segment whose gradient drift the correction read as noise, and the rates stayed 1.3-7x float32's. The
    parameters' dtype still counts (bf16 parameters probe as bf16)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from curvopt.optax import cdat, stats

    (h32, _), _ = _autocast_mlp_run(None, noise_correction=True)
    (h16, _), _ = _autocast_mlp_run(torch.bfloat16, noise_correction=True)
    assert h16 == pytest.approx(h32, rel=1e-3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8)), jnp.float32)
    p0 = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((8, 3)) / 3, jnp.float32)}

    def first_rate(compute, params):
        loss = lambda p: jnp.mean(jnp.tanh(x.astype(compute) @ p["w"].astype(compute)).astype(jnp.float32) ** 2)  # noqa
        opt = cdat(optax.scale_by_adam(), base_method="adam")
        _, s = opt.update(jax.grad(loss)(params), opt.init(params), params)
        return float(stats(s)["lr"])

    f32 = first_rate(jnp.float32, p0)
    assert first_rate(jnp.bfloat16, p0) == pytest.approx(f32, rel=1e-3)
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p0)
    assert first_rate(jnp.bfloat16, bf16_params) / f32 == pytest.approx(2.0 ** 8, rel=0.05)  # sqrt(2^-7 / 2^-23)


def test_gradient_eps_reads_the_forward_precision_from_the_gradients():
    from torch_backend.precision import gradient_eps

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 20, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3))
    found = {}
    for dtype in (None, torch.bfloat16, torch.float16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        found[dtype] = gradient_eps([p.grad for p in model.parameters()])
    assert found == {None: 0.0, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
                     torch.float16: torch.finfo(torch.float16).eps}
    grads = [p.grad for p in model.parameters()]
    assert gradient_eps([g / 3.0 for g in grads if g.numel() >= 64]) == 0.0  # rescaled: the trace is gone
    assert gradient_eps([torch.zeros(100), torch.ones(10)]) == 0.0  # too few nonzero entries to tell


def _rank_averaged_gradient(dtype, ranks):
    """A GELU MLP's gradient under autocast(``dtype``; None: float32), averaged in float32 over ``ranks`` equal
    shards of the batch, as DDP's all-reduce averages the ranks' gradients (benchmarks.precision_reading)."""
    from benchmarks.precision_reading import TASKS, averaged_gradient

    return averaged_gradient(TASKS["mlp"](), dtype, ranks)


def test_gradient_eps_sees_the_half_precision_through_a_data_parallel_average():
    """Averaged over 8 ranks in float32, 6 % of a bf16 forward's gradient entries are still exactly representable
    in bf16: read as one gradient the trace is gone (the probe sized for float32, the next closure-free rates 1.43-1.47x
    float32's on this MLP); with the world size the budget widens by ceil(log2 8) + 2 bits and the reading is
    bf16 again, and float16 and float32 averages keep their own readings."""
    from torch_backend.precision import gradient_eps

    bf16, f16 = torch.finfo(torch.bfloat16).eps, torch.finfo(torch.float16).eps
    averaged = _rank_averaged_gradient(torch.bfloat16, 8)
    assert gradient_eps(averaged) == 0.0
    assert gradient_eps(averaged, terms=8) == bf16
    assert gradient_eps(_rank_averaged_gradient(torch.float16, 8), terms=8) == f16
    assert gradient_eps(_rank_averaged_gradient(None, 8), terms=8) == 0.0
    assert gradient_eps(_rank_averaged_gradient(torch.bfloat16, 1), terms=1) == bf16


@pytest.mark.slow  # ~13 s (JAX compiles)
def test_jax_closure_free_probe_sized_for_a_bf16_forward_and_the_same_reading_as_torch():
    """The Optax counterpart: closure-free there is no value_fn to read the precision from, so the probing step
    reads it from the gradient (jax_backend.oracles.gradient_eps, the core's curvopt.precision rule): a model
    computing in bf16 over float32 parameters probes 2^8 x farther than the float32 model. And the same
    gradients (float32, bf16 values cast up, fp16 values cast up) read the same precision in both backends."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from curvopt.optax import cdat, stats
    from jax_backend.oracles import gradient_eps as jax_gradient_eps
    from torch_backend.precision import gradient_eps as torch_gradient_eps

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 20)), jnp.float32)
    y = jnp.asarray((np.asarray(x) @ rng.standard_normal((20, 3))).argmax(1))
    r = np.random.default_rng(1)
    p0 = {"w1": jnp.asarray(r.standard_normal((20, 64)) / np.sqrt(20), jnp.float32), "b1": jnp.zeros(64),
          "w2": jnp.asarray(r.standard_normal((64, 3)) / 8, jnp.float32), "b2": jnp.zeros(3)}

    def first_rate(cdt):
        def loss(p):
            q = jax.tree.map(lambda a: a.astype(cdt), p)
            logits = (jax.nn.gelu(x.astype(cdt) @ q["w1"] + q["b1"]) @ q["w2"] + q["b2"]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        opt = cdat(optax.scale_by_adam())
        v, g = jax.value_and_grad(loss)(p0)
        _, s = jax.jit(lambda g, s, p, v: opt.update(g, s, p, value=v, grad=g))(g, opt.init(p0), p0, v)
        return float(stats(s)["lr"]), g

    h32, g32 = first_rate(jnp.float32)
    h16, g16 = first_rate(jnp.bfloat16)
    assert h16 / h32 == pytest.approx(2.0 ** 8, rel=1e-3)
    for g, want in ((g32, 0.0), (g16, 2.0 ** -7),
                    (jax.tree.map(lambda a: a.astype(jnp.float16).astype(jnp.float32), g32), 2.0 ** -10)):
        assert float(jax_gradient_eps(g)) == want
        assert torch_gradient_eps([torch.from_numpy(np.asarray(a)) for a in jax.tree.leaves(g)]) == want


def test_torch_float16_parameters_behind_a_small_group_lr_keep_the_effective_rate():
    """float16 parameters behind SGD at group lr 1e-4: the tuner's rate is 1e4 times the effective one, above
    float16's largest number (65504) on the second step. ``addcmul`` cast it to float16 first, and the
    parameters became inf/NaN for good; now the effective rates equal those at group lr 1 (to 2 %: the two runs
    round their float16 parameters differently, 1.2 % apart by the fourth step on a CPU with AVX512-FP16, under
    1 % on the one the test was written on) and the parameters stay finite."""
    from curvopt.torch import QuadraticGreedy

    torch.manual_seed(0)
    x, y = torch.randn(256, 20).half(), torch.randint(0, 5, (256,))

    def effective_rates(group_lr):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).half()
        opt = QuadraticGreedy(torch.optim.SGD(model.parameters(), lr=group_lr))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss
        rates = []
        for _ in range(4):
            opt.step(closure)
            rates.append(float(opt.stats["lr"]) * group_lr)
            assert all(bool(p.isfinite().all()) for p in model.parameters())
        return rates

    at_one, small = effective_rates(1.0), effective_rates(1e-4)
    assert max(small) / 1e-4 > torch.finfo(torch.float16).max  # the tuner's own rate
    assert small == pytest.approx(at_one, rel=2e-2)
