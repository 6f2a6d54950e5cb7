"""Writes the ``v0_*.pt`` checkpoints in this folder with the pre-0.3 tuners (commit fc9abc2, whose
``state_dict`` is ``{"base", "tuner"}``). Kept to document how the files were made; it runs only against that
commit (``git worktree add /tmp/old_code fc9abc2 && cd /tmp/old_code && python <this file> <out dir>``).

Each file holds ``{"model": model.state_dict(), "opt": opt.state_dict(), "lrs": [...], "kind": ...}`` after
``STEPS`` steps of a tiny MLP (full batch, float32) on the data of :func:`data`;
``tests/test_torch_checkpoints.py`` loads them into the current tuners and continues training.
"""
import sys

import torch
from torch import nn

STEPS = 5


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))


def main(out):
    from torch_backend import CDAT, ArmijoLineSearch, EdgeOfStability

    makers = {
        "cdat_fd_adam": lambda m: CDAT(torch.optim.Adam(m.parameters(), lr=0.1), curvature="fd"),
        "cdat_secant_sgd": lambda m: CDAT(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9),
                                          curvature="secant"),
        "armijo_sgd": lambda m: ArmijoLineSearch(torch.optim.SGD(m.parameters(), lr=1.0), c=0.5),
        "eos_adam_sharp": lambda m: EdgeOfStability(torch.optim.Adam(m.parameters(), lr=1.0), sharpness_every=2),
    }
    x, y = data()
    for name, make in makers.items():
        m = model()
        opt = make(m)

        def closure():
            opt.zero_grad()
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss

        lrs = []
        for _ in range(STEPS):
            opt.step(closure)
            lrs.append(float(opt.stats["lr"]))
        torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "lrs": lrs, "kind": name},
                   f"{out}/v0_{name}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
