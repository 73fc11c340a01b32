"""Every selector on the same model, data and budget, side by side: a loop of ``run_select``.

Each row is ``run_select`` with ``dataclasses.replace(select, method=..., max_drop=...)``: the selection's
own config (task, limit, seed, few-shot, data folder, confidence, compensation, policy, verification)
is the one ``prune-heads select`` takes, so a row is exactly the plan ``select`` would write with those
options. Selectors: static with each proxy score in the scores file, ``random``, static ranked by measured
``ablation_kl`` (measured once with the selection's compensation when the scores lack it), ``iterative``
and ``gates`` (when a target is given; its plan does not depend on the budget, so it is trained once and
repeated under each budget). Each row reports the plan's held-out verification and, optionally, the
perplexity of the compensated masked model. Writes ``results.md``, ``results.json``,
``accuracy_vs_removed.png`` and every plan (with its compensation file) under ``plans/``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prune_heads.errors import PruneHeadsError
from prune_heads.schema import Config, option

PROXY_EXCLUDE = ("ablation_kl", "ablation_loss")


class SharedMeasurement(NamedTuple):
    """Budget-independent work a measured selector ranks by, with its cost (charged to every row using it)."""

    scores: Any  # HeadScores whose ``ablation_kl`` ranks the heads; None when it failed
    wall_seconds: float
    forward_equivalents: float
    error: str | None = None


def _budgets(v: Any) -> str | None:
    return None if all(d >= 0 for d in v) else f"must be numbers >= 0, got {v}"  # (NaN is not >= 0)


@dataclass
class CompareConfig(Config):
    """What ``compare-selectors`` adds to ``select``'s options (everything else is the ``SelectConfig``)."""

    selectors: list[str] | None = option(None, help="Subset to run (static:ID, random, static:ablation_kl, iterative, "
                                                     "gates; gates needs --target-fraction or --l0-penalty).")
    budgets: list[float] | None = option(None, check=_budgets,
                                         help="Budgets to compare, each in place of --max-drop (default: --max-drop).")
    ppl_data: str | None = option(None, help="Also report perplexity on this data spec (e.g. wikitext2).")
    ppl_limit: int | None = option(None, ge=1, help="Documents of the perplexity report.")


def method_configs(iterative: Any = None, gates: Any = None) -> dict[str, Any]:
    """The method of each selector name (``static:ID`` is built per score): the iterative method's options as
    given (default ``IterativeMethod()``), and gates only when configured."""
    from prune_heads.selection.stage import IterativeMethod

    out = {"iterative": iterative if iterative is not None else IterativeMethod()}
    if gates is not None:
        out["gates"] = gates
    return out


@dataclass
class _Setup:
    select: Any  # SelectConfig
    loaded: Any
    scores: Any
    methods: dict[str, Any]
    ppl: Any
    layout: Any
    progress: bool

    @property
    def pad_id(self) -> int:
        tok = self.loaded.tokenizer
        return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def _selector_names(cfg: CompareConfig, scores: Any, methods: dict[str, Any]) -> list[str]:
    proxies = [s for s in scores.score_ids if s not in PROXY_EXCLUDE]
    names = [f"static:{s}" for s in proxies] + ["random", "static:ablation_kl", "iterative"]
    available = names + ["gates"]
    if "gates" in methods:
        names.append("gates")
    if cfg.selectors:
        unknown = set(cfg.selectors) - set(available)
        if unknown:
            raise PruneHeadsError(f"unknown selector(s) {sorted(unknown)}; available: {', '.join(available)}")
        if "gates" in cfg.selectors and "gates" not in methods:
            raise PruneHeadsError("the gates selector needs its target: --target-fraction F or --l0-penalty P")
        names = [n for n in available if n in cfg.selectors]
    return names


