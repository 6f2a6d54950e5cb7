"""Checkpoints of the PyTorch tuners (issues 9 and 10): torch's ``{"state", "param_groups"}`` state dict made by
``torch.optim.Optimizer.state_dict`` (hooks run), readable with ``weights_only=True``; loading casts like torch
(float32 checkpoint -> float64 parameters), is atomic, and reads curvopt 0.1's ``{"base", "tuner"}`` files;
``torch.save(opt)``, pickle and ``copy.deepcopy`` round-trip."""
import copy
import importlib.util
import io
import math
import os
import pickle
import warnings

import pytest
import torch
from torch import nn

from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_spec = importlib.util.spec_from_file_location("make_v0_checkpoints", os.path.join(DATA, "make_v0_checkpoints.py"))
v0 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v0)

V0_TUNERS = {
    "cdat_fd_adam": lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.1), curvature="fd"),
    "cdat_secant_sgd": lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9), curvature="secant"),
    "armijo_sgd": lambda m: ArmijoLineSearch(torch.optim.SGD(m.parameters(), lr=1.0), c=0.5),
    # 0.1's rule behind Adam (sigma 1.5, no loss-bound cap) so that the held rate comes back
    "eos_adam_sharp": lambda m: EdgeOfStability(torch.optim.Adam(m.parameters(), lr=1.0), sharpness=2, sigma=1.5,
                                                loss_cap=math.inf),
}


def closure_of(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    return closure


def closure_free_step(model, opt, x, y):
    """``loss.backward(); opt.step()``; the rate taken."""
    closure_of(model, opt, x, y)()
    opt.step()
    return float(opt.stats["lr"])


@pytest.mark.parametrize("name", list(V0_TUNERS))
def test_v01_checkpoints_load_and_continue(name):
    """Files written by curvopt 0.1 (tests/data/make_v0_checkpoints.py at commit fc9abc2) load into the current
    tuners: the counters, rule state, secant memory and sharpness carry over, and training continues."""
    ckpt = torch.load(os.path.join(DATA, f"v0_{name}.pt"), weights_only=True)
    assert set(ckpt["opt"]) == {"base", "tuner"}
    x, y = v0.data()
    model = v0.model()
    model.load_state_dict(ckpt["model"])
    opt = V0_TUNERS[name](model)
    opt.load_state_dict(ckpt["opt"])
    p0 = next(model.parameters())
    assert opt.state[p0]["curvopt_step"] == v0.STEPS
    if "adam" in name:
        assert torch.equal(opt.state[p0]["step"], ckpt["opt"]["base"]["state"][0]["step"])
    closure = closure_of(model, opt, x, y)
    first = float(closure().detach())
    lrs = []
    for _ in range(10):
        opt.step(closure)
        lrs.append(float(opt.stats["lr"]))
        if name == "cdat_secant_sgd" and len(lrs) == 1:
            assert opt.stats["closure_calls"] == 1  # the secant memory came along: no fd fallback
    assert all(math.isfinite(v) and v >= 0 for v in lrs) and sum(v > 0 for v in lrs) >= 8, lrs
    if name != "eos_adam_sharp":  # EoS at 1.5x the edge is not a descent method on this tiny problem
        assert float(closure().detach()) < first
    if name == "eos_adam_sharp":  # the held preconditioned sharpness gives back 0.1's last rate
        assert lrs[0] == pytest.approx(ckpt["lrs"][-1], rel=1e-6)
    if name == "armijo_sgd":
        assert opt.stats["closure_calls"] >= 2


def mlp(dtype=torch.float64, seed=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 3, generator=g).to(dtype), torch.randn(40, 1, generator=g).to(dtype)


MAKERS = {
    "cdat_secant_adam_sharp": lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.5), curvature="secant",
                                             sharpness=3),
    "greedy_fd_momentum": lambda m: QuadraticGreedy(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.5)),
    # c = 1e-4: a search whose trials sit far from the acceptance boundary (at AdamW's default c = 0.5 the float32
    # and float64 runs accept trials one backtracking step apart, 1.25x, a rounding-level tie)
    "armijo_adamw": lambda m: ArmijoLineSearch(torch.optim.AdamW(m.parameters(), lr=1.0, weight_decay=0.1), c=1e-4),
    "polyak_sgd": lambda m: PolyakStep(torch.optim.SGD(m.parameters(), lr=1.0)),
    "eos_adam": lambda m: EdgeOfStability(torch.optim.Adam(m.parameters(), lr=1.0), sharpness=2),
}


