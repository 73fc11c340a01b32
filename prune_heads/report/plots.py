"""PNG figures for the report, drawn with matplotlib's Agg canvas.

Figures are built from ``matplotlib.figure.Figure`` directly (no pyplot), so drawing never opens a
window, never touches the global backend of a notebook that imported us, and is safe on headless
machines. Every heatmap uses the same convention: **dark = inactive**, so figures of scores with
opposite directions read the same way, and a robust colour scale (2nd to 98th percentile, arrows on
the colour bar when values lie beyond) so that a few outlying heads cannot flatten the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prune_heads.report.metrics import ecdf
from prune_heads.scoring.score_defs import inactive_when_high

DPI = 110
#: heatmap colour scales span these percentiles of the finite values
CLIP_PERCENTILES = (2.0, 98.0)


def direction_text(score_id: str) -> str:
    return "high = inactive" if inactive_when_high(score_id) else "low = inactive"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _margins(fig: Figure, left: float, right: float, top: float, bottom: float, **kw: float) -> None:
    """Fixed margins in inches: about twice as fast as constrained layout for the per-score figures."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, **kw)


def _cmap(score_id: str) -> str:
    # viridis is dark at its low end: reverse it for scores that are inactive when high
    return "viridis_r" if inactive_when_high(score_id) else "viridis"


def _head_ticks(ax, num_layers: int, num_heads: int) -> None:
    step_h = max(1, math.ceil(num_heads / 16))
    step_l = max(1, math.ceil(num_layers / 24))
    ax.set_xticks(range(0, num_heads, step_h))
    ax.set_yticks(range(0, num_layers, step_l))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")


def robust_limits(values: np.ndarray, percentiles: tuple[float, float] = CLIP_PERCENTILES) -> tuple[float, float, str]:
    """``(vmin, vmax, extend)``: the percentile range of the finite values, and which ends were clipped
    (``extend`` for ``colorbar``: neither, min, max or both)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0, "neither"
    lo, hi = (float(x) for x in np.percentile(flat, percentiles))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    below, above = bool((flat < lo).any()), bool((flat > hi).any())
    return lo, hi, {(False, False): "neither", (True, False): "min", (False, True): "max"}.get((below, above), "both")


def gqa_groups(num_heads: int, num_kv_heads: int | None) -> int | None:
    """Query heads per KV head when the heads form more than one GQA group, else None."""
    if num_kv_heads and 1 < num_kv_heads < num_heads and num_heads % num_kv_heads == 0:
        return num_heads // num_kv_heads
    return None


def _kv_lines(ax, num_heads: int, num_kv_heads: int | None) -> str:
    """Thin white lines between GQA groups: heads of one group share keys/values and often behave alike.

    Returns the sentence that explains them (empty when there are none), for the figure's caption."""
    group = gqa_groups(num_heads, num_kv_heads)
    if group is None:
        return ""
    for x in range(group, num_heads, group):
        ax.axvline(x - 0.5, color="white", lw=1.2, alpha=0.9)
    return (f"White lines separate the {num_kv_heads} GQA groups: the {group} query heads between two lines "
            "share one key/value head.")


def _caption(fig: Figure, text: str) -> None:
    """A note under the axes, inside the figure, so the figure explains itself when shared alone."""
    if text:
        fig.text(0.01, 0.12 / fig.get_size_inches()[1], text, fontsize="small", ha="left", va="bottom",
                 wrap=True, color="0.25")


