"""Mini-batch study of CDAT (issues 11 and 12), on the default suite's own tasks, data and models.

Four studies, the first two rerunnable from a cache (one JSON line per run in ``--out``; a second call only replots):

* ``noise`` (issue 11): closure-free (secant) CDAT's learning rate in mini-batch **with and without** the
  secant noise correction (``CDAT(..., noise_correction=True)``, :mod:`torch_backend.noise`), beside CDAT with
  a closure (``fd`` oracle, the suite's ``cdat``), on the mini-batch ResNet (SGD) and LM (Adam) of the default
  suite and on the full-batch ResNet (middle width). Writes ``docs/minibatch_noise_lr.png``.
* ``edge`` (issue 12): why CDAT, which stays on the edge, loses to the best constant on the mini-batch ResNet,
  and rules that do not. Along each trajectory: the lr, the batch loss, two per-batch edges every
  ``--edge-every`` steps (the quadratic one ``2 n / c``, CDAT's sigma = 2 rate along the batch's direction with
  ``c`` by a forward difference on the same batch, and the loss edge, the smallest lr at which the batch loss
  along that direction stops decreasing) and the top Hessian eigenvalue on 512 training digits (ARPACK, every
  ``--sharpness-every`` steps). ``--task lm`` / ``--regime full`` run the same comparison elsewhere (the
  checks that a rule which helps the mini-batch ResNet does not break the Adam LM or the full batch). Writes
  ``docs/minibatch_edge.png`` (ResNet mini) or ``docs/edge_<task>_<regime>.png``.
* ``guard`` (issue 12): gradient descent's default CDAT (``sigma = 4`` with the above-edge guard of
  :class:`curvopt.rules.CDATRule`) on convex problems, where the loss cannot flatten above the edge, against
  ``sigma = 2``, unguarded ``sigma = 4`` and a guard falling back to the edge (numpy, seconds); ``--replay``
  counts the steps the guard refused ``sigma = 4`` in the GD CDAT runs of a benchmark ``results.jsonl``.
* ``numerator`` (issue 12, section 8): the figure of CDAT's numerator behind Adam with and without the batch's own
  gradient (the ``nb:MODE`` prototypes, read from the ``edge`` caches of the LM mini, LM full and ViT full w4).

Variants (``run_variant``): ``constant:LR``; ``fd`` (CDAT with a closure); ``secant`` / ``secant+nc``
(closure-free without / with the noise correction); ``cdat:k=v;...`` (CDAT with rule settings); research
prototypes that are not in the library: ``snr`` / ``snru`` (sigma scaled by a measured noise ratio),
``chord`` (the fd probe at the step's own length), ``fall:F`` (the lr falls by at most a fraction ``F`` per
step), ``capA`` / ``capB`` (section 7's start-up caps ``lr <= w * 2 (f - f*) / n``, always / while the averages'
weight ``w < 0.9``, around the rule without the library's ``loss_cap``; ``nocap`` that rule alone; also
``benchmarks.mup_transfer --variant``), ``nb:MODE`` (section 8: CDAT with a closure behind Adam, the numerator
without the batch's own gradient inside Adam's first moment, :class:`_AdamNumerator`; ``nb:mprev`` is the
library's ``numerator="momentum"``, also reachable as ``fd@numerator=momentum``); any CDAT variant takes
``@k=v;...`` for CDAT keywords, e.g. ``fd@ema=0.9``. ``edge --widths 2,4,8`` runs the suite's other widths
(default: the middle one), ``--ref PATH`` takes the ratios' reference from a benchmark ``results.jsonl`` (its best
constant, per width).

Rerun (one thread; about 25 CPU minutes for everything before section 7, whose runs add about 22)::

    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study noise --seeds 0,1,2
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --seeds 0,1,2
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --docs /tmp \
        --variants "constant:0.5,fd@ema=0.99,cdat:sigma=4;ema=0.99,snr@ema=0.99,fall:0.01@ema=0.9"  # other rows
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --task lm --edge-every 0 --sharpness-every 0 \
        --variants "constant:0.032,fd@ema=0.99,cdat:sigma=4;ema=0.99,fall:0.002@ema=0.99,fall:0.01@ema=0.99"
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --task lm --edge-every 0 --sharpness-every 0 \
        --variants "constant:0.032,fd@ema=0.99,nb:mprev@ema=0.99,nb:gprev@ema=0.99,nb:g2prev@ema=0.99,nb:sub@ema=0.99"
        # section 8; the same variants with --regime full (LM w8) and --task vit --regime full --widths 4, then
    python -m benchmarks.minibatch_study numerator --seeds 0   # section 8's figure (docs/minibatch_numerator.png)
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --task resnet --regime full --edge-every 0 \
        --sharpness-every 0 --variants "constant:0.1768,fd@ema=0.9,cdat:sigma=4;ema=0.9"
    python -m benchmarks.minibatch_study guard    # section 5, the convex table (seconds)
    OMP_NUM_THREADS=1 python -m benchmarks --suite default --out results/guard --tasks resnet --regimes full \
        --widths 2,4,8 --tuners constant,cdat --seeds 0,1,2                          # section 5, the networks
    python -m benchmarks.minibatch_study guard --replay results/guard/results.jsonl
    for v in nocap capA capB; do for s in 0 1 2; do  # section 7, the μP start-up (about 2 CPU minutes)
      OMP_NUM_THREADS=1 python -m benchmarks.mup_transfer --only cdat --variant $v --seed $s --out results/mup_startup/${v}_s$s
    done; done
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --task resnet --regime full --widths 2,4,8 \
        --edge-every 0 --sharpness-every 0 --variants nocap,capA,capB --ref results/default/results.jsonl --docs /tmp
    OMP_NUM_THREADS=1 python -m benchmarks.minibatch_study edge --task resnet --regime mini \
        --edge-every 0 --sharpness-every 0 --variants nocap,capA,capB --ref results/default/results.jsonl --docs /tmp
                                                      # section 7, the ResNet cells (about 20 CPU minutes)

The tables printed give the final train loss (mean of the last tenth of the steps in mini-batch, of the last 5
in full batch, as the suite), its ratio to the constant of the same seed (median and worst seed), the eval
loss and the median lr of the last fifth of the steps. Findings (2026-11-30) are in ``docs/minibatch_study.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

from . import suites as suites_mod
from . import tasks as tasks_mod
from . import tuners as tuners_mod

__all__ = ["main", "run_variant"]

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def experiment(task: str, regime: str):
    """The default suite's experiment for ``(task, regime)`` (torch, standard parameterisation): where it runs
    one per width, the one with the most tuners (the middle width, where the peers run)."""
    found = [e for e in suites_mod.DEFAULT.experiments
             if e.task == task and e.regime == regime and e.backends == ("torch",) and e.params == ("sp",)]
    if not found:
        raise KeyError((task, regime))
    return max(found, key=lambda e: len(e.tuners))


def width_of(exp) -> int:
    """The experiment's middle width (the one the suite runs every tuner and peer at)."""
    return exp.widths[len(exp.widths) // 2]


# ------------------------------------------------------------------------------------------ one run
def _snr_sigma(state: dict, grads, beta: float, base_sigma: float, cap: float) -> float:
    """``sigma = base_sigma * v / ||m||^2`` (at least ``base_sigma``, at most ``cap``): ``m`` the moving
    average of the batch gradient, ``v`` that of its squared norm (both bias-corrected). ``v / ||m||^2`` is
    ``1 + noise / signal`` once the average holds many batches: 1 when every batch agrees (full batch), large
    when the batch gradients are mostly noise."""
    import torch

    t = state.get("t", 0) + 1
    m = state.get("m")
    if m is None:
        m = [torch.zeros_like(g) for g in grads]
    for mi, g in zip(m, grads):
        mi.mul_(beta).add_(g, alpha=1 - beta)
    sq = float(sum(float((g * g).sum()) for g in grads))
    v = beta * state.get("v", 0.0) + (1 - beta) * sq
    state.update(t=t, m=m, v=v)
    corr = 1 - beta ** t
    msq = float(sum(float((mi * mi).sum()) for mi in m)) / corr ** 2
    ratio = (v / corr) / msq if msq > 0 else 1.0
    return float(min(max(base_sigma * ratio, base_sigma), cap))


def run_variant(task: str, regime: str, seed: int, variant: str, steps: int | None = None, *,
                edge_every: int = 0, sharpness_every: int = 0, width: int | None = None) -> dict:
    """One training run. ``variant``: ``constant:LR``, ``fd`` (CDAT with a closure, library defaults),
    ``secant`` / ``secant+nc`` (closure-free CDAT without / with the noise correction), ``cdat:KEY=V;...``
    (CDAT with a closure and rule settings), ``snr`` / ``snr:BETA`` (CDAT with a closure, sigma from the
    gradient noise, :func:`_snr_sigma`), ``snru`` / ``snru:BETA`` (the same from the directions taken,
    ``u = (w_{t+1} - w_t) / lr_t``, lagged by one step: for SGD ``u = -g``, for Adam its own averaged update),
    ``chord`` / ``chord:KAPPA`` (CDAT with a closure whose probe sits at ``KAPPA`` times the previous lr,
    :class:`_chord_probe`), ``fall:F`` (CDAT with a closure whose lr falls by at most a fraction ``F`` per step,
    :func:`_fall_limited`), ``capA`` / ``capB`` (CDAT with a closure under section 7's start-up caps,
    :func:`_startup_capped`). ``width``: one of the suite's widths for the task (default: the middle one)."""
    import torch

    torch.set_num_threads(1)
    exp = experiment(task, regime)
    base = exp.base or tasks_mod.TASKS[task].base
    steps = steps or exp.steps
    width = width or width_of(exp)
    prob = tasks_mod.torch_problem(exp, width, seed)
    model = prob.model
    model.train()
    params = list(model.parameters())
    from curvopt.torch import CDAT

    name, _, extra = variant.partition("@")  # "VARIANT@key=value;key=value": CDAT keywords (e.g. ema=0.9)
    extra_kw = tuners_mod.parse_tuner("cdat:" + extra)[1] if extra else {}
    closure_free = name in ("secant", "secant+nc")
    snr = name.startswith("snr")
    if name.startswith("constant:"):
        opt = tuners_mod.torch_base(base, params, float(name.split(":")[1]))
    elif closure_free:
        opt = CDAT(tuners_mod.torch_base(base, params, 1.0), modules=model, noise_correction=name == "secant+nc",
                   **extra_kw)
    else:
        kw = dict(extra_kw)
        if name.startswith("cdat:"):
            kw.update(tuners_mod.parse_tuner(name)[1])
        opt = CDAT(tuners_mod.torch_base(base, params, 1.0), modules=model, **kw)
        if name.startswith("fall:"):
            opt.rule = _fall_limited(opt.rule, float(name.split(":")[1]))
        if name in STARTUP_CAPS or name == "nocap":  # section 7's start-up caps A / B, and the rule without
            startup_variant(opt, name)
    nbias = _AdamNumerator(opt, params, name.split(":")[1]) if name.startswith("nb:") else None  # section 8
    chord = name.startswith("chord")  # prototype: the fd probe at the step's own scale (see _chord_probe)
    if chord:
        kappa = float(name.split(":")[1]) if ":" in name else 1.0
        holder = {"lr": 0.0}
        patch = _chord_probe(holder, kappa)
        patch.__enter__()
    on_u = name.startswith("snru")  # sigma from the noise of the direction taken (lagged by one step)
    beta = float(name.split(":")[1]) if snr and ":" in name else 0.9
    snr_state: dict = {}
    it = prob.batches()
    # a fixed 512-sample training subset for the full-batch sharpness
    xs, ys = prob.x[:512], prob.y[:512]
    rec = {k: [] for k in ("loss", "lr", "sigma")}
    edges, sharp = [], []
    first = None
    t0 = time.process_time()
    for step in range(steps):
        xb, yb = next(it)

        def closure():
            model.zero_grad(set_to_none=True)
            loss = prob.loss(model(xb), yb)
            loss.backward()
            return loss

        if nbias is not None:
            closure = nbias.wrap(closure, lambda xb=xb, yb=yb: prob.loss(model(xb), yb),
                                 lambda ps, xb=xb, yb=yb: prob.loss(torch.func.functional_call(
                                     model, dict(zip([n for n, _ in model.named_parameters()], ps)), (xb,)), yb))
        if edge_every and step % edge_every == 0:
            edges.append((step, _batch_edge(prob, model, params, xb, yb, base, opt)))
        if sharpness_every and step % sharpness_every == 0:
            sharp.append((step, _sharpness(prob, model, params, xs, ys)))
        sigma = math.nan
        if snr and not on_u:
            closure()
            sigma = _snr_sigma(snr_state, [p.grad for p in params], beta, 2.0, 64.0)
            opt.sigma = sigma
        elif on_u:
            sigma = snr_state.get("sigma", 2.0)
            opt.sigma = sigma
            w_before = [p.detach().clone() for p in params]
        if closure_free:
            loss = closure()
            opt.step()
        else:
            loss = opt.step(closure)
        lv = float(loss.detach())
        lr = float(opt.stats["lr"]) if hasattr(opt, "stats") else float(opt.param_groups[0]["lr"])
        if on_u and lr > 0:  # the direction just taken, u = (w_new - w_old) / lr, feeds the next step's sigma
            with torch.no_grad():
                u = [(p.detach() - w) / lr for p, w in zip(params, w_before)]
            snr_state["sigma"] = _snr_sigma(snr_state, u, beta, 2.0, 64.0)
        if chord:
            holder["lr"] = lr
        rec["loss"].append(lv)
        rec["lr"].append(lr)
        rec["sigma"].append(sigma)
        first = lv if first is None else first
        if not math.isfinite(lv) or lv > 1000 * max(first, 1e-3):
            break
    cpu = time.process_time() - t0
    if chord:
        patch.__exit__(None, None, None)
    ev_loss, ev_acc = prob.evaluate()
    n = len(rec["loss"])
    window = max(1, steps // 10) if regime == "mini" else 5
    final = statistics.fmean(rec["loss"][-window:]) if n == steps else math.inf
    return {"task": task, "regime": regime, "width": width, "seed": seed, "variant": variant, "steps": steps, "final": final,
            "eval_loss": ev_loss, "eval_acc": ev_acc, "cpu": cpu, "edges": edges, "sharpness": sharp, **rec,
            **({"nb": nbias.log} if nbias is not None else {})}


def _rule_around(inner, update, init=None):
    """A duck-typed rule value around ``inner`` (a :class:`curvopt.rules.CDATRule`) for the research prototypes:
    ``update(x, state, xp)`` (and ``init(zero)`` when given) replace the rule's, everything else is ``inner``'s."""

    class Around:
        needs = inner.needs
        default_sharpness = inner.default_sharpness

        def __getattr__(self, name):
            return getattr(inner, name)

    Around.init = staticmethod(init or inner.init)
    Around.update = staticmethod(update)
    return Around()


def _fall_limited(inner, fall: float):
    """Research prototype (not the library): CDAT whose lr may rise as fast as the rule says but fall by at most
    a fraction ``fall`` per step, ``lr_t = max(cdat_t, (1 - fall) lr_{t-1})``: the rate does not follow a
    rising sharpness down at once, so the edge-of-stability dynamics get the time to flatten the landscape
    (the constant's mechanism) before the rate gives way. A duck-typed rule value around ``inner``."""
    from typing import NamedTuple

    from curvopt.rules import CDATState

    class FallState(NamedTuple):
        numerator_avg: object
        denominator_avg: object
        avg_weight: object
        cdat_lr: object
        gap_avg: object
        gap_weight: object
        gap_min: object
        unit: object
        held_lr: object

    def update(x, state, xp):
        lr, new = inner.update(x, CDATState(*state[:-1]), xp)
        floor = (1 - fall) * state.held_lr
        lr = xp.where(lr > floor, lr, floor)
        return lr, FallState(*new, lr)

    return _rule_around(inner, update, init=lambda zero: FallState(*inner.init(zero), zero))


# ------------------------------------------------------------------------------------------ start-up caps (section 7)
#: research prototypes of docs/minibatch_study.md section 7 (issue 12, CDAT's start-up under μP): variant name ->
#: the averages' weight ``w = 1 - ema^t`` below which the cap applies (A: always, B: while ``w < 0.9``)
STARTUP_CAPS = {"capA": math.inf, "capB": 0.9}


def _startup_capped(inner, until: float = math.inf):
    """Research prototype (not the library): CDAT whose rate is capped by ``lr <= w * 2 (f - f_star) / n``
    while the averages' weight ``w = 1 - ema^t`` (the rule's ramp, this step included) is below ``until``;
    ``n = -g^T u`` the rule's numerator, ``f`` the loss. ``2 (f - f_star) / n`` is the minimiser of the flattest
    quadratic model consistent with the loss bound (the loss-bound floor's curvature ``n^2 / (2 (f - f_star))``),
    ramped like the rule's own rate. Applied to the rule's output rate (after the guard and the growth cap); the
    capped rate is the one stored as the growth cap's reference. No cap where the loss is unknown (NaN), not above
    ``f_star``, or ``n <= 0``. A duck-typed rule value around ``inner`` (a :class:`curvopt.rules.CDATRule`)."""
    from curvopt.rules import _safe_div

    def update(x, state, xp):
        lr, new = inner.update(x, state, xp)
        w, n, gap = new.avg_weight, x.numerator, x.value - inner.f_star
        on = (n > 0) & xp.isfinite(gap) & (gap > 0) & (w < until)
        bound = _safe_div(2 * w * gap, n, on, xp)
        lr = xp.where(on & (bound < lr), bound, lr)
        return lr, new._replace(cdat_lr=lr)

    return _rule_around(inner, update)


def startup_variant(opt, name: str):
    """``opt`` (a :class:`curvopt.torch.CDAT`) with the start-up variant ``name``: ``""``: as it is (the library's
    default, whose ``loss_cap`` is A since it was adopted); ``"nocap"``: the rule before that, ``loss_cap=inf``;
    a key of :data:`STARTUP_CAPS`: that rule wrapped by the research cap (:func:`_startup_capped`; ``capA``
    reproduces the library's ``loss_cap`` by separate code, ``tests/test_bench_minibatch_startup.py``)."""
    if name == "":
        return opt
    if name != "nocap" and name not in STARTUP_CAPS:
        raise ValueError(f"unknown start-up variant {name!r}; expected one of {sorted(STARTUP_CAPS)} or 'nocap'")
    opt.rule = dataclasses.replace(opt.rule, loss_cap=math.inf)
    if name in STARTUP_CAPS:
        opt.rule = _startup_capped(opt.rule, STARTUP_CAPS[name])
    return opt
# ------------------------------------------------------------------------------------------ end of start-up caps


# ------------------------------------------------------------------------------------------ section 8: Adam's numerator
class _AdamNumerator:
    """Research prototype (section 8, not the library): CDAT's numerator ``-g_B^T u`` under Adam without the
    batch's correlation with itself. Adam's direction is ``u = -D m_t`` with ``m_t = b1 m_{t-1} + (1 - b1) g_B``
    and ``D = lr_g / ((1 - b1^t) (sqrt(v_t / (1 - b2^t)) + eps))``, so ``-g_B^T u`` holds ``(1 - b1) g_B^T D g_B``,
    whose mean over batches carries the noise ``(1 - b1) E xi^T D xi`` of the batch gradient ``g_B = G + xi``.
    The rule sees ``-g_B^T u + (1 - b1) g_B^T D (g_hat - g_B)``, ``g_B`` inside ``m_t`` replaced by an estimate
    ``g_hat`` of the gradient that does not share the batch's noise (``mode``):

    * ``mprev``: ``g_hat = m_{t-1} / (1 - b1^(t-1))``, Adam's bias-corrected momentum before this step;
    * ``gprev``: ``g_hat`` = the previous step's batch gradient;
    * ``g2prev``: ``g_hat`` = the batch gradient of two steps back (at the edge of stability the full-batch
      gradient flips sign along the sharp directions every step, so ``g_{t-2}`` is close to ``g_t`` there while
      ``g_{t-1}`` and ``m_{t-1}`` are not);
    * ``sub``: the noise estimated and subtracted, ``-(1 - b1) (g_B - g_prev)^T D (g_B - g_prev) / 2``
      (half the squared difference of two independent batch gradients is the noise's second moment; in full
      batch it is the drift between two steps);
    * ``pair``: the noise's second moment from two batches at the same point, ``-(1 - b1) r^T D r / 2`` with
      ``r = g_B(w_t) - g_{B'}(w_t)``, ``B'`` the previous step's batch (one more gradient per step): 0 in full
      batch (the same batch twice), so the full-batch rule is unchanged (a check of the principle; the library
      would need the previous batch, or its drift predicted from the previous fd probe, ``lr H u``);
    * ``pairlin``: ``pair`` with the previous batch's gradient at ``w_t`` predicted to first order from ``w_{t-1}``,
      ``g_{t-1} + H_{B'} (w_t - w_{t-1})`` (``H_{B'} dw`` by a forward difference of the previous batch's gradient
      at 1 % of the step): what a tuner could do from its own fd probe; not exact in full batch;
    * ``off``: no change (``log`` only: the numerator and its self term).

    The first step (no previous momentum or gradient) is left alone. ``log`` holds, per step,
    ``(numerator, self term (1 - b1) g_B^T D g_B, correction, g_B^T D m_t)`` (the last equals the first: a check). Torch Adam without weight decay only (the LM)."""

    def __init__(self, opt, params, mode: str):
        import torch

        assert isinstance(opt.base, torch.optim.Adam) and mode in ("mprev", "gprev", "g2prev", "sub", "pair", "pairlin", "off"), mode
        self.opt, self.params, self.mode = opt, params, mode
        self.g = self.g_prev = self.g_prev2 = self.m_prev = self.g_other = self.prev_closure = None
        self.log: list = []
        inner = opt.rule
        opt.rule = _rule_around(inner, lambda x, state, xp: inner.update(
            x._replace(numerator=x.numerator + self.correction(float(x.numerator))), state, xp))

    def wrap(self, closure, batch_loss=None, loss_at=None):
        """The step's closure, recording the main call's batch gradient; ``m_{t-1}`` read before the step."""
        import torch

        base = self.opt.base
        self.m_prev = [base.state[p]["exp_avg"].detach().clone() if p in base.state else torch.zeros_like(p)
                       for p in self.params]
        self.t_prev = int(base.state[self.params[0]]["step"]) if self.params[0] in base.state else 0
        self.g_prev2, self.g_prev, self.g, self.g_other = self.g_prev, self.g, None, None
        previous, self.prev_closure = self.prev_closure, batch_loss  # this step's batch, bound (not late-bound)
        if self.mode == "pairlin":
            w_now = [p.detach().clone() for p in self.params]
            prev = getattr(self, "lin_prev", None)  # (loss_at, w) of the previous step
            if prev is not None and self.g_prev is not None:
                h = 0.01
                at = [w + h * (v - w) for w, v in zip(prev[1], w_now)]
                at = [a.requires_grad_(True) for a in at]
                g_plus = torch.autograd.grad(prev[0](at), at, allow_unused=True)
                self.g_other = [gp + (torch.zeros_like(gp) if gq is None else (gq.detach() - gp) / h)
                                for gp, gq in zip(self.g_prev, g_plus)]
            self.lin_prev = (loss_at, w_now)

        def recording():
            loss = closure()
            if self.g is None:
                self.g = [p.grad.detach().clone() for p in self.params]
                if self.mode == "pair" and previous is not None:  # the previous batch at this point
                    grads = torch.autograd.grad(previous(), self.params, allow_unused=True)
                    self.g_other = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads)]
            return loss

        return recording

    def correction(self, numerator: float) -> float:
        import torch

        base = self.opt.base
        group = base.param_groups[0]
        b1, b2 = group["betas"]
        eps, lr_g = group["eps"], group["lr"]
        t = int(base.state[self.params[0]]["step"])
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        self_term = corr = direct = 0.0
        with torch.no_grad():
            none = [None] * len(self.g)
            for p, g, m_prev, g_prev, g_prev2, g_other in zip(self.params, self.g, self.m_prev, self.g_prev or none,
                                                              self.g_prev2 or none, self.g_other or none):
                d = lr_g / (bc1 * ((base.state[p]["exp_avg_sq"] / bc2).sqrt() + eps))
                dg = d * g
                self_term += (1 - b1) * float((dg * g).sum(dtype=torch.float64))
                direct += float((dg * base.state[p]["exp_avg"]).sum(dtype=torch.float64))  # = -g^T u (a check)
                if self.mode == "mprev" and self.t_prev > 0:
                    corr += (1 - b1) * float((dg * (m_prev / (1 - b1 ** self.t_prev) - g)).sum(dtype=torch.float64))
                elif self.mode == "gprev" and g_prev is not None:
                    corr += (1 - b1) * float((dg * (g_prev - g)).sum(dtype=torch.float64))
                elif self.mode == "g2prev" and g_prev2 is not None:
                    corr += (1 - b1) * float((dg * (g_prev2 - g)).sum(dtype=torch.float64))
                elif self.mode in ("pair", "pairlin") and g_other is not None:
                    corr -= 0.5 * (1 - b1) * float((d * (g - g_other) ** 2).sum(dtype=torch.float64))
                elif self.mode == "sub" and g_prev is not None:
                    corr -= 0.5 * (1 - b1) * float((d * (g - g_prev) ** 2).sum(dtype=torch.float64))
        self.log.append((numerator, self_term, corr, direct))
        return corr


