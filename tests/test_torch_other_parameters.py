"""A tuner that steps only part of a model: the rest (a head under another optimizer, a GAN's other network) keeps
the gradient of the main closure call, whatever the tuner's probes do (:mod:`torch_backend.buffers`).

Found in a field test: with ``CDAT(Adam(body))`` and ``SGD(head)``, ``t.step(closure); sgd.step()`` stepped the
head on the main call's gradient plus the fd probe's (relative error 1.0: twice its rate) when the closure zeroed
only the tuner's gradients (``opt.zero_grad()``, as the quickstart does), and on the last line-search trial's
gradient under Armijo (errors 0.25-1.46) when it zeroed both. The reference here is the gradient at the main
call's point computed by ``torch.autograd.grad``, which touches no ``.grad``."""
import pytest
import torch
from torch import nn

from curvopt.torch import CDAT, ArmijoLineSearch, PolyakStep, hessian_top_eigenvalue

D64 = torch.float64


def _split(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.BatchNorm1d(8)).double()
    head = nn.Linear(8, 1).double()
    return body, head, nn.Sequential(body, head)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 5, dtype=D64, generator=g), torch.randn(64, 1, dtype=D64, generator=g)


def _head_gradient(model, head, x, y):
    """The gradient of the head at the current point, as the main call computes it (train mode, BatchNorm's
    statistics as they are: a forward in train mode would move them, so they are put back)."""
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    out = torch.autograd.grad(((model(x) - y) ** 2).mean(), list(head.parameters()))
    model.load_state_dict(kept)
    return out


@pytest.mark.parametrize("tuner,kw", [(CDAT, {}), (CDAT, {"sharpness": 1}), (ArmijoLineSearch, {}),
                                      (PolyakStep, {"sharpness": 1})])
@pytest.mark.parametrize("zero", ["tuner", "model"])
@pytest.mark.parametrize("given", [None, "body"])
def test_the_other_optimizer_steps_on_the_main_calls_gradient(tuner, kw, zero, given):
    """``modules=body`` (the part the tuner trains, its buffers the ones to keep) as well: the head's gradient
    was the main call's plus the probe's there (2.0x under QuadraticGreedy, up to 22x under Armijo; a field test)."""
    body, head, model = _split()
    x, y = _data()
    opt = tuner(torch.optim.SGD(body.parameters(), lr=0.1), **({"modules": body} if given else {}), **kw)
    sgd = torch.optim.SGD(head.parameters(), lr=0.1)

    def closure():
        (opt if zero == "tuner" else model).zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(4):
        sgd.zero_grad()
        want = _head_gradient(model, head, x, y)
        opt.step(closure)
        assert opt.stats["closure_calls"] > 1  # probes ran
        for p, g in zip(head.parameters(), want):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
        sgd.step()


def test_a_step_that_fails_in_a_probe_leaves_the_main_calls_gradient():
    body, head, model = _split()
    x, y = _data()
    opt = CDAT(torch.optim.SGD(body.parameters(), lr=0.1))
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:  # the fd probe
            ((model(x) - y) ** 2).mean().backward()  # its gradients, then a failure
            raise RuntimeError("probe failed")
        model.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    want = _head_gradient(model, head, x, y)
    with pytest.raises(RuntimeError, match="probe failed"):
        opt.step(closure)
    for p, g in zip(head.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)


def test_hessian_top_eigenvalue_of_one_part_leaves_the_others_gradient():
    body, head, model = _split()
    x, y = _data()

    def closure():
        model.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    want = _head_gradient(model, head, x, y)
    hessian_top_eigenvalue(closure, list(body.parameters()), iters=5, method="power")
    for p, g in zip(head.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tuner", [CDAT, ArmijoLineSearch])
@pytest.mark.parametrize("zero", ["tuner", "both"])
def test_a_tensor_no_module_holds_keeps_the_main_calls_gradient(tuner, zero):
    """Block coordinate descent on raw tensors, and a weight used through ``F.linear`` of a module the closure
    never calls: the other tensors, found from the main call's loss's graph, keep its gradient (before: the main
    call's plus the fd probe's, 6.0 for 3.0, or the last line-search trial's, relative error 0.74)."""
    torch.manual_seed(0)
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=D64)
    x, y = (torch.tensor([1.0], dtype=D64, requires_grad=True) for _ in range(2))
    net, other = nn.Linear(3, 5).double(), nn.Linear(5, 1).double()
    data = torch.randn(16, 3, dtype=D64)
    opt = tuner(torch.optim.SGD([x, *net.parameters()], lr=1.0))
    plain = torch.optim.SGD([y, *other.parameters()], lr=0.1)

    def loss_of():
        z = torch.cat([x, y])
        return 0.5 * z @ a @ z + nn.functional.linear(torch.tanh(net(data)), other.weight, other.bias).square().mean()

    def closure():
        (opt if zero == "tuner" else torch.optim.SGD([x, y, *net.parameters(), *other.parameters()])).zero_grad()
        loss = loss_of()
        loss.backward()
        return loss

    for _ in range(3):
        plain.zero_grad()
        want = torch.autograd.grad(loss_of(), [y, *other.parameters()])
        opt.step(closure)
        assert opt.stats["closure_calls"] > 1
        for p, g in zip([y, *other.parameters()], want):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)
        plain.step()


class _Scale(torch.autograd.Function):
    """``x * variable``, its factor kept on the ctx under the name an ``AccumulateGrad`` node gives its tensor."""

    @staticmethod
    def forward(ctx, x, variable):
        ctx.variable = variable
        return x * variable

    @staticmethod
    def backward(ctx, g):
        return g * ctx.variable, None


def test_a_custom_functions_ctx_is_not_taken_for_a_leaf():
    """A custom ``autograd.Function``'s graph node is its ctx: an attribute it names ``variable`` is not a leaf
    tensor (the review found every probing step raised an AttributeError on a float there)."""
    body, head, model = _split()
    x, y = _data()
    opt = CDAT(torch.optim.SGD(body.parameters(), lr=0.1))

    def closure():
        opt.zero_grad()
        loss = ((_Scale.apply(model(x), 2.0) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        assert opt.stats["closure_calls"] > 1 and float(opt.stats["lr"]) > 0
