"""``write_compare``: how far apart two scores files are (e.g. a base model and its instruct version).

Decision on shapes: the Wasserstein-1 distance compares the *distribution of a score's values*
(every per-sequence value of every head, pooled), which is defined for any two files, so it is
always reported. Per-head comparisons (mean differences, correlation, overlap of inactive sets)
need the same ``(layers, heads)`` grid; when the grids differ they are left out and the summary
says so, rather than failing. Raw scores of different models can sit on different scales; the
``_ln``/``_hn`` forms are the ones to compare across architectures.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import atomic_dir, write_json_atomic
from prune_heads.report import metrics as M
from prune_heads.report import plots
from prune_heads.report.summary import DEFAULT_SCORES, arrays, file_stem, kv_heads
from prune_heads.report.tables import pct, table
from prune_heads.scoring.head_scores import HeadScores


def common_score_ids(a: HeadScores, b: HeadScores, score_ids: list[str] | None) -> list[str]:
    if score_ids:
        missing = [f"{s} (in {name})" for s in score_ids for name, hs in (("A", a), ("B", b)) if s not in hs.score_ids]
        if missing:
            raise PruneHeadsError(f"score(s) missing: {', '.join(missing)}; compare only scores both files have")
        return list(dict.fromkeys(score_ids))
    common = [s for s in a.score_ids if s in b.score_ids]
    if not common:
        raise PruneHeadsError(f"the two scores files share no score (A: {', '.join(a.score_ids)}; "
                              f"B: {', '.join(b.score_ids)}); recalibrate one with the other's --scores")
    return common


def default_labels(a: HeadScores, b: HeadScores) -> tuple[str, str]:
    la, lb = str(a.meta.get("model") or "A"), str(b.meta.get("model") or "B")
    return (la, lb) if la != lb else (f"A: {la}", f"B: {lb}")


def write_compare(a: HeadScores, b: HeadScores, out_dir: str | os.PathLike, *, score_ids: list[str] | None = None,
                  fraction: float = 0.1, labels: tuple[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write ``compare.md``, ``compare.json``, a CDF overlay plot and per-head difference heatmaps."""
    fraction = M.check_fraction(fraction)
    ids = common_score_ids(a, b, score_ids)
    plot_ids = ids if score_ids else ([s for s in DEFAULT_SCORES if s in ids] or ids)
    labels = labels or default_labels(a, b)
    same_grid = (a.num_layers, a.num_heads) == (b.num_layers, b.num_heads)
    results: dict[str, dict[str, Any]] = {}
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for sid in ids:
            mean_a, per_a = arrays(a, sid)
            mean_b, per_b = arrays(b, sid)
            pooled = per_a is not None and per_b is not None
            va, vb = (per_a, per_b) if pooled else (mean_a, mean_b)
            w1 = M.wasserstein1(va, vb)
            spread = float(np.nanstd(np.concatenate([va.reshape(-1), vb.reshape(-1)])))
            r: dict[str, Any] = {"w1": w1, "w1_over_std": w1 / spread if spread > 0 else float("nan"),
                                 "pooled_over": "per-sample values" if pooled else "head means",
                                 "mean_a": float(np.nanmean(va)), "mean_b": float(np.nanmean(vb))}
            if same_grid:
                delta = mean_b - mean_a
                idx = np.unravel_index(int(np.nanargmax(np.abs(delta))), delta.shape)
                r.update({"mean_abs_diff": float(np.nanmean(np.abs(delta))), "max_abs_diff": float(np.abs(delta)[idx]),
                          "max_at": [int(idx[0]), int(idx[1])], "pearson": M.pearson(mean_a, mean_b),
                          "inactive_iou": M.iou(M.inactive_set(mean_a, sid, fraction), M.inactive_set(mean_b, sid, fraction))})
                if sid in plot_ids:
                    r["diff_heatmap"] = f"diff_{file_stem(sid)}.png"
                    plots.diff_heatmap(delta, sid, labels, tmp / r["diff_heatmap"], num_kv_heads=kv_heads(a))
            if sid in plot_ids:
                series[sid] = (va, vb)
            results[sid] = r
        plots.compare_cdfs(series, {s: results[s]["w1"] for s in series}, labels, tmp / "compare_cdfs.png")
        data = {"labels": list(labels), "same_grid": same_grid, "fraction": fraction,
                "grid_a": [a.num_layers, a.num_heads], "grid_b": [b.num_layers, b.num_heads], "scores": results}
        write_json_atomic(tmp / "compare.json", data)
        (tmp / "compare.md").write_text(_markdown(data, ids, plot_ids))
    return Path(out_dir)


def _markdown(data: dict[str, Any], ids: list[str], plot_ids: list[str]) -> str:
    la, lb = data["labels"]
    (La, Ha), (Lb, Hb) = data["grid_a"], data["grid_b"]
    out = ["# Scores comparison", "", f"- A: `{la}` ({La} layers x {Ha} heads)", f"- B: `{lb}` ({Lb} layers x {Hb} heads)", "",
           "## Wasserstein-1 distance per score", "",
           "W1 between the distributions of each score's values, pooling every per-sequence value of every head "
           "(head means for whole-set scores). It is in the score's own units; W1/std divides by the standard "
           "deviation of both pools together so scores can be compared with each other.", ""]
    rows = [[f"`{s}`", data["scores"][s]["w1"], data["scores"][s]["w1_over_std"], data["scores"][s]["mean_a"],
             data["scores"][s]["mean_b"], data["scores"][s]["pooled_over"]] for s in ids]
    out += [table(["score", "W1", "W1/std", "mean A", "mean B", "pooled over"], rows), "", "![CDFs](compare_cdfs.png)", ""]
    out += ["## Per-head differences", ""]
    if not data["same_grid"]:
        out += [f"Not computed: the files have different head grids ({La}x{Ha} vs {Lb}x{Hb}), so heads do not "
                "correspond (different models). The pooled W1 above still compares the score distributions.", ""]
        return "\n".join(out) + "\n"
    f = data["fraction"]
    out += [f"Δ = B − A of each head's mean. *inactive IoU* is the IoU of the two files' top {f:.0%} inactive sets.", ""]
    rows = [[f"`{s}`", r["mean_abs_diff"], r["max_abs_diff"], f"L{r['max_at'][0]} H{r['max_at'][1]}", r["pearson"],
             pct(r["inactive_iou"])] for s, r in ((s, data["scores"][s]) for s in ids)]
    out += [table(["score", "mean \\|Δ\\|", "max \\|Δ\\|", "at", "Pearson r", "inactive IoU"], rows), ""]
    out += [f"![{s} difference]({data['scores'][s]['diff_heatmap']})" for s in plot_ids if "diff_heatmap" in data["scores"][s]]
    return "\n".join(out) + "\n"
