"""torch's generic optimizer tests, run on the tuners (issue 9): the tuners registered as
``torch.testing._internal.common_optimizers.OptimizerInfo`` entries and driven through torch's own machinery
(``OptimizerInfo``, ``OptimizerInput``/``ErrorOptimizerInput``, the ``optim_inputs_func`` of SGD and Adam,
``_get_optim_inputs_including_global_cliquey_kwargs``), with the checks of torch's ``TestOptimRenewed``
(test/test_optim.py in the pytorch repository, not installed) written again here over those entries.

A tuner takes a base optimizer, so each entry's ``optim_cls`` is a thin factory subclass of the tuner,
``Tuner_Base(params, lr=1.0, **kw) -> Tuner(Base(params, lr=lr, **base_kw), **tuner_kw)`` (the group lr is the
relative multiplier); its ``optim_inputs_func`` is the base's own (minus what the tuners refuse, below) plus
a few tuner settings. The five tuners x {SGD, Adam} step with a closure (probes, fd oracle); CDAT and
QuadraticGreedy are also registered closure-free (``loss.backward(); opt.step()``, secant).

Covered (each on every entry): error inputs (construction and step errors); every config goes the right
direction, contiguous and not, with and without LR schedulers (StepLR, ReduceLROnPlateau, OneCycleLR,
CyclicLR, LambdaLR), also with a scheduler over two param groups; tensor lr equals float lr; param groups
with their own weight decay / lr (a group at lr 1e-28 does not move); a zero gradient moves nothing;
printability; state_dict round trip (load into a fresh optimizer, continue identically; named parameters
either side; repeated groups), older state dicts without the newer flags, non-tensor ``step``, torch.save +
``torch.load(weights_only=True)``, float32 state into float64 parameters (cast, continues like float32);
state_dict pre/post hooks and load_state_dict pre (prepend)/post hooks; step pre/post hooks per instance and
global (firing once per tuner step, in torch's order, beside a plain SGD); deepcopy keeps every public
attribute; a stepped optimizer has non-empty state; the base's foreach (and, for Adam, CPU fused) kernels
match its for-loop; zero_grad(set_to_none); add_param_group; the closure convention.

torch's generic tests that do not apply (and why):

* ``maximize=True`` configs (in SGD's and Adam's inputs): refused at construction (the tuners minimise the
  closure's loss; return the negated objective instead) -- checked as an error input.
* ``differentiable=True`` and ``test_optim_infos ... differentiable``: the tuner's step runs under
  ``no_grad`` and its learning rate comes from host-side rules, so there is no graph through the step.
* complex parameters (``test_complex``, ``test_complex_2d``): refused (the curvature ``u^T H u`` and the
  rules are real; view complex parameters as real) -- checked as an error input.
* sparse gradients (``test_rosenbrock_sparse``): refused at step (the tuners' inner products are dense) --
  checked as an error input.
* ``test_step_is_noop_when_params_have_no_grad`` and the all-``None``-gradient step inside torch's
  foreach/fused comparison: a tuner whose parameters are all frozen is refused at construction, and a step
  where no parameter has a gradient raises (a forgotten ``backward()`` is reported, not ignored); a step where
  only some parameters have gradients works and is covered.
* CUDA/MPS/multi-GPU tests (``*_multigpu``, ``test_state_dict_with_cuda_params``, ``test_cpu_load_state_dict``,
  ``test_mixed_device_dtype``, ``test_peak_memory_foreach``, ``test_fused_does_not_step_if_foundinf``,
  ``test_defaults_changed_to_foreach``, large-tensor tests, ``capturable``): CPU-only suite; the tuners keep
  their scalars on the parameters' device and the base keeps its own kernels.
* ``test_second_order_optims_return_consistent_types``: LBFGS-specific (``tolerance_grad``).
* float16 configs: the suite runs float32/float64 (fp16 training with GradScaler is tests/test_torch_dropin.py).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import tempfile

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR, ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_inputs_func_adam,
    optim_inputs_func_sgd,
)

from curvopt.torch import CDAT, ArmijoLineSearch, EdgeOfStability, PolyakStep, QuadraticGreedy

torch.set_num_threads(1)
DEVICE = "cpu"
F32 = torch.float32

# ------------------------------------------------------------------------------------------ registration

#: base configs the tuners refuse (maximize) or that need CUDA (capturable)
_REFUSED_KWARGS = ("maximize", "capturable")


def _base_inputs(base_inputs_func):
    def inputs(device, dtype=None):
        return [i for i in base_inputs_func(device, dtype) if not any(k in i.kwargs for k in _REFUSED_KWARGS)]
    return inputs


def _factory(tuner_cls: type, base_cls: type) -> type:
    """``Tuner_Base(params, lr=1.0, **kw)``: the base gets the keywords its constructor takes, the tuner the rest."""
    base_keys = set(inspect.signature(base_cls).parameters) - {"params", "lr"}

    def __init__(self, params, lr=1.0, **kw):
        base_kw = {k: kw.pop(k) for k in list(kw) if k in base_keys}
        tuner_cls.__init__(self, base_cls(params, lr=lr, **base_kw), **{**_FACTORY_KWARGS.get(tuner_cls, {}), **kw})

    name = f"{tuner_cls.__name__}_{base_cls.__name__}"
    cls = type(name, (tuner_cls,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls  # importable by name: torch.save / pickle of the optimizer itself
    return cls


#: a few tuner settings beside the defaults (desc, kwargs)
_TUNER_INPUTS = {
    CDAT: [("sigma 1, secant", {"sigma": 1.0, "curvature": "secant"})],
    QuadraticGreedy: [("lr_max", {"lr_max": 0.5})],
    ArmijoLineSearch: [("c 0.5", {"c": 0.5})],
    PolyakStep: [("lr_max", {"lr_max": 0.5})],
    EdgeOfStability: [("sharpness every 3", {"sharpness": 3})],
}
#: settings of the registered factories (the tuner's defaults otherwise). torch's test problem is a rank-one
#: least-squares quadratic that a greedy step solves exactly; afterwards u^T H u and -g^T u are rounding noise:
#: * EdgeOfStability's default sigma 1.5 steps 1.5x past the stability threshold c / lambda by design (it relies
#:   on a network's self-stabilisation), which on a quadratic diverges by construction; its threshold also
#:   ignores the base's weight decay (the update's Jacobian is H + wd, not H). Registered at sigma 0.5.
#: * QuadraticGreedy (lr_max inf) can then take a noise ratio as its lr, and with weight decay the base's
#:   direction -(g + wd w) is no descent direction of the solved loss: registered with lr_max 1.
_FACTORY_KWARGS = {EdgeOfStability: {"sigma": 0.5}, QuadraticGreedy: {"lr_max": 1.0}}
_CLOSURE_FREE = (CDAT, QuadraticGreedy)


def _error_inputs(closure_free: bool):
    """``closure_free``: the tuner can step without a closure (then a sparse gradient is the step error)."""
    def inputs(device, dtype):
        def sparse_grad():
            p = Parameter(torch.randn(3, 2, device=device, dtype=dtype))
            p.grad = torch.randn(3, 2, device=device, dtype=dtype).to_sparse()
            return [p]
        twice = Parameter(torch.randn(2, 3, device=device, dtype=dtype))
        out = [
            ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"maximize": True}, desc="maximize"),
                                error_type=ValueError, error_regex="maximize=True is not supported"),
            ErrorOptimizerInput(OptimizerInput(params=None, kwargs={"differentiable": True}, desc="differentiable"),
                                error_type=ValueError, error_regex="differentiable=True is not supported"),
            ErrorOptimizerInput(
                OptimizerInput(params=[torch.randn(2, dtype=torch.complex64, requires_grad=True)], kwargs={},
                               desc="complex"), error_type=ValueError, error_regex="complex"),
            ErrorOptimizerInput(OptimizerInput(params=[torch.randn(2, 3)], kwargs={}, desc="all frozen"),
                                error_type=ValueError, error_regex="requires_grad"),
            ErrorOptimizerInput(OptimizerInput(params=[twice] * 2, kwargs={}, desc="a parameter listed twice"),
                                error_type=ValueError, error_regex="same tensor more than once"),
        ]
        if closure_free:
            out.append(ErrorOptimizerInput(OptimizerInput(params=sparse_grad(), kwargs={}, desc="sparse grad"),
                                           error_on=OptimizerErrorEnum.STEP_ERROR,
                                           error_type=NotImplementedError,
                                           error_regex=r"parameter \d+ \(shape \(.*\)\) has a sparse gradient"))
        else:
            out.append(ErrorOptimizerInput(OptimizerInput(params=sparse_grad(), kwargs={}, desc="no closure"),
                                           error_on=OptimizerErrorEnum.STEP_ERROR,
                                           error_type=TypeError, error_regex="closure"))
        for e in out:
            if e.optimizer_error_input.params is None:
                e.optimizer_error_input.params = [Parameter(torch.randn(2, 3, device=device, dtype=dtype))]
        return out
    return inputs


_SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: OneCycleLR(opt, max_lr=1.0, total_steps=20)],
    [lambda opt: CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=5)],
    [lambda opt: LambdaLR(opt, lambda k: 0.95 ** k), lambda opt: StepLR(opt, gamma=0.9, step_size=5)],
)


def _info(tuner_cls: type, base_cls: type, closure_free: bool) -> OptimizerInfo:
    base_inputs = _base_inputs(optim_inputs_func_sgd if base_cls is SGD else optim_inputs_func_adam)
    extra = _TUNER_INPUTS[tuner_cls]

    def optim_inputs_func(device, dtype=None):
        return base_inputs(device, dtype) + [OptimizerInput(params=None, kwargs=dict(kw), desc=d) for d, kw in extra]

    return OptimizerInfo(_factory(tuner_cls, base_cls), optim_inputs_func=optim_inputs_func,
                         scheduler_inputs=_SCHEDULERS, supported_impls=("foreach", "fused"),
                         supports_fused_on=("cpu",), supports_complex=False,
                         supports_sparse=False, step_requires_closure=not closure_free,
                         optim_error_inputs_func=_error_inputs(tuner_cls in _CLOSURE_FREE))


#: the tuners' OptimizerInfo entries: (test id, info)
TUNER_DB = []
for _t in (CDAT, QuadraticGreedy, ArmijoLineSearch, PolyakStep, EdgeOfStability):
    for _b in (SGD, Adam):
        TUNER_DB.append((f"{_t.__name__}_{_b.__name__}", _info(_t, _b, closure_free=False)))
for _t in _CLOSURE_FREE:
    for _b in (SGD, Adam):
        TUNER_DB.append((f"{_t.__name__}_{_b.__name__}-closure_free", _info(_t, _b, closure_free=True)))

db = pytest.mark.parametrize("optim_info", [i for _, i in TUNER_DB], ids=[n for n, _ in TUNER_DB])


def all_inputs(optim_info, dtype=F32, skip=()):
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, dtype, optim_info, skip=skip)


def forloop_inputs(optim_info):
    return optim_info.optim_inputs_func(device=DEVICE)


def take_step(optimizer, optim_info, closure):
    """torch's convention: closure-requiring optimizers get the closure, others step after it ran."""
    if optim_info.step_requires_closure:
        return optimizer.step(closure)
    loss = closure()
    optimizer.step()
    return loss


