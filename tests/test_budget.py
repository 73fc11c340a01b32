"""The budget with a confidence level, on a simulated task whose true drop curve is known.

The simulated evaluator (``budget_sim``) has document-level noise shared by every ``k``, as a real
evaluation of fixed documents has; the true drop of any ``k`` is known, so these tests check what a
user is promised: the returned ``k`` is truly within budget with the stated confidence.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from budget_sim import SimEvaluator, SimulatedTask
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection_static import make_scores
from tiny_models import tiny_model

from prune_heads.errors import BudgetError
from prune_heads.plan import Plan
from prune_heads.selection import select_static
from prune_heads.selection.budget import UnderpoweredBudget, VerificationFailed, VerificationOverlap

UNITS = 56  # 8 layers x 8 heads, one head kept per layer (policy free)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=8, heads=8, kv_heads=8, head_dim=4)


@pytest.fixture(scope="module")
def scores(model):
    return make_scores(model, torch.rand(8, 8, generator=torch.Generator().manual_seed(0)))


def _select(model, scores, task, budget, confidence, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return select_static(model, scores, SimEvaluator(task), score_id="ahon_ln", max_drop=budget,
                             confidence=confidence, progress=False, allow_underpowered=True, **kw)


def coverage(model, scores, scenario, confidence, seeds, **kw) -> tuple[float, float]:
    """Fraction of seeds whose returned k is truly within budget, and the mean returned k."""
    n_docs, budget, sigma, power, d_max = scenario
    ok, ks = 0, []
    for seed in range(seeds):
        task = SimulatedTask(n_docs, UNITS, seed, d_max=d_max, power=power, sigma=sigma)
        k = _select(model, scores, task, budget, confidence, **kw).selection.details.k
        ks.append(k)
        ok += bool(task.true_drop(k) <= budget)
    return ok / seeds, float(np.mean(ks))


scenarios = st.tuples(st.integers(80, 300), st.floats(0.02, 0.06), st.floats(0.3, 1.5), st.floats(1.0, 2.0),
                      st.floats(0.2, 0.4))


@settings(max_examples=3, deadline=None, derandomize=True)
@given(scenario=scenarios, surrogate=st.sampled_from([None, "margin"]))
def test_confidence_holds_for_the_returned_k(model, scores, scenario, surrogate):
    covered, k90 = coverage(model, scores, scenario, 0.9, seeds=200, surrogate=surrogate)
    assert covered >= 0.9, f"only {covered:.1%} of seeds returned a k truly within budget at confidence 0.9"
    # today's point estimate (confidence 0, gallop + bisection) breaks the budget for about half the seeds:
    # the check above can fail
    naive, k0 = coverage(model, scores, scenario, 0.0, seeds=200)
    assert naive < 0.8 and k0 >= k90


def test_every_probe_records_its_statistics(model, scores):
    task = SimulatedTask(200, UNITS, 1)
    plan = _select(model, scores, task, 0.05, 0.9, surrogate="margin")
    sel = plan.selection
    assert sel.budget.confidence == 0.9 and sel.details.search == "ascend" and sel.details.surrogate == "margin"
    assert sel.trace[0].k == 0 and sel.trace[0].drop.estimate == 0 and sel.trace[0].drop.bound == 0
    ks = [p.k for p in sel.trace]
    assert ks == sorted(ks) and len(set(ks)) == len(ks)  # ascending, each k once
    for p in sel.trace[1:]:
        d = p.drop
        ref = task.result(p.k)
        assert d.estimate == pytest.approx(task.result(0).value - ref.value)  # paired mean = difference of means
        assert d.stderr > 0 and d.bound > d.estimate > d.lower and d.n == 200 and d.method == "paired"
        assert p.within_budget == d.within_budget == (d.bound <= 0.05)
        assert d.surrogate == "margin" and d.surrogate_estimate is not None
    assert all(p.within_budget for p in sel.trace[:-1])  # it stops at the first failure...
    assert sel.details.k == max(p.k for p in sel.trace if p.within_budget)  # ...and returns the last pass
    back = Plan.from_dict(plan.to_dict())  # typed on load
    assert back.selection.trace[3].drop == sel.trace[3].drop


def test_underpowered_budget_stops_at_once(model, scores):
    task = SimulatedTask(100, UNITS, 2)
    ev = SimEvaluator(task)
    with pytest.raises(UnderpoweredBudget, match=r"needs about \d+ documents") as e:
        select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.02, confidence=0.9, progress=False)
    assert ev.calls == 1  # only the baseline was evaluated
    p = task.result(0).value
    z = 1.2815515655446004
    sd = math.sqrt(p * (1 - p) * 100 / 99)
    assert f"about {math.ceil((z * sd / 0.02) ** 2)} documents" in str(e.value)
    with pytest.warns(UserWarning, match="continuing anyway"):
        plan = select_static(model, scores, SimEvaluator(task), score_id="ahon_ln", max_drop=0.02, confidence=0.9,
                             progress=False, allow_underpowered=True)
    assert plan.selection.budget.underpowered and plan.selection.budget.docs_needed > 100
    # a budget the documents can resolve is not refused, and confidence 0 never is
    ok = select_static(model, scores, SimEvaluator(task), score_id="ahon_ln", max_drop=0.2, confidence=0.9,
                       progress=False)
    assert not ok.selection.budget.underpowered and ok.selection.budget.resolvable_drop < 0.2
    select_static(model, scores, SimEvaluator(task), score_id="ahon_ln", max_drop=0.02, confidence=0.0, progress=False)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.2, math.nan])
def test_confidence_out_of_range(model, scores, bad):
    with pytest.raises(BudgetError, match=r"--confidence must be in \[0, 1\)"):
        select_static(model, scores, SimEvaluator(SimulatedTask(50, UNITS, 0)), score_id="ahon_ln", max_drop=0.05,
                      confidence=bad, progress=False)


class Shifted(SimEvaluator):
    """Held-out documents on which the same heads hurt ``factor`` times more."""

    def __init__(self, task, factor):
        super().__init__(task, name="held-out")
        self.factor = factor

    def __call__(self, removed=None, *, context=None):
        k = 0 if removed is None else int(removed.sum())
        return self.task.result(min(UNITS, round(k * self.factor)))


def test_verification_failure_raises_with_the_plan(model, scores, tmp_path):
    search = SimulatedTask(400, UNITS, 3)
    held = SimulatedTask(400, UNITS, 4)
    held.ids = tuple(f"held:{i}" for i in range(400))
    with pytest.raises(VerificationFailed, match="accept-unverified") as e:
        _select(model, scores, search, 0.05, 0.9, verify_evaluator=Shifted(held, 3.0))
    plan = e.value.plan
    v = plan.selection.verification
    assert v.verdict == "over" and not v.within_budget and v.drop.lower > 0.05
    assert not plan.selection.accepted_unverified
    accepted = e.value.accept()
    assert accepted.selection.accepted_unverified
    back = Plan.load(accepted.save(tmp_path / "plan.json"))
    assert back.selection.accepted_unverified and back.selection.verification.drop == v.drop
    # the library option does the same without the exception
    with pytest.warns(UserWarning, match="verification failed"):
        same = select_static(model, scores, SimEvaluator(search), score_id="ahon_ln", max_drop=0.05, confidence=0.9,
                             verify_evaluator=Shifted(held, 3.0), accept_unverified=True, progress=False)
    assert same.selection.accepted_unverified and same.removed_heads == plan.removed_heads
    # the same held-out documents without the shift verify the plan
    good = _select(model, scores, search, 0.05, 0.9, verify_evaluator=Shifted(held, 1.0))
    assert good.selection.verification.verdict in ("within", "inconclusive")
    assert not good.selection.accepted_unverified


def test_inconclusive_verification_is_a_warning_unless_strict(model, scores):
    search = SimulatedTask(400, UNITS, 5)
    tiny = SimulatedTask(15, UNITS, 6)  # 15 held-out documents: the interval cannot settle anything
    tiny.ids = tuple(f"held:{i}" for i in range(15))
    with pytest.warns(UserWarning, match="inconclusive"):
        plan = select_static(model, scores, SimEvaluator(search), score_id="ahon_ln", max_drop=0.05, confidence=0.9,
                             verify_evaluator=Shifted(tiny, 1.0), progress=False)
    assert plan.selection.verification.verdict == "inconclusive"
    with pytest.raises(VerificationFailed):
        _select(model, scores, search, 0.05, 0.9, verify_evaluator=Shifted(tiny, 1.0), strict_verification=True)


def test_verify_split_overlapping_the_search_split_is_refused(model, scores):
    task = SimulatedTask(100, UNITS, 7)
    ev, ver = SimEvaluator(task), SimEvaluator(task)
    with pytest.raises(VerificationOverlap, match="overlap"):
        select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.05, verify_evaluator=ver, progress=False)
    assert ev.calls == ver.calls == 0


def test_iterative_and_gates_use_the_same_rule():
    from prune_heads.selection.gates import select_gates
    from prune_heads.selection.iterative import select_iterative

    model = tiny_model("llama", layers=2, heads=4, kv_heads=4, head_dim=8)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 100, (12,), generator=g).tolist() for _ in range(3)]
    task = SimulatedTask(300, 8, 0, d_max=0.4, power=1.0)
    plan = select_iterative(model, seqs, SimEvaluator(task), max_drop=0.1, confidence=0.9, round_size=2,
                            progress=False, allow_underpowered=True)
    sel = plan.selection
    assert sel.budget.confidence == 0.9 and sel.trace and sel.trace[0].k == 0
    for p in sel.trace[1:]:
        assert p.drop.bound > p.drop.estimate and p.within_budget == (p.drop.bound <= 0.1)
    final = [p for p in sel.trace if p.heads_removed == len(plan.removed_heads)]
    assert final and final[-1].within_budget
    gated = select_gates(model, seqs, l0_penalty=0.5, steps=40, lr=0.1, evaluator=SimEvaluator(task), max_drop=0.3,
                         confidence=0.9, progress=False)
    t = gated.selection.trace
    assert gated.removed_heads and [p.k for p in t] == [0, len(gated.removed_heads)] and t[1].drop.n == 300
    assert t[1].drop.estimate == pytest.approx(task.result(0).value - task.result(len(gated.removed_heads)).value)


def test_selection_plot_draws_the_paired_drops_of_the_task(model, scores, tmp_path, monkeypatch):
    """What the plot draws, read back from the figure, against the simulated task itself: a point at every
    probed k whose height is the paired drop of k removed heads on the search documents and whose error bar
    reaches its one-sided 90% bound (``paired_drop`` on ``task.result(0)`` and ``task.result(k)``), coloured
    by that bound against the budget; the budget line; the held-out diamond at the held-out task's drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prune_heads.evaluation.paired import paired_drop
    from prune_heads.selection.trace_plot import plot_selection

    search, held = SimulatedTask(300, UNITS, 8), SimulatedTask(300, UNITS, 9)
    held.ids = tuple(f"held:{i}" for i in range(300))
    plan = _select(model, scores, search, 0.05, 0.9, verify_evaluator=Shifted(held, 1.0))
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))  # keep the figure to read it
    out = plot_selection(plan, tmp_path / "trace.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    drawn = {}  # k -> (height, top of the error bar, colour)
    for container in ax.containers:
        line, _, (bars,) = container.lines  # the points, their caps, their vertical bars
        for (x, y), seg in zip(line.get_xydata(), bars.get_segments()):
            drawn.setdefault((line.get_marker(), int(x)), (y, max(seg[:, 1]), line.get_color()))
    probes = {k: v for (marker, k), v in drawn.items() if marker == "o"}
    probed = {p.heads_removed for p in plan.selection.trace if p.drop is not None}
    assert set(probes) == probed and len(probed) >= 3
    base = search.result(0)
    for k, (y, top, color) in probes.items():
        d = paired_drop(base, search.result(k), confidence=0.9)
        assert y == pytest.approx(d.estimate) and top == pytest.approx(d.upper)
        assert color == ("tab:green" if d.upper <= 0.05 else "tab:red")
    k = len(plan.removed_heads)
    y, top, _ = drawn[("D", k)]
    d = paired_drop(held.result(0), held.result(k), confidence=0.9)
    assert y == pytest.approx(d.estimate) and top == pytest.approx(d.upper)
    assert 0.05 in {line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"}


def test_sweep_rows_carry_the_paired_band(model, scores, tmp_path):
    from prune_heads.evaluation.paired import paired_drop
    from prune_heads.selection.sweep import run_sweep

    task = SimulatedTask(200, 64, 0)  # the sweep may empty layers: all 64 heads are units
    ev = SimEvaluator(task)
    res = run_sweep(model, scores, ev, score_ids=["ahon_ln"], fractions=[0, 0.1, 0.2, 0.3], random_seeds=[],
                    max_drop=0.03, confidence=0.9, progress=False)
    for row in res.rows:
        k = int(row["heads_zeroed"])
        d = paired_drop(task.result(0), task.result(k), confidence=0.9)
        assert (row["drop"], row["drop_lower"], row["drop_upper"]) == pytest.approx((d.estimate, d.lower, d.upper))
        assert row["within_budget"] == (d.upper <= 0.03 + 1e-12)
    best = res.table()[0]
    assert best["max_fraction"] == max(r["fraction"] for r in res.rows if r["within_budget"])
    res.save(tmp_path / "sweep")
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "drop_upper" in (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()[0]
