"""``write_report``: figures, tables and a markdown summary of one scores file."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import atomic_dir, write_json_atomic
from prune_heads.report import metrics as M
from prune_heads.report import plots
from prune_heads.report.tables import pct, table
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import ABLATION, GRADIENT, inactive_when_high

#: shown when the user names no scores: the paper's baseline, its best functions, and measured scores
DEFAULT_SCORES: tuple[str, ...] = ("awft", "ahon_ln", "lthon_ln", "aeqd_ln") + GRADIENT + ABLATION


def choose_score_ids(scores: HeadScores, score_ids: list[str] | None) -> list[str]:
    """The requested ids (all must be in the file), else every score the file holds: the paper's
    baseline and best functions and the measured scores first (``DEFAULT_SCORES``), then the rest."""
    if score_ids:
        missing = [s for s in score_ids if s not in scores.score_ids]
        if missing:
            raise PruneHeadsError(f"score(s) {', '.join(missing)} not in this scores file; it has: "
                                  f"{', '.join(scores.score_ids)}")
        return list(dict.fromkeys(score_ids))
    first = [s for s in DEFAULT_SCORES if s in scores.score_ids]
    return first + [s for s in scores.score_ids if s not in first]


def file_stem(score_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", score_id)


def arrays(scores: HeadScores, score_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Head means ``(L, H)`` and per-sample values ``(N, L, H)`` (None for whole-set scores)."""
    mean = scores.mean(score_id).numpy().astype(np.float64)
    per = scores.per_sample_values.get(score_id)
    return mean, (per.float().numpy().astype(np.float64) if per is not None else None)


def kv_heads(scores: HeadScores) -> int | None:
    kv = scores.meta.get("num_kv_heads")
    return int(kv) if isinstance(kv, int) else None


def data_text(data: Any) -> str:
    """The calibration data spec as one readable line (it is a dict in files from ``calibrate``)."""
    if isinstance(data, dict):
        rest = ", ".join(f"{k}={v}" for k, v in data.items() if k != "source" and v is not None)
        return f"`{data.get('source', '?')}`" + (f" ({rest})" if rest else "")
    return f"`{data if data is not None else '?'}`"


def threshold_rows(score_id: str, mean: np.ndarray, per: np.ndarray | None,
                   fractions: list[float]) -> list[dict[str, Any]]:
    """τ for each fraction (from per-sample values, or head means for whole-set scores) and what it marks."""
    pool = per if per is not None else mean
    rows = []
    for f in fractions:
        tau = M.quantile_threshold(pool, score_id, f)
        heads = M.marked_by_threshold(mean, score_id, tau)
        rows.append({"fraction": f, "tau": tau,
                     "values_marked": float(M.marked_by_threshold(pool, score_id, tau).mean()),
                     "head_means_marked": float(heads.mean()), "heads_marked": int(heads.sum()),
                     "per_layer": M.per_layer_counts(heads)})
    return rows


def plan_mask(plan: Any, shape: tuple[int, int]) -> np.ndarray:
    """``(L, H)`` bool of the heads a plan (``Plan``, plan file, or ``[(layer, head)]``) removes."""
    from prune_heads.plan import Plan

    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    heads = plan.removed_heads if isinstance(plan, Plan) else [tuple(h) for h in plan]
    mask = np.zeros(shape, dtype=bool)
    for layer, head in heads:
        if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
            raise PruneHeadsError(f"the plan removes head [{layer}, {head}] but the scores cover {shape[0]} layers x "
                                  f"{shape[1]} heads: plan and scores come from different models")
        mask[layer, head] = True
    return mask


