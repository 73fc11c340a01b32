"""``lsq_error``: the error that removing heads leaves after least-squares compensation, in greedy order.

Within a layer removals interact (two correlated heads each predict the other; removing both loses
both), so a head's cost depends on what is already gone. Per layer the greedy order removes next the unit
(a head, or a whole KV group) whose removal leaves the least error given those already removed, and
records each step's cumulative error ``E(R) = tr(W_R (P_RR)^{-1} W_R^T)`` (``solve.residual_error``).

Each step is an optimal-brain-surgeon downdate on the kept set ``K`` (SlimGPT): with ``G = S_KK^{-1}``
and ``V = G S_{K,:} W^T`` (the compensated ``o_proj`` weights, transposed; ``V = W^T`` at the start),
removing block ``b`` from ``K`` costs ``tr(V_b^T (G_bb)^{-1} V_b)``, after which
``V <- V_K' - G_K'b G_bb^{-1} V_b`` and ``G <- G_K'K' - G_K'b G_bb^{-1} G_bK'``. One layer costs
``O(H n^2 D)``, not a fresh solve per candidate.

Errors are in squared attention-output units per token; to compare layers they are made relative to
the residual stream ``h`` each token's error is added to, the mean ``E_t |delta_t|^2 / |h_t|^2`` that the
following layers' norms see (normalisation ``relative``, the default): the greedy runs on the covariance
weighted by ``w_t = 1 / |h_t|^2`` (``Moments.relative_covariance``) and its errors are multiplied by the
mean weight. Moments collected without the weighted sums fall back to ``harmonic``: the unweighted error
times the mean ``1 / |h|^2``. The lead's first suggestion, dividing by the mean ``|h|^2``
(``mean_square``), is dominated by the few tokens with massive activations (the first token in SmolLM2)
and ranked worst (``benchmarks/results/compensation.md`` has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prune_heads.compensation.moments import Moments
from prune_heads.compensation.solve import head_dims, precision, regularised
from prune_heads.compensation.spec import DEFAULT_RIDGE

#: score ids this module provides (inactive when LOW)
LSQ_SCORES: tuple[str, ...] = ("lsq_error", "lsq_error_group")
NORMALISATIONS: tuple[str, ...] = ("relative", "harmonic", "mean_square", "none")


@dataclass
class GreedyResult:
    """Units in removal order and the cumulative error after each removal (``cumulative[-1]``: all gone)."""

    order: list[int]
    cumulative: list[float]

    def rank_values(self, num_units: int) -> list[float]:
        """Per unit, the cumulative error at the step it is removed."""
        out = [0.0] * num_units
        for u, e in zip(self.order, self.cumulative):
            out[u] = e
        return out


def greedy_removal(cov: torch.Tensor, weight: torch.Tensor, units: Sequence[Sequence[int]]) -> GreedyResult:
    """Greedy removal order of ``units`` (lists of input dims) for a regularised covariance ``cov``.

    ``weight`` is ``o_proj``'s ``(hidden, n)`` weight. Ties go to the lower unit index.
    """
    cov = cov.double()
    G = torch.linalg.inv(cov)
    G = (G + G.T) / 2
    V = weight.double().T.to(cov.device).clone()      # (n, hidden)
    pos = list(range(cov.shape[0]))                     # original dim of each row of G / V
    remaining = list(range(len(units)))
    order: list[int] = []
    cumulative: list[float] = []
    total = 0.0
    while remaining:
        where = {d: i for i, d in enumerate(pos)}
        best: tuple[float, int, torch.Tensor] | None = None
        for u in remaining:
            b = torch.tensor([where[d] for d in units[u]], dtype=torch.long, device=cov.device)
            vb = V[b]
            cost = float((vb * torch.linalg.solve(G[b][:, b], vb)).sum())
            if best is None or cost < best[0]:
                best = (cost, u, b)
        cost, u, b = best
        total += max(cost, 0.0)
        order.append(u)
        cumulative.append(total)
        remaining.remove(u)
        drop = set(b.tolist())
        keep = torch.tensor([i for i in range(len(pos)) if i not in drop], dtype=torch.long, device=cov.device)
        g_kb, g_bb = G[keep][:, b], G[b][:, b]
        V = V[keep] - g_kb @ torch.linalg.solve(g_bb, V[b])
        G = G[keep][:, keep] - g_kb @ torch.linalg.solve(g_bb, g_kb.T)
        G = (G + G.T) / 2
        pos = [pos[i] for i in keep.tolist()]
    return GreedyResult(order, cumulative)


def layer_scale(moments: Moments, layer: int, normalisation: str) -> float:
    """Factor that turns layer ``layer``'s squared error into the cross-layer score."""
    if normalisation in ("harmonic", "relative"):
        return moments.residual_inverse_mean(layer)
    if normalisation == "mean_square":
        return 1.0 / max(moments.residual_mean_square(layer), 1e-30)
    if normalisation == "none":
        return 1.0
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}")