class _chord_probe:
    """Research prototype (not the library): CDAT's ``fd`` probe moved from ``h ~ sqrt(eps) ||w|| / ||u||`` to
    ``h = kappa * lr_{t-1}``, so ``(g(w + h u) - g(w))^T u / h`` is the curvature averaged over the chord of the
    step about to be taken (the mean of ``u^T H u`` along it) instead of the curvature at ``w``. Patches
    ``torch_backend.oracles.finite_difference_step`` while the run lasts."""

    def __init__(self, holder: dict, kappa: float):
        self.holder, self.kappa = holder, kappa

    def __enter__(self):
        import torch

        from torch_backend import oracles

        self.mod, self.orig = oracles, oracles.finite_difference_step
        orig, holder, kappa = self.orig, self.holder, self.kappa

        def step(param_norm, direction_norm, *, dtype_eps, xp):
            h = orig(param_norm, direction_norm, dtype_eps=dtype_eps, xp=xp)
            big = kappa * holder["lr"]
            if float(h) >= big:
                return h
            return torch.full_like(h, big) if isinstance(h, torch.Tensor) else type(h)(big)

        oracles.finite_difference_step = step
        return self

    def __exit__(self, *exc):
        self.mod.finite_difference_step = self.orig


def _flat_grad(prob, model, params, xb, yb):
    import torch

    model.zero_grad(set_to_none=True)
    loss = prob.loss(model(xb), yb)
    loss.backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _batch_edge(prob, model, params, xb, yb, base, opt) -> float:
    """``2 n / c`` along the batch's gradient-descent direction ``u = -g`` (SGD) or Adam's current direction
    estimate ``-g / (sqrt(v_hat) + eps)`` with the base's second moment (Adam): CDAT's sigma = 2 rate on this
    batch alone, ``c = u^T H_B u`` by a forward difference on the same batch."""
    import torch

    g = _flat_grad(prob, model, params, xb, yb)
    if base == "adam":
        st = getattr(opt, "base", opt).state
        u = []
        for p, gi in zip(params, g):
            s = st.get(p, {})
            if "exp_avg_sq" in s and int(float(s.get("step", 1))) > 0:
                stp = float(s["step"])
                v = s["exp_avg_sq"] / (1 - 0.999 ** stp)
                u.append(-gi / (v.sqrt() + 1e-8))
            else:
                u.append(-gi.sign())
    else:
        u = [-gi for gi in g]
    n = -sum(float((gi * ui).sum()) for gi, ui in zip(g, u))
    w = [p.detach().clone() for p in params]
    wn = math.sqrt(sum(float((x * x).sum()) for x in w))
    un = math.sqrt(sum(float((x * x).sum()) for x in u))
    h = 3.5e-4 * wn / un if un > 0 else 0.0
    with torch.no_grad():
        for p, ui in zip(params, u):
            p.add_(ui, alpha=h)
    g2 = _flat_grad(prob, model, params, xb, yb)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    model.zero_grad(set_to_none=True)
    c = sum(float(((b - a) * ui).sum()) for a, b, ui in zip(g, g2, u)) / h if h > 0 else math.nan
    quad = 2 * n / c if c > 0 else math.inf
    return quad, _loss_edge(prob, model, params, xb, yb, u, quad if math.isfinite(quad) else 1.0)


