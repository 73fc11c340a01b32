"""Choosing which heads to remove: the budgeted static selector, GQA policies and the paper's sweep.

The measured selectors (``iterative``, ``gates``) live in their own modules. Names here load on first
use (``prune_heads.lazy``), so importing a sibling module (the stage's config) does not import torch.
"""

from prune_heads.lazy import lazy_exports

_EXPORTS = {
    "BudgetJudge": "prune_heads.selection.budget",
    "UnderpoweredBudget": "prune_heads.selection.budget",
    "VerificationFailed": "prune_heads.selection.budget",
    "VerificationOverlap": "prune_heads.selection.budget",
    "check_power": "prune_heads.selection.budget",
    "judge": "prune_heads.selection.budget",
    "POLICIES": "prune_heads.selection.policies",
    "candidate_units": "prune_heads.selection.policies",
    "heads_of": "prune_heads.selection.policies",
    "layer_floor": "prune_heads.selection.policies",
    "removal_mask": "prune_heads.selection.policies",
    "SearchResult": "prune_heads.selection.search",
    "max_probes": "prune_heads.selection.search",
    "search_ascending": "prune_heads.selection.search",
    "search_largest_k": "prune_heads.selection.search",
    "RANDOM_SCORE": "prune_heads.selection.static",
    "ranking": "prune_heads.selection.static",
    "select_static": "prune_heads.selection.static",
    "within_budget": "prune_heads.selection.static",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
