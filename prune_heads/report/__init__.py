"""Plots and markdown summaries of scores files: ``write_report`` for one, ``write_compare`` for two.

Only numpy and matplotlib (Agg) are used, never a model, so reports are cheap to (re)make.
"""

from prune_heads.report.compare import write_compare
from prune_heads.report.metrics import inactive_set, iou, precision, quantile_threshold, wasserstein1
from prune_heads.report.search import plot_selection_search
from prune_heads.report.summary import DEFAULT_SCORES, write_report

__all__ = ["DEFAULT_SCORES", "inactive_set", "iou", "precision", "plot_selection_search", "quantile_threshold",
           "wasserstein1", "write_compare", "write_report"]