def _ablation(s: _Setup, shared: dict[str, SharedMeasurement]) -> SharedMeasurement:
    """Scores with ``ablation_kl``: the scores' own, else measured once (compensated as the selection compensates,
    so the ranking measures the removal the plan makes) and merged in; its cost is charged to the row."""
    if "ablation_kl" in s.scores.score_ids:
        return SharedMeasurement(s.scores, 0.0, 0.0)
    if "ablation" not in shared:
        from prune_heads.compensation.plans import compensator_for
        from prune_heads.scoring.ablation import ablation_scores
        from prune_heads.selection.stage import SelectContext

        t0 = time.time()
        spec = s.select.compensation_spec()
        seqs = SelectContext(s.loaded.model, s.loaded.tokenizer, s.scores, None, None, progress=s.progress,
                             data=s.select.data).calibration_tokens()  # select's --data, else the scores' tokens
        comp = compensator_for(spec, scores=s.scores, model=s.loaded.model, seqs=seqs if spec.sequential else None,
                               batch_size=s.select.batch_size, pad_id=s.pad_id) if spec.active else None
        abl = ablation_scores(s.loaded.model, seqs, scores=["ablation_kl"], batch_size=s.select.batch_size,
                              pad_id=s.pad_id, progress=s.progress, compensation=comp)
        cost = ablation_cost(abl)
        merged = s.scores.merged(abl)
        merged.meta = {**dict(s.scores.meta), "ablation": abl.meta.get("ablation")}
        shared["ablation"] = SharedMeasurement(merged, time.time() - t0, cost)
    return shared["ablation"]


def _config_of(s: _Setup, name: str, drop: float) -> Any:
    """``select``'s config for one row. The options only some methods read (``--surrogate``/``--search`` for
    static, ``--allow-underpowered`` beside a budget search) apply to the rows that read them; the others get
    their defaults, which ``select`` would otherwise refuse as options with no effect."""
    from prune_heads.selection.stage import GatesMethod, StaticMethod

    if name in s.methods:
        method = s.methods[name]
    else:
        method = StaticMethod(score="random" if name == "random" else name.split(":", 1)[1])
    unread: dict[str, Any] = {}
    if not isinstance(method, StaticMethod):
        unread.update(surrogate=None, search=None)
    if isinstance(method, GatesMethod):
        unread["allow_underpowered"] = False
    return dataclasses.replace(s.select, method=method, max_drop=drop, **unread)


def _error_row(name: str, drop: float, wall: float, error: str) -> dict[str, Any]:
    return {"selector": name, "max_drop": drop, "heads_removed": None, "percent_removed": None, "held_out": None,
            "perplexity": None, "evaluations": 0, "forward_equivalents": None, "wall_seconds": round(wall, 1),
            "error": error}


def _one_row(s: _Setup, name: str, drop: float, plans_dir: Path, shared: dict[str, SharedMeasurement]
             ) -> tuple[dict[str, Any], Any]:
    """One selector under one budget: ``run_select`` with the selector's method and the budget; its row and plan."""
    from prune_heads.selection.budget import VerificationFailed
    from prune_heads.selection.gates import GatesDidNotConverge
    from prune_heads.selection.stage import run_select

    scores, extra_wall, fwd = s.scores, 0.0, 0.0
    if name == "static:ablation_kl":
        measured = _ablation(s, shared)
        scores, extra_wall, fwd = measured.scores, measured.wall_seconds, measured.forward_equivalents
    key = f"{name.replace(':', '_')}_{drop}"
    t0 = time.time()
    try:
        plan = run_select(_config_of(s, name, drop), s.loaded, scores, plans_dir / f"{key}.json",
                          progress=s.progress, keep_unverified=plans_dir / f"{key}.unverified.json")
    except GatesDidNotConverge as e:  # a row that says so, not a lost comparison
        return _error_row(name, drop, time.time() - t0, str(e)), None
    except VerificationFailed as e:
        return _error_row(name, drop, time.time() - t0, f"verification failed, kept as plans/{key}.unverified.json: "
                                                         f"{len(e.plan.removed_heads)} heads over budget on held-out "
                                                         "documents"), None
    wall = time.time() - t0 + extra_wall
    sel = plan.selection
    fwd += sel.cost.forward_equivalents or 0.0
    n = len(plan.removed_heads)
    return ({"selector": name, "max_drop": drop, "heads_removed": n,
             "percent_removed": round(100.0 * n / s.layout.total_heads, 2),
             "held_out": sel.verification.result["value"] if sel.verification else None,
             "perplexity": _perplexity(s, plan, scores), "evaluations": sel.cost.evaluations,
             "forward_equivalents": round(fwd, 1), "wall_seconds": round(wall, 1)}, plan)


def _perplexity(s: _Setup, plan: Any, scores: Any) -> float | None:
    """The ``--ppl-data`` perplexity of the model the plan exports (compensated as the plan says)."""
    if s.ppl is None:
        return None
    if not plan.selection.compensated:
        return s.ppl(plan.mask(s.layout)).value
    from prune_heads.compensation.plans import compensation_for_plan, evaluator_with

    comp = compensation_for_plan(plan, scores=scores, model=s.loaded.model, seqs=scores.tokens,
                                 batch_size=s.select.batch_size, pad_id=s.pad_id)
    return evaluator_with(s.ppl, comp)(plan.mask(s.layout)).value