def trained(make, steps=5, dtype=torch.float64):
    model = mlp(dtype)
    opt = make(model)
    x, y = data(dtype)
    for _ in range(steps):
        opt.step(closure_of(model, opt, x, y))
    return model, opt


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_is_torchs_and_loads_with_weights_only(name):
    model, opt = trained(MAKERS[name])
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post"))
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and set(sd) == {"state", "param_groups"}
    assert opt.state is opt.base.state and opt.param_groups is opt.base.param_groups
    st0 = sd["state"][0]
    assert st0["curvopt_step"] == 5 and "curvopt_u" in st0 and "curvopt_w0" in st0
    if "adam" in name:  # the base's state and the tuner's in one dict
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(st0)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    x, y = data()
    model2 = mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = MAKERS[name](model2)
    opt2.load_state_dict(loaded)
    assert "curvopt_tuner" not in opt2.param_groups[0]  # the name lives only in the saved dict
    for _ in range(6):
        opt.step(closure_of(model, opt, x, y))
        opt2.step(closure_of(model2, opt2, x, y))
        assert torch.equal(opt.stats["lr"], opt2.stats["lr"])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(MAKERS))
def test_saved_state_holds_each_buffer_once(name):
    """``torch.save`` writes a view's whole storage: the tuner's buffers (views of flat workspace buffers, ``w0``'s
    with the base's state snapshot behind it) are saved as compact copies, so the checkpoint is the base's
    state plus one parameter-sized tensor per buffer, and the live state keeps its views."""
    model, opt = trained(MAKERS[name])
    for sd in (opt.state_dict(), opt.base.state_dict()):  # the base's own holds our buffers too
        _assert_compact(sd)
    live = [t for st in opt.state.values() for k, t in st.items() if k in ("curvopt_w0", "curvopt_u")]
    assert live and all(t._base is not None for t in live)


def _assert_compact(sd: dict) -> None:
    n_bytes = 0
    for st in sd["state"].values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
                n_bytes += v.untyped_storage().nbytes()
    buf = io.BytesIO()
    torch.save(sd, buf)
    assert len(buf.getvalue()) < n_bytes + 64 * 1024


@pytest.mark.parametrize("name", ["cdat_secant_adam_sharp", "eos_adam", "armijo_adamw"])
def test_float32_checkpoint_loads_into_float64_parameters(name):
    model32, opt32 = trained(MAKERS[name], dtype=torch.float32)
    sd = opt32.state_dict()
    model64 = mlp(torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    opt64 = MAKERS[name](model64)
    opt64.load_state_dict(sd)
    p0 = next(model64.parameters())
    for k, v in opt64.state[p0].items():
        if isinstance(v, torch.Tensor) and k != "step":
            assert v.dtype == torch.float64, k
    x, y = data(torch.float32)
    x64, y64 = x.double(), y.double()
    for _ in range(3):
        opt32.step(closure_of(model32, opt32, x, y))
        opt64.step(closure_of(model64, opt64, x64, y64))
        # float32 vs 64: the secant's curvature differs by up to 6% here, and on a secant step whose length cap
        # binds the rate follows ||u_t|| / ||u_{t-1}|| directly (3% apart), not through the averages
        assert float(opt64.stats["lr"]) == pytest.approx(float(opt32.stats["lr"]), rel=5e-2)


def snapshot(opt, model):
    return copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in model.parameters()]))


