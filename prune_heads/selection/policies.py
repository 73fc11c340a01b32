"""GQA policies: which sets of heads may be removed together, in what order.

A policy turns per-head inactivity into an ordered list of *removal units* (most inactive first).
Removing the first ``k`` units gives the ``k``-th candidate plan, so the search works on ``k`` alone
and every candidate already has a structure the exporter accepts:

- ``free``: a unit is one query head; any head may go.
- ``kv-groups``: a unit is a whole KV group (its query heads together), ranked by the mean
  inactivity of its heads; removing whole groups also shrinks the KV cache.
- ``uniform``: unit ``j`` removes the ``j``-th most inactive query head of *every* KV group of *every*
  layer, so all layers keep the same head count and the export is a stock architecture.

Each layer keeps at least ``min_heads_per_layer`` heads; ``allow_empty_layers`` lowers that floor to 0.
"""

from __future__ import annotations

import math

import torch

from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import HeadLayout

POLICIES: tuple[str, ...] = ("free", "kv-groups", "uniform")
Unit = list[tuple[int, int]]


def layer_floor(layout: HeadLayout, min_heads_per_layer: int, allow_empty_layers: bool) -> int:
    """Heads every layer must keep. A floor of 0 (an emptied layer) needs an explicit opt-in, because
    a model with a layer that has no attention left is rarely what a user means to ship."""
    if min_heads_per_layer < 0:
        raise PruneHeadsError(f"--min-heads-per-layer must be >= 0, got {min_heads_per_layer}")
    if allow_empty_layers:
        return 0
    if min_heads_per_layer < 1:
        raise PruneHeadsError(
            "--min-heads-per-layer 0 would let a layer lose every head; pass --allow-empty-layers if that is intended"
        )
    if min_heads_per_layer > layout.num_heads:
        raise PruneHeadsError(
            f"--min-heads-per-layer {min_heads_per_layer} is more than the {layout.num_heads} heads a layer has"
        )
    return min_heads_per_layer


def _clean(inactivity: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    if tuple(inactivity.shape) != (layout.num_layers, layout.num_heads):
        raise PruneHeadsError(
            f"scores have shape {tuple(inactivity.shape)} but the model has {layout.num_layers} layers x "
            f"{layout.num_heads} heads: they were made on another model"
        )
    # unmeasured heads (NaN, e.g. ablation restricted to candidates) rank last: never removed first
    return torch.nan_to_num(inactivity.detach().float().cpu(), nan=-math.inf)


def _order(values: torch.Tensor) -> list[int]:
    """Indices by decreasing value; ties keep index order so plans are reproducible."""
    return torch.argsort(-values, stable=True).tolist()


def candidate_units(inactivity: torch.Tensor, layout: HeadLayout, policy: str, min_heads_per_layer: int = 1,
                    allow_empty_layers: bool = False) -> list[Unit]:
    """Ordered removal units (most inactive first) under a GQA policy; see the module docstring."""
    if policy not in POLICIES:
        raise PruneHeadsError(f"unknown GQA policy {policy!r}; choose from {', '.join(POLICIES)}")
    values = _clean(inactivity, layout)
    floor = layer_floor(layout, min_heads_per_layer, allow_empty_layers)
    L, H, G = layout.num_layers, layout.num_heads, layout.num_kv_heads
    gs = layout.group_size
    if policy == "free":
        budget = [H - floor] * L
        units: list[Unit] = []
        for flat in _order(values.reshape(-1)):
            layer, head = divmod(flat, H)
            if budget[layer] > 0:
                budget[layer] -= 1
                units.append([(layer, head)])
        return units
    if policy == "kv-groups":
        group_values = values.reshape(L, G, gs).mean(-1)
        removable = (H - floor) // gs  # whole groups a layer may lose and keep >= floor heads
        taken = [0] * L
        units = []
        for flat in _order(group_values.reshape(-1)):
            layer, group = divmod(flat, G)
            if taken[layer] < removable:
                taken[layer] += 1
                units.append([(layer, group * gs + j) for j in range(gs)])
        return units
    # uniform: per layer, G * (gs - j) heads remain after j units
    max_units = gs - math.ceil(floor / G) if floor else gs
    per_group = values.reshape(L, G, gs)
    orders = [[_order(per_group[layer, g]) for g in range(G)] for layer in range(L)]
    return [
        [(layer, g * gs + orders[layer][g][j]) for layer in range(L) for g in range(G)]
        for j in range(max(0, max_units))
    ]


def heads_of(units: list[Unit], k: int) -> list[tuple[int, int]]:
    """The heads removed by the first ``k`` units."""
    return [h for unit in units[:k] for h in unit]


def removal_mask(units: list[Unit], k: int, layout: HeadLayout) -> torch.Tensor:
    """``(L, H)`` bool mask (True = removed) of the first ``k`` units."""
    mask = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
    for layer, head in heads_of(units, k):
        mask[layer, head] = True
    return mask
