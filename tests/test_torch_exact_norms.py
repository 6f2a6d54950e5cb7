"""The exact oracle on models with LayerNorm/BatchNorm: torch's nested forward-mode JVP of ``layer_norm`` and
``batch_norm`` is wrong (pytorch/pytorch#196700, #196699), so the oracle must not use forward-over-forward."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curvopt.torch import CDAT


def _closure(opt, model, x, y, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d])
def test_exact_curvature_matches_double_backward_with_norm_layers(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), norm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    names = [n for n, _ in model.named_parameters()]

    def f(ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    opt = CDAT(torch.optim.SGD(model.parameters(), lr=1.0), curvature="exact", functional_loss=f, modules=model)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y, F.cross_entropy))
    # reference: u^T H u by reverse-over-reverse at w0 along u = -g (the SGD direction at multiplier 1)
    qs = [w.clone().requires_grad_(True) for w in w0]
    g = torch.autograd.grad(f(qs), qs, create_graph=True)
    u = [-gi.detach() for gi in g]
    hu = torch.autograd.grad(sum((gi * ui).sum() for gi, ui in zip(g, u)), qs)
    ref = float(sum((h * ui).sum() for h, ui in zip(hu, u)))
    assert float(opt.stats["curvature"]) == pytest.approx(ref, rel=1e-9)


def _mlp_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    return model, x, y, names


def _one_exact_step(model, x, y, functional_loss, sharpness=False):
    from curvopt import SharpnessConfig
    from curvopt.torch import QuadraticGreedy

    opt = QuadraticGreedy(torch.optim.SGD(model.parameters(), lr=1.0), curvature="exact",
                          functional_loss=functional_loss, sharpness=SharpnessConfig(every=1) if sharpness else None)
    opt.step(_closure(opt, model, x, y, F.mse_loss))
    return opt


@pytest.mark.parametrize("mistake, match", [
    ("closes_over_module", "does not depend on the parameters it is handed"),
    ("no_grad", "does not depend on the parameters it is handed"),
    ("ignores_one", r"does not depend on the parameter\(s\) at \[2\]"),
    ("per_sample", r"returned shape \(32,\)"),
    ("python_float", "returned float"),
])
@pytest.mark.parametrize("sharpness", [False, True])
def test_a_functional_loss_mistake_is_named_and_changes_nothing(mistake, match, sharpness):
    """A functional_loss that ignores its parameters gave a curvature and a sharpness of 0 silently (a field test);
    its other mistakes were reported as autograd failing to differentiate twice, with advice to use fd. Each is a
    ValueError naming it, before any double backward, the parameters unchanged."""
    model, x, y, names = _mlp_problem()
    call = lambda ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,))  # noqa: E731
    f = {"closes_over_module": lambda ps: F.mse_loss(model(x), y),
         "no_grad": lambda ps: torch.no_grad()(lambda: F.mse_loss(call(ps), y))(),
         "per_sample": lambda ps: ((call(ps) - y) ** 2).mean(1),
         "python_float": lambda ps: float(F.mse_loss(call(ps), y)),
         # the second layer's weight taken from the module: what names taken before a prune of it zip to
         "ignores_one": lambda ps: F.mse_loss(torch.func.functional_call(
             model, dict(zip(names[:2] + names[3:], ps[:2] + ps[3:])), (x,)), y),
         }[mistake]
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        _one_exact_step(model, x, y, f, sharpness)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


def test_an_error_of_functional_loss_itself_reaches_the_caller_as_it_is():
    """Parameters zipped in reverse order: functional_call raises its own RuntimeError, which was re-raised as
    "autograd could not differentiate functional_loss twice ... use fd" (a field test); now it goes on as it is,
    and the parameters are unchanged."""
    model, x, y, names = _mlp_problem()
    w0 = [p.detach().clone() for p in model.parameters()]
    f = lambda ps: F.mse_loss(torch.func.functional_call(model, dict(zip(names, ps[::-1])), (x,)), y)  # noqa: E731
    with pytest.raises(RuntimeError) as caught:
        _one_exact_step(model, x, y, f)
    assert "differentiate" not in str(caught.value)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))


@pytest.mark.parametrize("sharpness", [False, True])
def test_a_functional_loss_that_is_not_the_closures_loss_warns_once(sharpness):
    """Two same-shape weights swapped, a stale batch or a scaled loss: the exact rates came out 1.2-100x off,
    silently (a field test). The first steps compare functional_loss with the closure's main call (loss and slope
    along the update) and warn; the right one does not warn."""
    import warnings

    model, x, y, names = _mlp_problem()
    call = lambda ps, order=(0, 1, 2, 3), xb=x: torch.func.functional_call(  # noqa: E731
        model, dict(zip(names, [ps[i] for i in order])), (xb,))
    cases = {"right": lambda ps: F.mse_loss(call(ps), y),
             "swapped": lambda ps: F.mse_loss(call(ps, (2, 1, 0, 3)), y),
             "stale batch": lambda ps: F.mse_loss(call(ps, xb=x.flip(0)), y),
             "scaled": lambda ps: 100 * F.mse_loss(call(ps), y)}
    for name, f in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _one_exact_step(model, x, y, f, sharpness)
        said = [str(w.message) for w in caught if "does not compute the closure's loss" in str(w.message)]
        assert len(said) == (name != "right"), (name, said)


def test_a_float32_functional_loss_beside_a_bf16_closure_is_not_a_mismatch():
    """The docs advise curvature="exact" for a closure under a bf16 autocast; its float32 functional_loss differs
    from the closure's loss by bf16's rounding (6e-5 relative here), which the check first read as another loss.
    It allows the closure's compute precision; a loss x100 still warns."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    names = [n for n, _ in model.named_parameters()]
    for scale, warns in ((1.0, False), (100.0, True)):
        f = lambda ps, s=scale: s * F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)
        opt = CDAT(torch.optim.AdamW(model.parameters(), lr=1.0), curvature="exact", functional_loss=f)

        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(closure)
        said = [str(w.message) for w in caught if "does not compute the closure's loss" in str(w.message)]
        assert len(said) == warns, (scale, said)