def linear_problem(dtype=F32, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
        bias = Parameter(torch.randn(10, generator=g, dtype=dtype))
    else:
        weight = Parameter(torch.randn(10, 5, 2, generator=g, dtype=dtype)[..., 0])
        bias = Parameter(torch.randn(10, 2, generator=g, dtype=dtype)[..., 0])
    x = torch.randn(5, generator=g, dtype=dtype)
    return weight, bias, x


def fwd_bwd(optimizer, weight, bias, x):
    optimizer.zero_grad()
    loss = (weight.mv(x) + bias).pow(2).sum()
    loss.backward()
    return loss


def assert_same(a, b, exact=True):
    """Equal nested state dicts / tensors (bit-equal when ``exact``, else torch's default tolerances)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            assert_same(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, exact)
    elif isinstance(a, torch.Tensor):
        kw = {"rtol": 0.0, "atol": 0.0} if exact else {}
        torch.testing.assert_close(a, b, equal_nan=True, **kw)
    else:
        assert a == b or (a != a and b != b), (a, b)


# ------------------------------------------------------------------------------------------ construction


@db
def test_optim_infos_do_not_specify_global_cliquey_kwargs(optim_info):
    for optim_input in optim_info.optim_inputs_func(device=DEVICE):
        assert not any(f in optim_input.kwargs for f in ("foreach", "fused", "differentiable"))


@db
def test_errors(optim_info):
    for error_input in optim_info.optim_error_inputs_func(device=DEVICE, dtype=F32):
        oi = error_input.optimizer_error_input
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optim_info.optim_cls(oi.params, **oi.kwargs)
        else:
            optimizer = optim_info.optim_cls(oi.params, **oi.kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer.step()


@db
def test_optimizer_can_be_printed(optim_info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for optim_input in all_inputs(optim_info):
        text = repr(optim_info.optim_cls(params, **optim_input.kwargs))
        assert text.startswith(optim_info.optim_cls.__name__) and "base=" in text


# ------------------------------------------------------------------------------------------ right direction


def train_with_schedulers(optim_info, optimizer, schedulers_c, weight, bias, x, steps=20) -> bool:
    """``steps`` steps with the schedulers stepped after each; whether the loss went down."""
    schedulers = [s(optimizer) for s in (schedulers_c or [])]
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    initial = closure().item()
    for _ in range(steps):
        loss = take_step(optimizer, optim_info, closure)
        for s in schedulers:
            s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
    return closure().item() < initial


@db
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_lrsched", [False, True])
def test_forloop_goes_right_direction(optim_info, contiguous, with_lrsched):
    for schedulers_c in (optim_info.scheduler_inputs if with_lrsched else [None]):
        for optim_input in forloop_inputs(optim_info):
            optim_input.kwargs["foreach"] = False
            weight, bias, x = linear_problem(contiguous=contiguous)
            optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
            assert train_with_schedulers(optim_info, optimizer, schedulers_c, weight, bias, x), optim_input.desc


@db
def test_param_group_with_lrscheduler_goes_right_direction(optim_info):
    for schedulers_c in optim_info.scheduler_inputs:
        weight, bias, x = linear_problem()
        optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        assert train_with_schedulers(optim_info, optimizer, schedulers_c, weight, bias, x)


@db
def test_scheduler_changes_the_group_lr_the_tuner_multiplies(optim_info):
    """A scheduler acts on the group lr (the relative multiplier): OneCycleLR/CyclicLR find momentum/betas in
    the tuner's defaults (the base's) and cycle them."""
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight, bias], lr=1.0)
    sched = OneCycleLR(optimizer, max_lr=1.0, total_steps=10)
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    lrs = []
    for _ in range(9):
        take_step(optimizer, optim_info, closure)
        sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[-1] < max(lrs) and optimizer.base.param_groups[0]["lr"] == lrs[-1]


@db
def test_tensor_lr(optim_info):
    for optim_input in all_inputs(optim_info, skip=("differentiable", "fused")):
        weight, bias, x = linear_problem()
        weight_c, bias_c = (Parameter(t.detach().clone()) for t in (weight, bias))
        kwargs = dict(optim_input.kwargs, lr=0.5)
        optimizer_r = optim_info.optim_cls([weight, bias], **kwargs)
        try:
            optimizer = optim_info.optim_cls([weight_c, bias_c], **dict(kwargs, lr=torch.tensor(0.5)))
        except ValueError as e:  # the base refuses a tensor lr with foreach
            assert "lr as a Tensor is not supported" in str(e)
            continue
        for _ in range(5):
            take_step(optimizer_r, optim_info, functools.partial(fwd_bwd, optimizer_r, weight, bias, x))
            take_step(optimizer, optim_info, functools.partial(fwd_bwd, optimizer, weight_c, bias_c, x))
            assert_same(weight, weight_c, exact=False)
            assert_same(bias, bias_c, exact=False)


# ------------------------------------------------------------------------------------------ param groups


@db
def test_param_groups_weight_decay(optim_info):
    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        weight, bias, x = linear_problem()
        optimizer = optim_info.optim_cls([dict(params=[weight], **optim_input.kwargs),
                                          dict(params=[bias], **dict(optim_input.kwargs, weight_decay=0.0))])
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
        initial = closure().item()
        for _ in range(20):
            take_step(optimizer, optim_info, closure)
        assert closure().item() < initial


@db
def test_param_groups_lr(optim_info):
    """A group at lr 1e-28 (the relative multiplier) does not move while the others train."""
    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        if not optim_input.kwargs.get("lr"):
            optim_input.kwargs["lr"] = 1.0
        weight, bias, x = linear_problem()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        optimizer = optim_info.optim_cls([dict(params=[weight, bias], **optim_input.kwargs),
                                          dict(params=[irrelevant])], lr=1e-28)
        g = torch.Generator().manual_seed(1)
        noise = torch.rand(2, generator=g)

        def closure():  # a function of the parameters (the closure contract): the step's noise is drawn outside
            loss = fwd_bwd(optimizer, weight, bias, x)
            irrelevant.grad = noise.clone()
            return loss

        initial = closure().item()
        for _ in range(20):
            noise = torch.rand(2, generator=g)
            take_step(optimizer, optim_info, closure)
        assert closure().item() < initial, optim_input.desc
        assert_same(irrelevant.detach(), irrelevant_clone, exact=False)


@db
def test_param_group_lr_change_takes_effect(optim_info):
    """Setting a group's lr between steps scales that group's update (the tuner's lr multiplies it): from the same
    point, halving it halves the group's share of the step; lr 0 stops the group, and it moves again at lr 1."""
    weight, bias, x = linear_problem(torch.float64)  # float64: the moves are compared to 1e-9
    optimizer = optim_info.optim_cls([{"params": [weight]}, {"params": [bias]}], lr=1.0)
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)

    def step_with_bias_lr(lr):
        # from the optimizer's point and state, its next step with the bias group at ``lr``: (weight's, bias's move)
        w, b = (Parameter(t.detach().clone()) for t in (weight, bias))
        twin = optim_info.optim_cls([{"params": [w]}, {"params": [b]}], lr=1.0)
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        twin.param_groups[1]["lr"] = lr
        w0, b0 = w.detach().clone(), b.detach().clone()
        take_step(twin, optim_info, functools.partial(fwd_bwd, twin, w, b, x))
        return w.detach() - w0, b.detach() - b0

    # the first step (later ones may find the quadratic solved: the greedy step solves it in one)
    dw_full, db_full = step_with_bias_lr(1.0)
    dw_half, db_half = step_with_bias_lr(0.5)
    # one global rate for both groups, whatever the tuner chose: the bias's move is half the weight's share
    rate_ratio = float(dw_half.norm() / dw_full.norm())
    assert rate_ratio > 0
    torch.testing.assert_close(dw_half, rate_ratio * dw_full, rtol=1e-9, atol=0.0)
    torch.testing.assert_close(db_half, 0.5 * rate_ratio * db_full, rtol=1e-9, atol=0.0)

    take_step(optimizer, optim_info, closure)
    optimizer.param_groups[1]["lr"] = 0.0
    before = bias.detach().clone()
    take_step(optimizer, optim_info, closure)
    assert torch.equal(bias.detach(), before)
    optimizer.param_groups[1]["lr"] = 1.0
    take_step(optimizer, optim_info, closure)
    assert not torch.equal(bias.detach(), before)


