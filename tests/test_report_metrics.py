"""Report numbers against independent references: Python sets, a hand-written quantile, scipy's W1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import wasserstein_distance

from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import threshold_for_fraction
from prune_heads.report import metrics as M
from prune_heads.report.summary import threshold_rows
from prune_heads.scoring.head_scores import HeadScores

SETTINGS = settings(max_examples=25, deadline=None)


def distinct_grid(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Distinct values (a permutation, scaled) so rankings have no ties."""
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64) / 7.0 - 3.0


def reference_top(mean: np.ndarray, high_inactive: bool, k: int) -> set[tuple[int, int]]:
    cells = [(float(mean[layer, h]), layer, h) for layer in range(mean.shape[0]) for h in range(mean.shape[1])]
    cells.sort(key=lambda c: c[0], reverse=high_inactive)
    return {(layer, h) for _, layer, h in cells[:k]}


@SETTINGS
@given(L=st.integers(1, 6), H=st.integers(1, 6), frac=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]), seed=st.integers(0, 999),
       sid=st.sampled_from(["awft", "ahon_ln", "lthon_ln"]))
def test_inactive_set_is_top_fraction_in_the_inactive_direction(L, H, frac, seed, sid):
    mean = distinct_grid(seed, (L, H))
    k = max(1, round(frac * L * H))
    got = M.inactive_set(mean, sid, frac)
    assert len(got) == k
    assert got == reference_top(mean, sid == "awft", k)


def test_inactive_set_ties_and_nan_are_deterministic():
    mean = np.array([[1.0, 1.0], [np.nan, 1.0]])
    # low = inactive; ties break to the lowest flat index; NaN is never chosen before a real value
    assert M.inactive_set(mean, "ahon", 0.5) == {(0, 0), (0, 1)}
    assert (1, 0) not in M.inactive_set(mean, "ahon", 0.75)


@SETTINGS
@given(a=st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3))), b=st.sets(st.tuples(st.integers(0, 3), st.integers(0, 3))))
def test_iou_and_precision_match_set_arithmetic(a, b):
    inter = len(a & b)
    union = len(a | b)
    assert M.iou(a, b) == (inter / union if union else 1.0)
    if a:
        assert M.precision(a, b) == inter / len(a)
    else:
        assert math.isnan(M.precision(a, b))


def test_overlap_matrices_hand_computed():
    sets = {"x": {(0, 0), (0, 1), (1, 0)}, "y": {(0, 1), (1, 0), (1, 1), (2, 2)}, "z": {(5, 5)}}
    ov = M.overlap_matrices(sets)
    assert ov.ids == ["x", "y", "z"]
    assert ov.sizes == [3, 4, 1]
    assert ov.iou[0, 1] == pytest.approx(2 / 5) and ov.iou[1, 0] == pytest.approx(2 / 5)
    assert ov.precision[0, 1] == pytest.approx(2 / 3)  # |x∩y| / |x|
    assert ov.precision[1, 0] == pytest.approx(2 / 4)  # |x∩y| / |y|
    assert ov.iou[0, 2] == 0 and ov.precision[2, 0] == 0
    assert np.all(np.diag(ov.iou) == 1) and np.all(np.diag(ov.precision) == 1)


def hand_quantile(values: np.ndarray, q: float) -> float:
    s = sorted(values.reshape(-1).tolist())
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


@SETTINGS
@given(N=st.integers(1, 5), L=st.integers(1, 4), H=st.integers(1, 4), seed=st.integers(0, 999),
       frac=st.sampled_from(list(M.PAPER_FRACTIONS) + [0.5, 1.0]), sid=st.sampled_from(["awft", "aeqd_ln"]))
def test_quantile_threshold_marks_the_fraction_and_matches_masking(N, L, H, seed, frac, sid):
    per = distinct_grid(seed, (N, L, H))
    tau = M.quantile_threshold(per, sid, frac)
    hs = HeadScores({sid: torch.tensor(per, dtype=torch.float32)})
    assert tau == pytest.approx(threshold_for_fraction(hs, sid, frac), rel=1e-5, abs=1e-5)
    if frac == 0:
        assert math.isinf(tau) and not M.marked_by_threshold(per, sid, tau).any()
        return
    expected = hand_quantile(per, 1 - frac if sid == "awft" else frac)
    assert tau == pytest.approx(expected, abs=1e-9)
    n = per.size
    marked = M.marked_by_threshold(per, sid, tau).mean()
    assert abs(marked - frac) <= 1.0 / n + 1e-12  # strict inequality: at most one value short


def test_threshold_rows_count_head_means_crossing_tau():
    per = distinct_grid(3, (4, 3, 5))
    mean = per.mean(0)
    rows = threshold_rows("ahon_ln", mean, per, [0.0, 0.3])
    r = rows[1]
    tau = hand_quantile(per, 0.3)
    assert r["tau"] == pytest.approx(tau)
    hand = [[mean[layer, h] < tau for h in range(5)] for layer in range(3)]
    assert r["per_layer"] == [sum(row) for row in hand]
    assert r["heads_marked"] == sum(map(sum, hand))
    assert r["head_means_marked"] == pytest.approx(r["heads_marked"] / 15)
    assert rows[0]["heads_marked"] == 0


@SETTINGS
@given(u=st.lists(st.floats(-50, 50), min_size=1, max_size=40), v=st.lists(st.floats(-50, 50), min_size=1, max_size=40),
       dup=st.booleans())
def test_wasserstein_matches_scipy(u, v, dup):
    if dup:  # ties inside and across samples
        u = u + u[: len(u) // 2] + v[:2]
    assert M.wasserstein1(np.array(u), np.array(v)) == pytest.approx(wasserstein_distance(u, v), rel=1e-9, abs=1e-9)


def test_wasserstein_known_values_and_nonfinite_dropped():
    assert M.wasserstein1(np.zeros(3), np.ones(5)) == pytest.approx(1.0)
    assert M.wasserstein1(np.array([0.0, 1.0]), np.array([0.0, 1.0, np.nan, np.inf])) == 0.0
    with pytest.raises(PruneHeadsError):
        M.wasserstein1(np.array([np.nan]), np.ones(2))


def test_fraction_out_of_range_is_a_clear_error():
    with pytest.raises(PruneHeadsError, match="fraction"):
        M.quantile_threshold(np.ones(3), "awft", 1.5)