def assert_same(a, b):
    (sa, pa), (sb, pb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["param_groups"] == sb["param_groups"]
    assert set(sa["state"]) == set(sb["state"])
    for k in sa["state"]:
        assert set(sa["state"][k]) == set(sb["state"][k]), k
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            # (bit for bit; a NaN, a stall window not open, equals a NaN)
            assert (torch.equal(v.nan_to_num(), w.nan_to_num()) and torch.equal(v.isnan(), w.isnan())
                    if isinstance(v, torch.Tensor) and v.is_floating_point() else
                    torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (k, key)


def test_load_state_dict_is_atomic():
    """A state dict that does not fit is refused before anything is assigned (issue 10: loading an fd
    checkpoint into a secant tuner raised KeyError after the base state was already replaced)."""
    model, opt = trained(MAKERS["cdat_secant_adam_sharp"])
    _, donor = trained(lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.5), curvature="fd"), steps=3)
    good = donor.state_dict()
    before = snapshot(opt, model)
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][3]["exp_avg"] = torch.zeros(2)
    bad_rule = copy.deepcopy(good)
    del bad_rule["state"][0]["curvopt_denominator_avg"]
    bad_count = copy.deepcopy(good)
    bad_count["state"][0]["curvopt_step"] = -1
    bad_group = copy.deepcopy(good)
    bad_group["param_groups"][0]["params"] = bad_group["param_groups"][0]["params"][:-1]
    for bad, match in ((bad_shape, "shape"), (bad_rule, "rule state"), (bad_count, "curvopt_step"),
                       (bad_group, "parameter"), ({"base": {}, "tuner": {}}, "curvopt"), ([], "curvopt")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        assert_same(before, snapshot(opt, model))
    opt.load_state_dict(good)  # an fd CDAT's state loads into a secant CDAT (no secant memory: fd fallback)
    x, y = data()
    opt.step(closure_of(model, opt, x, y))
    assert opt.stats["closure_calls"] >= 2


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize("name", ["cdat_secant_adam_sharp", "armijo_adamw", "eos_adam"])
def test_pickle_deepcopy_and_torch_save_round_trip(how, name):
    model, opt = trained(MAKERS[name])
    if how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    elif how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert type(opt2) is type(opt) and type(opt2.base) is type(opt.base)
    assert opt2.param_groups is opt2.base.param_groups and opt2.state is opt2.base.state
    assert all(p2 is q2 for p2, q2 in zip(opt2.param_groups[0]["params"], model2.parameters()))
    x, y = data()
    for _ in range(5):
        opt.step(closure_of(model, opt, x, y))
        opt2.step(closure_of(model2, opt2, x, y))
        assert torch.equal(opt.stats["lr"], opt2.stats["lr"])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_a_pickle_with_the_outside_clip_watch_as_a_list_loads_and_still_watches():
    """Earlier builds kept the closure-free outside-clip watch (the last gradient norms) as a list; such a pickle
    loads with an empty window, and the watch still warns when a clip before ``step`` fixes the norm."""
    from curvopt.config import EXTERNAL_CLIP_MESSAGE

    model = mlp()
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0), curvature="secant")
    x, y = data()
    opt._clip_norms = [0.5, 0.5]  # what such a build pickled
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert not isinstance(opt2._clip_norms, list) and not opt2._clip_norms.any()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(12):
            opt2.zero_grad()
            ((model2(x) - y) ** 2).mean().backward()
            torch.nn.utils.clip_grad_norm_(model2.parameters(), 1e-3)
            opt2.step()
    assert any(str(m.message) == EXTERNAL_CLIP_MESSAGE for m in seen)


@pytest.mark.parametrize("attribute", [None, 0.5], ids=["no-scale", "scale-attribute"])
def test_a_pickle_from_a_build_without_the_replay_scale_in_the_state_loads_and_steps(attribute):
    """The fd replay check's rounding scale (the largest loss it has checked) is a global of the state now
    (``curvopt_replay_scale``); a tuner pickled before its first fd probe by a build that had no scale, or that
    kept it as the attribute ``_replay_scale``, loads without that attribute and takes its checked steps, which
    put the scale in the state."""
    model = mlp()
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0))
    if attribute is not None:
        opt._replay_scale = attribute  # what such a build pickled
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert not hasattr(opt2, "_replay_scale") and opt2._replay_checks > 0
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            opt2.step(closure_of(model2, opt2, x, y))
    assert float(opt2.state[next(model2.parameters())]["curvopt_replay_scale"]) > 0 and opt2._replay_checks <= 0