@db
@pytest.mark.parametrize("given", [list, iter], ids=["list", "generator"])
def test_add_param_group(optim_info, given):
    """A group's parameters as a list or a generator (``module.parameters()``; found in the field: the tuner's
    check read the generator and the base got an empty group, silently)."""
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight])
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    take_step(optimizer, optim_info, closure)
    optimizer.add_param_group({"params": given([bias]), "lr": 0.5})
    assert optimizer.param_groups is optimizer.base.param_groups and len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["lr"] == 0.5 and optimizer.param_groups[1]["params"] == [bias]
    assert set(optimizer.defaults) <= set(optimizer.param_groups[1])  # defaults filled in by the base
    before = bias.detach().clone()
    for _ in range(3):
        take_step(optimizer, optim_info, closure)
    assert not torch.equal(bias.detach(), before)
    with pytest.raises(ValueError, match="maximize"):
        optimizer.add_param_group({"params": [Parameter(torch.randn(2))], "maximize": True})
    twice = Parameter(torch.randn(2))
    with pytest.raises(ValueError, match="same tensor more than once"):  # torch only warns
        optimizer.add_param_group({"params": given([twice, twice])})
    assert len(optimizer.param_groups) == 2
    # torch 2's named parameters, as torch's own add_param_group takes them (before: an AttributeError on the
    # (name, tensor) pairs)
    named = optim_info.optim_cls([("weight", weight)])
    with pytest.raises(ValueError, match="same tensor more than once"):  # the pairs' tensors checked
        named.add_param_group({"params": given([("a", twice), ("b", twice)])})
    named.add_param_group({"params": given([("bias", bias)])})
    assert named.param_groups[1]["params"] == [bias] and named.param_groups[1]["param_names"] == ["bias"]


