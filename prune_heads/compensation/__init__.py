"""Least-squares compensation of removed heads (issue 10): statistics, closed-form solve, greedy
``lsq_error`` ranking, live application, sequential mode, and the checks that tie a plan to its statistics.

One definition is used everywhere: ``compute_compensation(removed, spec, moments=...)`` (or a cached
``Compensator``) gives a ``Compensation``; ``static_mask(model, heads, compensation=...)`` applies it to a
running model, the export folds it into the weights, and verification compares the two.
"""

from prune_heads.compensation.apply import CompensationHooks, apply_compensation, fold_into_model
from prune_heads.compensation.compensator import Compensator, compute_compensation
from prune_heads.compensation.greedy import LSQ_SCORES, GreedyResult, greedy_removal, lsq_error_scores
from prune_heads.compensation.moments import (
    MOMENTS_FILE,
    Moments,
    MomentsCollector,
    collect_moments,
    moments_cost,
)
from prune_heads.compensation.plans import compensation_for_plan, compensator_for
from prune_heads.compensation.record import Compensation, LayerCompensation
from prune_heads.compensation.solve import precision, residual_error, solve_layer
from prune_heads.compensation.spec import DEFAULT_RIDGE, MODES, CompensationSpec, as_spec

__all__ = [
    "DEFAULT_RIDGE",
    "LSQ_SCORES",
    "MODES",
    "MOMENTS_FILE",
    "Compensation",
    "CompensationHooks",
    "CompensationSpec",
    "Compensator",
    "GreedyResult",
    "LayerCompensation",
    "Moments",
    "MomentsCollector",
    "apply_compensation",
    "as_spec",
    "collect_moments",
    "compensation_for_plan",
    "compensator_for",
    "compute_compensation",
    "fold_into_model",
    "greedy_removal",
    "lsq_error_scores",
    "moments_cost",
    "precision",
    "residual_error",
    "solve_layer",
]
