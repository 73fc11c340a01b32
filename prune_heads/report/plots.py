"""PNG figures for the report, drawn with matplotlib's Agg canvas.

Figures are built from ``matplotlib.figure.Figure`` directly (no pyplot), so drawing never opens a
window, never touches the global backend of a notebook that imported us, and is safe on headless
machines. Every heatmap uses the same convention: **dark = inactive**, so figures of scores with
opposite directions read the same way.
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


def _kv_lines(ax, num_heads: int, num_kv_heads: int | None) -> None:
    """Thin white lines between GQA groups: heads of one group share keys/values and often behave alike."""
    if num_kv_heads and 1 < num_kv_heads < num_heads and num_heads % num_kv_heads == 0:
        group = num_heads // num_kv_heads
        for x in range(group, num_heads, group):
            ax.axvline(x - 0.5, color="white", lw=1.0, alpha=0.8)


def heatmap(mean: np.ndarray, score_id: str, path: Path, *, marked: np.ndarray | None = None,
            marked_label: str = "", subtitle: str = "", num_kv_heads: int | None = None) -> Path:
    """Layers x heads map of one score's head means; ``marked`` heads get a red x."""
    num_layers, num_heads = mean.shape
    width = min(16.0, 3.2 + 0.42 * num_heads)
    height = min(14.0, 1.6 + 0.3 * num_layers)
    fig = Figure(figsize=(width, height))
    _margins(fig, left=0.7, right=0.3, top=0.75, bottom=0.85)
    ax = fig.add_subplot()
    im = ax.imshow(mean, aspect="auto", cmap=_cmap(score_id), interpolation="nearest", origin="upper")
    cb = fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03, aspect=30)
    cb.set_label(f"{score_id} ({direction_text(score_id)}, dark)")
    if marked is not None and marked.any():
        ys, xs = np.nonzero(marked)
        ax.scatter(xs, ys, marker="x", s=min(60, 900 / max(num_heads, num_layers)), c="red",
                   linewidths=1.2, label=marked_label or "inactive")
        ax.legend(loc="upper left", bbox_to_anchor=(-0.02, -0.5 / (height - 1.6)),
                  fontsize="small", frameon=False)
    _head_ticks(ax, num_layers, num_heads)
    _kv_lines(ax, num_heads, num_kv_heads)
    ax.set_title(f"{score_id}: head means, {direction_text(score_id)}" + (f"\n{subtitle}" if subtitle else ""),
                 fontsize="medium")
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
    lim = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
    lim = lim or 1.0
    fig = Figure(figsize=(min(16.0, 3.2 + 0.42 * num_heads), min(14.0, 1.6 + 0.3 * num_layers)))
    _margins(fig, left=0.7, right=0.3, top=0.5, bottom=0.6)
    ax = fig.add_subplot()
    im = ax.imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.1, pad=0.03, aspect=30).set_label(f"Δ {score_id} ({labels[1]} − {labels[0]})")
    _head_ticks(ax, num_layers, num_heads)
    _kv_lines(ax, num_heads, num_kv_heads)
    ax.set_title(f"{score_id}: head-mean difference ({direction_text(score_id)})", fontsize="medium")
    return _save(fig, path)
