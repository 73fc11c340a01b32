"""The run summary: what a run produced, read from the stages' own files, and its markdown table.

Everything is read from the typed outputs (the plan's ``SelectionResult``, the export's provenance, the
verification record, the evaluation's ``results.json``), so the summary says exactly what the stages
recorded and can be rendered again from a work directory (``render_summary``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Summary:
    recipe: str
    model: str
    workdir: str
    complete: bool
    stages: dict[str, str] = field(default_factory=dict)
    heads_total: int | None = None
    heads_removed: int | None = None
    kv_heads_removed: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # {task, split, baseline, pruned}
    speed: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None
    export_dir: str | None = None
    plan: str | None = None
    report: str | None = None
    hub_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [f"# prune-heads run: {self.recipe}", "", f"Model `{self.model}`; work directory `{self.workdir}`.", "",
                 "| | original | pruned | change |", "|---|---|---|---|"]
        lines += [_metric_row(m) for m in self.metrics]
        if self.heads_total is not None and self.heads_removed is not None:
            frac = self.heads_removed / self.heads_total if self.heads_total else 0.0
            lines.append(f"| attention heads | {self.heads_total} | {self.heads_total - self.heads_removed} | "
                         f"-{self.heads_removed} ({frac:.1%}) |")
        if self.params_before and self.params_after:
            d = self.params_before - self.params_after
            lines.append(f"| parameters | {self.params_before:,} | {self.params_after:,} | -{d:,} ({d / self.params_before:.2%}) |")
        lines += [_speed_row(s) for s in (self.speed or {}).values() if s and "ratio" in s]
        lines.append("")
        lines += self._notes()
        lines += ["", "Stages: " + ", ".join(f"{k} {v}" for k, v in self.stages.items())]
        if not self.complete:
            lines += ["", "The run stopped early; rerun the same command to continue."]
        return "\n".join(lines) + "\n"

    def _notes(self) -> list[str]:
        out = []
        if self.selection:
            s = self.selection
            out.append(f"Selection: method `{s['method']}`, score `{s['score']}`, policy `{s['policy']}`, "
                       f"compensation `{s['compensation']}`, budget {s['budget']}, task `{s['task']}`"
                       f"{' at ' + str(s['seq_len']) + ' tokens' if s.get('seq_len') else ''}.")
            for g in s.get("guards") or []:
                out.append(f"Guard at {g['seq_len']} tokens: `{g['task']}` within {g['budget']}; {g['metric']} "
                           f"{g['baseline']:.4f} -> {g['result']:.4f} on the guard's search documents "
                           f"({'within' if g['within_budget'] else 'NOT within'} budget; {g['refused']} probe(s) "
                           f"refused), held out: {g['verdict'] or 'not checked'}.")
        if self.verification is not None:
            v = self.verification
            out.append(f"Export check: max |logit difference| {v['max_abs_logit_diff']:.3g} (tolerance "
                       f"{v['tolerance']:g}, float64), {'passed' if v['passed'] else 'NOT passed'}.")
        for key, label in (("export_dir", "Exported model"), ("plan", "Plan"), ("report", "Score report"),
                           ("hub_url", "Pushed to")):
            if getattr(self, key):
                out.append(f"{label}: {getattr(self, key)}")
        return out


def _speed_row(s: dict[str, Any]) -> str:
    """Tokens per second of both models and the time ratio beside what the FLOPs predict."""
    after = "" if s["mode"] == "prefill" else f" after {s['context']}"
    orig, pruned = s["tokens_per_s"]
    placements = s.get("placements", 1)
    runs = (f"{s['repeats']} interleaved" if placements == 1 else
            f"{s['repeats']} interleaved over {placements} weight placements")
    return (f"| {s['mode']} tokens/s ({s['tokens']} tokens{after}, {s['device']}, {s['threads']} threads, median of "
            f"{runs}) | {orig:.0f} | {pruned:.0f} | time x{s['ratio']:.2f} (FLOPs predict x{s['flops_ratio']:.2f}) |")


def _units(r: dict[str, Any]) -> str:
    """``n`` counts tokens for perplexity/KL and documents for accuracy: say which."""
    metric = r.get("metric", "")
    return f"{r.get('n', '?')} {'tokens' if metric in ('perplexity', 'kl') else 'documents'}"


def _fmt(r: dict[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    s = f"{r['value']:.4f}"
    return s + (f" ± {r['stderr']:.4f}" if r.get("stderr") is not None else "")


def _metric_row(m: dict[str, Any]) -> str:
    b, p = m.get("baseline") or {}, m.get("pruned") or {}
    at = f" at {m['seq_len']} tokens" if m.get("seq_len") else ""
    label = f"{m['task']}{at} {b.get('metric', '')} ({m.get('split', 'all')}, {_units(b or p)})"
    change = f"{p['value'] - b['value']:+.4f}" if b.get("value") is not None and p.get("value") is not None else ""
    return f"| {label} | {_fmt(b)} | {_fmt(p)} | {change} |"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def selection_brief(plan: Any) -> dict[str, Any]:
    s = plan.selection
    budget = None if s.budget is None else {"max_drop": s.budget.max_drop, "relative": s.budget.relative,
                                            "confidence": s.budget.confidence}
    if getattr(s.details, "fixed", False):  # a fixed count: no budget was searched or claimed
        budget = "none (fixed count)"
    return {"method": s.method, "score": s.score_id, "policy": s.policy, "budget": budget,
            "task": (s.task or {}).get("task"), "seq_len": (s.task or {}).get("seq_len"),
            "compensation": (s.compensation or {}).get("mode", "none"),
            "guards": [b for b in map(guard_brief, s.guards) if b is not None]}


def guard_brief(g: Any) -> dict[str, Any] | None:
    """What the summary says of the guard at the serving length (None without one)."""
    if g is None or not g.baseline or not g.result:
        return None
    return {"task": (g.task or {}).get("task"), "seq_len": g.seq_len, "metric": g.baseline.get("metric"),
            "budget": {"max_drop": g.budget.max_drop, "relative": g.budget.relative,
                       "confidence": g.budget.confidence},
            "baseline": g.baseline["value"], "result": g.result["value"], "within_budget": g.within_budget,
            "refused": len(g.refused), "verdict": g.verification.verdict if g.verification else None}


def build_summary(recipe: Any, wd: Path, outcomes: dict[str, Any], complete: bool) -> Summary:
    """The summary of a work directory after a run (stages that did not run contribute nothing)."""
    from prune_heads.plan import Plan

    done = {k for k, v in outcomes.items() if v.status != "skipped"}
    s = Summary(recipe=recipe.name, model=recipe.model.id, workdir=str(wd), complete=complete,
                stages={k: v.status for k, v in outcomes.items()})
    if "select" in done:
        plan = Plan.load(wd / "select" / "plan.json")
        s.heads_total, s.heads_removed = plan.selection.heads_total, len(plan.removed_heads)
        s.selection, s.plan = selection_brief(plan), str(wd / "select" / "plan.json")
    if "export" in done:
        from prune_heads.export.record import ExportRecord

        rec = ExportRecord.load(wd / "export" / "model")
        s.params_before, s.params_after, s.kv_heads_removed = rec.params_before, rec.params_after, rec.kv_heads_removed
        s.export_dir = str(wd / "export" / "model")
    if "verify" in done:
        from prune_heads.export.record import VerificationRecord

        s.verification = VerificationRecord.load(wd / "verify" / "verification.json").to_dict()
    if "evaluate" in done:
        from prune_heads.evaluation.stage import EvaluationResult

        res = EvaluationResult.load(wd / "evaluate" / "results.json")
        s.metrics = [{"task": t.task["task"], "split": t.task.get("split", "all"), "baseline": t.baseline,
                      "pruned": t.pruned, "seq_len": t.task.get("seq_len")} for t in res.tasks]
        s.speed = res.speed
    if "report" in done:
        s.report = str(wd / "report" / "plots" / "report.md")
    if "push" in done:
        s.hub_url = (_read(wd / "push" / "push.json") or {}).get("url")
    return s
