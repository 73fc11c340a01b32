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
    engine: str = option("auto", choices=("auto", "memory", "sequential"),
                         help="memory: load the whole model; sequential: one decoder layer at a time from the shards "
                              "(forward scores and moments only; the same numbers, resumable after a kill); auto: "
                              "memory when the model and its moments fit with headroom.")

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


def calibrate_memory(config: CalibrateConfig) -> dict[str, Any]:
    """What sets calibrate's peak memory (``sequential_engine.engine_for``'s keywords).

    Whole model: its weights in the dtype it loads in, every layer's float64 moments and one batch's
    activations. Layer by layer: two layers, one layer's moments, every sequence's hidden states and one
    batch's activations (``sequential_engine.Footprint``). Gradient, measured ablation and lsq scores need
    the whole model.
    """
    from prune_heads.scoring.score_defs import ABLATION, COMPENSATION, GRADIENT

    whole_only = next((f"the {s} score" for s in config.scores or () if s in GRADIENT or s in ABLATION
                       or s in COMPENSATION), None)
    seq_len = config.seq_len or 512
    return {"batch_tokens": config.batch_size * seq_len, "all_tokens": config.num_samples * seq_len,
            "moments": "stream" if config.moments else "none", "logits": False, "whole_only": whole_only,
            "instead": "the forward scores and moments run layer by layer (drop it)"}


def calibrate_engine(config: CalibrateConfig, model: Any, notify: Any = None, estimate: Any = None) -> str:
    """``memory`` or ``sequential`` for ``config.engine`` and the model (a ``ModelConfig``), judged before loading;
    what needs the whole model is refused, with the memory it needs, when the model does not fit."""
    from prune_heads.model.sequential_engine import engine_for

    return engine_for(config.engine, model, what="calibrate", notify=notify, estimate=estimate, **calibrate_memory(config))


def layers_dir(out: Path) -> Path:
    """Where a layer-by-layer calibration keeps its finished layers until the scores are written."""
    out = Path(out)
    return out.parent / f".{out.name}.layers"


def run_calibrate_sequential(config: CalibrateConfig, model: Any, model_id: str, out: Path, *,
                             overwrite: bool = False, progress: bool = True) -> CalibrationResult:
    """``run_calibrate`` one decoder layer at a time from the checkpoint's shards (``scoring.sequential``).

    Finished layers are kept beside ``out`` (``layers_dir``) until the scores directory is written, so a
    killed run, started again with the same command, resumes from the last finished layer. The result's
    ``scores`` are for its summary only: their moments were streamed to ``out`` and are never held whole here
    (4 GiB for an 8B), so whoever needs them reads the directory back (``HeadScores.load(out)``).
    """
    import shutil

    from prune_heads.data import calibration_sequences
    from prune_heads.errors import PruneHeadsError
    from prune_heads.export.source import resolve_source
    from prune_heads.model.loading import parse_dtype
    from prune_heads.model.remote_code import pretrained
    from prune_heads.model.sequential_engine import skeleton
    from prune_heads.scoring.distributed import rank_and_world
    from prune_heads.scoring.sequential import calibrate_sequential

    if rank_and_world()[1] > 1:
        raise PruneHeadsError("layer by layer calibration runs in one process; launch it without torchrun/accelerate, "
                              "or use --engine memory for data-parallel calibration")
    if model.device_map is not None:
        raise PruneHeadsError("--device-map spreads a whole model over devices; layer by layer needs none: drop it "
                              "or use --engine memory")
    source = resolve_source(model)
    tokenizer = pretrained("tokenizer", str(source), trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sk = skeleton(source, trust_remote_code=model.trust_remote_code)
    spec = config.spec(sk)
    documents: list[str] = []
    seqs = calibration_sequences(spec, tokenizer, sk, documents=documents)
    t0 = time.time()
    work = layers_dir(out)
    hs = calibrate_sequential(source, seqs, work, scores=config.scores, batch_size=config.batch_size,
                              pad_id=int(tokenizer.pad_token_id or 0), block_size=config.block_size,
                              dtype=parse_dtype(model.dtype), device=model.resolved_device() or "cpu",
                              moments=config.moments, progress=progress, model_name=model_id,
                              revision=model.revision)
    hs.meta["data"] = {**spec.to_dict(), "documents": documents}
    if hs.moments is not None:
        hs.moments.meta["data"] = spec.to_dict()
    hs.meta["wall_seconds"] = round(time.time() - t0, 2)
    hs.tokens = seqs
    hs.save(out, overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return CalibrationResult(Path(out), len(seqs), int(sum(map(len, seqs))), hs.score_ids, hs.meta["wall_seconds"], hs)


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

