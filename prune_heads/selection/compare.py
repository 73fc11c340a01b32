"""Every selector on the same model, data and budget, side by side.

Selectors: static with each proxy score in the scores file, ``random``, static ranked by measured
``ablation_kl``, ``iterative`` and ``gates`` (trained once, then its ``log_alpha`` ranking is searched
under the same budget as the static ones). Each plan is scored on held-out documents (the
evaluator's ``verify`` split) and, optionally, perplexity. Writes ``results.md``, ``results.json``,
``accuracy_vs_removed.png`` and every plan under ``plans/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prune_heads.errors import PruneHeadsError
from prune_heads.schema import Config, ConfigError, option

PROXY_EXCLUDE = ("ablation_kl", "ablation_loss")


class SharedMeasurement(NamedTuple):
    """Budget-independent work a measured selector ranks by, with its cost (charged to every row using it)."""

    scores: Any  # HeadScores whose ``ablation_kl`` ranks the heads; None when it failed
    wall_seconds: float
    forward_equivalents: float
    error: str | None = None


@dataclass
class CompareConfig(Config):
    task: str = option("", required=True, help="Evaluation task (lm-eval name, mc:FILE.jsonl, ppl:DATA or kl:DATA).")
    max_drop: list[float] = option(default_factory=list, required=True, help="Budget(s): one line per selector and budget.")
    relative: bool = option(False, help="--max-drop is a fraction of the baseline.")
    ppl_data: str | None = option(None, help="Also report perplexity on this data spec (e.g. wikitext2).")
    limit: int | None = option(None, ge=1, help="Documents per evaluation split.")
    ppl_limit: int | None = option(None, ge=1, help="Documents of the perplexity report.")
    calib_data: str | None = option(None, help="Data the measured selectors train/measure on (default: the scores' "
                                               "own calibration tokens).")
    calib_samples: int = option(8, ge=1, help="With --calib-data: documents.")
    calib_len: int = option(128, ge=2, help="With --calib-data: tokens per document.")
    round_size: int = option(4, ge=1, help="Iterative: units removed per round.")
    candidates_fraction: float | None = option(None, gt=0, le=1,
                                               help="Iterative: re-measure only this fraction of heads (least harmful "
                                                    "at the first measurement).")
    gates_fraction: float = option(0.3, gt=0, lt=1, help="Gates: fraction of heads the gates are trained to close.")
    gates_steps: int = option(100, ge=1, help="Gates: training steps.")
    gates_lr: float = option(0.1, gt=0, help="Gates: learning rate.")
    selectors: list[str] | None = option(None, help="Subset to run (static:ID, random, static:ablation_kl, iterative, gates).")

    def check(self) -> None:
        if not self.max_drop or not all(d >= 0 for d in self.max_drop):  # (NaN is not >= 0)
            raise ConfigError("max_drop", f"must be one or more numbers >= 0, got {self.max_drop}")


@dataclass
class _Setup:
    model: Any
    tokenizer: Any
    scores: Any
    seqs: list[list[int]]
    search: Any
    held: Any
    ppl: Any
    layout: Any
    progress: bool

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def _selector_names(cfg: CompareConfig, scores: Any) -> list[str]:
    proxies = [s for s in scores.score_ids if s not in PROXY_EXCLUDE]
    names = [f"static:{s}" for s in proxies] + ["random", "static:ablation_kl", "iterative", "gates"]
    if cfg.selectors:
        unknown = set(cfg.selectors) - set(names)
        if unknown:
            raise PruneHeadsError(f"unknown selector(s) {sorted(unknown)}; available: {', '.join(names)}")
        names = [n for n in names if n in cfg.selectors]
    return names


def _measure_shared(cfg: CompareConfig, s: _Setup, names: list[str], shared: dict[str, SharedMeasurement]) -> None:
    """The budget-independent work of the measured selectors, once (its cost is charged to each user)."""
    import torch  # here, not at the top: the CLI imports ``CompareConfig`` from this module

    from prune_heads.scoring.ablation import ablation_scores
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.gates import GatesDidNotConverge, select_gates

    if "static:ablation_kl" in names and "ablation" not in shared:
        t0 = time.time()
        abl = ablation_scores(s.model, s.seqs, scores=["ablation_kl"], pad_id=s.pad_id, progress=s.progress)
        cost = ablation_cost(abl)
        abl.meta = dict(s.scores.meta)
        shared["ablation"] = SharedMeasurement(s.scores.merged(abl), time.time() - t0, cost)
    if "gates" in names and "gates" not in shared:
        t0 = time.time()
        try:
            gplan = select_gates(s.model, s.seqs, target_fraction=cfg.gates_fraction, steps=cfg.gates_steps,
                                 lr=cfg.gates_lr, pad_id=s.pad_id, progress=s.progress)
        except GatesDidNotConverge as e:  # a row that says so, not a lost comparison
            shared["gates"] = SharedMeasurement(None, time.time() - t0, 0.0, str(e))
        else:
            la = torch.tensor(gplan.selection.details.log_alpha)[None]
            shared["gates"] = SharedMeasurement(HeadScores({"ablation_kl": la}, dict(s.scores.meta)), time.time() - t0,
                                                float(gplan.selection.cost.forward_equivalents or 0.0))


def _one_row(cfg: CompareConfig, s: _Setup, name: str, drop: float, shared: dict[str, SharedMeasurement]
             ) -> tuple[dict[str, Any], Any]:
    """One selector under one budget: its row, and its plan (None when it could not make one)."""
    from prune_heads.selection.iterative import select_iterative
    from prune_heads.selection.static import RANDOM_SCORE, select_static

    calls0, t0 = s.search.calls, time.time()
    fwd, extra_wall = 0.0, 0.0
    if name == "iterative":
        plan = select_iterative(s.model, s.seqs, s.search, max_drop=drop, relative=cfg.relative,
                                round_size=cfg.round_size, candidates_fraction=cfg.candidates_fraction,
                                pad_id=s.pad_id, progress=s.progress)
        fwd = plan.selection.cost.forward_equivalents or 0.0
    elif name in ("gates", "static:ablation_kl"):
        measured = shared["gates" if name == "gates" else "ablation"]
        extra_wall, fwd = measured.wall_seconds, measured.forward_equivalents
        if measured.error:
            return ({"selector": name, "max_drop": drop, "heads_removed": None, "percent_removed": None,
                     "held_out": None, "perplexity": None, "evaluations": 0, "forward_equivalents": None,
                     "wall_seconds": round(extra_wall, 1), "error": measured.error}, None)
        plan = select_static(s.model, measured.scores, s.search, score_id="ablation_kl", max_drop=drop,
                             relative=cfg.relative, progress=False)
    else:
        sid = RANDOM_SCORE if name == "random" else name.split(":", 1)[1]
        plan = select_static(s.model, s.scores, s.search, score_id=sid, max_drop=drop, relative=cfg.relative,
                             progress=False)
    wall = time.time() - t0 + extra_wall
    mask = plan.mask(s.layout)
    h, p = s.held(mask), (s.ppl(mask) if s.ppl else None)
    n = len(plan.removed_heads)
    return ({"selector": name, "max_drop": drop, "heads_removed": n,
             "percent_removed": round(100.0 * n / s.layout.total_heads, 2), "held_out": h.value,
             "perplexity": p.value if p else None, "evaluations": s.search.calls - calls0,
             "forward_equivalents": round(fwd, 1), "wall_seconds": round(wall, 1)}, plan)


def calibration_tokens(cfg: CompareConfig, scores: Any, tokenizer: Any, model: Any) -> list[list[int]]:
    """``--calib-data`` tokenised the one way every stage does, else the scores' own calibration tokens."""
    if cfg.calib_data is None:
        return scores.require_tokens()
    from prune_heads.data import DataSpec, calibration_sequences

    spec = DataSpec(source=cfg.calib_data, num_samples=cfg.calib_samples, seq_len=cfg.calib_len, seed=0)
    return calibration_sequences(spec, tokenizer, model)


