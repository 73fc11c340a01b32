"""The resumable ``prune-heads run``: recipes, the generic stage runner, and the run summary."""

from .runner import Pipeline, Summary, run

__all__ = ["Pipeline", "Summary", "run"]
