"""Plots and markdown summaries of scores files: ``write_report`` for one, ``write_compare`` for two.

Only numpy and matplotlib (Agg) are used, never a model, so reports are cheap to (re)make. Names load on
first use (``prune_heads.lazy``).
"""

from prune_heads.lazy import lazy_exports

_EXPORTS = {
    "write_compare": "prune_heads.report.compare",
    "inactive_set": "prune_heads.report.metrics",
    "iou": "prune_heads.report.metrics",
    "precision": "prune_heads.report.metrics",
    "quantile_threshold": "prune_heads.report.metrics",
    "wasserstein1": "prune_heads.report.metrics",
    "plot_selection_search": "prune_heads.report.search",
    "DEFAULT_SCORES": "prune_heads.report.summary",
    "write_report": "prune_heads.report.summary",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