def heatmap(mean: np.ndarray, score_id: str, path: Path, *, marked: np.ndarray | None = None,
            marked_label: str = "", subtitle: str = "", num_kv_heads: int | None = None) -> Path:
    """Layers x heads map of one score's head means on a robust colour scale; ``marked`` heads get a red x."""
    num_layers, num_heads = mean.shape
    width = min(16.0, 4.2 + 0.42 * num_heads)
    height = min(15.0, 2.3 + 0.3 * num_layers)
    fig = Figure(figsize=(width, height))
    _margins(fig, left=0.7, right=0.3, top=0.75, bottom=1.45)
    ax = fig.add_subplot()
    vmin, vmax, extend = robust_limits(mean)
    im = ax.imshow(mean, aspect="auto", cmap=_cmap(score_id), interpolation="nearest", origin="upper",
                   vmin=vmin, vmax=vmax)
    cb = fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03, aspect=30, extend=extend)
    cb.set_label(f"{score_id} (dark = inactive)")
    if marked is not None and marked.any():
        ys, xs = np.nonzero(marked)
        ax.scatter(xs, ys, marker="x", s=min(60, 900 / max(num_heads, num_layers)), c="red",
                   linewidths=1.4, label=marked_label or "inactive")
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.55 / (height - 2.2)), fontsize="small", frameon=False)
    _head_ticks(ax, num_layers, num_heads)
    note = _kv_lines(ax, num_heads, num_kv_heads)
    ax.set_title(f"{score_id}: head means, {direction_text(score_id)}" + (f"\n{subtitle}" if subtitle else ""),
                 fontsize="medium")
    clip = ""
    if extend != "neither":
        finite = mean[np.isfinite(mean)]
        clip = (f"Colour scale clipped to the {CLIP_PERCENTILES[0]:g}–{CLIP_PERCENTILES[1]:g}th percentile "
                f"({vmin:.3g} to {vmax:.3g}; the values span {finite.min():.3g} to {finite.max():.3g}), "
                "so a few outlying heads do not flatten the rest.")
    _caption(fig, " ".join(t for t in (note, clip) if t))
    return _save(fig, path)


