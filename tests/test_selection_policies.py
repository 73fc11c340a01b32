"""GQA policies: every candidate plan has a structure the exporter accepts and respects the layer floor."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import HeadLayout
from prune_heads.selection.policies import candidate_units, layer_floor, removal_mask


def _layout(L: int, G: int, gs: int) -> HeadLayout:
    return HeadLayout(num_layers=L, num_heads=G * gs, num_kv_heads=G, head_dim=8, hidden_size=8 * G * gs)


layouts = st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=60, deadline=None)
@given(shape=layouts, seed=st.integers(0, 1000), min_heads=st.integers(1, 4), allow=st.booleans())
def test_free_policy_takes_each_layers_most_inactive_heads(shape, seed, min_heads, allow):
    layout = _layout(*shape)
    L, H = layout.num_layers, layout.num_heads
    min_heads = min(min_heads, H)
    values = torch.randn(L, H, generator=torch.Generator().manual_seed(seed))
    units = candidate_units(values, layout, "free", min_heads, allow)
    floor = 0 if allow else min_heads
    assert all(len(u) == 1 for u in units)
    assert len(units) == L * (H - floor)
    flat = [u[0] for u in units]
    assert len(set(flat)) == len(flat)
    # globally non-increasing inactivity along the order
    vals = [float(values[layer, h]) for layer, h in flat]
    assert vals == sorted(vals, reverse=True)
    for k in range(len(units) + 1):
        m = removal_mask(units, k, layout)
        assert int(m.sum()) == k
        assert (H - m.sum(1) >= floor).all()
        # within each layer the removed heads are that layer's most inactive ones (reference: sort)
        for layer in range(L):
            n = int(m[layer].sum())
            expected = set(torch.argsort(-values[layer], stable=True)[:n].tolist())
            assert set(torch.nonzero(m[layer]).flatten().tolist()) == expected


@settings(max_examples=60, deadline=None)
@given(shape=layouts, seed=st.integers(0, 1000), min_heads=st.integers(1, 8), allow=st.booleans())
def test_kv_groups_policy_removes_only_whole_groups(shape, seed, min_heads, allow):
    layout = _layout(*shape)
    L, H, G, gs = layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.group_size
    min_heads = min(min_heads, H)
    values = torch.randn(L, H, generator=torch.Generator().manual_seed(seed))
    units = candidate_units(values, layout, "kv-groups", min_heads, allow)
    floor = 0 if allow else min_heads
    assert len(units) == L * ((H - floor) // gs)
    group_means = values.reshape(L, G, gs).mean(-1)
    prev = float("inf")
    for u in units:
        layer = u[0][0]
        heads = sorted(h for _, h in u)
        g = heads[0] // gs
        assert all(x == layer for x, _ in u) and heads == list(range(g * gs, (g + 1) * gs))
        assert float(group_means[layer, g]) <= prev + 1e-6
        prev = float(group_means[layer, g])
    for k in range(len(units) + 1):
        m = removal_mask(units, k, layout).reshape(L, G, gs)
        per_group = m.sum(-1)
        assert ((per_group == 0) | (per_group == gs)).all()  # exporter: whole groups only
        assert (H - m.reshape(L, H).sum(1) >= floor).all()


@settings(max_examples=60, deadline=None)
@given(shape=layouts, seed=st.integers(0, 1000), min_heads=st.integers(1, 8), allow=st.booleans())
def test_uniform_policy_keeps_a_stock_architecture(shape, seed, min_heads, allow):
    layout = _layout(*shape)
    L, H, G, gs = layout.num_layers, layout.num_heads, layout.num_kv_heads, layout.group_size
    min_heads = min(min_heads, H)
    values = torch.randn(L, H, generator=torch.Generator().manual_seed(seed))
    units = candidate_units(values, layout, "uniform", min_heads, allow)
    floor = 0 if allow else min_heads
    # reference: the most units j with G * (gs - j) >= floor
    assert len(units) == max(j for j in range(gs + 1) if G * (gs - j) >= floor)
    for k in range(len(units) + 1):
        m = removal_mask(units, k, layout)
        grouped = m.reshape(L, G, gs)
        assert (grouped.sum(-1) == k).all()  # every group of every layer loses the same count
        assert (H - m.sum(1) >= floor).all()
        for layer in range(L):
            for g in range(G):
                expected = set(torch.argsort(-values[layer, g * gs:(g + 1) * gs], stable=True)[:k].tolist())
                assert set(torch.nonzero(grouped[layer, g]).flatten().tolist()) == expected


def test_empty_layers_refused_unless_allowed():
    layout = _layout(2, 2, 2)
    with pytest.raises(PruneHeadsError, match="allow-empty-layers"):
        layer_floor(layout, 0, allow_empty_layers=False)
    assert layer_floor(layout, 0, allow_empty_layers=True) == 0
    values = torch.randn(2, 4)
    assert len(candidate_units(values, layout, "free", 1, allow_empty_layers=True)) == 8
    assert len(candidate_units(values, layout, "free", 1)) == 6
    with pytest.raises(PruneHeadsError, match="more than"):
        layer_floor(layout, 5, allow_empty_layers=False)


def test_nan_scores_rank_last_and_bad_inputs():
    layout = _layout(1, 1, 4)
    values = torch.tensor([[float("nan"), 1.0, 3.0, 2.0]])
    units = candidate_units(values, layout, "free", 1, allow_empty_layers=True)
    assert [u[0][1] for u in units] == [2, 3, 1, 0]
    with pytest.raises(PruneHeadsError, match="unknown GQA policy"):
        candidate_units(values, layout, "blocks")
    with pytest.raises(PruneHeadsError, match="another model"):
        candidate_units(torch.zeros(2, 4), layout, "free")
