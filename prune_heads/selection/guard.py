"""A second constraint checked at the length the model is served at: ``select --guard-task``.

Why: a budget searched on 256-token windows says nothing about retrieval at 2k tokens (issue 18: the demo's
plan kept perplexity within +10% at 256 tokens and lost pass-key retrieval at 2048). The guard is a second
task (``passkey:2048``, or ``ppl:DATA`` with ``--guard-seq-len``) with its own budget, judged by the same
paired rule as the search (``budget.judge``: at ``--confidence`` C a probe passes only when the one-sided C
upper bound of its paired drop is within ``--guard-max-drop``).

How it enters the search: a probe passes only when the search budget passes it *and* the guard does; the
guard is evaluated only on probes the budget already passed (it is the expensive, long evaluation). A guard
failure is a budget failure, so the ascending search stops there and the confidence of both bounds holds
for the returned ``k`` as it does without a guard (the search tests k in a fixed increasing order and stops
at the first failure). The chosen plan is then judged on the guard task's held-out documents (disjoint
keys, depths and fillers for ``passkey:``); an over-budget verdict fails the selection like the search
task's own verification (``--accept-unverified`` writes it marked, ``--strict-verification`` also refuses
an inconclusive one). The plan records it all under ``selection.guards`` (``plan.record.Guard``, one each).

Several guards (``Guards``): ``--guard-ppl-max-drop`` adds perplexity at the guard's length beside a
``passkey:`` guard. A probe passes only when every guard passes it, judged in order and stopping at the
first refusal (the later guards are not evaluated on a probe already refused), so each guard's trace holds
the probes it judged and its ``refused`` list the probes it stopped.
"""

from __future__ import annotations

from typing import Any

from prune_heads.errors import BudgetError
from prune_heads.plan.record import Budget
from prune_heads.plan.record import Guard as GuardRecord

__all__ = ["GuardCheck", "Guards"]


class GuardCheck:
    """Judges probes on the guard task; ``record()`` is what the plan stores."""

    def __init__(self, evaluator: Any, budget: Budget, *, verify_evaluator: Any = None,
                 allow_underpowered: bool = False, budget_flag: str = "--guard-max-drop") -> None:
        self.evaluator, self.verify_evaluator, self.budget = evaluator, verify_evaluator, budget
        self.allow_underpowered = allow_underpowered
        #: the option that sets this guard's budget, named in its errors
        self.budget_flag = budget_flag
        self.judge: Any = None
        self.refused: list[int] = []

    @property
    def task(self) -> str:
        return str((getattr(self.evaluator, "task_config", None) or {}).get("task", "the guard task"))

    def with_compensation(self, compensation: Any) -> GuardCheck:
        """The same guard evaluating the compensated model (the one the export writes)."""
        from prune_heads.compensation.plans import evaluator_with

        return GuardCheck(evaluator_with(self.evaluator, compensation), self.budget,
                          verify_evaluator=evaluator_with(self.verify_evaluator, compensation),
                          allow_underpowered=self.allow_underpowered, budget_flag=self.budget_flag)

    def start(self) -> GuardCheck:
        """Evaluate the unpruned model on the guard task (``k = 0``) and check that the budget is usable there."""
        from prune_heads.selection.budget import BudgetJudge, check_disjoint

        check_disjoint(self.evaluator, self.verify_evaluator)
        baseline = self.evaluator(None)
        try:
            self.judge = BudgetJudge.start(baseline, self.budget, allow_underpowered=self.allow_underpowered)
        except BudgetError as e:
            raise type(e)(f"guard {self.task}: {e}".replace("--max-drop", self.budget_flag)
                          .replace("--limit", "--guard-limit")) from None
        return self

    def passes(self, removed: Any, *, k: int, heads_removed: int) -> bool:
        """Whether the plan ``removed`` (a mask) is within the guard's budget; recorded in the guard's trace."""
        if self.judge is None:
            self.start()
        if k == 0:
            return True
        import time

        tic = time.time()
        ok = self.judge(self.evaluator(removed), k=k, heads_removed=heads_removed, seconds=time.time() - tic)
        if not ok:
            self.refused.append(int(k))
        return ok

    def far(self, k: int) -> bool:
        """Whether the guard's bound at ``k`` (when it judged ``k``) is below a quarter of its budget (the
        ascending search's test for doubling its step)."""
        probes = [p for p in (self.judge.trace if self.judge is not None else []) if p.k == k and p.drop is not None]
        return not probes or probes[-1].drop.bound <= self.budget.max_drop / 4

    def record(self, removed: Any, *, k: int, heads_removed: int) -> GuardRecord:
        """The guard's verdict on the chosen plan (evaluated now if the search never did), and its held-out check."""
        from prune_heads.plan.record import result_dict
        from prune_heads.selection.budget import judge, verify

        if self.judge is None:
            self.start()
        baseline = self.judge.baseline
        result = self.evaluator(removed) if k else baseline
        drop = judge(baseline, result, self.budget)
        verification = None
        if self.verify_evaluator is not None:
            verification = verify(self.verify_evaluator, removed, self.budget, any_removed=bool(k))
        task = getattr(self.evaluator, "task_config", None)
        return GuardRecord(task=task, budget=self.budget, seq_len=(task or {}).get("seq_len"),
                           baseline=result_dict(baseline), result=result_dict(result), drop=drop,
                           within_budget=bool(drop.within_budget), trace=list(self.judge.trace),
                           refused=list(self.refused), verification=verification)


class Guards:
    """Several guards judged together: a probe passes only when each passes it (in order, stopping at the first
    refusal); ``record()`` is one ``Guard`` record per guard."""

    def __init__(self, checks: list[GuardCheck]) -> None:
        self.checks = list(checks)

    def with_compensation(self, compensation: Any) -> Guards:
        return Guards([c.with_compensation(compensation) for c in self.checks])

    def start(self) -> Guards:
        for c in self.checks:
            c.start()
        return self

    def passes(self, removed: Any, *, k: int, heads_removed: int) -> bool:
        return all(c.passes(removed, k=k, heads_removed=heads_removed) for c in self.checks)

    def far(self, k: int) -> bool:
        return all(c.far(k) for c in self.checks)

    def record(self, removed: Any, *, k: int, heads_removed: int) -> list[GuardRecord]:
        return [c.record(removed, k=k, heads_removed=heads_removed) for c in self.checks]


def as_guards(guard: Any) -> Guards | None:
    """``select_static``'s ``guard``: None, one ``GuardCheck`` or ``Guards``, as ``Guards``."""
    if guard is None or isinstance(guard, Guards):
        return guard
    return Guards([guard])