def overview(means: dict[str, np.ndarray], path: Path, *, num_kv_heads: int | None = None,
             marked: np.ndarray | None = None, marked_label: str = "") -> Path:
    """Every score's head-mean map side by side (small multiples, each on its own robust scale)."""
    ids = list(means)
    num_layers, num_heads = next(iter(means.values())).shape
    cols = min(4, len(ids))
    rows = math.ceil(len(ids) / cols)
    cell_w, cell_h = max(2.4, 0.2 * num_heads + 1.2), max(2.4, 0.09 * num_layers + 1.1)
    fig = Figure(figsize=(cols * cell_w + 0.4, rows * cell_h + 1.3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, sid in zip(axes, ids):
        vmin, vmax, extend = robust_limits(means[sid])
        im = ax.imshow(means[sid], aspect="auto", cmap=_cmap(sid), interpolation="nearest", vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.08, pad=0.02, extend=extend).ax.tick_params(labelsize="x-small")
        if marked is not None and marked.any():
            ys, xs = np.nonzero(marked)
            ax.scatter(xs, ys, marker="x", s=8, c="red", linewidths=0.7)
        _kv_lines(ax, num_heads, num_kv_heads)
        ax.set_title(f"{sid} ({direction_text(sid)})", fontsize="small")
        ax.set_xlabel("head", fontsize="x-small")
        ax.set_ylabel("layer", fontsize="x-small")
        ax.tick_params(labelsize="x-small")
    for ax in axes[len(ids):]:
        ax.set_visible(False)
    group = gqa_groups(num_heads, num_kv_heads)
    notes = ["Dark = inactive in every panel; each panel has its own colour scale, clipped to the "
             f"{CLIP_PERCENTILES[0]:g}–{CLIP_PERCENTILES[1]:g}th percentile."]
    extra = []
    if group:
        extra.append(f"White lines separate GQA groups ({group} query heads share one key/value head).")
    if marked is not None and marked.any():
        extra.append(f"Red x: {marked_label or 'marked heads'}.")
    fig.suptitle(f"All {len(ids)} scores: head means ({num_layers} layers x {num_heads} heads)")
    fig.supxlabel("\n".join([" ".join(notes), " ".join(extra)]).strip(), fontsize="small", color="0.25")
    return _save(fig, path)


def distribution(score_id: str, path: Path, *, per_sample: np.ndarray | None, mean: np.ndarray,
                 tau: float | None, fraction: float) -> Path:
    """Histogram and CDF of per-sample values (when there are any) and of head means, with ``τ``."""
    rows = [("per (sequence, head) value", per_sample)] if per_sample is not None else []
    rows.append(("head mean over sequences", mean))
    fig = Figure(figsize=(10, 3.0 * len(rows) + 0.6))
    _margins(fig, left=0.75, right=0.2, top=0.55, bottom=0.55, wspace=0.25, hspace=0.45)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (label, values), (ax_h, ax_c) in zip(rows, axes):
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
        flat = flat[np.isfinite(flat)]
        ax_h.hist(flat, bins=min(60, max(10, int(np.sqrt(flat.size)))), color="tab:blue", alpha=0.8, histtype="stepfilled")
        ax_h.set_xlabel(score_id)
        ax_h.set_ylabel("count")
        ax_h.set_title(f"histogram: {label} (n={flat.size})", fontsize="small")
        x, y = ecdf(flat)
        ax_c.step(x, y, where="post", color="tab:blue")
        ax_c.set_ylim(0, 1)
        ax_c.set_xlabel(score_id)
        ax_c.set_ylabel("fraction ≤ x")
        ax_c.set_title(f"CDF: {label}", fontsize="small")
        ax_c.grid(alpha=0.3)
        if tau is not None and math.isfinite(tau):
            for ax in (ax_h, ax_c):
                ax.axvline(tau, color="red", ls="--", lw=1, label=f"τ at {fraction:.0%}")
            ax_c.legend(fontsize="small", loc="lower right")
    fig.suptitle(f"{score_id} distribution ({direction_text(score_id)})")
    return _save(fig, path)


def matrix(values: np.ndarray, ids: Sequence[str], path: Path, *, title: str, cbar: str,
           row_label: str = "", col_label: str = "") -> Path:
    """Annotated square matrix (IoU / precision between score functions)."""
    n = len(ids)
    side = min(14.0, 2.5 + 0.75 * n)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0, vmax=1, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label(cbar)
    ax.set_xticks(range(n), ids, rotation=45, ha="right")
    ax.set_yticks(range(n), ids)
    if row_label:
        ax.set_ylabel(row_label)
    if col_label:
        ax.set_xlabel(col_label)
    for i in range(n):
        for j in range(n):
            v = values[i, j]
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if (not np.isnan(v) and v > 0.6) else "black")
    ax.set_title(title, fontsize="medium")
    return _save(fig, path)


def compare_cdfs(series: dict[str, tuple[np.ndarray, np.ndarray]], w1: dict[str, float],
                 labels: tuple[str, str], path: Path) -> Path:
    """One panel per score: the two pooled CDFs overlaid, W1 in the title."""
    ids = list(series)
    cols = min(3, len(ids))
    rows = math.ceil(len(ids) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, sid in zip(axes, ids):
        for values, label, color in zip(series[sid], labels, ("tab:blue", "tab:orange")):
            x, y = ecdf(values)
            ax.step(x, y, where="post", label=label, color=color)
        ax.set_title(f"{sid}: W1 = {w1[sid]:.4g}", fontsize="small")
        ax.set_xlabel(sid)
        ax.set_ylabel("fraction ≤ x")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")
    for ax in axes[len(ids):]:
        ax.set_visible(False)
    fig.suptitle(f"pooled score distributions: {labels[0]} vs {labels[1]}")
    return _save(fig, path)


def diff_heatmap(delta: np.ndarray, score_id: str, labels: tuple[str, str], path: Path, *,
                 num_kv_heads: int | None = None) -> Path:
    """Per-head mean difference ``B − A`` on a symmetric diverging scale."""
    num_layers, num_heads = delta.shape
    _, hi, extend = robust_limits(np.abs(delta), (0.0, CLIP_PERCENTILES[1]))
    lim = hi or 1.0
    extend = "both" if extend in ("max", "both") else "neither"
    fig = Figure(figsize=(min(16.0, 4.2 + 0.42 * num_heads), min(15.0, 2.2 + 0.3 * num_layers)))
    _margins(fig, left=0.7, right=0.3, top=0.5, bottom=1.2)
    ax = fig.add_subplot()
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03, aspect=30, extend=extend).set_label(
        f"Δ {score_id} ({labels[1]} − {labels[0]})")
    _head_ticks(ax, num_layers, num_heads)
    note = _kv_lines(ax, num_heads, num_kv_heads)
    ax.set_title(f"{score_id}: head-mean difference ({direction_text(score_id)})", fontsize="medium")
    clip = (f" Colour scale symmetric at the {CLIP_PERCENTILES[1]:g}th percentile of |Δ|." if extend != "neither" else "")
    _caption(fig, (note + clip).strip())
    return _save(fig, path)


def selection_search(trace: Sequence[dict], path: Path, *, metric: str, baseline: float | None = None,
                     limit: float | None = None, higher_is_better: bool = True, heads_total: int | None = None,
                     chosen: int | None = None, title: str = "") -> Path:
    """The search's probes: metric against heads removed, one point per evaluation, numbered in the order
    they ran, green within the budget and red outside it, with the baseline, the budget's limit and the
    chosen plan."""
    probes = [p for p in trace if p.get("value") is not None and math.isfinite(float(p["value"]))]
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    xs = np.array([p.get("heads_removed", p.get("k", 0)) for p in probes], dtype=float)
    ys = np.array([float(p["value"]) for p in probes])
    errs = np.array([float(p.get("stderr") or 0.0) for p in probes])
    ok = np.array([bool(p.get("within_budget", True)) for p in probes])
    if limit is not None:
        ax.axhline(limit, color="tab:red", ls=":", lw=1.2, label=f"budget limit ({limit:.4g})")
    if baseline is not None:
        ax.axhline(baseline, color="0.4", ls="--", lw=1, label=f"base model ({baseline:.4g})")
    order = np.argsort(xs, kind="stable")
    ax.plot(xs[order], ys[order], color="0.75", lw=1, zorder=1)
    for mask, colour, marker, label in ((ok, "tab:green", "o", "within budget"), (~ok, "tab:red", "X", "over budget")):
        if mask.any():
            ax.errorbar(xs[mask], ys[mask], yerr=errs[mask], fmt=marker, color=colour, ms=7, capsize=3, label=label,
                        zorder=3)
    for i, (x, y) in enumerate(zip(xs, ys), start=1):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(5, 6), fontsize="small", color="0.2")
    if chosen is not None:
        ax.axvline(chosen, color="tab:blue", lw=1.2, alpha=0.7, label=f"chosen: {chosen} heads")
    if limit is not None and baseline is not None:
        low = min((ys - errs).min(initial=baseline), limit)
        high = max((ys + errs).max(initial=baseline), limit)
        pad = 0.08 * max(high - low, 1e-9)
        ymin, ymax = low - pad, high + pad
        ax.set_ylim(ymin, ymax)
        ax.axhspan(limit, ymax if higher_is_better else ymin, color="tab:green", alpha=0.08, lw=0, zorder=0,
                   label="accepted by the budget")
    ax.set_xlabel("heads removed" + (f" (of {heads_total})" if heads_total else ""))
    ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    if heads_total:
        top = ax.secondary_xaxis("top", functions=(lambda h: 100 * h / heads_total, lambda p: p * heads_total / 100))
        top.set_xlabel("% of heads removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title(title or f"selection search: {len(probes)} evaluations, numbered in the order they ran",
                 fontsize="medium")
    return _save(fig, path)