def test_a_pickle_from_a_build_without_the_stall_memory_in_the_state_resumes_closure_free():
    """A closure-free tuner pickled by the build before the stall window and peak went into the state had no
    ``_watch_saved`` (the memory of what the state holds); its first step after loading raised ``AttributeError``
    (a checkpoint field test). It resumes as the uninterrupted run. Kills: the attribute only set in ``__init__``."""
    model, (x, y) = mlp(), data()
    opt = CDAT(torch.optim.AdamW(model.parameters(), lr=1.0))

    def step(m, o):
        return closure_free_step(m, o, x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free start-up's advice
        for _ in range(3):
            step(model, opt)
        del opt.__dict__["_watch_saved"]  # what that build pickled
        for key in ("curvopt_stall_reference", "curvopt_stall_start", "curvopt_stall_first", "curvopt_secant_peak",
                    "curvopt_exit_sq"):
            opt.state[next(model.parameters())].pop(key)
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
        assert [step(model2, opt2) for _ in range(3)] == [step(model, opt) for _ in range(3)]


def test_a_float32_checkpoint_resumed_in_float64_is_not_taken_for_motion():
    """The outside-motion check's reference saved by a float32 run (the parameters' squared norm, rounded in float32)
    differs from the float64 norm of the same weights by ~1e-9 relative, far past float64's allowance: resumed into
    float64 parameters (the model converted with them) it warned that the parameters had moved (a checkpoint field
    test, 8 of 8 closure-free cases). The reference is not used then; a float64 state into float64 still checks.
    Kills: the saved reference compared whatever its dtype."""
    model32, (x, y) = mlp(torch.float32), data(torch.float32)
    opt32 = CDAT(torch.optim.AdamW(model32.parameters(), lr=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free start-up's advice
        for _ in range(5):
            closure_free_step(model32, opt32, x, y)
    model64 = mlp(torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    opt64 = CDAT(torch.optim.AdamW(model64.parameters(), lr=1.0))
    opt64.load_state_dict(opt32.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            closure_free_step(model64, opt64, x.double(), y.double())
    assert not [m for m in caught if "outside the optimizer" in str(m.message)]
    assert math.isfinite(float(opt64.state[next(model64.parameters())]["curvopt_exit_sq"]))  # checked again


@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_the_closure_free_state_keeps_its_keys_from_step_to_step(base):
    """``torch.distributed.checkpoint`` loads into a template taken after two steps and needs every key of the saved
    state there: the stall window's keys were removed when the window closed (step 11 of a field test's run), the
    probing step's rate when the rule moved, and behind Adam (the noise correction on) the noise averages came
    at the second step; a checkpoint saved at step 8 (or 1) failed to load into the template ("Missing key in
    checkpoint"). From the first closure-free step on the keys stay."""
    model, (x, y) = mlp(), data()
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9) if base == "momentum" else
               torch.optim.Adam(model.parameters(), lr=1.0))
    keys = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(25):
            rows = slice(None) if base == "momentum" else slice(8 * (t % 5), 8 * (t % 5) + 8)  # Adam: batches
            closure_free_step(model, opt, x[rows], y[rows])
            keys.append(frozenset(opt.state[next(model.parameters())]))
            # FSDP's optimizer state dict compares each scalar state with == across the parameters it unflattens:
            # the probing rate, NaN once the rule moved, failed every FSDP load of a closure-free state
            scalars = [v for v in opt.state[next(model.parameters())].values() if torch.is_tensor(v) and not v.dim()]
            assert all(bool(v == v) for v in scalars)
    assert base == "adam" or opt._probed is None  # the window closed along the run
    assert "curvopt_secant_last_probe" in keys[0] and (base == "momentum" or "curvopt_secant_noise_avg" in keys[0])
    assert all(k == keys[0] for k in keys), [sorted(k ^ keys[0]) for k in keys if k != keys[0]]
    # parameters moved outside the tuner: warned, and the motion check's record is off (inf, not NaN) for good
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    with pytest.warns(RuntimeWarning, match="outside"):
        closure_free_step(model, opt, x[:8], y[:8])
    glob = opt.state[next(model.parameters())]
    assert glob["curvopt_exit_sq"] == math.inf and all(bool(v == v) for v in glob.values() if torch.is_tensor(v)
                                                       and not v.dim())
    # a state saved by a build that dropped the probing rate once the rule moved: the key comes back
    del opt.state[next(model.parameters())]["curvopt_secant_last_probe"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        closure_free_step(model, opt, x[:8], y[:8])
    assert frozenset(opt.state[next(model.parameters())]) == keys[0]


def _minibatch_run():
    """CDAT behind heavy ball with a closure on batches of 2 of the 40 rows (step ``t`` on batch ``t``) up to the
    step its mini-batch watch fires on: the model, the tuner, a closure maker for step ``t`` and the rates."""
    x, y = data()
    rows = [torch.randperm(40, generator=torch.Generator().manual_seed(t))[:2] for t in range(400)]
    model = mlp()
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))

    def closure_at(m, o, t):
        return closure_of(m, o, x[rows[t]], y[rows[t]])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "curvopt: the loss of each step")
        rates = []
        while not math.isfinite(float(opt.state[next(model.parameters())].get("curvopt_watch_fired", math.nan))):
            opt.step(closure_at(model, opt, len(rates)))
            rates.append(float(opt.stats["lr"]))
    return model, opt, closure_at, rates


def _continue(model, opt, closure_at, first: int, steps: int) -> list:
    rates = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "curvopt: the loss of each step")
        for t in range(first, first + steps):
            opt.step(closure_at(model, opt, t))
            rates.append(float(opt.stats["lr"]))
    return rates