def write_report(scores: HeadScores, out_dir: str | os.PathLike, *, score_ids: list[str] | None = None,
                 fraction: float = 0.1, overwrite: bool = False, plan: Any = None) -> Path:
    """Write heatmaps (one per score, and all scores in ``overview.png``), distributions,
    quantile-threshold and overlap tables, and ``report.md``.

    ``plan`` (a ``Plan``, a plan file or ``[(layer, head)]``): the heatmaps mark the heads it removes
    instead of each score's top ``fraction``. The output directory appears complete or not at all
    (``atomic_dir``); ``report.json`` holds every number of ``report.md`` for scripts.
    """
    fraction = M.check_fraction(fraction)
    if fraction == 0.0:
        raise PruneHeadsError("--fraction must be > 0 (it sizes the inactive sets that are compared)")
    ids = choose_score_ids(scores, score_ids)
    L, H = scores.num_layers, scores.num_heads
    k = M.num_for_fraction(fraction, L * H)
    fractions = sorted(set(M.PAPER_FRACTIONS) | {fraction})
    removed = plan_mask(plan, (L, H)) if plan is not None else None
    data: dict[str, Any] = {"fraction": fraction, "top_k": k, "num_layers": L, "num_heads": H,
                            "source": scores.summary(), "scores": {},
                            "plan_heads": None if removed is None else [list(map(int, x)) for x in np.argwhere(removed)]}
    sets: dict[str, set] = {}
    means: dict[str, np.ndarray] = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for sid in tqdm(ids, desc="report", unit="score", leave=False):
            mean, per = arrays(scores, sid)
            means[sid] = mean
            rows = threshold_rows(sid, mean, per, fractions)
            sets[sid] = M.inactive_set(mean, sid, fraction)
            at = next(r for r in rows if r["fraction"] == fraction)
            stem = file_stem(sid)
            marked, label = _marks(removed, sets[sid], (L, H), fraction, k)
            plots.heatmap(mean, sid, tmp / f"heatmap_{stem}.png", marked=marked, marked_label=label,
                          subtitle=f"{L} layers x {H} heads" + (f", mean over {per.shape[0]} sequences" if per is not None else ", whole-set score"),
                          num_kv_heads=kv_heads(scores))
            plots.distribution(sid, tmp / f"dist_{stem}.png", per_sample=per, mean=mean, tau=at["tau"],
                               fraction=fraction)
            data["scores"][sid] = {
                "inactive_when": "high" if inactive_when_high(sid) else "low",
                "per_sample": per is not None, "thresholds": rows,
                "inactive_set": sorted(sets[sid]), "inactive_per_layer": M.per_layer_counts(M.set_to_mask(sets[sid], (L, H))),
                "heatmap": f"heatmap_{stem}.png", "distribution": f"dist_{stem}.png",
            }
        if len(ids) > 1:
            plots.overview(means, tmp / "overview.png", num_kv_heads=kv_heads(scores), marked=removed,
                           marked_label=None if removed is None else f"removed by the plan ({int(removed.sum())} heads)")
        overlap = None
        if len(ids) > 1:
            overlap = M.overlap_matrices(sets)
            plots.matrix(overlap.iou, ids, tmp / "overlap_iou.png", cbar="IoU",
                         title=f"IoU of inactive sets (top {fraction:.0%} = {k} heads)")
            plots.matrix(overlap.precision, ids, tmp / "overlap_precision.png", cbar="precision",
                         title=f"precision of row w.r.t. column (top {fraction:.0%})",
                         row_label="A (row)", col_label="B (column)")
            data["overlap"] = {"ids": ids, "iou": overlap.iou, "precision": overlap.precision}
        write_json_atomic(tmp / "report.json", data)
        (tmp / "report.md").write_text(_markdown(scores, ids, data, overlap, fractions))
    return Path(out_dir)


def _marks(removed: np.ndarray | None, top: set, shape: tuple[int, int], fraction: float,
           k: int) -> tuple[np.ndarray, str]:
    if removed is not None:
        return removed, f"removed by the plan ({int(removed.sum())} heads)"
    return M.set_to_mask(top, shape), f"top {fraction:.0%} inactive by this score ({k} heads)"