def _loss_edge(prob, model, params, xb, yb, u, start: float) -> float:
    """The true edge along ``u`` on this batch: the smallest lr on a sqrt(2) grid from ``start / 16`` with
    ``f_B(w + lr u) >= f_B(w)`` (inf if none below ``1024 start``), refined by 6 bisections."""
    import torch

    w = [p.detach().clone() for p in params]

    def f(lr):
        with torch.no_grad():
            for p, wi, ui in zip(params, w, u):
                p.copy_(wi).add_(ui, alpha=lr)
            return float(prob.loss(model(xb), yb))

    f0 = f(0.0)
    lo, hi, lr = 0.0, math.inf, start / 16
    while lr <= 1024 * start:
        if f(lr) >= f0:
            hi = lr
            break
        lo, lr = lr, lr * 2 ** 0.5
    if math.isfinite(hi):
        for _ in range(6):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if f(mid) < f0 else (lo, mid)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    return hi


def _sharpness(prob, model, params, xs, ys) -> float:
    from .hessian import top_eigenvalue

    try:
        val, _ = top_eigenvalue(lambda: prob.loss(model(xs), ys), params, tol=1e-3)
    except Exception:  # ARPACK fails on a dead network (zero or non-finite Hessian products)
        val = math.nan
    model.zero_grad(set_to_none=True)
    return val


