"""The greedy ``lsq_error`` order (optimal-brain-surgeon downdates) against brute force with lstsq."""

from __future__ import annotations

import itertools

import pytest
import torch
from compensation_reference import lstsq_fit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from prune_heads.compensation import (
    collect_moments,
    greedy_removal,
    lsq_error_scores,
    precision,
    residual_error,
)


def _error_by_lstsq(x: torch.Tensor, w: torch.Tensor, units: list[list[int]], removed: list[int]) -> float:
    """Mean squared error of predicting the attention output W x from the kept dims (lstsq with intercept)."""
    r = [d for u in removed for d in units[u]]
    k = [d for u in range(len(units)) if u not in removed for d in units[u]]
    y = x @ w.T
    if not k:
        return float((y - y.mean(0)).pow(2).sum() / x.shape[0])
    return lstsq_fit(x[:, k], y)[2] if r else 0.0


def brute_force_greedy(x, w, units):
    order, cumulative = [], []
    while len(order) < len(units):
        costs = {u: _error_by_lstsq(x, w, units, order + [u]) for u in range(len(units)) if u not in order}
        u = min(costs, key=lambda v: (costs[v], v))
        order.append(u)
        cumulative.append(costs[u])
    return order, cumulative


@st.composite
def layers(draw):
    n_units = draw(st.integers(2, 5))
    size = draw(st.integers(1, 3))
    hidden = draw(st.integers(2, 6))
    n = n_units * size
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    # correlated activations: a low-dimensional signal mixed into every unit, plus noise
    rank = draw(st.integers(1, n))
    z = torch.randn(200, rank, generator=g, dtype=torch.float64)
    x = z @ torch.randn(rank, n, generator=g, dtype=torch.float64) + 0.3 * torch.randn(200, n, generator=g, dtype=torch.float64)
    x = x + torch.randn(n, generator=g, dtype=torch.float64)  # a mean: the intercept matters
    w = torch.randn(hidden, n, generator=g, dtype=torch.float64)
    units = [list(range(u * size, (u + 1) * size)) for u in range(n_units)]
    return x, w, units


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(layer=layers())
def test_greedy_order_equals_brute_force(layer):
    x, w, units = layer
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    got = greedy_removal(cov, w, units)
    order, cumulative = brute_force_greedy(x, w, units)
    # equal costs (to rounding) may be taken in either order; compare where the brute force has a clear winner
    assert got.cumulative == pytest.approx(cumulative, rel=1e-6, abs=1e-9)
    assert got.order == order or all(
        abs(_error_by_lstsq(x, w, units, got.order[: i + 1]) - cumulative[i]) < 1e-9 * max(1, cumulative[i])
        for i in range(len(order)))
    # each cumulative error is the closed form tr(W_R (P_RR)^-1 W_R^T)
    prec = precision(cov, 0.0)
    for i in range(len(order) - 1):
        r = torch.tensor([d for u in got.order[: i + 1] for d in units[u]])
        assert residual_error(prec, w, r) == pytest.approx(got.cumulative[i], rel=1e-6, abs=1e-9)


def test_greedy_beats_no_worse_than_any_single_choice_on_two_steps():
    """The first greedy step is the best single removal of all (exhaustive over pairs for step two)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0] + 0.01 * x[:, 1]  # unit 0 and unit 1 predict each other
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    units = [[0], [1], [2, 3], [4, 5]]
    xc = x - x.mean(0)
    res = greedy_removal(xc.T @ xc / 300, w, units)
    singles = {u: _error_by_lstsq(x, w, units, [u]) for u in range(4)}
    assert res.order[0] == min(singles, key=singles.get) and res.order[0] in (0, 1)
    pairs = {p: _error_by_lstsq(x, w, units, list(p)) for p in itertools.combinations(range(4), 2)}
    # removing both correlated units costs far more than either: the greedy's second step leaves the other
    assert res.order[1] != ({0, 1} - {res.order[0]}).pop()
    assert res.cumulative[1] <= min(pairs[p] for p in pairs if res.order[0] in p) + 1e-9


def test_lsq_error_scores_follow_the_greedy_order_and_groups_share_values():
    model = tiny_model("llama", layers=2, heads=6, kv_heads=2, head_dim=4, hidden=48).double()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, 101, (int(n),), generator=g).tolist() for n in torch.randint(8, 20, (20,), generator=g)]
    moments = collect_moments(model, seqs, progress=False)
    values, record = lsq_error_scores(model, moments, ridge=1e-3)
    for i in range(2):
        order = record["order"][i]
        v = values["lsq_error"][i]
        assert torch.all(v[order][1:] >= v[order][:-1])  # cumulative: non-decreasing along the greedy order
        group = values["lsq_error_group"][i]
        assert torch.equal(group[:3], group[0].repeat(3)) and torch.equal(group[3:], group[3].repeat(3))
        scale = moments.residual_inverse_mean(i)
        assert record["cumulative"][i][0] == pytest.approx(float(v[order[0]]), rel=1e-6)
        assert float(v[order[0]]) / scale > 0


def test_selectors_compute_lsq_error_from_the_moments_when_not_stored():
    from prune_heads import calibrate
    from prune_heads.compensation.greedy import ensure_lsq_scores
    from prune_heads.errors import PruneHeadsError

    model = tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    seqs = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8, 3], [1, 8, 8, 4, 17, 6], [1, 60, 3, 17, 22, 5, 5]] * 3
    stored = calibrate(model, seqs, scores=["ahon", "lsq_error", "lsq_error_group"], progress=False)
    plain = calibrate(model, seqs, scores=["ahon"], progress=False)
    assert "lsq_error" not in plain.score_ids
    ensure_lsq_scores(plain, model, "lsq_error")
    assert torch.equal(plain.mean("lsq_error"), stored.mean("lsq_error"))
    assert torch.equal(plain.mean("lsq_error_group"), stored.mean("lsq_error_group"))
    without = calibrate(model, seqs, scores=["ahon"], moments=False, progress=False)
    with pytest.raises(PruneHeadsError, match="recalibrate"):
        ensure_lsq_scores(without, model, "lsq_error")
