"""Choosing which heads to remove: the budgeted static selector, GQA policies and the paper's sweep.

The measured selectors (``iterative``, ``gates``) live in their own modules and are imported lazily.
"""

from prune_heads.selection.budget import (
    BudgetJudge,
    UnderpoweredBudget,
    VerificationFailed,
    VerificationOverlap,
    check_power,
    judge,
)
from prune_heads.selection.policies import POLICIES, candidate_units, heads_of, layer_floor, removal_mask
from prune_heads.selection.search import SearchResult, max_probes, search_ascending, search_largest_k
from prune_heads.selection.static import RANDOM_SCORE, ranking, select_static, within_budget

__all__ = [
    "POLICIES",
    "RANDOM_SCORE",
    "BudgetJudge",
    "SearchResult",
    "UnderpoweredBudget",
    "VerificationFailed",
    "VerificationOverlap",
    "check_power",
    "judge",
    "search_ascending",
    "candidate_units",
    "heads_of",
    "layer_floor",
    "max_probes",
    "ranking",
    "removal_mask",
    "search_largest_k",
    "select_static",
    "within_budget",
]