class _Checkpointed(nn.Module):
    """A tanh MLP whose middle block runs under ``torch.utils.checkpoint`` (or not)."""

    def __init__(self, checkpointed):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.checkpointed = checkpointed

    def block(self, h):
        return torch.tanh(self.l2(h))

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        else:
            h = self.block(h)
        return self.l3(h)


@pytest.mark.parametrize("tuner", ["cdat", "eos"])
def test_a_functional_loss_through_checkpoint_sees_the_module_at_the_step_start(tuner):
    """``torch.utils.checkpoint`` recomputes its block in the backward pass from the module's own parameters, after
    ``functional_call`` has put them back: the tuner called ``functional_loss`` with the module left at the base's
    trial step or the last probe's point, and read another point's curvature (CDAT behind Adam: 5.94 for 59.73) and
    sharpness (the edge rule's rate 3.4x low), with a warning that blamed the function. Now the rates are those of the
    same model without checkpoint, to rounding."""
    from curvopt.torch import EdgeOfStability
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)

    def run(checkpointed):
        torch.manual_seed(0)
        model = _Checkpointed(checkpointed).double()
        names = [n for n, _ in model.named_parameters()]

        def functional_loss(ps):
            return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

        base = torch.optim.Adam(model.parameters(), lr=1.0)
        opt = (CDAT(base, curvature="exact", functional_loss=functional_loss) if tuner == "cdat" else
               EdgeOfStability(base, sharpness=1, functional_loss=functional_loss))
        rates = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(5):
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss
                opt.step(closure)
                rates.append(float(opt.stats["lr"]))
        return rates

    plain, checkpointed = run(False), run(True)
    assert all(r > 0 for r in plain)
    assert checkpointed == pytest.approx(plain, rel=1e-9)
