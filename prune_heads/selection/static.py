"""The static selector: the most heads a scores ranking lets go while a task stays within budget.

Heads are ranked once, globally, by a calibration score (LN scores are comparable across layers);
the GQA policy groups them into removal units; the search finds the largest number of units whose
static mask keeps the task metric within ``max_drop`` of the unmasked baseline. Every probe is judged
by ``selection.budget.judge`` on paired per-document differences; with a confidence level, a probe
passes only when the upper bound of its drop is within budget, and the search ascends and stops at
the first failure so that the bound's confidence holds for the returned ``k`` (``selection.search``).
Search and verification evaluate disjoint data (checked), so the verified figure is not the one the
search tuned on, and a plan that fails its verification raises ``VerificationFailed``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation.paired import SURROGATES
from prune_heads.model.adapters import HeadLayout, get_adapter
from prune_heads.plan import Plan
from prune_heads.plan.record import Budget, Cost, Probe, SelectionResult, StaticDetails, result_dict
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import inactivity, is_layer_comparable, validate_score_ids
from prune_heads.selection.budget import (
    BudgetJudge,
    check_disjoint,
    judge,
    make_budget,
    measure,
    raise_if_unverified,
    verify,
)
from prune_heads.selection.policies import candidate_units, heads_of, removal_mask
from prune_heads.selection.search import (
    geometric_step,
    max_probes,
    max_probes_ascending,
    search_ascending,
    search_largest_k,
)

#: pseudo score id: a seeded random ranking, the baseline every real score must beat
RANDOM_SCORE = "random"


def within_budget(baseline: Any, result: Any, max_drop: float, relative: bool, confidence: float = 0.0) -> bool:
    """Whether ``result`` lost at most ``max_drop`` against ``baseline`` (``budget.judge`` decides).

    For a higher-is-better metric (accuracy) the loss is the drop; for a lower-is-better one
    (perplexity, KL) it is the increase. ``relative`` measures it as a fraction of the baseline value.
    With ``confidence`` > 0 the upper one-sided bound of the paired drop must be within budget.
    """
    return judge(baseline, result, make_budget(max_drop, relative, confidence)).within_budget


def ranking(scores: HeadScores | None, score_id: str, layout: HeadLayout, seed: int = 0) -> torch.Tensor:
    """``(L, H)`` inactivity (larger = more inactive) for ``score_id``, or a seeded random ranking."""
    if score_id == RANDOM_SCORE:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(layout.num_layers, layout.num_heads, generator=g)
    if scores is None:
        raise PruneHeadsError(f"score {score_id!r} needs a scores file")
    validate_score_ids([score_id])
    if not is_layer_comparable(score_id):
        warnings.warn(
            f"score {score_id!r} is not normalised per layer, so its values are not comparable across layers; "
            f"a global ranking may favour some layers (prefer {score_id}_ln if it exists)", stacklevel=3
        )
    return inactivity(scores.mean(score_id), score_id)


def _task_config(evaluator: Any) -> Any:
    return getattr(evaluator, "task_config", None)


def select_static(model: nn.Module, scores: HeadScores | None, evaluator: Any, *, score_id: str, max_drop: float,
                  relative: bool = False, policy: str = "free", min_heads_per_layer: int = 1,
                  allow_empty_layers: bool = False, verify_evaluator: Any = None, progress: bool = True,
                  seed: int = 0, first_probe: int | None = None, confidence: float = 0.0,
                  allow_underpowered: bool = False, accept_unverified: bool = False,
                  strict_verification: bool = False, surrogate: str | None = None, search: str | None = None,
                  guard: Any = None) -> Plan:
    """Largest static removal within budget under a score ranking; returns a ``Plan`` with its provenance.

    Args:
        scores: calibration scores of this model (checked against it); may be None for ``score_id="random"``.
        evaluator: ``prune_heads.evaluation.Evaluator`` on the search data: ``evaluator(mask)`` -> EvalResult.
            Built with ``compensation=`` it evaluates every candidate compensated (rank by ``lsq_error``
            then); the plan records that compensation under ``compensation``.
        max_drop: allowed loss in metric units (0.01 = one accuracy point), or a fraction with ``relative``.
        verify_evaluator: evaluator on held-out data (documents disjoint from the search's, else an error);
            the plan records its paired drop, and a plan the held-out data show over budget raises
            ``VerificationFailed`` (``accept_unverified``: returned marked ``accepted_unverified``;
            ``strict_verification``: an inconclusive verification fails too).
        seed: seed of the ``random`` ranking.
        confidence: a probe passes only if the upper one-sided ``confidence`` bound of its paired drop is
            within ``max_drop``; 0 = the point estimate. Budgets below what the search documents can
            resolve stop with ``UnderpoweredBudget`` unless ``allow_underpowered``.
        surrogate: ``margin`` or ``choice_kl`` (multiple-choice tasks): a low-variance per-document signal
            that sizes the ascending search's steps; every step is still judged on the task's metric.
        search: ``ascend`` (test increasing k, stop at the first failure: the bound's confidence holds for
            the returned k) or ``bisect`` (gallop + bisection: fewest evaluations, exact for a noiseless
            metric); default ``bisect`` at confidence 0 without a surrogate, else ``ascend``.
        guard: a ``selection.guard.GuardCheck`` (a second task, e.g. ``passkey:2048``) or ``Guards`` (several):
            a probe passes only when every guard passes it too, and the plan records each guard's verdict and
            its held-out check (``selection.guards``).
    """
    from prune_heads.selection.guard import as_guards

    guard = as_guards(guard)
    t0 = time.time()
    layout = get_adapter(model).layout(model.config)
    if scores is not None:
        scores.check(model)
    budget = make_budget(max_drop, relative, confidence)
    from prune_heads.compensation.greedy import ensure_lsq_scores

    scores = ensure_lsq_scores(scores, model, score_id)
    strategy = _strategy(search, budget, surrogate)
    check_disjoint(evaluator, verify_evaluator)
    values = ranking(scores, score_id, layout, seed)
    units = candidate_units(values, layout, policy, min_heads_per_layer, allow_empty_layers)
    if strategy == "ascend" and first_probe is None:
        first_probe = ascending_first_probe(len(units))
    # the bisection's bound is exact; the ascending search is capped at twice its geometric-growth count
    n_max = (max_probes(len(units)) if strategy == "bisect" else 2 * max_probes_ascending(len(units), first_probe)) + 1
    bar = tqdm(total=n_max, desc=f"select ({score_id}, {policy})", unit="eval", disable=not progress)
    probe = _Prober(evaluator, units, layout, bar, guard)
    baseline = probe.evaluate(0)
    _check_surrogate(baseline, surrogate)
    probe.judge = BudgetJudge.start(baseline, budget, surrogate=surrogate, allow_underpowered=allow_underpowered,
                                    seconds=probe.baseline_seconds)
    if guard is not None:
        guard.start()

    if not units:
        warnings.warn("no head can be removed under this policy and --min-heads-per-layer", stacklevel=2)
    if strategy == "bisect":
        result = search_largest_k(len(units), probe.passes, first=first_probe, progress=bar)
    else:
        step = _ascending_step(probe.judge, budget, len(units), guided=surrogate is not None, guard=guard)
        result = search_ascending(len(units), probe.passes, first=first_probe, next_k=step, progress=bar,
                                  max_evaluations=n_max - 1)
    bar.close()
    k = result.k
    chosen = probe.evaluate(k)
    removed = heads_of(units, k)
    mask = removal_mask(units, k, layout)
    verification = None
    if verify_evaluator is not None:
        from prune_heads.compensation.plans import evaluator_with

        # held-out data judge the same (compensated) model the search evaluated
        verify_evaluator = evaluator_with(verify_evaluator, getattr(evaluator, "compensation", None))
        verification = verify(verify_evaluator, mask, budget, any_removed=bool(k))
    guard_records = guard.record(mask if k else None, k=k, heads_removed=int(mask.sum())) if guard is not None else []

    selection = SelectionResult.for_removal(
        model, mask,
        method="static",
        score_id=score_id,
        policy=policy,
        min_heads_per_layer=min_heads_per_layer,
        allow_empty_layers=bool(allow_empty_layers),
        budget=budget,
        task=_task_config(evaluator),
        baseline=result_dict(baseline),
        result=result_dict(chosen),
        verification=verification,
        guards=guard_records,
        trace=probe.judge.trace,
        cost=Cost(evaluations=len(probe.judge.trace), max_evaluations=n_max, wall_seconds=round(time.time() - t0, 2)),
        scores=scores.summary() if scores is not None else None,
        compensation=_compensation_record(evaluator),
        details=StaticDetails(k=k, num_units=len(units), seed=seed if score_id == RANDOM_SCORE else None,
                              search=strategy, surrogate=surrogate),
    )
    return raise_if_unverified(Plan(removed, selection), accept_unverified=accept_unverified,
                               strict=strict_verification)


def unit_size(layout: HeadLayout, policy: str) -> int:
    """Heads in one removal unit of ``policy``: 1 (free), a KV group's query heads (kv-groups), or one head of
    every KV group of every layer (uniform)."""
    if policy == "kv-groups":
        return layout.group_size
    if policy == "uniform":
        return layout.num_layers * layout.num_kv_heads
    return 1


def fixed_units(layout: HeadLayout, policy: str, available: int, *, heads: int | None = None,
                fraction: float | None = None) -> int:
    """How many removal units a fixed count asks for: ``heads`` query heads (for every policy; under kv-groups and
    uniform a whole number of units, else refused with the nearest counts that are), or ``fraction`` of all heads
    rounded to the nearest whole unit. Refuses (one line) zero units and more than ``available``."""
    if (heads is None) == (fraction is None):
        raise PruneHeadsError("a fixed count needs exactly one of heads (--heads N) and fraction (--fraction F)")
    size = unit_size(layout, policy)
    what = {"free": "head", "kv-groups": f"KV group ({size} query heads)",
            "uniform": f"round of one head from each of the {size} KV groups of the model"}[policy]
    if heads is not None:
        if heads < 1 or heads % size:
            lo, hi = (heads // size) * size, (heads // size + 1) * size
            near = " or ".join(str(n) for n in (lo, hi) if n >= size)
            raise PruneHeadsError(f"--heads {heads} is not a whole number of removal units under --gqa {policy} (a "
                                  f"unit is one {what}): use {near}, or --fraction")
        k, asked = heads // size, f"--heads {heads}"
    else:
        k = round(float(fraction) * layout.total_heads / size)
        asked = f"--fraction {fraction:g} ({fraction * layout.total_heads:g} of {layout.total_heads} heads)"
        if k < 1:
            raise PruneHeadsError(f"{asked} is less than half a removal unit under --gqa {policy} (one {what}): ask "
                                  f"for at least {size / layout.total_heads:.3g}")
    if k > available:
        raise PruneHeadsError(f"{asked} asks for {k * size} heads, but --gqa {policy} with the layers' floor "
                              f"(--min-heads-per-layer, --allow-empty-layers) lets at most {available * size} go")
    return k


def select_fixed(model: nn.Module, scores: HeadScores | None, evaluator: Any = None, *, score_id: str,
                 heads: int | None = None, fraction: float | None = None, policy: str = "free",
                 min_heads_per_layer: int = 1, allow_empty_layers: bool = False, verify_evaluator: Any = None,
                 confidence: float = 0.9, seed: int = 0, compensation: Any = None) -> Plan:
    """A fixed number of heads (``heads``, or ``fraction`` of all heads; see ``fixed_units``), the first units of
    the ranking the search would walk (same score, policy, floor and compensation): no search, no budget.

    With ``evaluator`` (search split) the plan records the baseline and the result; with ``verify_evaluator``
    (held-out documents, disjoint from the search's) its verification is the measured cost, the paired drop
    with one-sided ``confidence`` bounds, verdict ``measured``. Nothing is judged against a budget, so no plan
    is refused for its cost: the caller asked for this count. ``compensation`` (a ``Compensator``; default the
    evaluator's own) is what the plan records and every evaluation applies.
    """
    from prune_heads.compensation.plans import evaluator_with, record_of

    t0 = time.time()
    compensation = compensation if compensation is not None else getattr(evaluator, "compensation", None)
    evaluator = evaluator_with(evaluator, compensation)
    layout = get_adapter(model).layout(model.config)
    if scores is not None:
        scores.check(model)
    from prune_heads.compensation.greedy import ensure_lsq_scores

    scores = ensure_lsq_scores(scores, model, score_id)
    check_disjoint(evaluator, verify_evaluator)
    units = candidate_units(ranking(scores, score_id, layout, seed), layout, policy, min_heads_per_layer,
                            allow_empty_layers)
    k = fixed_units(layout, policy, len(units), heads=heads, fraction=fraction)
    mask = removal_mask(units, k, layout)
    baseline = result = None
    if evaluator is not None:
        baseline = evaluator(None)
        result = evaluator(mask)
    verification = None
    if verify_evaluator is not None:  # held-out data judge the same (compensated) model
        verification = measure(evaluator_with(verify_evaluator, compensation), mask, confidence=confidence)
    selection = SelectionResult.for_removal(
        model, mask, method="static", score_id=score_id, policy=policy, min_heads_per_layer=min_heads_per_layer,
        allow_empty_layers=bool(allow_empty_layers), budget=None, task=_task_config(evaluator),
        baseline=result_dict(baseline), result=result_dict(result), verification=verification,
        cost=Cost(evaluations=2 if evaluator is not None else 0, wall_seconds=round(time.time() - t0, 2)),
        scores=scores.summary() if scores is not None else None, compensation=record_of(compensation),
        details=StaticDetails(k=k, num_units=len(units), seed=seed if score_id == RANDOM_SCORE else None,
                              search="fixed", heads=heads, fraction=fraction),
    )
    return Plan(heads_of(units, k), selection)


STRATEGIES = ("ascend", "bisect")


def _strategy(search: str | None, budget: Budget, surrogate: str | None) -> str:
    if surrogate is not None and surrogate not in SURROGATES:
        raise PruneHeadsError(f"surrogate must be one of {', '.join(SURROGATES)} (or none), not {surrogate!r}")
    if search is None:
        return "bisect" if budget.confidence == 0 and surrogate is None else "ascend"
    if search not in STRATEGIES:
        raise PruneHeadsError(f"search must be one of {', '.join(STRATEGIES)}, not {search!r}")
    if search == "bisect" and surrogate is not None:
        raise PruneHeadsError("the surrogate sizes the steps of the ascending search; use search='ascend'")
    return search


class _Prober:
    """Evaluates prefixes of the ranking once each and judges every new one (the plan's trace); with a guard, a
    prefix the budget passed passes only if the guard passes it too."""

    def __init__(self, evaluator: Any, units: list, layout: HeadLayout, bar: Any, guard: Any = None) -> None:
        self.evaluator, self.units, self.layout, self.bar, self.guard = evaluator, units, layout, bar, guard
        self.guarded: dict[int, bool] = {}
        self.cache: dict[int, Any] = {}
        self.judge: BudgetJudge | None = None
        self.baseline_seconds = 0.0

    def evaluate(self, k: int) -> Any:
        if k not in self.cache:
            mask = removal_mask(self.units, k, self.layout)
            tic = time.time()
            self.cache[k] = self.evaluator(mask if k else None)
            if self.judge is not None:
                self.judge.probe(self.cache[k], k=k, heads_removed=int(mask.sum()), seconds=time.time() - tic)
            elif k == 0:
                self.baseline_seconds = time.time() - tic
        return self.cache[k]

    def passes(self, k: int) -> bool:
        self.evaluate(k)
        assert self.judge is not None
        ok = bool(next(p for p in reversed(self.judge.trace) if p.k == k).within_budget)
        if ok and self.guard is not None and k:
            if k not in self.guarded:
                mask = removal_mask(self.units, k, self.layout)
                self.guarded[k] = self.guard.passes(mask, k=k, heads_removed=int(mask.sum()))
            ok = self.guarded[k]
        return ok


def _check_surrogate(baseline: Any, surrogate: str | None) -> None:
    if surrogate is None:
        return
    docs = getattr(baseline, "docs", None)
    if docs is None or docs.choice_scores is None:
        raise PruneHeadsError(f"the {surrogate} surrogate needs a multiple-choice task scored by log-likelihood "
                              f"(per-choice scores); {baseline.metric} on this task has none")


def ascending_first_probe(n: int) -> int:
    """The ascending search starts low (it never comes back below a failure) and doubles while far from the budget."""
    return max(1, n // 64)


def _ascending_step(judge: BudgetJudge, budget: Budget, n: int, *, guided: bool, gain: float = 0.5,
                    guard: Any = None) -> Any:
    """Next ``k`` after a pass at ``lo``: double while the bound is far below the budget, then close in.

    Without a surrogate: double while the last bound is below a quarter of the budget, else grow by
    ``GROWTH``. With one: double while the predicted bound at ``2 lo`` is within budget, else go
    ``gain`` of the way to the predicted crossing (``predict_crossing``), at least 5%. A guard (``Guards``)
    that is not far from its own budget at ``lo`` also stops the doubling: the search stops at the first
    refusal, so a jump past the guard's limit would lose every ``k`` in between (issue 18: a perplexity
    guard at 2048 tokens near its bound while the 256-token budget was far from its own).
    """

    def step(lo: int) -> int:
        passed = sorted((p for p in judge.trace if 0 < p.k <= lo and p.within_budget and p.drop is not None),
                        key=lambda p: p.k)
        last = passed[-1].drop if passed and passed[-1].k == lo else None
        guard_far = guard is None or guard.far(lo)
        if not guided:
            far = last is not None and last.bound <= budget.max_drop / 4 and guard_far
            return min(n, 2 * lo if far else geometric_step(lo))
        k_pred = predict_crossing(passed, budget.max_drop, lo)
        if k_pred >= 2 * lo and guard_far:
            return min(n, 2 * lo)
        min_step = max(1, math.ceil(lo / 20))
        return int(min(n, max(lo + min_step, math.floor(lo + gain * (k_pred - lo)))))

    return step


def predict_crossing(passed: list[Probe], allowed: float, lo: int, cap: float = 2.0) -> float:
    """Where the metric's bound is predicted to reach ``allowed``, from the probes that passed (up to ``cap * lo``).

    The surrogate is smooth in ``k``, so its last two points give the curve's shape: ``S(k) = S_lo (k/lo)^b``
    (``b`` clamped to [0.5, 3]). The metric's estimate is predicted as ``rho * S(k)`` with ``rho`` the ratio
    of the summed metric drops to the summed surrogate values of all passing probes (pooling many probes
    averages the metric's per-probe noise), and its bound's margin as growing like ``sqrt(S)`` (the
    variance of paired differences grows with the number of documents that change).
    """
    last = passed[-1] if passed else None
    if last is None or last.k != lo or last.drop is None or not last.drop.surrogate_estimate:
        return cap * lo
    s_lo = float(last.drop.surrogate_estimate)
    if s_lo <= 0:
        return cap * lo
    b = 1.0
    prev = [p for p in passed[:-1] if p.drop is not None and (p.drop.surrogate_estimate or 0) > 0]
    if prev and prev[-1].k < lo:
        b = math.log(s_lo / float(prev[-1].drop.surrogate_estimate)) / math.log(lo / prev[-1].k)
        b = min(max(b, 0.5), 3.0)
    pts = [p.drop for p in passed if p.drop is not None and (p.drop.surrogate_estimate or 0) > 0]
    rho = max(0.0, sum(d.estimate for d in pts) / sum(float(d.surrogate_estimate) for d in pts))
    margin = max(0.0, last.drop.bound - last.drop.estimate)

    def bound_at(r: float) -> float:
        return rho * s_lo * r ** b + margin * r ** (b / 2)

    if bound_at(cap) <= allowed:
        return cap * lo
    if bound_at(1.0) >= allowed:
        return float(lo)
    a, z = 1.0, cap
    for _ in range(40):
        mid = 0.5 * (a + z)
        a, z = (mid, z) if bound_at(mid) <= allowed else (a, mid)
    return a * lo


def _compensation_record(evaluator: Any) -> dict[str, Any]:
    """How the evaluated (and so the exported) model compensates the removed heads."""
    from prune_heads.compensation.plans import record_of

    return record_of(getattr(evaluator, "compensation", None))