def _markdown(scores: HeadScores, ids: list[str], data: dict[str, Any], overlap: M.Overlap | None,
              fractions: list[float]) -> str:
    f, k, L, H = data["fraction"], data["top_k"], data["num_layers"], data["num_heads"]
    meta = scores.meta
    out = ["# Head scores report", ""]
    kv = f" ({meta['num_kv_heads']} KV heads per layer; white lines split GQA groups)" if kv_heads(scores) else ""
    out.append(f"- model: `{meta.get('model', '?')}`; {L} layers x {H} heads = {L * H} heads{kv}")
    out.append(f"- data: {data_text(meta.get('data'))}; {meta.get('num_samples', '?')} sequences, "
               f"{meta.get('num_tokens', '?')} tokens")
    out.append(f"- scores shown: {', '.join(f'`{s}`' for s in ids)} (file has {len(scores.score_ids)})")
    out.append(f"- chosen fraction: {f:.0%} (the top {k} heads by inactivity for the overlap tables)")
    marks = ("the heads the plan removes" if data.get("plan_heads") is not None
             else "the score's top-fraction inactive set")
    out += ["", "Direction: `awft`/`awft_ln` mark a head inactive when **high**, every other score when **low**. "
            f"In every heatmap dark means inactive and a red x marks {marks}. Colour scales are clipped to the "
            f"{plots.CLIP_PERCENTILES[0]:g}–{plots.CLIP_PERCENTILES[1]:g}th percentile (arrows on the colour bar) so "
            "that a few outlying heads do not flatten the rest.", ""]
    if data.get("plan_heads") is not None:
        out += [f"- plan: {len(data['plan_heads'])} heads removed", ""]

    out += ["## Heatmaps", ""]
    if len(ids) > 1:
        out += ["![all scores](overview.png)", ""]
    out += [f"![{s}]({data['scores'][s]['heatmap']})" for s in ids] + [""]

    out += ["## Quantile thresholds (paper style)", "",
            "τ is the quantile of the score's per-(sequence, head) values over the calibration set that marks the "
            "given fraction of them inactive (as the paper's dynamic mode does). *Head means marked* is the "
            "fraction of heads whose mean score crosses that τ (a static reading of the same threshold). "
            "Scores without per-sequence values (whole-set measurements) take τ from the head means.", ""]
    header = ["score"] + [f"{x:.0%}" for x in fractions]
    out += ["**τ**", "", table(header, [[f"`{s}`"] + [r["tau"] for r in data["scores"][s]["thresholds"]] for s in ids]), ""]
    out += ["**Head means marked inactive by τ**", "",
            table(header, [[f"`{s}`"] + [pct(r["head_means_marked"]) for r in data["scores"][s]["thresholds"]]
                           for s in ids]), ""]

    out += [f"### Heads marked by τ at {f:.0%}, per layer", ""]
    at = {s: next(r for r in data["scores"][s]["thresholds"] if r["fraction"] == f) for s in ids}
    rows = [[str(layer)] + [str(at[s]["per_layer"][layer]) for s in ids] for layer in range(L)]
    rows.append(["**total**"] + [f"**{at[s]['heads_marked']}**" for s in ids])
    out += [table(["layer"] + [f"`{s}`" for s in ids], rows), ""]

    if overlap is not None:
        out += [f"## Agreement between score functions (top {f:.0%} = {k} heads)", "",
                "Inactive set of a score = its top fraction of heads by inactivity of the head mean. "
                "IoU = |A∩B| / |A∪B|; precision of A (row) w.r.t. B (column) = |A∩B| / |A|. "
                "All sets have the same size here, so precision is symmetric and equals the overlap share.", ""]
        hdr = ["A \\ B"] + [f"`{s}`" for s in ids]
        out += ["**IoU**", "", table(hdr, [[f"`{a}`"] + list(overlap.iou[i]) for i, a in enumerate(ids)]), ""]
        out += ["**Precision**", "",
                table(hdr, [[f"`{a}`"] + list(overlap.precision[i]) for i, a in enumerate(ids)]), ""]
        out += ["![IoU](overlap_iou.png)", "", "![precision](overlap_precision.png)", ""]

    out += ["## Distributions", "",
            "Histogram and CDF of each score over per-(sequence, head) values and over head means; the dashed "
            f"line is τ at {f:.0%}.", ""]
    out += [f"![{s} distribution]({data['scores'][s]['distribution']})" for s in ids]
    return "\n".join(out) + "\n"


__all__ = ["DEFAULT_SCORES", "choose_score_ids", "write_report"]