def run_comparison(cfg: CompareConfig, model: Any, tokenizer: Any, scores: Any, out: str | Path, *,
                   overwrite: bool = False, progress: bool = True, calib_seqs: list[list[int]] | None = None,
                   shared: dict[str, SharedMeasurement] | None = None) -> list[dict[str, Any]]:
    """Run the selectors and write the comparison to ``out``; returns one row per (selector, budget).

    ``shared``: pass the same dict to several calls on one model and calibration set (e.g. an
    accuracy budget and a perplexity budget) and the budget-independent work, the ablation
    measurement and the gate training, is done once; its cost is still charged to each row.
    """
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import check_output_dir
    from prune_heads.model.adapters import get_adapter

    check_output_dir(out, overwrite)
    scores.check(model)
    seqs = calib_seqs if calib_seqs is not None else calibration_tokens(cfg, scores, tokenizer, model)
    s = _Setup(model, tokenizer, scores, seqs,
               make_evaluator(model, tokenizer, cfg.task, limit=cfg.limit, split="search"),
               make_evaluator(model, tokenizer, cfg.task, limit=cfg.limit, split="verify"),
               make_evaluator(model, tokenizer, f"ppl:{cfg.ppl_data}", limit=cfg.ppl_limit) if cfg.ppl_data else None,
               get_adapter(model).layout(model.config), progress)
    names = _selector_names(cfg, scores)
    shared = {} if shared is None else shared
    _measure_shared(cfg, s, names, shared)
    held_base, ppl_base = s.held(None), (s.ppl(None) if s.ppl else None)
    rows: list[dict[str, Any]] = [{"selector": "unpruned", "max_drop": None, "heads_removed": 0, "percent_removed": 0.0,
                                   "held_out": held_base.value, "perplexity": ppl_base.value if ppl_base else None,
                                   "evaluations": 0, "forward_equivalents": 0.0, "wall_seconds": 0.0}]
    plans: dict[str, Any] = {}
    for drop in cfg.max_drop:
        for name in names:
            row, plan = _one_row(cfg, s, name, drop, shared)
            rows.append(row)
            if plan is not None:
                plans[f"{name.replace(':', '_')}_{drop}"] = plan
    _write(cfg, out, overwrite, rows, plans, held_base.metric, len(seqs))
    return rows


def _write(cfg: CompareConfig, out: str | Path, overwrite: bool, rows: list[dict[str, Any]], plans: dict[str, Any],
           metric: str, num_samples: int) -> None:
    from prune_heads.io_utils import atomic_dir, write_json_atomic

    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "results.json", {"task": cfg.task, "metric": metric, "max_drops": cfg.max_drop,
                                                  "ppl_data": cfg.ppl_data, "rows": rows,
                                                  "calibration": {"num_samples": num_samples}})
        (tmp / "results.md").write_text(markdown_table(rows, metric, cfg.task, cfg.ppl_data))
        plot(rows, metric, tmp / "accuracy_vs_removed.png")
        (tmp / "plans").mkdir()
        for key, plan in plans.items():
            plan.save(tmp / "plans" / f"{key}.json")


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