def test_the_held_rate_is_kept_by_the_state_dict():
    """CDAT's mini-batch watch lives in the state (``curvopt_watch_*``): a run resumed from a state dict saved just
    after the watch fired goes on at the held rate exactly as the uninterrupted run, and warns no second time."""
    model, opt, closure_at, rates = _minibatch_run()
    held, fired = float(opt.state[next(model.parameters())]["curvopt_watch_held"]), len(rates) - 1
    assert held == rates[-1] and fired < 150
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    after = _continue(model, opt, closure_at, fired + 1, 30)
    assert max(after) <= held and held in after  # the hold binds
    model2 = mlp()
    model2.load_state_dict(saved_model)
    opt2 = CDAT(torch.optim.SGD(model2.parameters(), lr=1.0, momentum=0.9))
    opt2.load_state_dict(torch.load(_saved(saved), weights_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = []
        for t in range(fired + 1, fired + 31):
            opt2.step(closure_at(model2, opt2, t))
            resumed.append(float(opt2.stats["lr"]))
    assert resumed == after


def _saved(sd: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_a_state_dict_or_pickle_without_the_watch_starts_it_afresh():
    """A state saved by a build that kept no watch in the state (no ``curvopt_watch_*`` keys), loaded as a state
    dict or in a pickle that held the watch on the tuner (``_minibatch_watch``), starts the watch afresh: no rate
    held, the first step after loading judges nothing."""
    model, opt, closure_at, rates = _minibatch_run()
    glob = opt.state[next(model.parameters())]
    for key in [k for k in glob if k.startswith("curvopt_watch_")]:
        del glob[key]
    opt._minibatch_watch = object()  # what such a build pickled beside the state
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert not hasattr(opt2, "_minibatch_watch")
    model3 = copy.deepcopy(model)
    opt3 = CDAT(torch.optim.SGD(model3.parameters(), lr=1.0, momentum=0.9))
    opt3.load_state_dict(opt.state_dict())
    for m, o in ((model2, opt2), (model3, opt3)):
        _continue(m, o, closure_at, len(rates), 2)
        g = o.state[next(m.parameters())]
        assert float(g["curvopt_watch_judged"]) == 1 and float(g["curvopt_watch_held"]) == math.inf  # (none)


def test_frozen_first_parameter_and_lazy_adam_state():
    """The globals live in the first parameter's state; a frozen first parameter (no Adam state) that is
    unfrozen later must still get Adam's lazy initialisation, and pickling must survive it."""
    model = mlp()
    first = model[0].weight
    first.requires_grad_(False)
    opt = CDAT(torch.optim.Adam(model.parameters(), lr=0.1))
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            opt.step(closure_of(model, opt, x, y))
    assert set(opt.state[first]) <= {k for k in opt.state[first] if k.startswith("curvopt_")}
    opt2 = copy.deepcopy(opt)
    assert opt2.state[opt2.param_groups[0]["params"][0]]["curvopt_step"] == 2
    first.requires_grad_(True)
    opt.step(closure_of(model, opt, x, y))
    assert {"exp_avg", "exp_avg_sq", "step", "curvopt_step"} <= set(opt.state[first])
    assert opt.state[first]["curvopt_step"] == 3
    sd = opt.state_dict()
    opt3 = CDAT(torch.optim.Adam(mlp().parameters(), lr=0.1))
    opt3.load_state_dict(sd)


@pytest.mark.parametrize("freeze_first", [True, False])
def test_base_state_dict_loads_into_the_bare_base_at_the_effective_rate(freeze_first):
    """``opt.base_state_dict()`` goes on without the tuner: the bare AdamW loads it (the tuner's own
    ``state_dict()`` raises ``KeyError: 'step'`` there when the first parameter is frozen), keeps Adam's moments and
    counts, holds none of the tuner's keys, runs at ``stats['lr'] x`` the group lr and steps on. Kills: the tuner's keys kept, the rate left at the group's,
    the rate not multiplied by the group's."""
    model = mlp()
    model[0].weight.requires_grad_(not freeze_first)
    opt = CDAT(torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.1))
    x, y = data()
    with pytest.raises(ValueError, match="no learning rate"):
        opt.base_state_dict()
    for _ in range(3):
        opt.step(closure_of(model, opt, x, y))
    rate = float(opt.stats["lr"])
    sd = opt.base_state_dict()
    assert not any(k.startswith("curvopt_") for entry in sd["state"].values() for k in entry)
    assert not any(k.startswith("curvopt_") for g in sd["param_groups"] for k in g)
    assert sd["param_groups"][0]["lr"] == pytest.approx(0.5 * rate, rel=1e-12)
    bare = torch.optim.AdamW(model.parameters(), lr=1.0)
    bare.load_state_dict(sd)
    assert bare.param_groups[0]["lr"] == pytest.approx(0.5 * rate, rel=1e-12)
    assert bare.param_groups[0]["weight_decay"] == 0.1
    moved = [p for p in model.parameters() if p.requires_grad]
    for p in moved:
        assert torch.equal(bare.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert torch.equal(bare.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    closure_of(model, bare, x, y)()
    bare.step()
    assert all(bare.state[p]["step"] == 4 for p in moved)
    assert model[0].weight not in bare.state if freeze_first else bare.state[model[0].weight]["step"] == 4
    with pytest.raises(ValueError, match="finite number"):
        opt.base_state_dict(lr=float("nan"))
    resumed = CDAT(torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.1))
    resumed.load_state_dict(opt.state_dict())  # stats are not saved: the message says so (it said "no step yet")
    with pytest.raises(ValueError, match="load_state_dict does not restore stats"):
        resumed.base_state_dict()
    assert resumed.base_state_dict(lr=rate)["param_groups"][0]["lr"] == pytest.approx(0.5 * rate, rel=1e-12)


def test_base_state_dict_after_a_closure_free_probing_step_asks_for_the_rate():
    """A closure-free probing step's rate is the tiny finite-difference step (a field test: 1.6e-4 after an unfreeze
    where the step before took 0.078); handed to the bare base by default it would crawl. ``base_state_dict()``
    refuses it and says to pass ``lr=``; after a step the rule chose it hands that rate over. Kills: the probe's
    rate handed over silently."""
    model, (x, y) = mlp(), data()
    opt = CDAT(torch.optim.AdamW(model.parameters(), lr=1.0))
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(6):
            closure_of(model, opt, x, y)()
            opt.step()
            rates.append(float(opt.stats["lr"]))
            if len(rates) == 1:  # the first closure-free step probes
                with pytest.raises(ValueError, match="probing step"):
                    opt.base_state_dict()
                assert opt.base_state_dict(lr=0.01)["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert rates[-1] > 10 * rates[0]
    assert opt.base_state_dict()["param_groups"][0]["lr"] == pytest.approx(rates[-1], rel=1e-12)


@pytest.mark.parametrize("weights_from", ["saved step", "later step"])
def test_a_state_loaded_beside_weights_of_another_step_is_told(weights_from):
    """The outside-motion check's reference (the parameters' norm as the last secant step left them) is in the state:
    an optimizer state loaded beside the weights of a later step (or one that went through a bare optimizer) warns
    at the first closure-free step, as a weight change between two live steps does; the matching weights resume
    silently and bit for bit. Kills: the reference kept only in memory (a new tuner had none and said nothing)."""
    model, (x, y) = mlp(), data()
    make = lambda m: CDAT(torch.optim.AdamW(m.parameters(), lr=1.0))  # noqa: E731
    opt = make(model)

    def step(m, o):
        return closure_free_step(m, o, x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free start-up's advice
        for _ in range(6):
            step(model, opt)
        saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        expected = [step(model, opt) for _ in range(3)]
    resumed = mlp()
    resumed.load_state_dict(weights if weights_from == "saved step" else model.state_dict())
    new = make(resumed)
    new.load_state_dict(saved)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rates = [step(resumed, new) for _ in range(3)]
    told = [m for m in caught if "changed between two steps outside the optimizer" in str(m.message)]
    assert len(told) == (weights_from == "later step")
    if weights_from == "saved step":
        assert rates == expected


def _clean_copy(model, base):
    """The model and a bare base with the same parameters' values and the base's own state (no tuner keys)."""
    twin = copy.deepcopy(model)
    plain = type(base)(twin.parameters(), lr=1.0)  # the hyperparameters come with the state dict
    plain.load_state_dict({"state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()
                                         if not k.startswith("curvopt_")}
                                     for i, st in base.state_dict()["state"].items()},
                           "param_groups": [{k: v for k, v in g.items() if not k.startswith("curvopt_")}
                                            for g in base.state_dict()["param_groups"]]})
    return twin, plain


@pytest.mark.parametrize("before, after, closure_free", [
    (CDAT, CDAT, True),  # the old secant memory and noise averages went on: the secant read 105-337x too high
    (QuadraticGreedy, CDAT, False),  # the greedy rule's averages went on as CDAT's: its start-up skipped
    ("loaded", CDAT, True),  # a tuner's state dict loaded into the bare base, then wrapped
])
def test_a_new_tuner_around_a_base_another_tuner_used_starts_afresh(before, after, closure_free):
    """A tuner built around a base that holds a tuner's state (an earlier tuner wrapped it, or a tuner's state dict
    was loaded into it) warns and starts afresh: its rates are those of the same tuner around a clean copy of the
    base (Adam's moments and counts kept, no tuner keys). Kills: the old keys left in the base (the new tuner took
    the old one's secant memory and rule averages, silently)."""
    model = mlp()
    x, y = data()
    base = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
    def train(opt, m, steps):
        for _ in range(steps):
            if closure_free:
                closure_of(m, opt, x, y)()
                opt.step()
            else:
                opt.step(closure_of(m, opt, x, y))
            yield float(opt.stats["lr"])

    old = (before if before != "loaded" else CDAT)(base)
    list(train(old, model, 6))
    for _ in range(3):  # the base alone moves on: the old tuner's memory is now stale
        closure_of(model, base, x, y)()
        base.step()
    if before == "loaded":
        saved = old.state_dict()
        base = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
        base.load_state_dict(saved)  # torch takes the tuner's keys along
        assert any(k.startswith("curvopt_") for g in base.param_groups for k in g)
    twin, plain = _clean_copy(model, base)
    with pytest.warns(RuntimeWarning, match="starts afresh"):
        new = after(base)
    assert not any(k.startswith("curvopt_") for st in base.state.values() for k in st)
    assert not any(k.startswith("curvopt_") for g in base.param_groups for k in g)
    assert all(torch.equal(base.state[p]["exp_avg"], plain.state[q]["exp_avg"])
               for p, q in zip(model.parameters(), twin.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = after(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free start-up's advice
        assert list(train(new, model, 4)) == pytest.approx(list(train(clean, twin, 4)), rel=1e-12)


@pytest.mark.parametrize("tuner", [CDAT, QuadraticGreedy])
def test_a_bare_state_dict_loaded_into_the_base_of_a_tuner_that_stepped_starts_it_afresh(tuner):
    """Rolling back to a bare AdamW checkpoint through ``opt.base.load_state_dict`` (what the tuner's own
    ``load_state_dict`` advises for a bare state dict) on a tuner that already stepped: every parameter's state is
    now AdamW's alone, and the tuner continues as a new tuner over that state would, closure-free, with no warning.
    A field test: the tuner took the bare state for a frozen layer's freed state and put its last globals back;
    the closure-free rate stayed 28x below a fresh tuner's for 30 steps (the greedy rule's 370x at the first secant
    step), with a warning that blamed an added parameter group. Kills: the globals put back."""
    x, y = data()
    torch.manual_seed(0)
    model = mlp()
    bare = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(6):
        closure_of(model, bare, x, y)()
        bare.step()
    weights, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(bare.state_dict())

    def rates(opt, m, steps):
        out = []
        for _ in range(steps):
            closure_of(m, opt, x, y)()
            opt.step()
            out.append(float(opt.stats["lr"]))
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the closure-free start-up's advice
        fresh_model = mlp()
        fresh_model.load_state_dict(weights)
        fresh = tuner(torch.optim.AdamW(fresh_model.parameters(), lr=1.0))
        fresh.base.load_state_dict(copy.deepcopy(saved))
        expected = rates(fresh, fresh_model, 8)
        stepped = tuner(torch.optim.AdamW(model.parameters(), lr=1.0))
        rates(stepped, model, 5)
    model.load_state_dict(weights)
    stepped.base.load_state_dict(copy.deepcopy(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rates(stepped, model, 8) == expected


def test_a_failed_first_step_after_loading_keeps_the_loaded_w0():
    """A fresh optimizer that loaded a state dict adopts the loaded ``curvopt_w0`` into its own buffers with its
    values: a first step that failed (a probe raised) left never-initialised memory in ``state_dict()``."""
    import copy
    import io

    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(32, 1)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return model, CDAT(torch.optim.Adam(model.parameters(), lr=1.0))

    def closure_for(model, opt, fail_at=None):
        calls = {"n": 0}

        def closure():
            calls["n"] += 1
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            if calls["n"] == fail_at:
                raise RuntimeError("probe failed")
            return loss
        return closure

    model, opt = make()
    for _ in range(3):
        opt.step(closure_for(model, opt))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(RuntimeError, match="probe failed"):
        opt2.step(closure_for(model2, opt2, fail_at=2))
    after = opt2.state_dict()
    for p, st in before["state"].items():
        assert torch.equal(after["state"][p]["curvopt_w0"], st["curvopt_w0"])


def test_a_state_saved_before_the_unit_continues_as_the_uninterrupted_run():
    """A CDAT state saved before the rule state had its unit (``curvopt_unit``, the scale CDAT's averages follow
    behind SGD: the group lr times the clip's factor) loads with the unit not known, so the next step takes the
    averages as they are: behind ``SGD(lr=0.1)`` (unit 0.1) the run continues as the uninterrupted one. Started at
    1 instead, the first step would have carried the averages by 0.1."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        return model, CDAT(torch.optim.SGD(model.parameters(), lr=0.1), curvature="fd")

    model, opt = make()
    for _ in range(5):
        opt.step(closure_of(model, opt, x, y))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    old = next(st for st in saved["state"].values() if "curvopt_unit" in st)
    assert old.pop("curvopt_unit") == pytest.approx(0.1)  # as a state saved before the unit existed
    rates = []
    for _ in range(5):
        opt.step(closure_of(model, opt, x, y))
        rates.append(float(opt.stats["lr"]))
    model2, opt2 = make()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    resumed = []
    for _ in range(5):
        opt2.step(closure_of(model2, opt2, x, y))
        resumed.append(float(opt2.stats["lr"]))
    assert resumed == pytest.approx(rates, rel=1e-12)


def _dcp_problem(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 16, generator=g, dtype=dtype), torch.randint(0, 4, (128,), generator=g)

    def make(tuner=CDAT):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)
        return model, tuner(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))

    def step(model, opt, closure_free=True):
        if closure_free:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        return float(opt.stats["lr"])
    return make, step


def test_torch_distributed_checkpoint_state_initialisation_is_a_no_op_that_says_why(tmp_path):
    """torch.distributed.checkpoint creates an optimizer's state by stepping it once with zero gradients at lr 0
    (_init_optim_state, before get_/set_optimizer_state_dict). Before, CDAT skipped that step with a misleading
    zero-gradient warning (its template then held one stray key, and dcp.load with strict=False silently restarted
    the tuner), and PolyakStep, ArmijoLineSearch and EdgeOfStability raised "needs a closure", so
    set_optimizer_state_dict failed. Now the call does nothing and warns what a template taken then lacks; a saved
    state loads through set_optimizer_state_dict into every tuner; dcp.save / dcp.load into a template taken after
    two steps resumes bit for bit."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, get_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)
    make, step = _dcp_problem()
    model, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="torch.distributed.checkpoint does to create"):
        assert get_optimizer_state_dict(model, opt)["state"] == {}
    assert not opt.state and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for tuner in (PolyakStep, ArmijoLineSearch, EdgeOfStability):  # these need a closure: they raised here
        model, opt = make(tuner)
        step(model, opt, closure_free=False)
        saved = get_optimizer_state_dict(model, opt)
        model2, opt2 = make(tuner)
        model2.load_state_dict(model.state_dict())
        with pytest.warns(RuntimeWarning, match="torch.distributed.checkpoint"):
            set_optimizer_state_dict(model2, opt2, saved)
        assert step(model2, opt2, closure_free=False) == step(model, opt, closure_free=False)
    # the documented way with dcp.load: the template after two steps, which the load overwrites
    model, opt = make()
    expected = [step(model, opt) for _ in range(12)]
    model, opt = make()
    for _ in range(6):
        step(model, opt)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    model2, opt2 = make()
    for _ in range(2):
        step(model2, opt2)
    msd2, osd2 = get_state_dict(model2, opt2)
    loaded = {"model": msd2, "optim": osd2}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    assert [step(model2, opt2) for _ in range(6)] == expected[6:]


def test_a_state_dict_flattened_by_torch_distributed_checkpoint_is_refused_saying_so():
    pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    make, step = _dcp_problem()
    model, opt = make()
    step(model, opt)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    _, flat = get_state_dict(model, opt, options=options)
    model2, opt2 = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the state-initialisation call's
        with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True"):
            set_state_dict(model2, opt2, model_state_dict=model.state_dict(), optim_state_dict=flat, options=options)
    assert not any(opt2.state.values())


@pytest.mark.parametrize("make", [lambda p: CDAT(torch.optim.Adam(p, lr=1.0)), lambda p: PolyakStep(
    torch.optim.SGD(p, lr=1.0)), lambda p: ArmijoLineSearch(torch.optim.SGD(p, lr=1.0))])
def test_a_pickle_from_a_build_without_the_rate_and_bound_watches_resumes(make):
    """A tuner pickled by a build before the watches on the loss bound and on runs of rate 0 were
    ``curvopt.bound_watch.BoundWatch`` / ``curvopt.config.ZeroRateWatch`` has neither attribute: it resumes (class
    defaults), as the uninterrupted run. Kills: the watch only set in ``__init__`` (``AttributeError``)."""
    model, (x, y) = mlp(), data()
    opt = make(list(model.parameters()))

    def step(m, o):
        def closure():
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return float(o.step(closure))

    assert len({step(model, opt) for _ in range(3)}) == 3  # (it trains)
    for name in ("_zero_watch", "_bound_watch"):
        opt.__dict__.pop(name, None)  # what that build pickled
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert [step(model2, opt2) for _ in range(3)] == [step(model, opt) for _ in range(3)]



@pytest.mark.parametrize("saved,built", [(0.9, 0.0), (0.0, 0.9)])
def test_a_checkpoint_of_another_kind_of_base_warns_at_its_first_step(saved, built):
    """A heavy-ball checkpoint loaded into a tuner built around plain SGD (or the reverse) takes the checkpoint's
    momentum, as torch restores groups, but kept the sigma chosen for the other kind (CDAT at plain SGD's sigma 4
    behind heavy ball: rates up to 2.8x the uninterrupted run's), silently; now the next step warns, once. With
    ``sigma`` given, at construction or assigned after it, nothing depends on the kind, and nothing is said."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0, momentum=saved))
    opt.step(closure_of(model, opt, x, y))
    sd = opt.state_dict()
    for sigma, assigned in ((None, None), (2.0, None), (None, 2.0)):
        fresh = CDAT(torch.optim.SGD(model.parameters(), lr=1.0, momentum=built), sigma=sigma)
        if assigned is not None:
            fresh.sigma = assigned
        fresh.load_state_dict(sd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.step(closure_of(model, fresh, x, y))
            fresh.step(closure_of(model, fresh, x, y))
        said = [str(w.message) for w in caught if "was built around a" in str(w.message)]
        assert len(said) == (1 if sigma is None and assigned is None else 0), said
