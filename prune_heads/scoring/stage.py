"""The calibrate stage: its config (CLI options and the recipe's ``calibration:`` section) and its function."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.schema import Config, ConfigError, option


def check_score_ids(ids: list[str]) -> str | None:
    from prune_heads.scoring.score_defs import all_score_ids

    known = all_score_ids()
    if "random" in ids:
        return "'random' is a ranking (select.score / --score random), not a calibration score"
    bad = [s for s in ids if s not in known]
    if bad:
        return f"unknown score(s) {', '.join(bad)}; known: {', '.join(known)}"
    return None


def _data_spec(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty (e.g. wikitext2, a .txt/.jsonl/.parquet file, hub:ID)"


@dataclass
class CalibrateConfig(Config):
    data: str = option("", required=True, check=_data_spec,
                       help="wikitext2 (packaged; wikitext2:hub for the Hub copy), FILE(.txt/.jsonl/.parquet), a "
                            "save_to_disk folder, hub:ID?name=..&split=.., or task:NAME.")
    offline_data: str | None = option(None, cli=False,
                                      help="used instead of a hub: data spec when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    num_samples: int = option(128, ge=1, help="Calibration documents (one sample each).")
    seq_len: int | None = option(None, ge=2, le=1 << 20,
                                 help="Tokens per sample (default: 512, or the model's context if shorter).")
    batch_size: int = option(8, ge=1, help="Sequences per forward pass.")
    seed: int = option(0, ge=0, help="Seed of the document order (and of --split's halves).")
    split: str = option("all", choices=("all", "search", "verify"),
                        help="Calibrate on all documents, or on one seeded half: the same halves that ppl:/kl: tasks' "
                             "search/verify splits use with the same seed, so held-out evaluation never scores "
                             "calibration text.")
    scores: list[str] | None = option(None, check=check_score_ids,
                                      help="Score ids (default: every forward-pass score; grad, ablation_kl, "
                                           "ablation_loss on request).")
    block_size: int | None = option(None, ge=1, help="Query block size of the scoring attention (default: adaptive).")
    moments: bool = option(True, help="Keep the o_proj-input statistics that compensation needs (--no-moments skips them).")
    ablation_compensate: str = option("none", choices=("none", "mean", "lsq"),
                                      help="Measure ablation_kl/ablation_loss with each head's removal compensated "
                                           "(lsq, mean) instead of zeroed (none), to rank for select --compensate of "
                                           "the same mode.")

    def check(self) -> None:
        from prune_heads.scoring.score_defs import ABLATION

        if self.ablation_compensate == "none":
            return
        if not any(s in ABLATION for s in self.scores or ()):
            raise ConfigError("ablation_compensate", "applies to measured ablation scores: add ablation_kl or "
                                                     "ablation_loss to the scores")
        if not self.moments:
            raise ConfigError("ablation_compensate", "compensation is solved from the moments: drop --no-moments")

    def data_now(self) -> str:
        """The data spec to use now: ``offline_data`` when the Hub is switched off and ``data`` is a hub: spec."""
        from prune_heads.data.documents import offline_requested

        if self.offline_data and self.data.startswith("hub:") and offline_requested():
            return self.offline_data
        return self.data

    def spec(self, model: Any = None) -> Any:
        from prune_heads.data import DataSpec

        seq_len = self.seq_len
        if seq_len is None:
            context = None
            if model is not None:
                from prune_heads.model.adapters import get_adapter

                context = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
            seq_len = min(512, context or 512)
        return DataSpec(source=self.data_now(), num_samples=self.num_samples, seq_len=seq_len, seed=self.seed,
                        split=self.split)


@dataclass
class CalibrationResult:
    scores_dir: Path | None
    num_samples: int
    num_tokens: int
    score_ids: list[str]
    wall_seconds: float
    scores: Any = None  # HeadScores

    def to_dict(self) -> dict[str, Any]:
        return {"scores": str(self.scores_dir) if self.scores_dir else None, "num_samples": self.num_samples,
                "num_tokens": self.num_tokens, "score_ids": self.score_ids}


def run_calibrate(config: CalibrateConfig, loaded: Any, model_id: str, out: Path | None, *, revision: str | None = None,
                  overwrite: bool = False, progress: bool = True) -> CalibrationResult:
    """Score every head of ``loaded.model`` and write the scores directory ``out`` (rank 0 only).

    The calibration token sequences are kept in the scores directory, so every later stage that needs
    calibration data (measured selectors, compensation) uses exactly these.
    """
    from prune_heads.data import calibration_sequences
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.scoring.distributed import rank_and_world

    spec = config.spec(loaded.model)
    documents: list[str] = []
    seqs = calibration_sequences(spec, loaded.tokenizer, loaded.model, documents=documents)
    t0 = time.time()
    hs = calibrate(loaded.model, seqs, scores=config.scores, batch_size=config.batch_size, tokenizer=loaded.tokenizer,
                   block_size=config.block_size, progress=progress, model_name=model_id, revision=revision,
                   moments=config.moments,
                   ablation_compensation=None if config.ablation_compensate == "none" else config.ablation_compensate)
    # which documents were calibrated on, so ppl:/kl: evaluations of the same source can leave them out
    hs.meta["data"] = {**spec.to_dict(), "documents": documents}
    if hs.moments is not None:  # the moments name the same data, so a mismatch with a plan's data is caught
        hs.moments.meta["data"] = spec.to_dict()
    hs.meta["wall_seconds"] = round(time.time() - t0, 2)
    hs.tokens = seqs
    if out is not None and rank_and_world()[0] == 0:
        hs.save(out, overwrite=overwrite)
    return CalibrationResult(Path(out) if out is not None else None, len(seqs), int(sum(map(len, seqs))),
                             hs.score_ids, hs.meta["wall_seconds"], hs)

