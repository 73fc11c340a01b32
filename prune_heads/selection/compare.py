"""Every selector on the same model, data and budget, side by side on the same model, data and budget, side by side.

Selectors: static with each proxy score in the scores file, ``random``, static ranked by measured
``ablation_kl``, ``iterative`` and ``gates`` (trained once, then its ``log_alpha`` ranking is searched
under the same budget as the static ones). Each plan is scored on held-out documents (the
evaluator's ``verify`` split) and, optionally, perplexity. Writes ``results.md``, ``results.json``,
``accuracy_vs_removed.png`` and every plan under ``plans/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

PROXY_EXCLUDE = ("ablation_kl", "ablation_loss")


class SharedMeasurement(NamedTuple):
    """Budget-independent work a measured selector ranks by, with its cost (charged to every row using it)."""

    scores: Any  # HeadScores whose ``ablation_kl`` ranks the heads; None when it failed
    wall_seconds: float
    forward_equivalents: float
    error: str | None = None


def _calibration_seqs(tokenizer: Any, model: Any, data: str, num: int, seq_len: int) -> list[list[int]]:
    from prune_heads.data import DataSpec, iter_documents, tokenize_documents
    from prune_heads.model.adapters import get_adapter

    ctx = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
    spec = DataSpec(source=data, num_samples=num, seq_len=seq_len, seed=1)
    return tokenize_documents(iter_documents(data), tokenizer, spec, ctx)


def run_comparison(model: Any, tokenizer: Any, scores: Any, task: str, max_drops: list[float], out: str | Path, *,
                   ppl_data: str | None = None, limit: int | None = None, ppl_limit: int | None = None,
                   calib_data: str = "wikitext2", calib_samples: int = 8, calib_len: int = 128,
                   relative: bool = False, round_size: int = 4, candidates_fraction: float | None = None,
                   gates_fraction: float = 0.3, gates_steps: int = 100, gates_lr: float = 0.1,
                   selectors: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                   calib_seqs: list[list[int]] | None = None,
                   shared: dict[str, SharedMeasurement] | None = None) -> list[dict[str, Any]]:
    """Run the selectors and write the comparison to ``out``; returns one row per (selector, budget).

    ``shared``: pass the same dict to several calls on one model and calibration set (e.g. an
    accuracy budget and a perplexity budget) and the budget-independent work, the ablation
    measurement and the gate training, is done once; its cost is still charged to each row.
    """
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import atomic_dir, check_output_dir, write_json_atomic
    from prune_heads.model.adapters import get_adapter
    from prune_heads.scoring.ablation import ablation_scores
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.gates import GatesDidNotConverge, select_gates
    from prune_heads.selection.iterative import select_iterative
    from prune_heads.selection.static import RANDOM_SCORE, select_static

    check_output_dir(out, overwrite)
    scores.check(model)
    layout = get_adapter(model).layout(model.config)
    pad_id = int(tokenizer.pad_token_id) if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    seqs = calib_seqs if calib_seqs is not None else _calibration_seqs(tokenizer, model, calib_data, calib_samples, calib_len)
    search = make_evaluator(model, tokenizer, task, limit=limit, split="search")
    held = make_evaluator(model, tokenizer, task, limit=limit, split="verify")
    ppl = make_evaluator(model, tokenizer, f"ppl:{ppl_data}", limit=ppl_limit) if ppl_data else None

    proxies = [s for s in scores.score_ids if s not in PROXY_EXCLUDE]
    names = [f"static:{s}" for s in proxies] + ["random", "static:ablation_kl", "iterative", "gates"]
    if selectors:
        unknown = set(selectors) - set(names)
        if unknown:
            from prune_heads.errors import PruneHeadsError

            raise PruneHeadsError(f"unknown selector(s) {sorted(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in selectors]

    # one-off measurements shared by the measured selectors (their cost is charged to each user)
    shared = {} if shared is None else shared
    if "static:ablation_kl" in names and "ablation" not in shared:
        t0 = time.time()
        abl = ablation_scores(model, seqs, scores=["ablation_kl"], pad_id=pad_id, progress=progress)
        cost = ablation_cost(abl)
        abl.meta = dict(scores.meta)
        shared["ablation"] = SharedMeasurement(scores.merged(abl), time.time() - t0, cost)
    if "gates" in names and "gates" not in shared:
        t0 = time.time()
        try:
            gplan = select_gates(model, seqs, target_fraction=gates_fraction, steps=gates_steps, lr=gates_lr,
                                 pad_id=pad_id, progress=progress)
        except GatesDidNotConverge as e:  # a row that says so, not a lost comparison
            shared["gates"] = SharedMeasurement(None, time.time() - t0, 0.0, str(e))
        else:
            la = torch.tensor(gplan.selection.details.log_alpha)[None]
            shared["gates"] = SharedMeasurement(HeadScores({"ablation_kl": la}, dict(scores.meta)), time.time() - t0,
                                                float(gplan.selection.cost.forward_equivalents or 0.0))

    held_base, ppl_base = held(None), (ppl(None) if ppl else None)
    rows: list[dict[str, Any]] = [{"selector": "unpruned", "max_drop": None, "heads_removed": 0, "percent_removed": 0.0,
                                   "held_out": held_base.value, "perplexity": ppl_base.value if ppl_base else None,
                                   "evaluations": 0, "forward_equivalents": 0.0, "wall_seconds": 0.0}]
    plans: dict[str, Any] = {}
    for drop in max_drops:
        for name in names:
            calls0, t0 = search.calls, time.time()
            fwd, extra_wall = 0.0, 0.0
            if name == "iterative":
                plan = select_iterative(model, seqs, search, max_drop=drop, relative=relative, round_size=round_size,
                                        candidates_fraction=candidates_fraction, pad_id=pad_id, progress=progress)
                fwd = plan.selection.cost.forward_equivalents or 0.0
            elif name in ("gates", "static:ablation_kl"):
                measured = shared["gates" if name == "gates" else "ablation"]
                extra_wall, fwd = measured.wall_seconds, measured.forward_equivalents
                if measured.error:
                    rows.append({"selector": name, "max_drop": drop, "heads_removed": None, "percent_removed": None,
                                 "held_out": None, "perplexity": None, "evaluations": 0, "forward_equivalents": None,
                                 "wall_seconds": round(extra_wall, 1), "error": measured.error})
                    continue
                plan = select_static(model, measured.scores, search, score_id="ablation_kl", max_drop=drop, relative=relative, progress=False)
            else:
                sid = RANDOM_SCORE if name == "random" else name.split(":", 1)[1]
                plan = select_static(model, scores, search, score_id=sid, max_drop=drop, relative=relative, progress=False)
            wall = time.time() - t0 + extra_wall
            mask = plan.mask(layout)
            h, p = held(mask), (ppl(mask) if ppl else None)
            n = len(plan.removed_heads)
            rows.append({"selector": name, "max_drop": drop, "heads_removed": n,
                         "percent_removed": round(100.0 * n / layout.total_heads, 2), "held_out": h.value,
                         "perplexity": p.value if p else None, "evaluations": search.calls - calls0,
                         "forward_equivalents": round(fwd, 1), "wall_seconds": round(wall, 1)})
            plans[f"{name.replace(':', '_')}_{drop}"] = plan

    metric = held_base.metric
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "results.json", {"task": task, "metric": metric, "max_drops": max_drops,
                                                  "ppl_data": ppl_data, "rows": rows,
                                                  "calibration": {"num_samples": len(seqs)}})
        (tmp / "results.md").write_text(markdown_table(rows, metric, task, ppl_data))
        plot(rows, metric, tmp / "accuracy_vs_removed.png")
        (tmp / "plans").mkdir()
        for key, plan in plans.items():
            plan.save(tmp / "plans" / f"{key}.json")
    return rows


def ablation_cost(hs: Any) -> float:
    return float(hs.meta.get("ablation", {}).get("cost", {}).get("forward_equivalents", 0.0))


def markdown_table(rows: list[dict[str, Any]], metric: str, task: str, ppl_data: str | None) -> str:
    def f(x: Any, nd: int = 4) -> str:
        return "-" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))

    lines = [f"| selector | max drop | heads removed | % removed | held-out {metric} ({task}) | perplexity"
             f"{' (' + ppl_data + ')' if ppl_data else ''} | evaluations | forward passes (seq-equiv.) | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['selector']} | {f(r['max_drop'])} | no plan: {r['error']} | - | - | - | - | - | "
                         f"{r['wall_seconds']} |")
            continue
        lines.append(f"| {r['selector']} | {f(r['max_drop'])} | {r['heads_removed']} | {r['percent_removed']} | "
                     f"{f(r['held_out'])} | {f(r['perplexity'])} | {r['evaluations']} | {r['forward_equivalents']} | "
                     f"{r['wall_seconds']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["selector"] == "unpruned")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["selector"] for r in rows if r["selector"] != "unpruned"):
        pts = sorted((r["percent_removed"], r["held_out"]) for r in rows if r["selector"] == name and not r.get("error"))
        pts = [(0.0, base["held_out"]), *pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("% of heads removed")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