def layer_covariance(moments: Moments, layer: int, normalisation: str) -> torch.Tensor:
    """The covariance the greedy runs on: weighted by ``1 / |h|^2`` for ``relative``."""
    return moments.relative_covariance(layer) if normalisation == "relative" else moments.covariance(layer)


def lsq_error_scores(model: nn.Module, moments: Moments, *, ridge: float = DEFAULT_RIDGE,
                     normalisation: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``lsq_error`` (head-level greedy) and ``lsq_error_group`` (KV-group-level greedy, every head of a
    group carries its group's value) as ``(L, H)`` float32, plus the greedy orders for the record.

    ``normalisation``: default ``relative`` when the moments have the weighted sums, else ``harmonic``.
    """
    from prune_heads.model.adapters import get_adapter

    if normalisation is None:
        normalisation = "relative" if moments.has_relative else "harmonic"
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}")

    adapter = get_adapter(model)
    layout = adapter.layout(model.config)
    L, H, D, gs = layout.num_layers, layout.num_heads, layout.head_dim, layout.group_size
    heads = [head_dims([h], D).tolist() for h in range(H)]
    groups = [head_dims(range(g * gs, (g + 1) * gs), D).tolist() for g in range(layout.num_kv_heads)]
    per_head = torch.zeros(L, H)
    per_group = torch.zeros(L, H)
    record: dict[str, Any] = {"ridge": ridge, "normalisation": normalisation, "order": [], "group_order": [],
                              "cumulative": [], "group_cumulative": []}
    from prune_heads.model.sequential_engine import streamed_of

    streamed = streamed_of(model)  # a layer-by-layer skeleton: each o_proj weight is read from the shards
    for i, layer in enumerate(adapter.layers(model)):
        weight = (streamed.o_proj_weight(i) if streamed is not None
                  else adapter.o_proj(adapter.attention(layer)).weight.detach())
        raw = layer_covariance(moments, i, normalisation)
        cov = regularised(raw.to(weight.device), ridge)
        precision(raw, ridge, layer=i)  # conditioning check and warning, as the solve does
        scale = layer_scale(moments, i, normalisation)
        g_head = greedy_removal(cov, weight, heads)
        per_head[i] = torch.tensor(g_head.rank_values(H)) * scale
        record["order"].append(g_head.order)
        record["cumulative"].append([e * scale for e in g_head.cumulative])
        g_group = greedy_removal(cov, weight, groups)
        values = g_group.rank_values(layout.num_kv_heads)
        per_group[i] = torch.tensor([values[h // gs] for h in range(H)]) * scale
        record["group_order"].append(g_group.order)
        record["group_cumulative"].append([e * scale for e in g_group.cumulative])
    return {"lsq_error": per_head, "lsq_error_group": per_group}, record


def ensure_lsq_scores(scores: Any, model: nn.Module, score_id: str) -> Any:
    """``scores`` with ``score_id`` (an ``lsq_error`` score) computed from its moments if it is not stored.

    Lets a selector rank by ``lsq_error`` with any scores directory whose calibration kept the moments.
    """
    if score_id not in LSQ_SCORES or scores is None or score_id in scores.score_ids:
        return scores
    if getattr(scores, "moments", None) is None:
        from prune_heads.errors import PruneHeadsError

        raise PruneHeadsError(f"score {score_id!r} is computed from the calibration moments, which this scores file "
                              "lacks; recalibrate (`prune-heads calibrate` keeps them by default)")
    values, record = lsq_error_scores(model, scores.moments)
    for sid in LSQ_SCORES:
        scores.means.setdefault(sid, values[sid])
    scores.meta["lsq_error"] = record
    return scores
