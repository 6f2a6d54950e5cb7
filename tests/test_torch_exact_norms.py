"""The exact oracle on models with LayerNorm/BatchNorm: torch's nested forward-mode JVP of ``layer_norm`` and
``batch_norm`` is wrong (pytorch/pytorch#196700, #196699), so the oracle must not use forward-over-forward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from curvopt.torch import CDAT


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

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    # reference: u^T H u by reverse-over-reverse at w0 along u = -g (the SGD direction at multiplier 1)
    qs = [w.clone().requires_grad_(True) for w in w0]
    g = torch.autograd.grad(f(qs), qs, create_graph=True)
    u = [-gi.detach() for gi in g]
    hu = torch.autograd.grad(sum((gi * ui).sum() for gi, ui in zip(g, u)), qs)
    ref = float(sum((h * ui).sum() for h, ui in zip(hu, u)))
    assert float(opt.stats["curvature"]) == pytest.approx(ref, rel=1e-9)