def _gates_rows(s: _Setup, budgets: list[float], plans_dir: Path, shared: dict[str, SharedMeasurement]
                ) -> list[tuple[dict[str, Any], Any]]:
    """Gates choose a fixed fraction whatever the budget: trained once (judged under the first budget), the same
    plan repeated for every budget."""
    row, plan = _one_row(s, "gates", budgets[0], plans_dir, shared)
    return [(row, plan)] + [({**row, "max_drop": d}, None) for d in budgets[1:]]


def run_comparison(select: Any, cfg: CompareConfig, loaded: Any, scores: Any, out: str | Path, *,
                   iterative: Any = None, gates: Any = None, overwrite: bool = False, progress: bool = True,
                   shared: dict[str, SharedMeasurement] | None = None) -> list[dict[str, Any]]:
    """Run every selector with ``select`` (a ``SelectConfig``: task, budget, compensation ...) and write the
    comparison to ``out``; returns one row per (selector, budget).

    ``iterative``/``gates``: the ``IterativeMethod``/``GatesMethod`` of those rows (gates runs only when given).
    ``shared``: pass the same dict to several calls on one model and scores (e.g. an accuracy budget and a
    perplexity budget) and the ablation measurement is done once; its cost is still charged to each row.
    """
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import atomic_dir, check_output_dir
    from prune_heads.model.adapters import get_adapter
    from prune_heads.selection.stage import calibration_documents

    check_output_dir(out, overwrite)
    if select.fixed:
        raise PruneHeadsError("compare-selectors compares searches within a budget: drop --heads/--fraction")
    model = loaded.model
    scores.check(model)
    budgets = list(cfg.budgets or [select.max_drop])
    ppl = make_evaluator(model, loaded.tokenizer, f"ppl:{cfg.ppl_data}", limit=cfg.ppl_limit, data_dir=select.data_dir,
                         batch_size=select.batch_size, seed=select.seed,
                         exclude_docs=calibration_documents(scores)) if cfg.ppl_data else None
    s = _Setup(select, loaded, scores, method_configs(iterative, gates), ppl,
               get_adapter(model).layout(model.config), progress)
    names = _selector_names(cfg, scores, s.methods)
    shared = {} if shared is None else shared
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "plans").mkdir()
        results: list[tuple[dict[str, Any], Any]] = []
        for name in names:
            if name == "gates":
                results += _gates_rows(s, budgets, tmp / "plans", shared)
            else:
                results += [_one_row(s, name, d, tmp / "plans", shared) for d in budgets]
        rows = [r for r, _ in results]
        plans = [p for _, p in results if p is not None]
        rows.insert(0, _unpruned_row(s, plans))
        metric = rows[0].get("metric") or "metric"
        _write_results(tmp, select, cfg, budgets, rows, metric)
        (tmp / "results.md").write_text(markdown_table(rows, metric, select.task, cfg.ppl_data))
        plot(rows, metric, tmp / "accuracy_vs_removed.png")
    return rows


def _unpruned_row(s: _Setup, plans: list[Any]) -> dict[str, Any]:
    """The baseline: the held-out value every plan's verification compared against (the same documents)."""
    ver = next((p.selection.verification for p in plans if p.selection.verification), None)
    return {"selector": "unpruned", "max_drop": None, "heads_removed": 0, "percent_removed": 0.0,
            "held_out": ver.baseline["value"] if ver else None, "metric": ver.baseline["metric"] if ver else None,
            "perplexity": s.ppl(None).value if s.ppl else None, "evaluations": 0, "forward_equivalents": 0.0,
            "wall_seconds": 0.0}


def _write_results(folder: Path, select: Any, cfg: CompareConfig, budgets: list[float],
                           rows: list[dict[str, Any]], metric: str) -> None:
    from prune_heads.io_utils import write_json_atomic

    write_json_atomic(folder / "results.json", {"task": select.task, "metric": metric, "max_drops": budgets,
                                                "ppl_data": cfg.ppl_data, "select": select.to_dict(), "rows": rows})


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
        pts = sorted((r["percent_removed"], r["held_out"]) for r in rows
                     if r["selector"] == name and not r.get("error") and r["held_out"] is not None)
        pts = [(0.0, base["held_out"]), *pts] if base["held_out"] is not None else pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("% of heads removed")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
