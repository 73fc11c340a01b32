"""The budget rule every selector uses, what the data can resolve, and verification that can fail.

``judge(baseline, result, budget)`` is the one rule: the drop is estimated from paired per-document
differences (``prune_heads.evaluation.paired``) and a probe passes only when the upper one-sided
``budget.confidence`` bound of its drop is within ``max_drop`` (at confidence 0: the point estimate,
the old behaviour). Static search, iterative rounds and the gates' evaluation all call it through
``BudgetJudge``, which also records every probe (estimate, standard error, bound, verdict) for the plan.

Before a search, ``check_power`` says whether the search documents can resolve the budget at all and,
when they cannot, stops with the number of documents that would be needed (``UnderpoweredBudget``)
unless ``allow_underpowered``. After it, ``verify`` judges the plan on held-out data with the same
statistics; a plan that the held-out data show to be over budget raises ``VerificationFailed``, which
carries the plan so that a front end can still write it, marked ``accepted_unverified``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from prune_heads.errors import BudgetError, PruneHeadsError
from prune_heads.evaluation.paired import PairedDrop, paired_drop, resolution, surrogate_drop
from prune_heads.plan.record import Budget, DropStats, Probe, Verification, result_dict

__all__ = ["Assessment", "BudgetJudge", "assess_plan", "UnderpoweredBudget", "VerificationFailed", "VerificationOverlap", "check_confidence",
           "check_disjoint", "check_power", "describe_drop", "judge", "raise_if_unverified", "verify"]

#: verdicts of a verification
WITHIN, INCONCLUSIVE, OVER = "within", "inconclusive", "over"
#: the verdict of a fixed-count plan's held-out check: a measured cost, judged against no budget
MEASURED = "measured"


class UnderpoweredBudget(BudgetError):
    """The search documents cannot resolve a drop as small as the budget at the chosen confidence."""


class VerificationOverlap(PruneHeadsError):
    """The verification documents include search documents, so verification would prove nothing."""


class VerificationFailed(PruneHeadsError):
    """The chosen plan is over budget on the held-out data; ``plan`` is the plan that was chosen."""

    def __init__(self, message: str, plan: Any) -> None:
        super().__init__(message)
        self.plan = plan

    def accept(self) -> Any:
        """The plan, marked ``accepted_unverified`` (what ``--accept-unverified`` writes)."""
        self.plan.selection.accepted_unverified = True
        return self.plan


def check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 <= confidence < 1.0:
        raise BudgetError(f"--confidence must be in [0, 1) (0.9 = a 90% one-sided bound; 0 = the point estimate), "
                          f"got {confidence!r}")
    return float(confidence)


def make_budget(max_drop: float, relative: bool, confidence: float, baseline: Any = None) -> Budget:
    """A validated ``Budget`` (metric and direction from the baseline when given)."""
    if max_drop is None or math.isnan(max_drop) or max_drop < 0:
        raise BudgetError(f"--max-drop must be >= 0, got {max_drop}: even the unpruned model (k = 0) fails it")
    return Budget(max_drop=float(max_drop), relative=bool(relative), confidence=check_confidence(confidence),
                  metric=None if baseline is None else baseline.metric,
                  higher_is_better=True if baseline is None else bool(baseline.higher_is_better))


def _to_stats(d: PairedDrop, budget: Budget) -> DropStats:
    allowed = float(budget.max_drop)
    tol = 1e-12 * max(1.0, abs(allowed))
    ok = bool(d.upper <= allowed + tol)  # NaN compares False: a failed evaluation never passes
    return DropStats(estimate=float(d.estimate), stderr=d.stderr, bound=float(d.upper), lower=float(d.lower),
                     confidence=float(d.confidence), allowed=allowed, within_budget=ok, n=int(d.n), method=d.method)


def judge(baseline: Any, result: Any, budget: Budget, surrogate: str | None = None) -> DropStats:
    """The drop of ``result`` against ``baseline`` (same documents) and whether it is within ``budget``."""
    stats = _to_stats(paired_drop(baseline, result, relative=budget.relative, confidence=budget.confidence), budget)
    if surrogate is not None:
        s = surrogate_drop(baseline, result, surrogate)
        stats.surrogate, stats.surrogate_estimate, stats.surrogate_stderr = surrogate, s.estimate, s.stderr
    return stats


class BudgetJudge:
    """Judges each evaluation of one selection against its baseline and records the trace of probes."""

    def __init__(self, baseline: Any, budget: Budget, surrogate: str | None = None) -> None:
        self.baseline = baseline
        self.budget = budget
        self.surrogate = surrogate
        self.trace: list[Probe] = []

    def probe(self, result: Any, *, k: int, heads_removed: int, seconds: float = 0.0) -> Probe:
        """Judge ``result`` and append it to the trace."""
        stats = judge(self.baseline, result, self.budget, self.surrogate)
        p = Probe(k=int(k), heads_removed=int(heads_removed), metric=result.metric, value=float(result.value),
                  stderr=None if result.stderr is None else float(result.stderr), n=int(result.n),
                  seconds=round(float(seconds), 2), within_budget=stats.within_budget, drop=stats)
        self.trace.append(p)
        return p

    def __call__(self, result: Any, *, k: int = 0, heads_removed: int = 0, seconds: float = 0.0) -> bool:
        return bool(self.probe(result, k=k, heads_removed=heads_removed, seconds=seconds).within_budget)

    @classmethod
    def start(cls, baseline: Any, budget: Budget, *, surrogate: str | None = None, allow_underpowered: bool = False,
              seconds: float = 0.0) -> BudgetJudge:
        """The judge of a selection whose unpruned model scored ``baseline``: checks that the baseline
        meets the budget and that the data can resolve it (``check_power``), and records it as ``k = 0``."""
        budget.metric, budget.higher_is_better = baseline.metric, bool(baseline.higher_is_better)
        if budget.relative and float(baseline.value) == 0.0:
            raise BudgetError(f"the baseline {baseline.metric} is 0, so a relative budget allows nothing; use an "
                              "absolute --max-drop")
        judge_ = cls(baseline, budget, surrogate)
        if not judge_(baseline, k=0, heads_removed=0, seconds=seconds):
            raise BudgetError(f"the unpruned model (k = 0) does not meet the budget: its {baseline.metric} is "
                              f"{baseline.value}; check the task and --limit")
        check_power(baseline, budget, allow_underpowered=allow_underpowered)
        return judge_


# ---- power ---------------------------------------------------------------------------------------------
def check_power(baseline: Any, budget: Budget, *, allow_underpowered: bool = False) -> Budget:
    """Fill ``budget.resolvable_drop``/``docs_needed``; stop if the budget is below what the data resolve.

    See ``prune_heads.evaluation.paired.resolution`` for the rule (accuracy-like metrics only).
    """
    r = resolution(baseline, allowed=budget.max_drop, confidence=budget.confidence, relative=budget.relative)
    if not r.applicable:
        return budget
    budget.resolvable_drop = float(r.resolvable)
    budget.docs_needed = r.docs_needed
    if budget.max_drop + 1e-12 >= r.resolvable:
        return budget
    unit = " (a fraction of the baseline)" if budget.relative else ""
    needed = f"about {r.docs_needed} documents" if r.docs_needed else "more documents"
    msg = (f"--max-drop {budget.max_drop:g}{unit} is below the smallest drop {r.n} search documents can resolve at "
           f"--confidence {budget.confidence:g} ({r.resolvable:.4g}: per-document sd {r.per_doc_sd:.3g}); this budget "
           f"needs {needed}. Raise --limit, raise --max-drop, lower --confidence, or pass --allow-underpowered")
    if not allow_underpowered:
        raise UnderpoweredBudget(msg)
    budget.underpowered = True
    warnings.warn(msg.replace("; this budget", "; continuing anyway: this budget"), stacklevel=4)
    return budget


# ---- verification --------------------------------------------------------------------------------------
def check_disjoint(search_evaluator: Any, verify_evaluator: Any) -> None:
    """Refuse verification documents that the search also uses (same task, same documents)."""
    if verify_evaluator is None or search_evaluator is None:
        return
    a, b = getattr(search_evaluator, "doc_ids", None), getattr(verify_evaluator, "doc_ids", None)
    if a is None or b is None:
        return
    common = set(a) & set(b)
    if common:
        example = sorted(common)[0]
        raise VerificationOverlap(
            f"the verification documents overlap the search documents ({len(common)} of {len(set(b))} shared, e.g. "
            f"{example}); verify on the held-out split of the task (split='verify') or on another task")


def verify(verify_evaluator: Any, removed: Any, budget: Budget, *, any_removed: bool = True) -> Verification:
    """Judge the plan ``removed`` (mask or heads) on held-out data with the budget's paired statistics."""
    vb = verify_evaluator(None)
    vr = verify_evaluator(removed) if any_removed else vb
    stats = judge(vb, vr, budget)
    allowed = budget.max_drop + 1e-12 * max(1.0, abs(budget.max_drop))
    verdict = WITHIN if stats.within_budget else (OVER if stats.lower > allowed else INCONCLUSIVE)
    return Verification(task=getattr(verify_evaluator, "task_config", None), baseline=result_dict(vb),
                        result=result_dict(vr), within_budget=stats.within_budget, drop=stats, verdict=verdict)


