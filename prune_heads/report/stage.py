"""The report stage: its config (``prune-heads report`` options, the recipe's ``report:`` section) and function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.schema import Config, option
from prune_heads.scoring.stage import check_score_ids


@dataclass
class ReportConfig(Config):
    enabled: bool = option(True, cli=False, help="plots of the calibration scores beside the summary")
    scores: list[str] | None = option(None, check=check_score_ids,
                                      help="Score ids to show (default: every score in the file).")
    fraction: float = option(0.1, gt=0, le=1, help="Fraction of heads in each inactive set (overlap tables, "
                                                   "per-layer counts).")


def run_report(cfg: ReportConfig, scores: Any, out: Path, *, plan: Any = None, overwrite: bool = False) -> Path:
    """Heatmaps, distributions, thresholds and overlaps of ``scores`` in ``out`` (``report.md``)."""
    from prune_heads.report import write_report

    return write_report(scores, out, score_ids=cfg.scores, fraction=cfg.fraction, overwrite=overwrite, plan=plan)