@db
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_group_lr_a_scheduler_made_negative_or_not_finite_is_refused_without_a_change(optim_info, bad):
    """The tuners multiply the group lrs: a negative one climbed the loss (CDAT behind SGD 0.48 -> 2.46 in 6 steps,
    the edge rule's to 2608), NaN or inf were skipped with a warning that blamed the base's update."""
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight, bias])
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    take_step(optimizer, optim_info, closure)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: bad)
    before, w = copy.deepcopy(optimizer.state_dict()), weight.detach().clone()
    with pytest.raises(ValueError, match="param group's lr is"):
        take_step(optimizer, optim_info, closure)
    assert torch.equal(weight.detach(), w)
    optimizer.param_groups[0]["lr"] = before["param_groups"][0]["lr"]
    assert str(optimizer.state_dict()) == str(before) and scheduler.last_epoch == 0


@db
def test_maximize_set_after_construction_is_refused_without_a_change(optim_info):
    # found in the field: EdgeOfStability climbed the loss 1.2 -> 366 after maximize=True came in this way
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight, bias])
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    take_step(optimizer, optim_info, closure)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0]["maximize"] = True
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match="maximize=True is not supported"):
        optimizer.load_state_dict(saved)
    optimizer.param_groups[0]["maximize"] = True
    w = weight.detach().clone()
    with pytest.raises(ValueError, match="maximize=True is not supported"):
        take_step(optimizer, optim_info, closure)
    assert torch.equal(weight.detach(), w)
    optimizer.param_groups[0]["maximize"] = False
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(_same(torch.as_tensor(after["state"][i][k]), torch.as_tensor(v))
               for i, entry in before["state"].items() for k, v in entry.items())


