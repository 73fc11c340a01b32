"""``plot_selection_search``: the figure of a selection search, from the plan it produced."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError
from prune_heads.report import plots


def budget_limit(baseline: float, max_drop: float, relative: bool, higher_is_better: bool) -> float:
    """The worst value the budget accepts (the selection's ``within_budget`` rule, solved for the value)."""
    allowed = max_drop * abs(baseline) if relative else max_drop
    return baseline - allowed if higher_is_better else baseline + allowed


def plot_selection_search(plan: Any, path: str | os.PathLike, *, title: str = "") -> Path:
    """Metric against heads removed, one point per probe of the search, with the base model and the budget.

    ``plan``: a ``Plan``, a plan file or its metadata; it must hold a ``trace`` of probes
    ``{k, heads_removed, value, stderr, within_budget}`` (as the static and budgeted searches write).
    """
    from prune_heads.plan import Plan

    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    meta = plan.to_dict() if isinstance(plan, Plan) else plan
    if not isinstance(meta, Mapping) or not meta.get("trace"):
        raise PruneHeadsError("this plan records no search trace (it was not made by a budgeted search): "
                              "nothing to plot")
    trace = list(meta["trace"])
    budget = meta.get("budget") or {}
    base = meta.get("baseline") or {}
    baseline = next((float(p["value"]) for p in trace if p.get("k") == 0), None)
    if baseline is None and isinstance(base, Mapping) and base.get("value") is not None:
        baseline = float(base["value"])
    higher = bool(budget.get("higher_is_better", base.get("higher_is_better", True) if isinstance(base, Mapping) else True))
    limit = None
    if baseline is not None and budget.get("max_drop") is not None:
        limit = budget_limit(baseline, float(budget["max_drop"]), bool(budget.get("relative")), higher)
    metric = budget.get("metric") or (base.get("metric") if isinstance(base, Mapping) else None) or trace[0].get("metric", "value")
    heads_total = meta.get("heads_total")
    chosen = meta.get("heads_removed")
    if chosen is None and isinstance(plan, Plan):
        chosen = len(plan.removed_heads)
    task = meta.get("task")
    task = task.get("task") if isinstance(task, Mapping) else task
    if not title:
        title = (f"selection search on {task}: " if task else "selection search: ") + \
            f"{len(trace)} evaluations, numbered in the order they ran"
    return plots.selection_search(trace, Path(path), metric=str(metric), baseline=baseline, limit=limit,
                                  higher_is_better=higher, heads_total=heads_total, chosen=chosen, title=title)


__all__ = ["budget_limit", "plot_selection_search"]
