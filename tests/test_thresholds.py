"""The paper's τ (the authors' empirical CDF with linear interpolation) beside ``torch.quantile``'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import threshold_for_fraction
from prune_heads.report.metrics import quantile_threshold
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.thresholds import paper_quantile, threshold


def authors_x_intercept(values: torch.Tensor, y: float) -> float:
    """The authors' procedure as described in their create-CDF.py / x_intercept_for_cdf, in float64:
    CDF points (sorted x, (i+1)/n); clamp y to the CDF's range; searchsorted; interpolate."""
    x = torch.sort(values.double()).values
    ys = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
    yt = torch.clamp(torch.tensor(y, dtype=torch.float64), min=ys[0], max=ys[-1])
    i = torch.clamp(torch.searchsorted(ys, yt), min=1, max=len(ys) - 1)
    den = ys[i] - ys[i - 1]
    den = torch.where(den == 0, torch.ones_like(den), den)
    return float(x[i - 1] + (yt - ys[i - 1]) / den * (x[i] - x[i - 1]))


values_st = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=200)


@settings(max_examples=200, deadline=None)
@given(values=values_st, q=st.floats(0.0, 1.0))
def test_paper_quantile_is_the_authors_interpolation(values, q):
    v = np.array(values)
    got = paper_quantile(v, q)
    assert got == pytest.approx(authors_x_intercept(torch.tensor(values), q), rel=1e-12, abs=1e-9)
    if q >= 1 / len(v):  # numpy's Hyndman-Fan type 4 is the same rule inside the CDF's range
        assert got == pytest.approx(float(np.quantile(v, q, method="interpolated_inverted_cdf")), rel=1e-12, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(values=values_st, frac=st.floats(0.01, 0.5), sid=st.sampled_from(["awft", "ahon_ln"]))
def test_both_methods_and_what_they_mark(values, frac, sid):
    v = np.array(values)
    for method, ref in (("quantile", lambda q: float(np.quantile(v, q))), ("paper", lambda q: paper_quantile(v, q))):
        t = threshold(v, sid, frac, method)
        assert t.method == method and t.score_id == sid and t.fraction == frac
        assert t.value == ref(1 - frac if sid == "awft" else frac)
        marked = (v > t.value) if sid == "awft" else (v < t.value)
        assert t.marked_fraction == pytest.approx(marked.mean())
        assert t.to_dict()["method"] == method


def test_paper_marks_fewer_than_quantile_at_the_low_end():
    """Between two order statistics the paper's position n*q - 1 sits one value lower than (n-1)*q: at 5% of
    20 values torch.quantile lands between the 1st and 2nd value and marks one, the paper's τ is the 1st
    value itself and marks none (the 4.91% vs 5.00% the issue measured on SmolLM2, in small)."""
    v = np.arange(20, dtype=np.float64)
    q, p = threshold(v, "ahon_ln", 0.05, "quantile"), threshold(v, "ahon_ln", 0.05, "paper")
    assert q.value == pytest.approx(0.95) and q.marked_fraction == 0.05
    assert p.value == 0.0 and p.marked_fraction == 0.0


def test_masking_and_report_offer_the_method():
    torch.manual_seed(0)
    per = torch.rand(40, 3, 5)
    hs = HeadScores({"ahon_ln": per, "awft": per}, {})
    for sid in ("ahon_ln", "awft"):
        for frac in (0.05, 0.3):
            base = threshold_for_fraction(hs, sid, frac)
            assert base == pytest.approx(float(torch.quantile(per.flatten(), 1 - frac if sid == "awft" else frac)))
            paper = threshold_for_fraction(hs, sid, frac, method="paper")
            assert paper == threshold(per.double().numpy(), sid, frac, "paper").value
            assert quantile_threshold(per.numpy(), sid, frac, method="paper") == pytest.approx(paper, rel=1e-7)
            assert quantile_threshold(per.numpy(), sid, frac) == pytest.approx(base, rel=1e-6)
    assert threshold_for_fraction(hs, "awft", 0.0, method="paper") == float("inf")
    assert threshold_for_fraction(hs, "ahon_ln", 0.0, method="paper") == float("-inf")
    with pytest.raises(PruneHeadsError, match="choose quantile .* or paper"):
        threshold_for_fraction(hs, "awft", 0.1, method="ecdf")
    with pytest.raises(PruneHeadsError, match="fraction must be in"):
        threshold(per.numpy(), "awft", 1.5)
