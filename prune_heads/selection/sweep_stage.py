"""The sweep stage (``prune-heads sweep``): its config and its function over ``selection.sweep.run_sweep``.

This module imports no torch (the CLI builds its options from ``SweepConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.schema import Config, ConfigError, option
from prune_heads.scoring.stage import check_score_ids


@dataclass
class SweepConfig(Config):
    task: str = option("", required=True, help="lm-eval task name, mc:FILE.jsonl, ppl:DATA or kl:DATA.")
    scores: list[str] = option(default_factory=lambda: ["ahon_ln", "awft", "lthon_ln"], check=check_score_ids,
                               help="Score ids to sweep (a random baseline is always added).")
    dynamic: bool = option(False, help="Zero heads per input as in the paper (default: static, the same heads "
                                       "for every input).")
    fractions: list[float] = option(default_factory=lambda: [0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30],
                                    help="Fractions of all heads to zero (0.05 = 5%).")
    random_seeds: list[int] = option(default_factory=lambda: [0], check=lambda v: None if all(s >= 0 for s in v)
                                     else f"seeds must be integers >= 0, got {v}",
                                     help="Seeds of the random baseline (empty: none).")
    max_drop: float = option(0.01, ge=0, help="Budget of the summary table (0.01 = one point).")
    limit: int | None = option(None, ge=1, help="Documents per (sub)task.")
    num_fewshot: int | None = option(None, ge=0, help="Few-shot examples (default: the task's own).")
    data_dir: str | None = option(None, help="Folder of offline task data (default: found automatically).")
    batch_size: int = option(8, ge=1, help="Requests per forward pass.")

    def check(self) -> None:
        if not self.fractions or not all(0 <= f <= 1 for f in self.fractions):
            raise ConfigError("fractions", f"must be fractions in [0, 1] (0.05 = 5% of the heads), got {self.fractions}")


def run_sweep_stage(cfg: SweepConfig, loaded: Any, scores: Any, out: Path, *, model_id: str,
                    overwrite: bool = False) -> Any:
    """Evaluate every (score, fraction) pair and write sweep.json/.csv, table.md/.csv and sweep.png."""
    from prune_heads.evaluation import make_evaluator
    from prune_heads.selection.sweep import run_sweep

    scores.check(loaded.model)
    ev = make_evaluator(loaded.model, loaded.tokenizer, cfg.task, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                        data_dir=cfg.data_dir, batch_size=cfg.batch_size)
    result = run_sweep(loaded.model, scores, ev, score_ids=[s for s in cfg.scores if s != "random"],
                       fractions=cfg.fractions, dynamic=cfg.dynamic, random_seeds=cfg.random_seeds,
                       max_drop=cfg.max_drop)
    result.meta.update({"model": model_id})
    result.save(out, overwrite=overwrite)
    return result


__all__ = ["SweepConfig", "run_sweep_stage"]