# ------------------------------------------------------------------------------------------ cache
class Cache:
    def __init__(self, path: str):
        self.path = path
        self.rows = {}
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    r = json.loads(line)
                    self.rows[self.key(r["task"], r["regime"], r["seed"], r["variant"], r["steps"], r.get("width"))] = r

    @staticmethod
    def key(task, regime, seed, variant, steps, width=None):
        return f"{task}|{regime}|w{width or width_of(experiment(task, regime))}|{seed}|{variant}|{steps}"

    def get(self, task, regime, seed, variant, steps=None, width=None, **kw) -> dict:
        steps = steps or experiment(task, regime).steps
        k = self.key(task, regime, seed, variant, steps, width)
        if k not in self.rows:
            r = run_variant(task, regime, seed, variant, steps, width=width, **kw)
            print(f"  {k}: final {r['final']:.4g} eval {r['eval_loss']:.4g} lr(last fifth) "
                  f"{_late_lr(r):.3g} ({r['cpu']:.0f} CPU s)", flush=True)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            self.rows[k] = r
        return self.rows[k]


def _late_lr(r: dict) -> float:
    lr = r["lr"]
    return statistics.median(lr[-max(1, len(lr) // 5):]) if lr else math.nan


def _smooth(xs, k=10):
    import numpy as np

    a = np.asarray(xs, dtype=float)
    if len(a) < k:
        return a
    c = np.convolve(a, np.ones(k) / k, mode="valid")
    return np.concatenate([a[:k - 1], c])


def _table(rows: list[tuple[str, list[dict]]], ref: dict | None = None) -> str:
    """Median over seeds of final loss / eval loss / late lr; ratio to ``ref`` (seed -> final) if given."""
    out = ["| setting | final train loss (median) | ÷ best const median | worst (seed) | eval loss | lr, last fifth |",
           "|---|---|---|---|---|---|"]
    for name, rs in rows:
        fin = [r["final"] for r in rs]
        ev = [r["eval_loss"] for r in rs]
        lrs = [_late_lr(r) for r in rs]
        rat, worst = "—", "—"
        if ref:
            ratios = {r["seed"]: r["final"] / ref[r["seed"]] for r in rs}
            rat = f"{statistics.median(ratios.values()):.3g}"
            s = max(ratios, key=ratios.get)
            worst = f"{ratios[s]:.3g} (s{s})"
        out.append(f"| {name} | {statistics.median(fin):.4g} | {rat} | {worst} | {statistics.median(ev):.4g} | "
                   f"{statistics.median(lrs):.3g} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ noise (issue 11)
NOISE_PANELS = (("resnet", "mini"), ("lm", "mini"), ("resnet", "full"))
NOISE_VARIANTS = (("secant", "closure-free, no correction"), ("secant+nc", "closure-free, noise_correction=True"),
                  ("fd", "with a closure (fd oracle)"))


def noise(args, cache: Cache) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = args.seeds
    fig, axes = plt.subplots(2, len(NOISE_PANELS), figsize=(5.2 * len(NOISE_PANELS), 7.5), squeeze=False)
    text = []
    for j, (task, regime) in enumerate(NOISE_PANELS):
        exp = experiment(task, regime)
        rows = []
        for v, label in NOISE_VARIANTS:
            # full batch: the first seed only (a full-batch run costs ~10 mini-batch runs on this CPU)
            rs = [cache.get(task, regime, s, v, args.steps) for s in (seeds if regime == "mini" else seeds[:1])]
            rows.append((label, rs))
            r0 = rs[0]
            axes[0, j].plot(r0["lr"], lw=0.8, label=f"{label}: lr late {statistics.median(_late_lr(r) for r in rs):.2g}")
            axes[1, j].plot(_smooth(r0["loss"]), lw=0.8, label=label)
        title = (f"{task} {'mini-batch ' + str(exp.batch_size) if regime == 'mini' else 'full batch'}, "
                 f"{exp.base or tasks_mod.TASKS[task].base}, w{width_of(exp)}")
        axes[0, j].set(yscale="log", xlabel="step", title=f"{title}: lr (seed {seeds[0]}"
                       + (")" if regime == "mini" else " only)"))
        axes[1, j].set(yscale="log", title="train loss (10-step mean)", xlabel="step")
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=7)
        text.append(f"### {title}\n\n{_table(rows)}\n")
    fig.suptitle("closure-free (secant) CDAT with and without the secant noise correction, vs CDAT with a closure"
                 " (medians in the legend over seeds " + ",".join(map(str, seeds)) + ")", fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.docs, "minibatch_noise_lr.png")
    os.makedirs(args.docs, exist_ok=True)
    fig.savefig(path, dpi=args.dpi)
    return "\n".join(text) + f"\nfigure: {path}\n"


# ------------------------------------------------------------------------------------------ edge (issue 12)
def suite_constant(path: str, task: str, regime: str, width: int, steps: int) -> tuple[float, dict]:
    """The best constant of a benchmark ``results.jsonl`` for the torch SP cell ``(task, regime, width)`` (the
    report's choice, :func:`benchmarks.best_constant.best_constant`; each seed's run by its last record, as a
    results file resumed after a code change holds one per code version): ``(lr, {seed: final})``."""
    from .best_constant import best_constant
    from .plan import eval_metric, final_loss
    from .results import load_results

    runs: dict = {}
    for r in load_results(path):
        if (r["task"], r["regime"], r["width"], r["backend"], r["param"], r["tuner_name"], r["max_steps"]) == \
                (task, regime, width, "torch", "sp", "constant", steps) and r.get("status") in ("ok", "diverged"):
            runs.setdefault(float(r["settings"]["lr"]), {})[r["seed"]] = r
    if not runs:
        raise KeyError(f"no constant runs for {task} {regime} w{width} ({steps} steps) in {path}")
    lr, _ = best_constant({k: [final_loss(r) for r in rs.values()] for k, rs in runs.items()},
                          {k: [eval_metric(r, "eval_loss", math.inf) for r in rs.values()] for k, rs in runs.items()})
    return lr, {seed: final_loss(r) for seed, r in runs[lr].items()}


def edge(args, cache: Cache) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = args.seeds
    task, regime = args.task, args.regime
    variants = args.variants.split(",")
    kw = {"edge_every": args.edge_every, "sharpness_every": args.sharpness_every}
    texts = []
    for width in (args.widths or [None])[::-1]:  # the figure shows the first width
        res = {v: [cache.get(task, regime, s, v, args.steps, width=width, **kw) for s in seeds] for v in variants}
        ref_v = next((v for v in variants if v.startswith("constant:")), None)
        ref = {r["seed"]: r["final"] for r in res[ref_v]} if ref_v else None
        note = ""
        if args.ref:  # the best constant of a benchmark run (the suite's own choice) is the ratios' reference
            lr_ref, ref = suite_constant(args.ref, task, regime, width or width_of(experiment(task, regime)),
                                         args.steps or experiment(task, regime).steps)
            note = f" (÷ the best constant of {args.ref}, lr={lr_ref:g})"
        texts.append(f"### {task} {regime} w{width or width_of(experiment(task, regime))}{note}\n\n"
                     + _table([(v, rs) for v, rs in res.items()], ref))
    text = "\n\n".join(texts[::-1])
    measured = any(r["edges"] or r["sharpness"] for rs in res.values() for r in rs)
    fig, axes = plt.subplots(2 if measured else 1, 2, figsize=(11, 8 if measured else 4.2), squeeze=False)
    for v, rs in res.items():
        r = rs[0]
        (line,) = axes[0, 0].plot(r["lr"], lw=0.8, label=v)
        if r["edges"]:
            st, e = zip(*r["edges"])
            quad, true = zip(*e)
            axes[0, 0].plot(st, _smooth(quad, 5), ":", lw=0.8, color=line.get_color())
            axes[0, 0].plot(st, _smooth(true, 5), "--", lw=0.8, color=line.get_color())
            lr_at = [r["lr"][i] if i < len(r["lr"]) else math.nan for i in st]
            axes[1, 0].plot(st, _smooth([a / b for a, b in zip(lr_at, quad)], 5), lw=0.8, color=line.get_color(),
                            label=f"{v}: lr / quadratic edge")
            axes[1, 0].plot(st, _smooth([a / b for a, b in zip(lr_at, true)], 5), "--", lw=0.8,
                            color=line.get_color(), label=f"{v}: lr / loss edge")
        axes[0, 1].plot(_smooth(r["loss"], 20), lw=0.8, label=v)
        if r["sharpness"]:
            st, sh = zip(*r["sharpness"])
            axes[1, 1].plot(st, sh, "-o", ms=2, lw=0.8, label=v)
    axes[0, 0].set(yscale="log", xlabel="step", title=f"lr (solid), batch edges: quadratic 2n/c (dotted), loss (dashed); "
                   f"seed {seeds[0]}" if measured else f"lr, seed {seeds[0]}")
    axes[0, 1].set(yscale="log", title="train (batch) loss, 20-step mean", xlabel="step")
    if measured:
        axes[1, 0].set(yscale="log", title="lr ÷ batch edge (5-point mean); 1 = on the edge", xlabel="step")
        axes[1, 0].axhline(1, color="k", lw=0.5)
        axes[1, 1].set(yscale="log", title="top Hessian eigenvalue, 512 training digits", xlabel="step")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    exp = experiment(task, regime)
    fig.suptitle(f"{task} {regime} ({exp.base or tasks_mod.TASKS[task].base}, w{rs[0]['width']}, default suite): "
                 "the best constant vs CDAT variants", fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.docs, "minibatch_edge.png" if args.figure_name == "edge" else f"{args.figure_name}.png")
    os.makedirs(args.docs, exist_ok=True)
    fig.savefig(path, dpi=args.dpi)
    return text + f"\n\nfigure: {path}\n"


# ------------------------------------------------------------------------------------------ numerator (section 8)
NUMERATOR_CELLS = (("lm", "mini", None, "constant:0.032"), ("lm", "full", None, "constant:0.032"),
                   ("vit", "full", 4, "constant:0.128"))
NUMERATOR_VARIANTS = (("fd@ema=0.99", "CDAT default (-g^T u)"), ("nb:mprev@ema=0.99", "numerator='momentum' (m_{t-1})"),
                      ("nb:gprev@ema=0.99", "prototype: g_{t-1}"), ("nb:sub@ema=0.99", "prototype: noise subtracted"),
                      ("nb:pairlin@ema=0.99", "prototype: noise at one point (pairlin)"))


class _EdgeCaches:
    """The edge study's caches, one file per ``(task, regime)`` (``edge_<task>_<regime>.jsonl``)."""

    def __init__(self, out: str):
        self.out, self.caches = out, {}

    def get(self, task, regime, seed, variant, steps=None, **kw) -> dict:
        if (task, regime) not in self.caches:
            self.caches[task, regime] = Cache(os.path.join(self.out, f"edge_{task}_{regime}.jsonl"))
        return self.caches[task, regime].get(task, regime, seed, variant, steps, **kw)


def numerator(args, cache) -> str:
    """Section 8's figure: the lr of CDAT with and without the batch's self term in its numerator (Adam) on the
    mini-batch LM, the full-batch LM and the full-batch ViT w4 (first seed), and the numerator's parts along the
    ``nb:gprev`` run (``-g^T u``, the self term ``(1 - b1) g^T D g`` and the rest ``b1 g^T D m_{t-1}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seed = args.seeds[0]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for j, (task, regime, width, const) in enumerate(NUMERATOR_CELLS):
        ax = axes[0, j]
        ax.axhline(float(const.split(":")[1]), color="k", lw=0.8, ls="--", label=const)
        runs = {v: cache.get(task, regime, seed, v, args.steps, width=width) for v, _ in NUMERATOR_VARIANTS}
        for v, label in NUMERATOR_VARIANTS:
            ax.plot(runs[v]["lr"], lw=0.8, label=label)
        w = runs[NUMERATOR_VARIANTS[0][0]]["width"]
        ax.set(yscale="log", title=f"{task} {regime} w{w}: lr (seed {seed})", xlabel="step")
        nb = np.array(runs["nb:gprev@ema=0.99"]["nb"])
        k = 25
        sm = lambda x: np.convolve(x, np.ones(k) / k, mode="valid")  # noqa: E731
        n, own = nb[:, 0], nb[:, 1]
        ax = axes[1, j]
        ax.plot(sm(n), lw=0.8, label="-g^T u")
        ax.plot(sm(own), lw=0.8, label="self term (1 - b1) g^T D g")
        ax.plot(sm(n - own), lw=0.8, label="rest, b1 g^T D m_{t-1}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_yscale("symlog", linthresh=max(1e-6, float(np.median(np.abs(sm(n - own))))))
        ax.set(title=f"{task} {regime}: the numerator's parts ({k}-step mean)", xlabel="step")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle("CDAT behind Adam: the numerator without the batch's self term (docs/minibatch_study.md, section 8)",
                 fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.docs, "minibatch_numerator.png")
    os.makedirs(args.docs, exist_ok=True)
    fig.savefig(path, dpi=args.dpi)
    return f"figure: {path}\n"


# ------------------------------------------------------------------------------------------ guard (issue 12)
def _convex_problems():
    """``name -> make(seed) -> (w0, fn)`` with ``fn(w) -> (f, g, hessian-vector form u -> u^T H u)``: two
    quadratics ``w^T A w / 2`` (50 eigenvalues log-spaced in ``[1, cond]``) and a logistic regression."""
    import numpy as np

    def quad(cond):
        def make(seed):
            lam = np.logspace(0, math.log10(cond), 50)
            return (np.random.default_rng(seed).standard_normal(50),
                    lambda w: (0.5 * w @ (lam * w), lam * w, lambda u: u @ (lam * u)))
        return make

    def logreg(seed):
        rng = np.random.default_rng(100)
        x = rng.standard_normal((200, 20)) * np.logspace(0, 1, 20)
        y = np.sign(x @ rng.standard_normal(20) + 0.5 * rng.standard_normal(200))

        def fn(w):
            m = y * (x @ w)
            p = 0.5 * (1 - np.tanh(m / 2))  # 1 / (1 + e^m) without overflow
            return (np.mean(np.logaddexp(0, -m)), -(x.T @ (y * p)) / len(y),
                    lambda u: np.mean(p * (1 - p) * (x @ u) ** 2))
        return np.random.default_rng(seed).standard_normal(20) * 0.1, fn

    return {"quadratic, cond 100": quad(100.0), "quadratic, cond 1e4": quad(1e4), "logistic regression": logreg}


def _gd_run(rule, make, seed: int, steps: int) -> list[float]:
    """Plain GD with the core rule (exact curvature, loss known, numpy): the losses (stops past 1e30)."""
    import numpy as np

    from curvopt import rules

    w, fn = make(seed)
    state, losses = rule.init(np.float64(0)), []
    for k in range(steps):
        f, g, hv = fn(w)
        lr, state = rules.apply_rule(rule, rules.RuleInputs(np.float64(g @ g), np.float64(hv(-g)), np.float64(f),
                                                            np.float64(np.nan), k), state, np)
        w = w - float(lr) * g
        losses.append(float(f))
        if not math.isfinite(f) or f > 1e30:
            break
    return losses


def guard(args, cache=None) -> str:
    """The above-edge safeguards (``curvopt.rules.above_edge_guard`` and ``CDATRule.loss_cap``): GD's default
    (sigma 4, guarded, loss-bound cap) against the guard alone (the default before the cap), sigma 2, sigma 4
    with neither and a guard falling back to the edge, on convex problems (final and peak loss / initial);
    with ``--replay PATH`` (a benchmark ``results.jsonl``), how many steps of each GD CDAT run the guard refused
    sigma 4 (replayed on the recorded losses: the guard depends on the loss sequence only)."""
    import numpy as np

    from curvopt import rules
    from curvopt.base import BaseMethod

    gd = rules.CDATRule(sigma=rules.default_sigma(BaseMethod.gd()), ema=rules.default_ema(BaseMethod.gd()))
    alone = dataclasses.replace(gd, loss_cap=math.inf)
    variants = (("GD default (sigma 4, guarded, capped)", gd), ("guard alone", alone),
                ("sigma 2", dataclasses.replace(gd, sigma=2.0)),
                ("sigma 4, neither", dataclasses.replace(alone, guard=math.inf)),
                ("guard alone falls back to 2", dataclasses.replace(alone, guard_sigma=2.0)))
    out = ["| problem | " + " | ".join(f"{n}: final ÷ initial (peak ÷ initial)" for n, _ in variants) + " |",
           "|---" * (len(variants) + 1) + "|"]
    for name, make in _convex_problems().items():
        cells = []
        for _, rule in variants:
            runs = [_gd_run(rule, make, s, args.steps or 1000) for s in args.seeds]
            fin = [r[-1] / r[0] if len(r) == (args.steps or 1000) else math.inf for r in runs]
            peak = [max(r) / r[0] for r in runs]
            cells.append(f"{min(fin):.2g}-{max(fin):.2g} ({min(peak):.2g}-{max(peak):.2g})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.replay:
        out.append("")
        with open(args.replay) as fh:
            for line in fh:
                r = json.loads(line)
                if r["tuner"] != "cdat" or r["base"] != "gd":
                    continue
                start = gd.init(np.float64(0))
                st = (start.gap_avg, start.gap_weight, start.gap_min, start.gap_lagged, start.gap_first)
                refused, first = 0, None
                for k, v in enumerate(r["steps"]["loss"]):
                    allowed, _, *st = rules.above_edge_guard(np.float64(v), gd.f_star, *st, guard=gd.guard, ema=gd.ema,
                                                             xp=np)
                    if not allowed:
                        refused, first = refused + 1, k if first is None else first
                out.append(f"- {r['task']} {r['regime']} w{r['width']} seed {r['seed']}: sigma 4 refused on "
                           f"{refused} of {len(r['steps']['loss'])} steps (first at step {first})")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.minibatch_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=("noise", "edge", "guard", "numerator"))
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the suite's; guard: 1000)")
    ap.add_argument("--out", default="results/minibatch_study", help="cache directory (runs.jsonl)")
    ap.add_argument("--docs", default=DOCS, help="where the figure goes")
    ap.add_argument("--dpi", type=int, default=70)
    ap.add_argument("--variants", default="constant:0.5,fd@ema=0.99,fd@ema=0.9,cdat:sigma=4;ema=0.9,fall:0.002@ema=0.9",
                    help="edge: runs to compare (the first constant is the ratios' reference)")
    ap.add_argument("--task", default="resnet", help="edge: the task (default resnet)")
    ap.add_argument("--regime", default="mini", help="edge: the regime (default mini)")
    ap.add_argument("--widths", default=None, type=lambda s: [int(x) for x in s.split(",")],
                    help="edge: the suite's widths to run (default: the middle one); a table for each")
    ap.add_argument("--ref", default=None,
                    help="edge: a benchmark results.jsonl whose best constant (per width) the ratios refer to")
    ap.add_argument("--edge-every", type=int, default=10)
    ap.add_argument("--sharpness-every", type=int, default=50)
    ap.add_argument("--replay", default=None, help="guard: a benchmark results.jsonl whose GD CDAT runs to replay")
    args = ap.parse_args(argv)
    if args.study == "guard":  # numpy only, no runs to cache
        print(guard(args))
        return 0
    from .train_torch import native_kernels

    with native_kernels():
        name = args.study if (args.study == "noise" or (args.task, args.regime) == ("resnet", "mini")) else \
            f"{args.study}_{args.task}_{args.regime}"
        if args.study == "numerator":  # section 8: reads the edge study's caches of its three cells
            cache = _EdgeCaches(args.out)
            print(numerator(args, cache))
            return 0
        cache = Cache(os.path.join(args.out, f"{name}.jsonl"))
        args.figure_name = name
        print((noise if args.study == "noise" else edge)(args, cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
