"""The export and verify stages: their configs (CLI options, the recipe's ``export:``/``verify:`` sections)
and their functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.schema import Config, option


def _shard_size(v: Any) -> str | None:
    from prune_heads.errors import PruneHeadsError
    from prune_heads.export.streaming import parse_size

    try:
        parse_size(v)
    except PruneHeadsError as e:
        return str(e)
    return None


@dataclass
class ExportConfig(Config):
    format: str = option("sliced", choices=("sliced", "uniform", "masked"),
                         help="sliced: smaller, modelling code travels via auto_map; uniform: stock architecture "
                              "(uniform plans); masked: same shapes, heads zeroed.")
    dtype: str | None = option(None, choices=(None, "float32", "bfloat16", "float16"),
                               help="Write weights in this dtype (default: as in the source).")
    shard_size: str = option("5GB", check=_shard_size, help="Largest output shard, e.g. 5GB, 500MB.")
    approximate_norms: bool = option(False, help="OLMo-2: drop removed heads from the q/k norm statistic "
                                                 "(smaller, inexact; the error is measured and recorded).")


@dataclass
class VerifyConfig(Config):
    enabled: bool = option(True, cli="verify", flag="pair",
                           help="Compare the export's logits with the (compensated) masked original.")
    tol: float = option(1e-4, gt=0, cli="tolerance", help="Largest allowed |logit difference| (compared in float64).")
    num_sequences: int = option(4, ge=1, le=4096, cli="verify-sequences", help="Random token sequences in the check.")
    seq_len: int = option(64, ge=2, le=1 << 20, cli="verify-seq-len",
                          help="Tokens per check sequence (at most the model's context).")
    engine: str = option("auto", choices=("auto", "memory", "sequential"),
                         help="memory: both models loaded whole in float64; sequential: one decoder layer of each at "
                              "a time from the shards (same numbers, about one float64 layer of memory); auto: memory "
                              "when it fits with headroom.")


def run_export(config: ExportConfig, model: Any, plan: Any, out: Path, *, verify: VerifyConfig | None = None,
               overwrite: bool = False, progress: bool = True, scores: Any = None) -> Any:
    """Write ``plan`` applied to the model (a ``ModelConfig``, whole: its revision, GGUF file and trust flag
    choose the source) as a checkpoint in ``out``; verify it inline
    when ``verify`` is given and enabled. Returns ``ExportResult``.

    A compensated plan brings its compensation file along (written beside it by ``select``); ``scores``
    (a scores directory or ``HeadScores`` with moments) rebuilds it instead, for plans without one.
    """
    from prune_heads.export import export_checkpoint

    v = verify if verify is not None and verify.enabled else None
    return export_checkpoint(model, plan, out, format=config.format, dtype=config.dtype,
                             shard_size=config.shard_size, verify=v is not None, overwrite=overwrite,
                             approximate_norms=config.approximate_norms,
                             scores_summary=plan.selection.scores, progress=progress,
                             verify_tol=v.tol if v else 1e-4, verify_num_sequences=v.num_sequences if v else 4,
                             verify_seq_len=v.seq_len if v else 64, verify_engine=v.engine if v else "auto",
                             moments=scores)


@dataclass
class VerificationResult:
    max_abs_logit_diff: float
    max_abs_logit_diff_float32: float | None
    tolerance: float
    passed: bool
    approximate_norms: bool
    record: dict[str, Any]

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> VerificationResult:
        return cls(float(rec["max_abs_logit_diff"]), rec.get("max_abs_logit_diff_float32"), float(rec["tolerance"]),
                   bool(rec["passed"]), bool(rec.get("approximate_norms")), rec)

    @property
    def acceptable(self) -> bool:
        """Passed, or an approximate (OLMo-2 --approximate-norms) export whose error is recorded by design."""
        return self.passed or self.approximate_norms


def run_verify(config: VerifyConfig, model: Any, export_dir: Path, plan: Any, *, scores: Any = None) -> VerificationResult:
    """Largest |logit difference| between the export and the (compensated) masked original (``verify_export``)."""
    from prune_heads.export.record import ExportRecord
    from prune_heads.export.verify import verify_export

    exported = ExportRecord.load(export_dir)  # the dtype and norms the export was written with
    rec = verify_export(model, export_dir, plan, num_sequences=config.num_sequences, seq_len=config.seq_len,
                        tol=config.tol, dtype=None if exported.dtype in (None, "source") else exported.dtype,
                        approximate=bool(exported.approximate_norms),
                        compensation=plan_compensation(plan, model, scores), engine=config.engine)
    return VerificationResult.from_record(rec)


def plan_compensation(plan: Any, model: Any, scores: Any = None) -> Any:
    """The plan's ``Compensation`` (None when it zeroes), checked against the source model's config."""
    if not plan.selection.compensated:
        return None
    from prune_heads.compensation.plans import compensation_for_plan
    from prune_heads.export.source import source_config

    return compensation_for_plan(plan, scores=scores, config=source_config(model))
