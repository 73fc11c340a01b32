"""The static selector: the most heads a scores ranking lets go while a task stays within budget.

Heads are ranked once, globally, by a calibration score (LN scores are comparable across layers);
the GQA policy groups them into removal units; the search finds the largest number of units whose
static mask keeps the task metric within ``max_drop`` of the unmasked baseline. Search and
verification evaluate disjoint data, so the verified figure is not the one the search tuned on.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.errors import BudgetError, PruneHeadsError
from prune_heads.model.adapters import HeadLayout, get_adapter
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan
from prune_heads.plan.record import (
    Budget,
    Cost,
    Probe,
    SelectionResult,
    StaticDetails,
    Verification,
    result_dict,
)
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import inactivity, is_layer_comparable, validate_score_ids
from prune_heads.selection.policies import candidate_units, heads_of, removal_mask
from prune_heads.selection.search import max_probes, search_largest_k

#: pseudo score id: a seeded random ranking, the baseline every real score must beat
RANDOM_SCORE = "random"


def within_budget(baseline: Any, result: Any, max_drop: float, relative: bool) -> bool:
    """Whether ``result`` lost at most ``max_drop`` against ``baseline``.

    For a higher-is-better metric (accuracy) the loss is the drop; for a lower-is-better one
    (perplexity, KL) it is the increase. ``relative`` measures it as a fraction of the baseline value.
    """
    if max_drop < 0 or math.isnan(max_drop):
        raise BudgetError(f"--max-drop must be >= 0, got {max_drop}: even the unpruned model cannot meet it")
    base, value = float(baseline.value), float(result.value)
    if math.isnan(value) or math.isnan(base):
        return False
    loss = base - value if baseline.higher_is_better else value - base
    allowed = max_drop * abs(base) if relative else max_drop
    return loss <= allowed + 1e-12 * max(1.0, abs(base))


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
                  seed: int = 0, first_probe: int | None = None) -> Plan:
    """Largest static removal within budget under a score ranking; returns a ``Plan`` with its provenance.

    Args:
        scores: calibration scores of this model (checked against it); may be None for ``score_id="random"``.
        evaluator: ``prune_heads.evaluation.Evaluator`` on the search data: ``evaluator(mask)`` -> EvalResult.
            Built with ``compensation=`` it evaluates every candidate compensated (rank by ``lsq_error``
            then); the plan records that compensation under ``compensation``.
        max_drop: allowed loss in metric units (0.01 = one accuracy point), or a fraction with ``relative``.
        verify_evaluator: evaluator on held-out data; the plan records its baseline and masked result.
        seed: seed of the ``random`` ranking.
    """
    t0 = time.time()
    layout = get_adapter(model).layout(model.config)
    if scores is not None:
        scores.check(model)
    if max_drop < 0 or math.isnan(max_drop):
        raise BudgetError(f"--max-drop must be >= 0, got {max_drop}: even the unpruned model (k = 0) fails it")
    from prune_heads.compensation.greedy import ensure_lsq_scores

    scores = ensure_lsq_scores(scores, model, score_id)
    values = ranking(scores, score_id, layout, seed)
    units = candidate_units(values, layout, policy, min_heads_per_layer, allow_empty_layers)

    cache: dict[bytes, Any] = {}
    trace: list[Probe] = []

    def evaluate(k: int) -> Any:
        mask = removal_mask(units, k, layout)
        key = mask.numpy().tobytes()
        if key not in cache:
            tic = time.time()
            cache[key] = evaluator(mask if k else None)
            trace.append(_probe(k, int(mask.sum()), cache[key], time.time() - tic))
        return cache[key]

    bar = tqdm(total=max_probes(len(units)) + 1, desc=f"select ({score_id}, {policy})", unit="eval",
               disable=not progress)
    baseline = evaluate(0)
    bar.update(1)
    trace[0].within_budget = within_budget(baseline, baseline, max_drop, relative)
    if not trace[0].within_budget:
        raise BudgetError(f"the unpruned model (k = 0) does not meet the budget: its {baseline.metric} is "
                          f"{baseline.value}; check the task and --limit")
    if relative and float(baseline.value) == 0.0:
        raise BudgetError(f"the baseline {baseline.metric} is 0, so a relative budget allows nothing; use an absolute --max-drop")

    def passes(k: int) -> bool:
        ok = within_budget(baseline, evaluate(k), max_drop, relative)
        for probe in trace:
            if probe.k == k:
                probe.within_budget = ok
        return ok

    if not units:
        warnings.warn("no head can be removed under this policy and --min-heads-per-layer", stacklevel=2)
    result = search_largest_k(len(units), passes, first=first_probe, progress=bar)
    bar.close()
    k = result.k
    chosen = evaluate(k)
    removed = heads_of(units, k)
    mask = removal_mask(units, k, layout)

    verification = None
    if verify_evaluator is not None:
        from prune_heads.compensation.plans import evaluator_with

        verify_evaluator = evaluator_with(verify_evaluator, getattr(evaluator, "compensation", None))
        vb = verify_evaluator(None)
        vr = verify_evaluator(mask) if k else vb
        ok = within_budget(vb, vr, max_drop, relative)
        verification = Verification(task=_task_config(verify_evaluator), baseline=result_dict(vb),
                                    result=result_dict(vr), within_budget=ok)
        if not ok:
            warnings.warn(
                f"the chosen {len(removed)} heads stay within budget on the search data but not on the held-out "
                f"data ({vb.metric} {float(vb.value):.4f} -> {float(vr.value):.4f}); consider a smaller --max-drop "
                "or a larger --limit", stacklevel=2
            )

    selection = SelectionResult(
        method="static",
        heads_total=layout.total_heads,
        heads_removed=len(removed),
        per_layer_counts=mask.sum(1).tolist(),
        model=getattr(model.config, "name_or_path", None) or None,
        fingerprint=fingerprint(model),
        score_id=score_id,
        policy=policy,
        min_heads_per_layer=min_heads_per_layer,
        allow_empty_layers=bool(allow_empty_layers),
        budget=Budget(max_drop=max_drop, relative=relative, metric=baseline.metric,
                      higher_is_better=bool(baseline.higher_is_better)),
        task=_task_config(evaluator),
        baseline=result_dict(baseline),
        result=result_dict(chosen),
        verification=verification,
        trace=trace,
        cost=Cost(evaluations=len(trace), max_evaluations=max_probes(len(units)) + 1,
                  wall_seconds=round(time.time() - t0, 2)),
        scores=scores.summary() if scores is not None else None,
        compensation=_compensation_record(evaluator),
        details=StaticDetails(k=k, num_units=len(units), seed=seed if score_id == RANDOM_SCORE else None),
    )
    return Plan(removed, selection)


def _probe(k: int, heads_removed: int, r: Any, seconds: float) -> Probe:
    return Probe(k=k, heads_removed=heads_removed, metric=r.metric, value=float(r.value),
                 stderr=None if r.stderr is None else float(r.stderr), n=int(r.n), seconds=round(seconds, 2))


def _compensation_record(evaluator: Any) -> dict[str, Any]:
    """How the evaluated (and so the exported) model compensates the removed heads."""
    from prune_heads.compensation.plans import record_of

    return record_of(getattr(evaluator, "compensation", None))
