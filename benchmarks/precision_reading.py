"""How far a data-parallel average hides a half-precision forward pass in the gradient:
``python -m benchmarks.precision_reading [--spreads 1,2,3]``.

The closure-free probing step is sized for the precision the forward pass computed in, read from the gradient
(:mod:`curvopt.precision`): an entry counts as computed in a half dtype when it has at most that dtype's significant
bits plus :func:`curvopt.precision.summed_bits` of the number of gradients averaged into it. For a GELU MLP (1,024
Gaussian inputs) and the benchmark's byte-level LM (64 blocks of 32 bytes of ``pydoc_data.topics``), under
``torch.autocast`` in float32 (off), bfloat16 and float16, the batch's gradient is averaged over ``n`` = 1 ... 32
equal shards, as data-parallel ranks average theirs, and the table gives, for each spread allowance of
:data:`curvopt.precision.SPREAD_BITS`'s kind, the share of nonzero entries within the bfloat16 / float16 budgets
and the precision :func:`torch_backend.precision.gradient_eps` reads (``bf16``, ``fp16``, ``fp32``: none).
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

import curvopt.precision as precision
from torch_backend.precision import gradient_eps

WORLDS = (1, 2, 4, 8, 16, 32)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {precision.HALF_DTYPES[0][1]: "bf16", precision.HALF_DTYPES[1][1]: "fp16", 0.0: "fp32"}


def _mlp():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 20, generator=gen)
    y = (x @ torch.randn(20, 3, generator=gen)).argmax(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 3))
    return model, F.cross_entropy, x, y


def _lm():
    from benchmarks.data import lm_blocks, load_text_bytes
    from benchmarks.models_torch import build_model

    xs, ys = lm_blocks(load_text_bytes(), 32, max_blocks=64)
    model = build_model("lm", (32,), 256, width=32, seed=0, depth=2, heads=2)

    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return model, loss, torch.from_numpy(xs), torch.from_numpy(ys)


TASKS = {"mlp": _mlp, "lm": _lm}


def averaged_gradient(task, dtype, world: int) -> list[torch.Tensor]:
    """The gradient of ``task``'s loss, each of ``world`` equal shards of its batch through an autocast forward
    pass in ``dtype`` (None: float32), averaged in float32 as DDP's all-reduce averages the ranks'."""
    model, loss_fn, x, y = task
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xs, ys in zip(x.chunk(world), y.chunk(world)):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = loss_fn(model(xs), ys)
        loss.backward()
        for t, p in zip(total, model.parameters()):
            if p.grad is not None:
                t += p.grad
    return [t / world for t in total]


def _shares(grads: list[torch.Tensor], world: int) -> list[float]:
    g = torch.cat([t.reshape(-1) for t in grads])
    return [float(w.float().mean()) for w in precision.within_budgets(g[g != 0], world, torch)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spreads", default=f"1,{precision.SPREAD_BITS},3",
                    help="spread allowances to tabulate (the library's is curvopt.precision.SPREAD_BITS)")
    args = ap.parse_args(argv)
    spreads = [int(s) for s in args.spreads.split(",")]
    print("| task | forward | world | " + " | ".join(f"spread {s}: bf16 / fp16 share, read" for s in spreads) + " |")
    print("|---|---|---|" + "---|" * len(spreads))
    for name, make in TASKS.items():
        task = make()
        for label, dtype in AUTOCAST.items():
            for world in WORLDS:
                grads = averaged_gradient(task, dtype, world)
                cells = []
                for spread in spreads:
                    with mock.patch.object(precision, "SPREAD_BITS", spread):
                        shares = _shares(grads, world)
                        read = NAMES[float(gradient_eps(grads, world))]
                    cells.append(" / ".join(f"{s:.2f}" for s in shares) + f", {read}")
                print(f"| {name} | {label} | {world} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
