"""The plot of one selection: every probe's drop with its confidence band, the budget and the choice.

A reader of a plan wants to see at once how close the chosen ``k`` is to the budget, how wide the
uncertainty was, and whether the held-out data agree; ``trace_points`` gives the numbers that
``plot_selection`` draws (so they can be tested and tabulated), for any selector's trace.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.plan.record import SelectionResult

__all__ = ["TracePoint", "plot_search", "plot_selection", "trace_points"]


@dataclass
class TracePoint:
    order: int
    heads_removed: int
    estimate: float
    lower: float
    bound: float
    within_budget: bool


def _selection(plan_or_selection: Any) -> SelectionResult:
    return getattr(plan_or_selection, "selection", plan_or_selection)


def trace_points(plan_or_selection: Any) -> list[TracePoint]:
    """The probes that carry drop statistics, in evaluation order."""
    sel = _selection(plan_or_selection)
    return [TracePoint(i, p.heads_removed, p.drop.estimate, p.drop.lower, p.drop.bound, bool(p.drop.within_budget))
            for i, p in enumerate(sel.trace) if p.drop is not None]


def plot_selection(plan_or_selection: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Drop against heads removed for every probe (one-sided bounds as error bars), the budget line,
    the chosen plan (star) and its verification on held-out data (diamond with its interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = _selection(plan_or_selection)
    pts = sorted(trace_points(sel), key=lambda p: p.heads_removed)
    budget = sel.budget
    fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=120)
    for ok, color, label in ((True, "tab:green", "within budget"), (False, "tab:red", "over budget")):
        sub = [p for p in pts if p.within_budget == ok]
        if sub:
            x = [p.heads_removed for p in sub]
            y = [p.estimate for p in sub]
            err = [[_gap(p.estimate, p.lower) for p in sub], [_gap(p.bound, p.estimate) for p in sub]]
            ax.errorbar(x, y, yerr=err, fmt="o", color=color, capsize=3, label=label)
    if len(pts) > 1:
        xs = [p.heads_removed for p in pts]
        ax.fill_between(xs, [p.estimate - _gap(p.estimate, p.lower) for p in pts],
                        [p.estimate + _gap(p.bound, p.estimate) for p in pts], color="tab:blue", alpha=0.12, linewidth=0)
        ax.plot(xs, [p.estimate for p in pts], color="tab:blue", linewidth=0.8)
    chosen = sel.chosen_probe
    if chosen is not None and chosen.drop is not None:
        ax.plot([chosen.heads_removed], [chosen.drop.estimate], marker="*", markersize=16, color="gold",
                markeredgecolor="k", linestyle="none", label=f"chosen: {chosen.heads_removed} heads")
    v = sel.verification
    if v is not None and v.drop is not None and sel.heads_removed is not None:
        d = v.drop
        ax.errorbar([sel.heads_removed], [d.estimate], yerr=[[_gap(d.estimate, d.lower)], [_gap(d.bound, d.estimate)]],
                    fmt="D", color="tab:purple", capsize=4, label=f"held-out: {v.verdict}")
    if budget is not None:
        ax.axhline(budget.max_drop, color="k", linestyle=":", linewidth=0.9,
                   label=f"budget {budget.max_drop:g}{' (relative)' if budget.relative else ''}")
    ax.axhline(0.0, color="0.7", linewidth=0.6)
    conf = budget.confidence if budget is not None else 0.0
    metric = (budget.metric if budget is not None else None) or "metric"
    ax.set_xlabel(f"heads removed (of {sel.heads_total})")
    ax.set_ylabel(f"{metric} drop" + (f" (one-sided {100 * conf:g}% bounds)" if conf else " (point estimates)"))
    ax.set_title(title or f"{sel.method} selection: {len(pts)} probes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _gap(a: float, b: float) -> float:
    """``a - b`` for an error bar; an infinite bound (fewer than two documents) draws no bar."""
    d = a - b
    return d if math.isfinite(d) and d >= 0 else 0.0


def plot_search(plan: Any, path: Path) -> list[Path]:
    """The search's probes against heads removed, when the method searched (static, iterative): ``path``
    shows the metric, and ``PATH-drop.png`` beside it each probe's paired drop with its confidence band,
    the budget line and the chosen k (what the budget rule decided on). Returns the files written."""
    if not plan.selection.trace:
        return []
    from prune_heads.report.search import plot_selection_search

    out = [plot_selection_search(plan, path)]
    if any(p.drop is not None for p in plan.selection.trace):
        path = Path(path)
        out.append(plot_selection(plan, path.with_name(f"{path.stem}-drop{path.suffix}")))
    return out
