"""Iterative measured pruning (Michel et al., 2019, on the project's ablation scores).

Heads interact: once some are gone, the others' importance changes. So heads are removed in rounds;
before each round the remaining candidates are re-measured *given what is already removed*, the
``round_size`` least harmful units are zeroed, and the task is evaluated. The first round that breaks
the budget is bisected, so the plan keeps the largest within-budget prefix of that round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import HeadLayout, get_adapter
from prune_heads.plan import Plan
from prune_heads.plan.record import Cost, IterativeDetails, SelectionResult, result_dict
from prune_heads.scoring.score_defs import ABLATION
from prune_heads.selection.budget import BudgetJudge, check_disjoint, make_budget, raise_if_unverified, verify
from prune_heads.selection.policies import layer_floor
from prune_heads.selection.static import within_budget

Unit = list[tuple[int, int]]
POLICIES_SUPPORTED = ("free", "kv-groups")


# ---- shared with gates -----------------------------------------------------------------------

def budget_check(baseline: Any, result: Any, max_drop: float, relative: bool, confidence: float = 0.0) -> bool:
    """The static selector's budget rule (``selection.budget.judge``), so every method judges a drop the same way."""
    return bool(within_budget(baseline, result, max_drop, relative, confidence))


# ---- units ------------------------------------------------------------------------------------

def all_units(layout: HeadLayout, policy: str) -> list[Unit]:
    if policy == "free":
        return [[(i, h)] for i in range(layout.num_layers) for h in range(layout.num_heads)]
    if policy == "kv-groups":
        gs = layout.group_size
        return [[(i, g * gs + j) for j in range(gs)] for i in range(layout.num_layers) for g in range(layout.num_kv_heads)]
    raise PruneHeadsError(
        f"iterative selection supports --policy {' or '.join(POLICIES_SUPPORTED)}, not {policy!r} "
        "(for a uniform export, select with --method static --policy uniform)"
    )


def _fits(removed: torch.Tensor, unit: Unit, floor: int) -> bool:
    """Unit not yet removed, and every layer it touches keeps ``floor`` heads afterwards."""
    if any(bool(removed[i, h]) for i, h in unit):
        return False
    H = removed.shape[1]
    for layer in {i for i, _ in unit}:
        after = int(removed[layer].sum()) + sum(1 for i, _ in unit if i == layer)
        if H - after < floor:
            return False
    return True


def _with(removed: torch.Tensor, units: Sequence[Unit]) -> torch.Tensor:
    out = removed.clone()
    for u in units:
        for i, h in u:
            out[i, h] = True
    return out


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return {}
    return {"n": int(v.numel()), "min": float(v.min()), "median": float(v.median()), "max": float(v.max())}


# ---- the selector -----------------------------------------------------------------------------