def _same(a, b):
    """Bit for bit, a NaN equal to a NaN (the closure-free stall window's entries are NaN while it is closed)."""
    return torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num()))


@db
def test_step_is_noop_for_zero_grads(optim_info):
    for optim_input in all_inputs(optim_info):
        kwargs = optim_input.kwargs
        if kwargs.get("weight_decay", 0) != 0:  # decay moves parameters with a zero gradient
            continue
        param = Parameter(torch.randn(5, 1))
        old = param.detach().clone()
        optimizer = optim_info.optim_cls([param], **kwargs)
        param.grad = torch.zeros_like(param)
        if optim_info.step_requires_closure:
            optimizer.step(lambda: torch.tensor([1.0]))
        else:
            optimizer.step()
        assert_same(param.detach(), old)


# ------------------------------------------------------------------------------------------ state dict


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


@db
@pytest.mark.parametrize("named0,named1", [(False, False), (True, False), (False, True)])
def test_state_dict_deterministic(optim_info, named0, named1):
    """Load a primed state into a fresh optimizer over cloned parameters: both continue identically and give
    the same state dict; repeated param groups pack identically."""
    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        weight, bias, x = linear_problem()
        optimizer = optim_info.optim_cls(_named([weight, bias], named0), **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
        for _ in range(6):
            take_step(optimizer, optim_info, closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = optim_info.optim_cls(_named([weight_c, bias_c], named1), **optim_input.kwargs)
        closure_c = functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c, x)
        optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(6):
            take_step(optimizer, optim_info, closure)
            take_step(optimizer_c, optim_info, closure_c)
            assert_same(weight, weight_c)
            assert_same(bias, bias_c)
        assert_same(_without_names(optimizer.state_dict()), _without_names(optimizer_c.state_dict()))
        optimizer_c.param_groups.extend(optimizer_c.param_groups)
        last = [_without_names(o.state_dict())["param_groups"][-1] for o in (optimizer, optimizer_c)]
        for g in last:  # the first packed group also names the tuner and base (torch_backend.state)
            for k in [k for k in g if k.startswith("curvopt_")]:
                del g[k]
        assert_same(*last)


def _conv_bn(dtype=F32):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2)).to(dtype)
    x = torch.rand(1, 4, 16, 16, dtype=dtype)

    def make_closure(optimizer, net=model):
        def closure():
            optimizer.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            return loss
        return closure
    return model, make_closure


