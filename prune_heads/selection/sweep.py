"""The paper's sweep: accuracy as more and more heads marked by each score are zeroed.

For each score and each target fraction (0, 5, ..., 30% of all heads) the model is evaluated with the
most inactive heads zeroed, either statically (the top fraction of the global ranking, the same heads
for every input) or, with ``dynamic``, per input as in the paper (a head is zeroed on an input when
that input's score crosses the threshold that marks the fraction in the calibration set). A random
ranking is the baseline every score must beat. The summary table is the paper's Table 2: the largest
fraction each score zeroes while staying within one point of the unmasked model.

Every row also carries the paired drop against the unmasked model on the same documents
(``selection.budget.judge``): its estimate, standard error and one-sided ``band`` bounds, which the
plot draws as a band around the drop curve, with the budget line and each score's chosen fraction.
With ``confidence`` > 0 a fraction counts as within budget only if its upper bound is.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation.paired import paired_drop
from prune_heads.io_utils import atomic_dir, write_json_atomic
from prune_heads.model.adapters import get_adapter
from prune_heads.plan.record import result_dict
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.selection.budget import check_confidence, judge, make_budget
from prune_heads.selection.policies import candidate_units, removal_mask
from prune_heads.selection.static import RANDOM_SCORE, ranking, within_budget

DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


@dataclass
class SweepResult:
    """Every evaluation of a sweep, and the Table-2 summary derived from them."""

    baseline: dict[str, Any]
    rows: list[dict[str, Any]]
    mode: str
    max_drop: float
    task: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- summary ------------------------------------------------------------------------------
    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """Rows per score (random seeds averaged), ordered by target fraction."""
        by: dict[str, dict[float, list[dict[str, Any]]]] = {}
        for r in self.rows:
            by.setdefault(r["score"], {}).setdefault(r["fraction"], []).append(r)
        out: dict[str, list[dict[str, Any]]] = {}
        for sid, fr in by.items():
            pts = []
            for f in sorted(fr):
                rs = fr[f]
                pts.append({
                    "fraction": f,
                    "pct_zeroed": sum(r["pct_zeroed"] for r in rs) / len(rs),
                    "value": sum(r["value"] for r in rs) / len(rs),
                    "within_budget": all(r["within_budget"] for r in rs) if len(rs) == 1 or self.meta.get("confidence")
                    else
                    _passes(self.baseline, sum(r["value"] for r in rs) / len(rs), self.max_drop),
                    **{key: _mean([r.get(key) for r in rs]) for key in ("drop", "drop_lower", "drop_upper")},
                })
            out[sid] = pts
        return out

    def table(self) -> list[dict[str, Any]]:
        """Largest target fraction within budget per score (the paper's Table 2)."""
        rows = []
        for sid, pts in self.curves().items():
            ok = [p for p in pts if p["within_budget"]]
            best = max(ok, key=lambda p: p["fraction"]) if ok else None
            rows.append({
                "score": sid,
                "max_fraction": best["fraction"] if best else 0.0,
                "pct_zeroed": round(best["pct_zeroed"], 2) if best else 0.0,
                "value": best["value"] if best else None,
            })
        return rows

    def table_markdown(self) -> str:
        metric = self.baseline["metric"]
        lines = [
            f"Largest % of heads zeroed ({self.mode}) with {metric} within {self.max_drop:g} of the unmasked "
            f"model ({self.baseline['value']:.4f}); grid: {', '.join(f'{100 * f:g}%' for f in self._fractions())}.",
            "",
            f"| score | max % heads (grid) | % heads zeroed (measured) | {metric} |",
            "|---|---:|---:|---:|",
        ]
        for r in self.table():
            v = "-" if r["value"] is None else f"{r['value']:.4f}"
            lines.append(f"| {r['score']} | {100 * r['max_fraction']:g} | {r['pct_zeroed']:.1f} | {v} |")
        return "\n".join(lines) + "\n"

    def table_csv(self) -> str:
        return _csv(self.table(), ["score", "max_fraction", "pct_zeroed", "value"])

    def rows_csv(self) -> str:
        return _csv(self.rows, ["score", "seed", "fraction", "pct_zeroed", "heads_zeroed", "metric", "value", "stderr",
                                "n", "within_budget", "threshold", "drop", "drop_stderr", "drop_lower", "drop_upper"])

    def _fractions(self) -> list[float]:
        return sorted({r["fraction"] for r in self.rows})

    # ---- outputs ------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike) -> Path:
        """The metric against % of heads zeroed (left) and the paired drop with its band (right)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax_drop) = plt.subplots(1, 2, figsize=(11.5, 4.2), dpi=120)
        curves = self.curves()
        colors: dict[str, Any] = {}
        for sid, pts in curves.items():
            style = {"color": "0.5", "linestyle": "--"} if sid == RANDOM_SCORE else {}
            line = ax.plot([p["pct_zeroed"] for p in pts], [p["value"] for p in pts], marker="o", label=sid, **style)
            colors[sid] = line[0].get_color()
        base = float(self.baseline["value"])
        hib = self.baseline["higher_is_better"]
        ax.axhline(base - self.max_drop if hib else base + self.max_drop, color="k", linewidth=0.8, linestyle=":",
                   label=f"baseline {'-' if hib else '+'} {self.max_drop:g}")
        ax.set_xlabel(f"% of heads zeroed ({self.mode})")
        ax.set_ylabel(self.baseline["metric"])
        task = self.task.get("task") if isinstance(self.task, dict) else self.task
        ax.set_title(f"{task or ''} - heads zeroed by score".strip(" -"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        self._plot_drop(ax_drop, curves, colors)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)

    def _plot_drop(self, ax: Any, curves: dict[str, list[dict[str, Any]]], colors: dict[str, Any]) -> None:
        band = self.meta.get("band", 0.9)
        chosen = {r["score"]: r for r in self.table()}
        for sid, pts in curves.items():
            pts = [p for p in pts if p.get("drop") is not None]
            if not pts:
                continue
            x = [p["pct_zeroed"] for p in pts]
            ax.plot(x, [p["drop"] for p in pts], marker="o", color=colors[sid], label=sid,
                    linestyle="--" if sid == RANDOM_SCORE else "-")
            lo, hi = [p["drop_lower"] for p in pts], [p["drop_upper"] for p in pts]
            if all(v is not None and math.isfinite(v) for v in lo + hi):
                ax.fill_between(x, lo, hi, color=colors[sid], alpha=0.15, linewidth=0)
            best = next((p for p in pts if p["fraction"] == chosen.get(sid, {}).get("max_fraction")), None)
            if best is not None and best["fraction"] > 0:
                ax.plot([best["pct_zeroed"]], [best["drop"]], marker="*", markersize=14, color=colors[sid],
                        markeredgecolor="k", linestyle="none")
        ax.axhline(self.max_drop, color="k", linewidth=0.8, linestyle=":", label=f"budget {self.max_drop:g}")
        ax.axhline(0.0, color="0.7", linewidth=0.6)
        ax.set_xlabel(f"% of heads zeroed ({self.mode})")
        ax.set_ylabel(f"{self.baseline['metric']} drop (paired, one-sided {100 * band:g}% band)")
        ax.set_title("drop vs. heads zeroed; * = largest fraction within budget")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "max_drop": self.max_drop, "task": self.task, "baseline": self.baseline,
                "rows": self.rows, "table": self.table(), **self.meta}

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """``sweep.json``, ``sweep.csv``, ``table.md``, ``table.csv`` and ``sweep.png`` in ``out_dir``."""
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            write_json_atomic(tmp / "sweep.json", self.to_dict())
            (tmp / "sweep.csv").write_text(self.rows_csv())
            (tmp / "table.md").write_text(self.table_markdown())
            (tmp / "table.csv").write_text(self.table_csv())
            self.plot(tmp / "sweep.png")
        return Path(out_dir)


def _passes(baseline: dict[str, Any], value: float, max_drop: float) -> bool:
    class _R:
        def __init__(self, v: float) -> None:
            self.value, self.higher_is_better = v, baseline["higher_is_better"]

    return within_budget(_R(baseline["value"]), _R(value), max_drop, False)


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _drop_columns(baseline: Any, result: Any, max_drop: float, confidence: float, band: float) -> dict[str, Any]:
    """The row's paired drop (estimate, stderr, ``band`` bounds) and its verdict at ``confidence``."""
    verdict = judge(baseline, result, make_budget(max_drop, False, confidence)).within_budget
    try:
        d = paired_drop(baseline, result, confidence=band)
    except PruneHeadsError:  # no per-document scores and no standard errors: the point estimate only
        d = paired_drop(baseline, result, confidence=0.0)
    return {"within_budget": verdict, "drop": d.estimate, "drop_stderr": d.stderr, "drop_lower": d.lower,
            "drop_upper": d.upper}


def _csv(rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


@contextlib.contextmanager
def _capturing_dynamic(model: nn.Module, score_id: str, threshold: float, sink: dict[str, Any]) -> Iterator[Any]:
    from prune_heads.model.masking import dynamic_mask

    with dynamic_mask(model, score_id, threshold) as stats:
        sink["stats"] = stats
        yield stats


def run_sweep(model: nn.Module, scores: HeadScores, evaluator: Any, *, score_ids: Sequence[str],
              fractions: Sequence[float] = DEFAULT_FRACTIONS, dynamic: bool = False, random_seeds: Sequence[int] = (0,),
              max_drop: float = 0.01, progress: bool = True, confidence: float = 0.0, band: float = 0.9) -> SweepResult:
    """Evaluate every (score, fraction) pair, plus a random ranking per seed; see the module docstring.

    ``confidence``: a fraction is within budget only if the upper one-sided bound of its paired drop is
    (0: the point estimate, the paper's rule); ``band``: the one-sided level of the plotted band.

    Static rankings are global and unconstrained (a layer may lose every head), as in the paper:
    the sweep measures scores, it does not produce an exportable plan. The random baseline zeroes
    random heads statically in both modes.
    """
    layout = get_adapter(model).layout(model.config)
    scores.check(model)
    make_budget(max_drop, False, confidence)  # bad --max-drop / --confidence: fail before evaluating
    check_confidence(band)
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] < 0 or fractions[-1] > 1:
        raise PruneHeadsError(f"fractions must lie in [0, 1], got {fractions}")
    if 0.0 not in fractions:
        fractions = [0.0, *fractions]
    ids = [s for s in score_ids if s != RANDOM_SCORE]
    if not ids and not random_seeds:
        raise PruneHeadsError("nothing to sweep: give at least one score or a random seed")
    rankings: dict[tuple[str, int | None], torch.Tensor] = {}
    for sid in ids:
        rankings[(sid, None)] = ranking(scores, sid, layout)  # validates ids, warns on raw scores
        if dynamic:
            scores.per_sample(sid)  # dynamic thresholds need per-sample values: fail before evaluating
    for seed in random_seeds:
        rankings[(RANDOM_SCORE, int(seed))] = ranking(None, RANDOM_SCORE, layout, int(seed))

    baseline = evaluator(None)
    base_d = result_dict(baseline)
    total = layout.total_heads
    rows: list[dict[str, Any]] = []
    n_evals = len(rankings) * (len(fractions) - 1)
    bar = tqdm(total=n_evals, desc="sweep", unit="eval", disable=not progress)
    for (sid, seed), values in rankings.items():
        units = candidate_units(values, layout, "free", 0, allow_empty_layers=True)
        for f in fractions:
            threshold = None
            if f == 0.0:
                result, zeroed = baseline, 0.0
            elif dynamic and sid != RANDOM_SCORE:
                from prune_heads.model.masking import threshold_for_fraction

                threshold = threshold_for_fraction(scores, sid, f)
                sink: dict[str, Any] = {}
                result = evaluator(context=lambda m, s=sid, t=threshold, k=sink: _capturing_dynamic(m, s, t, k))
                stats = sink.get("stats")
                zeroed = stats.fraction_zeroed * total if stats is not None else float("nan")
                bar.update(1)
            else:
                k = round(f * total)
                result = evaluator(removal_mask(units, k, layout))
                zeroed = float(k)
                bar.update(1)
            rows.append({
                "score": sid, "seed": seed, "fraction": f, "heads_zeroed": round(zeroed, 2),
                "pct_zeroed": 100.0 * zeroed / total, "metric": result.metric, "value": float(result.value),
                "stderr": None if result.stderr is None else float(result.stderr), "n": int(result.n),
                "threshold": threshold, **_drop_columns(baseline, result, max_drop, confidence, band),
            })
    bar.close()
    return SweepResult(base_d, rows, "dynamic" if dynamic else "static", max_drop,
                       task=getattr(evaluator, "task_config", None),
                       meta={"heads_total": total, "fractions": fractions, "random_seeds": list(random_seeds),
                             "confidence": confidence, "band": band})


def load_sweep(path: str | os.PathLike) -> SweepResult:
    """A saved sweep (``sweep.json`` or its directory), e.g. to re-plot it."""
    p = Path(path)
    if p.is_dir():
        p = p / "sweep.json"
    d = json.loads(p.read_text())
    meta = {k: v for k, v in d.items() if k not in ("mode", "max_drop", "task", "baseline", "rows", "table")}
    return SweepResult(d["baseline"], d["rows"], d["mode"], d["max_drop"], d.get("task"), meta)
