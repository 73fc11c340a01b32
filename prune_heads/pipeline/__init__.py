"""The resumable ``prune-heads run``: recipes, the generic stage runner, the stage declarations, the summary."""

from prune_heads.pipeline.stages import STAGES, run
from prune_heads.pipeline.summary import Summary

__all__ = ["STAGES", "Summary", "run"]