@db
def test_can_load_older_state_dict(optim_info):
    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        model, make_closure = _conv_bn()
        optimizer = optim_info.optim_cls(model.parameters(), modules=model, **optim_input.kwargs)
        for _ in range(3):
            take_step(optimizer, optim_info, make_closure(optimizer))
        old = copy.deepcopy(optimizer.state_dict())
        for group in old["param_groups"]:
            for flag in optim_info.not_og_supported_flags:
                group.pop(flag, None)
        model_c, optimizer_c = copy.deepcopy((model, optimizer))  # goes on without the reload
        optimizer.load_state_dict(old)
        take_step(optimizer, optim_info, make_closure(optimizer))
        take_step(optimizer_c, optim_info, make_closure(optimizer_c, model_c))
        for p, q in zip(model.parameters(), model_c.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@db
@pytest.mark.parametrize("named0,named1", [(True, False), (False, True)])
def test_can_load_from_to_named_state_dict(optim_info, named0, named1):
    for optim_input in all_inputs(optim_info, skip=("differentiable",))[:2]:
        model, make_closure = _conv_bn()
        optimizer = optim_info.optim_cls(model.named_parameters() if named0 else model.parameters(),
                                         **optim_input.kwargs)
        for _ in range(3):
            take_step(optimizer, optim_info, make_closure(optimizer))
        sd = copy.deepcopy(optimizer.state_dict())
        optimizer2 = optim_info.optim_cls(model.named_parameters() if named1 else model.parameters(),
                                          **optim_input.kwargs)
        optimizer2.load_state_dict(sd)
        take_step(optimizer2, optim_info, make_closure(optimizer2))
        assert optimizer2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight",
                                                                             "1.bias"]


@db
def test_save_load_equality_with_weights_only(optim_info):
    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        weight, bias, x = linear_problem()
        optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
        for _ in range(3):
            take_step(optimizer, optim_info, closure)
        sd = optimizer.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert_same(torch.load(f, weights_only=False), sd)
            f.seek(0)
            loaded = torch.load(f, weights_only=True)
        assert_same(loaded, sd)
        # and the weights-only copy continues like the original
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        optimizer_c = optim_info.optim_cls([weight_c, bias_c], **optim_input.kwargs)
        optimizer_c.load_state_dict(loaded)
        take_step(optimizer, optim_info, closure)
        take_step(optimizer_c, optim_info, functools.partial(fwd_bwd, optimizer_c, weight_c, bias_c, x))
        assert_same(weight, weight_c)


@db
def test_load_float32_state_into_float64(optim_info):
    """A float32 checkpoint loads into float64 parameters (cast like torch) and continues like float32 does."""
    for optim_input in forloop_inputs(optim_info)[:3]:
        weight, bias, x = linear_problem(F32)
        optimizer = optim_info.optim_cls([weight, bias], **optim_input.kwargs)
        closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
        for _ in range(4):
            take_step(optimizer, optim_info, closure)
        w64, b64 = (Parameter(t.detach().double().clone()) for t in (weight, bias))
        optimizer64 = optim_info.optim_cls([w64, b64], **optim_input.kwargs)
        optimizer64.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for st in optimizer64.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    assert v.dtype == torch.float64
        closure64 = functools.partial(fwd_bwd, optimizer64, w64, b64, x.double())
        for _ in range(2):
            take_step(optimizer, optim_info, closure)
            take_step(optimizer64, optim_info, closure64)
        torch.testing.assert_close(w64.detach().float(), weight.detach(), rtol=1e-3, atol=1e-4)


