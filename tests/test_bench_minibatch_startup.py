"""benchmarks.minibatch_study's start-up caps (docs/minibatch_study.md section 7, research prototypes A and B):
the cap ``lr <= w * 2 (f - f_star) / n`` on the rule's rate by hand, B's end at ``w = 0.9``, and the variant
reaching the μP experiment (``benchmarks.mup_transfer --variant``)."""
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is run from the repository, never installed

from benchmarks import minibatch_study as ms  # noqa: E402
from curvopt.rules import CDATRule, RuleInputs  # noqa: E402


def _inputs(n, c, f, k):
    return RuleInputs(np.float64(n), np.float64(c), np.float64(f), np.float64(np.nan), k)


def test_minibatch_startup_cap_a_by_hand():
    """GD's default rule (sigma 4, ema 0.9) on a flat first direction: n = 1, c = 0, f = 2. The loss-bound floor
    gives d = n^2 / (2 f) = 0.25 and the rule 4 * 0.1 * 1 / 0.25 = 1.6 (num_avg 0.1 * weight 0.1 over the
    bias-corrected den_avg 0.025); the cap is w * 2 f / n = 0.1 * 4 = 0.4, and the growth cap's reference is 0.4."""
    inner = CDATRule(sigma=4.0, ema=0.9, loss_cap=math.inf)
    capped = ms._startup_capped(inner)
    lr_inner, _ = inner.update(_inputs(1.0, 0.0, 2.0, 0), inner.init(np.float64(0)), np)
    lr, st = capped.update(_inputs(1.0, 0.0, 2.0, 0), capped.init(np.float64(0)), np)
    assert float(lr_inner) == pytest.approx(1.6)
    assert float(lr) == pytest.approx(0.4)
    assert float(st.cdat_lr) == pytest.approx(0.4)
    assert float(st.avg_weight) == pytest.approx(0.1)


def test_minibatch_startup_cap_inactive_without_a_known_loss_or_a_descent_numerator():
    inner = CDATRule(sigma=4.0, ema=0.9, loss_cap=math.inf)
    capped = ms._startup_capped(inner)
    for n, f in ((1.0, np.nan), (-1.0, 2.0), (1.0, 0.0)):
        a, _ = inner.update(_inputs(n, 0.3, f, 0), inner.init(np.float64(0)), np)
        b, _ = capped.update(_inputs(n, 0.3, f, 0), capped.init(np.float64(0)), np)
        assert float(a) == float(b)


def test_minibatch_startup_cap_b_ends_at_weight_0_9():
    """B caps while w = 1 - 0.9^t < 0.9 (t = 1..21) and leaves the rule alone from t = 22 on; A caps throughout."""
    inner = CDATRule(sigma=4.0, ema=0.9, growth=1e9, loss_cap=math.inf)
    rules = {v: ms._startup_capped(inner, ms.STARTUP_CAPS[v]) for v in ("capA", "capB")}
    states = {v: r.init(np.float64(0)) for v, r in rules.items()}
    st_inner = inner.init(np.float64(0))
    capped_steps = {v: [] for v in rules}
    for k in range(30):
        x = _inputs(1.0, 0.0, 2.0, k)  # the floor's curvature every step: rule 4 w * 2 f / n > the cap w * 2 f / n
        lr_inner, st_inner = inner.update(x, st_inner, np)
        for v, r in rules.items():
            lr, states[v] = r.update(x, states[v], np)
            if float(lr) < float(lr_inner):
                capped_steps[v].append(k + 1)
    assert capped_steps["capA"] == list(range(1, 31))
    assert capped_steps["capB"] == list(range(1, 22))


def test_minibatch_startup_variant_names():
    class Opt:
        rule = CDATRule()

    opt = Opt()
    assert ms.startup_variant(opt, "").rule is Opt.rule
    assert ms.startup_variant(Opt(), "nocap").rule == dataclasses.replace(Opt.rule, loss_cap=math.inf)
    assert ms.startup_variant(opt, "capB").rule.f_star == 0.0
    with pytest.raises(ValueError, match="start-up variant"):
        ms.startup_variant(Opt(), "capC")


@pytest.mark.slow  # one of the default suite's longest; CI runs it with the slow ones
def test_minibatch_startup_variant_reaches_the_mup_cdat_run():
    """mup_transfer's CDAT run takes the variant: at width 512 (μP), where the first rates without the loss-bound
    cap are far above the ones the run settles at, ``nocap``'s rates differ from the library's (whose
    ``loss_cap`` is A) and its first is larger; ``capA`` (A by the research wrapper) gives the library's rates up
    to float32 rounding (the two write the cap's product in a different order)."""
    torch = pytest.importorskip("torch")
    from benchmarks import mup_transfer as mt

    torch.manual_seed(0)
    x, y = mt.digits("mlp", 512)
    library = mt.run_cdat(512, "mup", 3, x, y, 0)
    nocap = mt.run_cdat(512, "mup", 3, x, y, 0, "nocap")
    cap = mt.run_cdat(512, "mup", 3, x, y, 0, "capA")
    assert all(math.isfinite(v) and v > 0 for v in library["lrs"])
    assert nocap["lrs"] != library["lrs"] and nocap["lrs"][0] > library["lrs"][0]
    assert cap["lrs"] == pytest.approx(library["lrs"], rel=1e-5)