def select_iterative(model: nn.Module, seqs: Sequence[Sequence[int]], evaluator: Any, *, max_drop: float,
                     relative: bool = False, round_size: int = 4, score_id: str = "ablation_kl", policy: str = "free",
                     min_heads_per_layer: int = 1, allow_empty_layers: bool = False,
                     candidates_fraction: float | None = None, verify_evaluator: Any = None, batch_size: int = 8,
                     pad_id: int = 0, progress: bool = True, max_rounds: int | None = None, confidence: float = 0.0,
                     allow_underpowered: bool = False, accept_unverified: bool = False,
                     strict_verification: bool = False, compensation: Any = None) -> Plan:
    """Remove heads in measured rounds until the evaluator's budget would break; return the plan.

    Args:
        seqs: calibration token sequences the ablation effects are measured on.
        evaluator: ``Evaluator`` (contract 1): ``evaluator(removed_mask) -> EvalResult``.
        round_size: units (heads under ``free``, KV groups under ``kv-groups``) removed per round.
        score_id: ``ablation_kl`` (default) or ``ablation_loss``; smaller = safer to remove.
        candidates_fraction: after the first (full) measurement keep only this fraction of the units,
            least harmful first, as candidates for later rounds (cheaper re-measurement).
        max_rounds: stop after this many accepted rounds (None: until the budget or the floor stops it).
        compensation: a ``prune_heads.compensation.Compensator``: units are measured, and every round
            evaluated, with the removed heads compensated.
        confidence, allow_underpowered, accept_unverified, strict_verification: as for ``select_static``;
            every evaluation is judged by ``selection.budget.judge`` and recorded in the plan's trace.
    """
    from prune_heads.compensation.plans import evaluator_with, record_of
    from prune_heads.scoring.ablation import measure_units

    if score_id not in ABLATION:
        raise PruneHeadsError(f"iterative selection measures {' or '.join(ABLATION)}, not {score_id!r}")
    if round_size < 1:
        raise PruneHeadsError(f"--round-size must be >= 1, got {round_size}")
    budget = make_budget(max_drop, relative, confidence)
    check_disjoint(evaluator, verify_evaluator)
    if candidates_fraction is not None and not 0 < candidates_fraction <= 1:
        raise PruneHeadsError(f"--candidates-fraction must be in (0, 1], got {candidates_fraction}")
    layout = get_adapter(model).layout(model.config)
    floor = layer_floor(layout, min_heads_per_layer, allow_empty_layers)
    pool = all_units(layout, policy)
    seqs = [list(map(int, s)) for s in seqs]
    compensation = compensation if compensation is not None else getattr(evaluator, "compensation", None)
    evaluator = evaluator_with(evaluator, compensation)
    verify_evaluator = evaluator_with(verify_evaluator, compensation)

    t0 = time.time()
    evaluations = 0
    baseline = evaluator(None)
    evaluations += 1
    judge = BudgetJudge.start(baseline, budget, allow_underpowered=allow_underpowered)
    removed = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
    final = baseline
    rounds: list[dict[str, Any]] = []
    forward_equivalents = 0.0
    stop_reason = "no removable units left"
    bar = tqdm(desc="iterative rounds", unit="round", disable=not progress)
    while max_rounds is None or len(rounds) < max_rounds:
        allowed = [u for u in pool if _fits(removed, u, floor)]
        if not allowed:
            break
        vals, cost = measure_units(model, seqs, allowed, scores=[score_id], removed=removed, batch_size=batch_size,
                                   pad_id=pad_id, progress=False, desc=f"round {len(rounds) + 1}",
                                   compensation=compensation)
        forward_equivalents += cost.forward_equivalents
        means = vals[score_id].mean(0)
        means = torch.nan_to_num(means, nan=math.inf)
        order = torch.argsort(means, stable=True).tolist()
        if candidates_fraction is not None and not rounds:
            keep = max(round_size, math.ceil(candidates_fraction * len(order)))
            pool = [allowed[j] for j in order[:keep]]
        picked: list[int] = []
        trial = removed
        for j in order:
            if len(picked) == round_size:
                break
            if _fits(trial, allowed[j], floor):
                picked.append(j)
                trial = _with(trial, [allowed[j]])
        if not picked:
            break
        result = evaluator(trial)
        evaluations += 1
        ok = judge(result, k=int(trial.sum()), heads_removed=int(trial.sum()))
        record: dict[str, Any] = {
            "round": len(rounds) + 1,
            "measured": _summary(means),
            "heads": [list(h) for j in picked for h in allowed[j]],
            "scores": [float(means[j]) for j in picked],
            "evaluation": result_dict(result),
            "accepted_units": len(picked) if ok else 0,
            "backoff": [],
            "forward_equivalents": round(cost.forward_equivalents, 2),
        }
        if ok:
            removed, final = trial, result
            rounds.append(record)
            bar.update(1)
            continue
        # the budget broke inside this round: keep the largest prefix (by measured order) that passes
        lo, hi, lo_result = 0, len(picked), None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            cand = _with(removed, [allowed[j] for j in picked[:mid]])
            res = evaluator(cand)
            evaluations += 1
            passed = judge(res, k=int(cand.sum()), heads_removed=int(cand.sum()))
            record["backoff"].append({"units": mid, "evaluation": result_dict(res), "within_budget": passed})
            if passed:
                lo, lo_result = mid, res
            else:
                hi = mid
        if lo:
            removed = _with(removed, [allowed[j] for j in picked[:lo]])
            final = lo_result
        record["accepted_units"] = lo
        record["heads_kept_out"] = [list(h) for j in picked[lo:] for h in allowed[j]]
        rounds.append(record)
        stop_reason = "budget reached"
        bar.update(1)
        break
    else:
        stop_reason = f"max_rounds={max_rounds} reached"
    bar.close()

    heads = [tuple(x) for x in removed.nonzero().tolist()]
    verification = (verify(verify_evaluator, removed, budget, any_removed=bool(heads))
                    if verify_evaluator is not None else None)
    selection = SelectionResult.for_removal(
        model, removed,
        method="iterative",
        score_id=score_id,
        policy=policy,
        min_heads_per_layer=min_heads_per_layer,
        allow_empty_layers=bool(allow_empty_layers),
        budget=budget,
        task=getattr(evaluator, "task_config", None),
        baseline=result_dict(baseline),
        result=result_dict(final),
        verification=verification,
        trace=judge.trace,
        cost=Cost(evaluations=evaluations, wall_seconds=round(time.time() - t0, 2),
                  forward_equivalents=round(forward_equivalents, 2)),
        calibration={"num_samples": len(seqs), "num_tokens": int(sum(len(s) for s in seqs))},
        details=IterativeDetails(round_size=round_size, candidates_fraction=candidates_fraction, rounds=rounds,
                                 stop_reason=stop_reason),
        compensation=record_of(compensation),
    )
    return raise_if_unverified(Plan(heads, selection), accept_unverified=accept_unverified, strict=strict_verification)