@db
def test_load_nontensor_step(optim_info):
    def closure_for(params):
        def closure():  # the loss sum(p^2 + sin p) / 2 + 1, its gradient by hand
            for p in params:
                p.grad = (p + 0.5 * torch.cos(p)).detach()
            return sum(0.5 * (p * p + torch.sin(p)).sum() for p in params).detach() + 1.0
        return closure

    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(i))) for i in range(2)]
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            take_step(optimizer, optim_info, closure_for(params))
        sd = copy.deepcopy(optimizer.state_dict())
        for st in sd["state"].values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].item()
        params_c, optimizer_c = copy.deepcopy((params, optimizer))  # goes on with its tensor steps
        optimizer.load_state_dict(sd)
        take_step(optimizer, optim_info, closure_for(params))
        take_step(optimizer_c, optim_info, closure_for(params_c))
        for p, q in zip(params, params_c):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


@db
def test_non_empty_state(optim_info):
    model = nn.Linear(5, 5)
    x = torch.rand(2, 5)
    for optim_input in forloop_inputs(optim_info):
        optimizer = optim_info.optim_cls(model.parameters(), **optim_input.kwargs)

        def closure():
            optimizer.zero_grad()
            loss = model(x).square().sum()
            loss.backward()
            return loss
        take_step(optimizer, optim_info, closure)
        assert optimizer.state and all(len(st) > 0 for st in optimizer.state.values())


# ------------------------------------------------------------------------------------------ hooks


def _hook_optimizer(optim_info, kwargs):
    param = Parameter(torch.tensor([1.0, 1.0]))
    optimizer = optim_info.optim_cls([param], **kwargs)

    def closure():
        optimizer.zero_grad()
        loss = (param - 3.0).square().sum()
        loss.backward()
        return loss
    return optimizer, (lambda: take_step(optimizer, optim_info, closure))


@db
def test_state_dict_hooks(optim_info):
    def pre(opt):
        opt.state["test"] = 1

    def post(opt, sd):
        sd["ran_pre"] = sd["state"].pop("test", None) == 1
        return sd

    for optim_input in all_inputs(optim_info):
        p = Parameter(torch.rand(2, 3))
        optimizer = optim_info.optim_cls([p], **optim_input.kwargs)
        optimizer.register_state_dict_pre_hook(pre)
        assert optimizer.state_dict()["state"]["test"] == 1
        optimizer = optim_info.optim_cls([p], **optim_input.kwargs)
        optimizer.register_state_dict_post_hook(post)
        assert optimizer.state_dict()["ran_pre"] is False
        optimizer = optim_info.optim_cls([p], **optim_input.kwargs)
        optimizer.register_state_dict_pre_hook(pre)
        optimizer.register_state_dict_post_hook(post)
        sd = optimizer.state_dict()
        assert "test" not in sd["state"] and sd["ran_pre"] is True


@db
def test_load_state_dict_hooks(optim_info):
    def pre1(opt, sd):
        sd["param_groups"][0]["lr"] = 0.002

    def pre2(opt, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    def post(opt):
        opt.__dict__["ran_pre2"] = opt.param_groups[0]["lr"] == 0.003
        opt.__dict__["ran_post"] = True

    for optim_input in all_inputs(optim_info):
        optimizer, step = _hook_optimizer(optim_info, optim_input.kwargs)
        step()
        sd = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(pre1)
        optimizer.load_state_dict(sd)
        assert optimizer.param_groups[0]["lr"] == 0.002
        optimizer.register_load_state_dict_pre_hook(pre2, prepend=True)
        optimizer.load_state_dict(sd)
        assert optimizer.param_groups[0]["lr"] == 0.002  # pre1 runs last and wins
        step()

        optimizer, step = _hook_optimizer(optim_info, optim_input.kwargs)
        optimizer.register_load_state_dict_post_hook(post)
        optimizer.load_state_dict(optimizer.state_dict())
        assert optimizer.ran_post and not optimizer.ran_pre2
        optimizer.register_load_state_dict_pre_hook(pre2)
        optimizer.load_state_dict(optimizer.state_dict())
        assert optimizer.ran_post and optimizer.ran_pre2
        step()


@db
def test_step_pre_and_post_hooks(optim_info):
    for optim_input in all_inputs(optim_info):
        optimizer, step = _hook_optimizer(optim_info, optim_input.kwargs)
        data = []
        pre = optimizer.register_step_pre_hook(lambda *a: data.append("pre"))
        post = optimizer.register_step_post_hook(lambda *a: data.append("post"))
        step()
        step()
        assert data == ["pre", "post"] * 2
        pre.remove()
        post.remove()
        step()
        assert data == ["pre", "post"] * 2


@db
def test_step_all_hooks(optim_info):
    """Global hooks fire once per tuner step (not again for the inner base), in torch's order."""
    for optim_input in all_inputs(optim_info):
        optimizer, step = _hook_optimizer(optim_info, optim_input.kwargs)
        p2 = Parameter(torch.tensor([1.0, 1.0]))
        p2.grad = torch.ones(2)
        optimizer2 = SGD([p2])
        data = []
        handles = [register_optimizer_step_pre_hook(lambda *a: data.append(0)),
                   register_optimizer_step_post_hook(lambda *a: data.append(5))]
        try:
            for opt in (optimizer, optimizer2):
                handles.append(opt.register_step_pre_hook(lambda *a: data.append(1)))
                handles.append(opt.register_step_post_hook(lambda *a: data.append(2)))
            step()
            assert data == [0, 1, 2, 5]
            optimizer2.step()
            assert data == [0, 1, 2, 5] * 2
            step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for h in handles:
                h.remove()
        step()
        optimizer2.step()
        assert data == [0, 1, 2, 5] * 3


# ------------------------------------------------------------------------------------------ copies, kernels


@db
def test_deepcopy_copies_all_public_attrs(optim_info):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]

    def closure():
        for p in params:
            p.grad = torch.ones_like(p)
        return sum(p.sum() for p in params).detach() + 10.0

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for optim_input in all_inputs(optim_info, skip=("differentiable",)):
        optimizer = optim_info.optim_cls(params, **optim_input.kwargs)
        for _ in range(3):
            take_step(optimizer, optim_info, closure)
        clone = copy.deepcopy(optimizer)
        assert public(optimizer) == public(clone)
        assert_same(clone.state_dict(), optimizer.state_dict())