def measure(verify_evaluator: Any, removed: Any, *, confidence: float, any_removed: bool = True) -> Verification:
    """The held-out cost of a plan chosen without a budget (fixed count): the paired drop in metric units with
    its one-sided ``confidence`` bounds, verdict ``measured`` (no budget is claimed, so none is judged)."""
    vb = verify_evaluator(None)
    vr = verify_evaluator(removed) if any_removed else vb
    d = paired_drop(vb, vr, relative=False, confidence=check_confidence(confidence))
    stats = DropStats(estimate=float(d.estimate), stderr=d.stderr, bound=float(d.upper), lower=float(d.lower),
                      confidence=float(d.confidence), allowed=None, within_budget=None, n=int(d.n), method=d.method)
    return Verification(task=getattr(verify_evaluator, "task_config", None), baseline=result_dict(vb),
                        result=result_dict(vr), within_budget=None, drop=stats, verdict=MEASURED)


@dataclass
class Assessment:
    """A fixed plan (no search) judged on the search data and, optionally, on held-out data."""

    baseline: Any
    result: Any
    trace: list[Probe]
    verification: Verification | None


def assess_plan(evaluator: Any, removed: Any, heads_removed: int, budget: Budget | None, *,
                verify_evaluator: Any = None, allow_underpowered: bool = True) -> Assessment:
    """Evaluate a plan chosen without a search (gates) under the same rule as the searches.

    Without a budget only the baseline and the result are recorded. A result over budget is a warning,
    since no search could have chosen otherwise; a failed verification raises later
    (``raise_if_unverified``) as for the other selectors.
    """
    if evaluator is None:
        return Assessment(None, None, [], None)
    check_disjoint(evaluator, verify_evaluator)
    baseline = evaluator(None)
    result = evaluator(removed) if heads_removed else baseline
    if budget is None:
        return Assessment(baseline, result, [], None)
    j = BudgetJudge.start(baseline, budget, allow_underpowered=allow_underpowered)
    if heads_removed and not j(result, k=heads_removed, heads_removed=heads_removed):
        line = describe_drop(j.trace[-1].drop, metric=result.metric, relative=budget.relative)
        warnings.warn(f"the plan is over budget on the search data: {line}", stacklevel=3)
    ver = None
    if verify_evaluator is not None:
        ver = verify(verify_evaluator, removed, budget, any_removed=bool(heads_removed))
    return Assessment(baseline, result, j.trace, ver)