def test_library_loss_cap_is_the_research_cap_a():
    """The library's ``loss_cap`` (:class:`curvopt.rules.CDATRule`) and section 7's research wrapper A around the
    rule without it are separate code for one rule: the same rates over a run of made-up steps (float64),
    where the cap binds on some steps and not on others."""
    rng = np.random.default_rng(0)
    library = CDATRule(sigma=4.0, ema=0.9)
    wrapped = ms._startup_capped(dataclasses.replace(library, loss_cap=math.inf))
    a, b = library.init(np.float64(0)), wrapped.init(np.float64(0))
    bound = 0
    for k in range(40):
        x = _inputs(rng.uniform(0.1, 2.0), rng.uniform(0.05, 3.0), rng.uniform(0.1, 3.0), k)
        uncapped = dataclasses.replace(library, loss_cap=math.inf).update(x, a, np)[0]
        lr_a, a = library.update(x, a, np)
        lr_b, b = wrapped.update(x, b, np)
        assert float(lr_a) == float(lr_b)
        bound += float(lr_a) < float(uncapped)
    assert 0 < bound


def test_mup_width_trend_is_the_fitted_power_law():
    """``width_trend``: exact on a power law (lr ~ width^-1/2 over 16x: ratio 1/4), 1 on values without a trend
    (scatter that ``spread`` reports as 100 %), inf when a run diverged."""
    from benchmarks.mup_transfer import spread, width_trend

    widths = [32, 64, 128, 256, 512]
    assert width_trend(widths, [w ** -0.5 for w in widths]) == pytest.approx(0.25, rel=1e-12)
    flat = [1.0, 2.0, 1.0, 2.0, 1.0]
    x = np.log(widths)
    assert np.polyfit(x, np.log(flat), 1)[0] == pytest.approx(0.0, abs=1e-12)  # the scatter is symmetric in log w
    assert width_trend(widths, flat) == pytest.approx(1.0, abs=1e-12) and spread(flat) == pytest.approx(1.0)
    assert width_trend(widths, [1.0, 1.0, math.nan, 1.0, 1.0]) == math.inf


@pytest.mark.parametrize("argv", [["--only", "foo"], ["--only", ""], ["--variant", "bogus"]])
def test_mup_transfer_refuses_unknown_experiments_and_variants_before_running(argv, capsys):
    """Before: --only foo ran nothing and exited 0 with an empty report; a bad --variant failed with a traceback
    once the cdat experiment was reached (after the others had run)."""
    from benchmarks import mup_transfer as mt

    with pytest.raises(SystemExit) as e:
        mt.main(["--quick", *argv])
    assert e.value.code == 2 and "expected" in capsys.readouterr().err


def test_mup_cdat_summary_separates_the_seeds_scatter_from_the_width_dependence():
    """``cdat_summary`` on made-up runs: a rate that does not depend on the width but scatters by seed has a
    per-seed spread (median, worst with its seed) that the seeds' medians do not have, and the seeds' scatter at
    one width reads it; a rate falling as width^-1/2 on every seed has the trend on the medians too."""
    from benchmarks.mup_transfer import cdat_summary

    widths = [32, 64, 128, 256, 512]
    jitter = {0: [1.0, 1.2, 1.0, 1.0, 1.0], 1: [1.0, 1.0, 1.0, 1.3, 1.0], 2: [1.1, 1.0, 1.0, 1.0, 1.0]}

    def runs(rate):
        return {s: {w: {"final_lr": rate(w) * j, "loss": 0.01 * (s + 1), "losses": [2.0] + [1.0 + s] * 14}
                    for w, j in zip(widths, js)} for s, js in jitter.items()}

    flat = cdat_summary(runs(lambda w: 0.5), widths)
    assert flat["spread_per_seed"] == pytest.approx({0: 0.2, 1: 0.3, 2: 0.1})
    assert flat["spread_median"] == pytest.approx(0.2) and flat["spread_worst"] == pytest.approx(0.3)
    assert flat["worst_seed"] == 1
    assert flat["median_lr"] == pytest.approx({w: 0.5 for w in widths}) and flat["spread"] == pytest.approx(0.0)
    assert flat["trend"] == pytest.approx(1.0)
    assert flat["seed_scatter"] == pytest.approx(0.1)  # per width 0.1 / 0.2 / 0 / 0.3 / 0
    assert flat["loss"] == {w: 0.03 for w in widths}
    assert flat["early_peak"] == {w: 1.5 for w in widths}  # seed 2's 3.0 over its initial 2.0

    falling = cdat_summary(runs(lambda w: w ** -0.5), widths)
    assert falling["trend"] == pytest.approx(0.25) and falling["spread"] == pytest.approx(3.0)