def _compare_impls(optim_info, flag, dtype=torch.float64):
    """The base's ``flag`` kernels (foreach / fused) against its for-loop, under the tuner: same parameters and
    state after 7 steps, with a layer frozen for two of them (torch's comparison, minus the step with no
    gradient at all, which the tuners refuse)."""
    for optim_input in optim_info.optim_inputs_func(device=DEVICE, dtype=dtype):
        models, optimizers, x = [], [], torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        for value in (False, True):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid()).to(dtype)
            empty = torch.empty((), dtype=dtype, requires_grad=True)  # a 0-d parameter last
            models.append(model)
            optimizers.append(optim_info.optim_cls(list(model.parameters()) + [empty],
                                                   **dict(optim_input.kwargs, **{flag: value})))
        for i in range(7):
            for model, opt in zip(models, optimizers):
                if i == 3:
                    model[2].requires_grad_(False)
                if i == 5:
                    model[2].requires_grad_(True)

                def closure(model=model, opt=opt):
                    opt.zero_grad()
                    loss = model(x).sum()
                    loss.backward()
                    return loss
                take_step(opt, optim_info, closure)
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                torch.testing.assert_close(p, q)
                for k, v in optimizers[0].state[p].items():  # (NaN: CDAT's watch has no prediction yet)
                    # the power iteration's vector is more sensitive than its eigenvalue to the kernels'
                    # rounding (here 5e-7 against 1.3e-8 for the eigenvalue; the parameters match to 1e-7)
                    tol = dict(rtol=1e-5, atol=1e-6) if k.startswith("curvopt_eig") else {}
                    torch.testing.assert_close(v, optimizers[1].state[q][k], equal_nan=True, **tol)


@db
def test_foreach_matches_forloop(optim_info):
    _compare_impls(optim_info, "foreach")


@db
def test_fused_matches_forloop(optim_info):
    _compare_impls(optim_info, "fused")  # (SGD's fused kernel runs on the CPU in torch 2.13 too)


# ------------------------------------------------------------------------------------------ zero_grad, closure


@db
def test_zero_grad_set_to_none(optim_info):
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight, bias])
    take_step(optimizer, optim_info, functools.partial(fwd_bwd, optimizer, weight, bias, x))
    fwd_bwd(optimizer, weight, bias, x)
    optimizer.zero_grad(set_to_none=False)
    assert weight.grad is not None and not weight.grad.any()
    optimizer.zero_grad()
    assert weight.grad is None and bias.grad is None


@db
def test_closure_convention(optim_info):
    """``step(closure)`` returns the closure's loss (torch.optim.LBFGS's convention); without a closure a
    closure-free tuner returns None and the others refuse with the convention's text."""
    weight, bias, x = linear_problem()
    optimizer = optim_info.optim_cls([weight, bias])
    closure = functools.partial(fwd_bwd, optimizer, weight, bias, x)
    with torch.no_grad():
        expected = (weight.mv(x) + bias).pow(2).sum()
    assert torch.equal(optimizer.step(closure), expected)
    closure()
    if isinstance(optimizer, CDAT):  # CDAT and QuadraticGreedy also step closure-free (secant)
        assert optimizer.step() is None
    else:
        with pytest.raises(TypeError, match="closure"):
            optimizer.step()
    with pytest.raises(TypeError, match="closure"):
        optimizer.step("not callable")