def describe_drop(stats: DropStats | None, *, metric: str | None = None, relative: bool = False) -> str:
    """One line for messages, summaries and model cards: the drop, its interval and the verdict."""
    if stats is None:
        return "no drop statistics"
    pct = relative
    f = (lambda x: f"{100 * x:.2f}%") if pct else (lambda x: f"{x:.4g}")
    what = f"{metric} drop" if metric else "drop"
    if stats.confidence > 0 and stats.stderr is not None and math.isfinite(stats.bound):
        c = f"{100 * stats.confidence:g}%"
        body = (f"{what} {f(stats.estimate)} (one-sided {c} bounds {f(stats.lower)} .. {f(stats.bound)}, "
                f"stderr {f(stats.stderr)}, {stats.n} documents)")
    else:
        se = f", stderr {f(stats.stderr)}" if stats.stderr is not None else ""
        body = f"{what} {f(stats.estimate)} (point estimate{se}, {stats.n} documents)"
    if stats.allowed is None:
        return f"{body}; no budget (fixed count)"
    return f"{body}; budget {f(stats.allowed)}: {'within' if stats.within_budget else 'NOT within'}"


def raise_if_unverified(plan: Any, *, accept_unverified: bool = False, strict: bool = False) -> Any:
    """Raise ``VerificationFailed`` when the plan's verification (or its guard's held-out check) says it is over
    budget.

    ``strict`` also refuses an ``inconclusive`` verification (the held-out interval straddles the budget).
    With ``accept_unverified`` the plan is returned marked ``accepted_unverified``, with a warning.
    """
    sel = plan.selection
    checks = [("", sel.verification, sel.budget, sel.chosen_probe)]
    checks += [(f"guard {(g.task or {}).get('task', '')} ", g.verification, g.budget, None)
               for g in sel.guards if g.verification is not None]
    for what, v, budget, chosen in checks:
        if v is None or v.verdict in (WITHIN, MEASURED):
            continue
        rel = bool(budget.relative) if budget else False
        held = describe_drop(v.drop, metric=v.result.get("metric"), relative=rel)
        if v.verdict == INCONCLUSIVE and not strict:
            warnings.warn(f"{what}verification inconclusive: {held}; more held-out documents would settle it",
                          stacklevel=3)
            continue
        search = describe_drop(chosen.drop, relative=rel) if chosen is not None and chosen.drop else "no statistics"
        state = "over budget" if v.verdict == OVER else "not shown to be within budget"
        msg = (f"{what}verification failed: the chosen {sel.heads_removed} heads are {state} on the held-out data "
               f"({held}); on the search split: {search}. Select again with more documents (--limit) or a higher "
               "--confidence, or pass --accept-unverified to write this plan anyway (it is then marked "
               "accepted_unverified)")
        err = VerificationFailed(msg, plan)
        if accept_unverified:
            warnings.warn(msg, stacklevel=3)
            return err.accept()
        raise err
    return plan
