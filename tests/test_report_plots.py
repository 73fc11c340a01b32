"""Figures that explain themselves: GQA lines, robust colour scales, the plan's heads, the search, every score."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_report import is_png, synthetic

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import EvalResult
from prune_heads.plan import Plan
from prune_heads.report import plot_selection_search, plots, write_report
from prune_heads.report.search import budget_limit
from prune_heads.selection.static import within_budget


@pytest.fixture
def figures(monkeypatch):
    """Capture the figures instead of only writing them."""
    seen = []
    real = plots._save

    def save(fig, path):
        seen.append(fig)
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return seen


def texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts)


def test_heatmap_explains_gqa_lines_and_clips_outliers(tmp_path, figures):
    mean = np.random.default_rng(0).random((30, 9))
    mean[3, 4], mean[17, 1] = 40.0, 55.0  # two outliers
    plots.heatmap(mean, "ahon_ln", tmp_path / "h.png", num_kv_heads=3)
    fig = figures[-1]
    assert "White lines separate the 3 GQA groups" in texts(fig) and "share one key/value head" in texts(fig)
    image = fig.axes[0].images[0]
    vmin, vmax = image.get_clim()
    assert vmax < 1.0 and vmin > 0.0  # the scale follows the bulk, not the two outliers
    assert (vmin, vmax) == pytest.approx(tuple(np.percentile(mean, plots.CLIP_PERCENTILES)))
    assert "clipped" in texts(fig) and "55" in texts(fig)
    plots.heatmap(np.random.default_rng(1).random((4, 4)), "awft", tmp_path / "g.png", num_kv_heads=4)
    assert "GQA" not in texts(figures[-1])  # no groups to explain (one head per KV head)


def test_robust_limits():
    v = np.concatenate([np.linspace(0, 1, 100), [50.0]])
    lo, hi, extend = plots.robust_limits(v)
    assert hi < 2 and extend == "both"
    assert plots.robust_limits(np.ones(5))[2] == "neither"
    assert plots.robust_limits(np.array([np.nan, np.inf]))[:2] == (0.0, 1.0)


def test_report_marks_the_plans_heads(tmp_path, monkeypatch):
    hs = synthetic(layers=4, heads=3)
    plan = Plan([(0, 2), (3, 1), (2, 0)])
    seen = {}

    def fake_heatmap(mean, sid, path, *, marked=None, marked_label="", **kw):
        seen[sid] = (marked.copy(), marked_label)
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(plots, "heatmap", fake_heatmap)
    out = write_report(hs, tmp_path / "r", plan=plan, fraction=0.25)
    want = plan.mask(type("L", (), {"num_layers": 4, "num_heads": 3})()).numpy()
    assert set(seen) == set(hs.score_ids)
    for mask, label in seen.values():
        assert np.array_equal(mask, want) and label == "removed by the plan (3 heads)"
    data = json.loads((out / "report.json").read_text())
    assert data["plan_heads"] == [[0, 2], [2, 0], [3, 1]]
    assert "red x marks the heads the plan removes" in (out / "report.md").read_text()
    with pytest.raises(PruneHeadsError, match="different models"):
        write_report(hs, tmp_path / "bad", plan=Plan([(9, 0)]))


def test_report_plots_every_score_and_an_overview(tmp_path):
    hs = synthetic()
    hs.means["mystery_score"] = torch.rand(hs.num_layers, hs.num_heads)
    out = write_report(hs, tmp_path / "r")
    for sid in hs.score_ids:
        assert is_png(out / f"heatmap_{sid}.png"), sid
    assert is_png(out / "overview.png") and "](overview.png)" in (out / "report.md").read_text()
    assert len(hs.score_ids) == 6


TRACE = [{"k": 0, "heads_removed": 0, "value": 0.61, "stderr": 0.02, "within_budget": True, "metric": "acc"},
         {"k": 4, "heads_removed": 4, "value": 0.60, "stderr": 0.02, "within_budget": True, "metric": "acc"},
         {"k": 16, "heads_removed": 16, "value": 0.55, "stderr": 0.02, "within_budget": False, "metric": "acc"},
         {"k": 8, "heads_removed": 8, "value": 0.595, "stderr": 0.02, "within_budget": True, "metric": "acc"}]


def test_selection_search_plot(tmp_path, figures):
    plan = Plan([(0, h) for h in range(8)], {"trace": TRACE, "heads_total": 270, "heads_removed": 8,
                                             "budget": {"max_drop": 0.02, "relative": False, "metric": "acc",
                                                        "higher_is_better": True},
                                             "task": {"task": "arc_easy"}})
    plan.save(tmp_path / "plan.json")
    assert is_png(plot_selection_search(tmp_path / "plan.json", tmp_path / "s.png"))
    ax = figures[-1].axes[0]
    assert "arc_easy" in ax.get_title() and "4 evaluations" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "4"]  # every probe, numbered in run order
    labels = ax.get_legend_handles_labels()[1]
    assert "budget limit (0.59)" in labels and "chosen: 8 heads" in labels and "over budget" in labels
    with pytest.raises(PruneHeadsError, match="no search trace"):
        plot_selection_search(Plan([(0, 1)]), tmp_path / "x.png")


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 100), st.floats(0, 0.5), st.booleans(), st.booleans(), st.floats(-1, 1))
def test_budget_limit_is_the_within_budget_rule(base, max_drop, relative, higher, offset):
    limit = budget_limit(base, max_drop, relative, higher)
    value = limit + offset * max(1e-6, abs(limit)) * 0.5
    b = EvalResult("m", base, None, higher, 10, {})
    r = EvalResult("m", value, None, higher, 10, {})
    accepted = value >= limit if higher else value <= limit
    if abs(value - limit) > 1e-9 * max(1, abs(base)):
        assert within_budget(b, r, max_drop, relative) == accepted
