"""The typed records of an export: ``prune_heads.json`` (``ExportRecord``), its verification
(``VerificationRecord``) and its evaluation rows (``EvaluationRow``).

The model card, the run summary and ``push`` read these fields; nothing guesses at a dict's shape. A record
is parsed strictly on load (every known field's type checked by the rules every config uses, unknown keys
refused), so a record written under another name fails where it is read, with the file named.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.__about__ import __version__
from prune_heads.errors import PruneHeadsError
from prune_heads.export.source import PROVENANCE_FILE  # the record's file name inside an export


class RecordError(PruneHeadsError):
    """A record file that is missing, unreadable, or whose fields do not have the documented types."""


#: a field every record of its kind has (``schema.build`` names it when it is missing)
_REQUIRED = {"required": True}


def _typed(cls: type, raw: Any, where: str) -> Any:
    from prune_heads.schema import ConfigError, build

    try:
        return build(cls, raw, "", root=where)
    except ConfigError as e:
        raise RecordError(f"{where}: {e}") from None


@dataclass
class VerificationRecord:
    """The export compared with the (compensated) masked original: what ``verify_export`` measured."""

    max_abs_logit_diff: float = field(metadata=_REQUIRED)
    tolerance: float = field(metadata=_REQUIRED)
    passed: bool = field(metadata=_REQUIRED)
    max_abs_logit_diff_float32: float | None = None
    num_sequences: int | None = None
    seq_len: int | None = None
    compute_dtype: str | None = None
    #: ``memory`` (both models whole) or ``sequential`` (streamed layer by layer): the same numbers either way
    engine: str | None = None
    weights_dtype: str | None = None
    approximate_norms: bool = False
    reference: str | None = None

    @property
    def acceptable(self) -> bool:
        """Passed, or an approximate (OLMo-2 --approximate-norms) export whose error is recorded by design."""
        return self.passed or self.approximate_norms

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "verification") -> VerificationRecord:
        return _typed(cls, raw, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VerificationRecord:
        return cls.from_dict(_read(Path(path)), str(path))


@dataclass
class EvaluationRow:
    """One row of the card's evaluation table: a task before and after pruning, and where it was measured."""

    task: str = field(metadata=_REQUIRED)
    metric: str = ""
    before: float | None = None
    before_stderr: float | None = None
    after: float | None = None
    after_stderr: float | None = None
    n: int | None = None
    higher_is_better: bool | None = None
    measured_on: str = ""

    @classmethod
    def of(cls, task: str, before: dict[str, Any] | None, after: dict[str, Any] | None, measured_on: str
           ) -> EvaluationRow:
        """A row from two ``EvalResult.to_dict()`` records (either may be missing)."""
        ref = after or before or {}
        b, a = before or {}, after or {}
        return cls(task=task, metric=ref.get("metric") or "", before=b.get("value"), before_stderr=b.get("stderr"),
                   after=a.get("value"), after_stderr=a.get("stderr"), n=ref.get("n"),
                   higher_is_better=ref.get("higher_is_better"), measured_on=measured_on)


@dataclass
class ExportRecord:
    """``prune_heads.json``: what an export is (source, plan, format, counts) and what was checked about it."""

    format: str = "sliced"
    source: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    #: the plan file's content (``Plan.to_dict()``), local paths reduced to their names
    plan: dict[str, Any] | None = None
    removed_per_layer: list[int] = field(default_factory=list)
    heads_total: int | None = None
    heads_removed: int | None = None
    kv_heads_removed: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    params_after_predicted: int | None = None
    dtype: str = "source"
    approximate_norms: bool = False
    compensation: dict[str, Any] | None = None
    scores_summary: dict[str, Any] | None = None
    evaluation: list[EvaluationRow] = field(default_factory=list)
    verification: VerificationRecord | None = None
    license: str | None = None
    #: the export's own files, each with its size and xxh3_128 content hash (``io_utils.file_record``; None for
    #: the card and this record, which change later): ``push`` checks them
    files: dict[str, Any] | None = None
    repo_id: str | None = None
    tool: str = "prune-heads"
    tool_version: str = __version__
    #: written by exports before the typed record; kept as it was, never rendered
    eval_results: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = PROVENANCE_FILE) -> ExportRecord:
        return _typed(cls, raw, where)

    @classmethod
    def load(cls, export_dir: str | os.PathLike) -> ExportRecord:
        """The record of the export in ``export_dir``; ``RecordError`` (one line) when it has none or a bad one."""
        path = Path(export_dir) / PROVENANCE_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RecordError(f"{Path(export_dir)} has no readable {PROVENANCE_FILE} ({e}): is it an export?") from e
        return cls.from_dict(raw, str(path))

    def save(self, export_dir: str | os.PathLike) -> Path:
        """Write the record atomically (``export_dir/prune_heads.json``)."""
        from prune_heads.io_utils import write_json_atomic

        return write_json_atomic(Path(export_dir) / PROVENANCE_FILE, self.to_dict())

    def selection(self) -> Any:
        """The plan's typed ``SelectionResult`` (None when the record has no plan)."""
        if not self.plan:
            return None
        from prune_heads.plan.record import SelectionResult

        return SelectionResult.from_dict({k: v for k, v in self.plan.items() if k != "removed_heads"},
                                         f"{PROVENANCE_FILE}: plan")


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecordError(f"cannot read {path} ({e})") from e


__all__ = ["PROVENANCE_FILE", "EvaluationRow", "ExportRecord", "RecordError", "VerificationRecord"]
