"""The typed record every plan file carries: what a selection produced and how.

Every selector returns a ``SelectionResult``; the plan file is written from it and parsed back into it,
with every known field's type checked on load. Consumers (export provenance, model cards, the run summary,
``eval --plan``) read attributes, never ``dict.get`` fallbacks, so a selector that records its evaluation
under another name is a type error at the source instead of a silently empty summary downstream.

Method-specific records (the static search's ``k``, iterative rounds, gate parameters) live in
``details``, typed per method by ``DETAILS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prune_heads.__about__ import __version__
from prune_heads.errors import PruneHeadsError


class PlanFormatError(PruneHeadsError):
    """A plan file whose metadata does not have the documented types."""


# ---- parts ------------------------------------------------------------------------------------
@dataclass
class Budget:
    """The budget a selection was held to: ``max_drop`` in metric units, or a fraction with ``relative``."""

    max_drop: float
    relative: bool = False
    metric: str | None = None
    higher_is_better: bool = True
    #: one-sided confidence level of the drop's upper bound (0: the point estimate decides)
    confidence: float = 0.0
    #: the smallest drop the search documents can resolve at ``confidence`` (``resolution()``), when known
    resolvable_drop: float | None = None
    #: documents the search split would need for ``max_drop`` at ``confidence``, when known
    docs_needed: int | None = None
    #: the budget was below ``resolvable_drop`` and the search ran anyway (``allow_underpowered``)
    underpowered: bool = False


@dataclass
class DropStats:
    """The drop of one evaluation against the baseline on the same documents, and its verdict.

    ``estimate``/``stderr`` in budget units (metric units, or a fraction of the baseline when the budget
    is relative); ``bound`` is the one-sided upper ``confidence`` bound (the estimate at confidence 0)
    and ``lower`` the matching lower one; ``allowed`` is the budget in the same units. A fixed-count
    selection claims no budget: its drops are measured only (``allowed`` and ``within_budget`` None).
    """

    estimate: float
    stderr: float | None
    bound: float
    lower: float
    confidence: float
    allowed: float | None
    within_budget: bool | None
    n: int = 0
    #: ``paired`` (per-document differences), ``unpaired`` (standard errors combined), ``point``
    method: str = "paired"
    #: the surrogate's mean per-document harm and its standard error, when the search used one
    surrogate: str | None = None
    surrogate_estimate: float | None = None
    surrogate_stderr: float | None = None


@dataclass
class Probe:
    """One evaluation of the search: ``k`` units (``heads_removed`` heads) removed."""

    k: int
    heads_removed: int
    metric: str
    value: float
    stderr: float | None = None
    n: int = 0
    seconds: float = 0.0
    within_budget: bool | None = None
    #: the drop statistics of this probe (estimate, stderr, bound, verdict)
    drop: DropStats | None = None


@dataclass
class Verification:
    """The chosen plan judged on data the search never saw (held-out documents or another task).

    ``verdict``: ``within`` (the upper bound is within budget), ``over`` (the lower bound is above it:
    the held-out data show the budget broken), ``inconclusive`` (the interval straddles it) or
    ``measured`` (a fixed-count plan: no budget, the held-out drop is its measured cost; ``within_budget``
    is then None).
    """

    task: dict[str, Any] | None
    baseline: dict[str, Any]
    result: dict[str, Any]
    within_budget: bool | None
    drop: DropStats | None = None
    verdict: str | None = None


@dataclass
class Guard:
    """The second constraint of a selection, checked at the length the model is served at (``--guard-task``).

    Every probe the budget passed was also judged on the guard task (``trace``); a probe the guard refused
    counted as a failure of the search, so the chosen plan held both. ``seq_len`` is the length at which the
    guard showed the budget to hold; ``verification`` judges the chosen plan on the guard task's held-out
    documents (keys and fillers the guard's search never saw, for ``passkey:``).
    """

    task: dict[str, Any] | None
    budget: Budget
    seq_len: int | None = None
    baseline: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    drop: DropStats | None = None
    within_budget: bool = True
    trace: list[Probe] = field(default_factory=list)
    #: the numbers of units the guard refused after the search budget had passed them
    refused: list[int] = field(default_factory=list)
    verification: Verification | None = None


@dataclass
class Cost:
    evaluations: int = 0
    max_evaluations: int | None = None
    wall_seconds: float = 0.0
    #: full forward passes of one sequence spent on measurements (ablation, gate training)
    forward_equivalents: float | None = None


# ---- method-specific details ------------------------------------------------------------------
@dataclass
class ManualDetails:
    """A hand-written plan: nothing but the heads."""


@dataclass
class StaticDetails:
    k: int = 0
    num_units: int = 0
    seed: int | None = None
    #: ``bisect`` (gallop + bisection), ``ascend`` (increasing k, stop at the first failure), or ``fixed``:
    #: no search and no budget, the first ``k`` units of the ranking for a requested count (``heads`` or
    #: ``fraction``, as asked; the plan's ``heads_removed`` is what was removed)
    search: str = "bisect"
    #: the surrogate that sized the ascending search's steps, if any
    surrogate: str | None = None
    #: the requested count of a ``fixed`` selection: heads, or a fraction of all heads
    heads: int | None = None
    fraction: float | None = None

    @property
    def fixed(self) -> bool:
        """A fixed-count selection: no budget was searched or claimed."""
        return self.search == "fixed"


@dataclass
class IterativeDetails:
    round_size: int = 4
    candidates_fraction: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = ""


@dataclass
class GatesDetails:
    target_fraction: float | None = None
    l0_penalty: float | None = None
    steps: int = 0
    lr: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    log_alpha: list[list[float]] = field(default_factory=list)


DETAILS: dict[str, type] = {"manual": ManualDetails, "static": StaticDetails, "iterative": IterativeDetails,
                            "gates": GatesDetails}


def register_details(method: str, cls: type) -> None:
    """Let a selector defined outside this package record typed details under its method name."""
    DETAILS[method] = cls


# ---- the record --------------------------------------------------------------------------------
@dataclass
class SelectionResult:
    method: str = "manual"
    heads_total: int | None = None
    heads_removed: int | None = None
    per_layer_counts: list[int] | None = None
    model: str | None = None
    fingerprint: dict[str, Any] | None = None
    score_id: str | None = None
    policy: str = "free"
    min_heads_per_layer: int = 1
    allow_empty_layers: bool = False
    budget: Budget | None = None
    #: the search task's exact configuration (``Evaluator.task_config``)
    task: dict[str, Any] | None = None
    #: ``EvalResult.to_dict()`` of the unpruned model and of the chosen plan, on the search data
    baseline: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    verification: Verification | None = None
    #: the constraints at the serving length (``--guard-task``, ``--guard-ppl-max-drop``), when the selection had any
    guards: list[Guard] = field(default_factory=list)
    #: the plan failed its verification and was written anyway (``--accept-unverified``)
    accepted_unverified: bool = False
    trace: list[Probe] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    #: ``CompensationSpec.to_dict()`` plus the moments' fingerprint, when removed heads are compensated
    compensation: dict[str, Any] | None = None
    scores: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    recipe: str | None = None
    details: Any = field(default_factory=ManualDetails)
    tool_version: str = __version__

    NESTED: ClassVar[dict[str, type]] = {"budget": Budget, "verification": Verification, "cost": Cost}

    @classmethod
    def for_removal(cls, model: Any, mask: Any, **fields: Any) -> SelectionResult:
        """The record of removing ``mask`` (a ``(layers, heads)`` bool tensor) from ``model``: the fields every
        selection method fills the same way (the counts and the model's identity), plus the method's own."""
        from prune_heads.model.fingerprint import fingerprint

        return cls(heads_total=int(mask.numel()), heads_removed=int(mask.sum()), per_layer_counts=mask.sum(1).tolist(),
                   model=getattr(model.config, "name_or_path", None) or None, fingerprint=fingerprint(model), **fields)

    @property
    def chosen_probe(self) -> Probe | None:
        """The trace entry of the chosen plan (the last evaluated probe with its number of heads)."""
        hits = [p for p in self.trace if p.heads_removed == self.heads_removed]
        return hits[-1] if hits else None

    @property
    def compensated(self) -> bool:
        """Whether the removed heads' output is made up for (``mean``/``lsq``), not just zeroed."""
        return bool(self.compensation) and self.compensation.get("mode", "none") != "none"

    @property
    def calibration_documents(self) -> list[str]:
        """The documents of the scores this plan was selected with (``data.recorded_documents``)."""
        from prune_heads.data.tokens import recorded_documents

        return recorded_documents((self.scores or {}).get("data"))

    @property
    def fraction_removed(self) -> float | None:
        if not self.heads_total or self.heads_removed is None:
            return None
        return self.heads_removed / self.heads_total

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["details"] = dataclasses.asdict(self.details)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "plan") -> SelectionResult:
        """Parse and type-check the metadata of a plan file (unknown keys are refused)."""
        if not isinstance(raw, dict):
            raise PlanFormatError(f"{where}: metadata must be a JSON object")
        method = raw.get("method", "manual")
        if method not in DETAILS:
            raise PlanFormatError(f"{where}: unknown selection method {method!r} (known: {', '.join(DETAILS)})")
        raw = dict(raw)
        if "guard" in raw and "guards" not in raw:  # plans of 0.x before several guards: one record or null
            old = raw.pop("guard")
            raw["guards"] = [old] if old else []
        kwargs = _typed_fields(cls, {k: v for k, v in raw.items() if k != "details"}, where)
        kwargs["details"] = DETAILS[method](**_typed_fields(DETAILS[method], raw.get("details") or {},
                                                            f"{where}: details"))
        return cls(**kwargs)


def _typed_fields(cls: type, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of ``cls`` from ``raw``, type-checked by the same rules as every config (``schema.build``)."""
    from prune_heads.schema import ConfigError, build

    try:
        built = build(cls, raw, "", root="the plan's metadata")
    except ConfigError as e:
        raise PlanFormatError(f"{where}: {e}") from None
    return {f.name: getattr(built, f.name) for f in dataclasses.fields(cls)}


def result_dict(result: Any) -> dict[str, Any] | None:
    """``EvalResult`` (or anything with ``to_dict``) as the plain dict a ``SelectionResult`` stores."""
    if result is None:
        return None
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return dict(result.__dict__)


__all__ = ["DETAILS", "Budget", "Cost", "DropStats", "GatesDetails", "Guard", "IterativeDetails", "ManualDetails", "PlanFormatError",
           "Probe", "SelectionResult", "StaticDetails", "Verification", "register_details", "result_dict"]
