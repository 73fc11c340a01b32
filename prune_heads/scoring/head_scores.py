"""``HeadScores``: every score of every head, per calibration sequence and averaged.

On disk a directory with ``scores.safetensors`` (``<score_id>`` = mean ``(L, H)``,
``per_sample/<score_id>`` = ``(N, L, H)``), ``scores.json`` (provenance and geometry) and, when the
calibration collected them, ``moments.safetensors`` (the statistics compensation is solved from; see
``prune_heads.compensation.moments``), written in the same atomic directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prune_heads.__about__ import __version__
from prune_heads.errors import ModelMismatchError, PruneHeadsError
from prune_heads.io_utils import atomic_dir, file_sha256, write_json_atomic
from prune_heads.model.fingerprint import check_fingerprint

SCORES_FILE = "scores.safetensors"
META_FILE = "scores.json"
TOKENS_FILE = "tokens.safetensors"


@dataclass
class HeadScores:
    """Per-head scores of one model on one calibration set."""

    per_sample_values: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the calibration token sequences, so later stages (measured selectors, sequential compensation) use
    #: exactly the data the scores came from; None when they were not kept
    tokens: list[list[int]] | None = None
    #: ``prune_heads.compensation.Moments`` of the same calibration pass, or None
    moments: Any = None

    def __post_init__(self) -> None:
        for sid, v in self.per_sample_values.items():
            if sid not in self.means:
                self.means[sid] = v.float().mean(0)

    # ---- access ---------------------------------------------------------------------------
    @property
    def score_ids(self) -> list[str]:
        return list(self.means)

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.means.values())).shape[0])

    @property
    def num_heads(self) -> int:
        return int(next(iter(self.means.values())).shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.meta.get("num_samples") or next(iter(self.per_sample_values.values())).shape[0])

    def _require(self, score_id: str) -> None:
        if score_id not in self.means:
            raise PruneHeadsError(
                f"score {score_id!r} is not in this scores file (it has {', '.join(self.score_ids)}); "
                f"recalibrate with --scores {score_id}"
            )

    def mean(self, score_id: str) -> torch.Tensor:
        """``(L, H)`` float32 mean over calibration sequences."""
        self._require(score_id)
        return self.means[score_id].float()

    def per_sample(self, score_id: str) -> torch.Tensor:
        """``(N, L, H)`` float32 per-sequence values."""
        self._require(score_id)
        if score_id not in self.per_sample_values:
            raise PruneHeadsError(f"score {score_id!r} has no per-sample values (it is a whole-set measurement)")
        return self.per_sample_values[score_id].float()

    def merged(self, other: HeadScores) -> HeadScores:
        """This file's scores plus ``other``'s (for adding ablation scores to a calibration); ``other``'s records
        that this file lacks (the ablation's cost and compensation) come along."""
        meta = {**other.meta, **self.meta}
        meta["scores"] = sorted(set(self.score_ids) | set(other.score_ids))
        return HeadScores({**self.per_sample_values, **other.per_sample_values}, meta, {**self.means, **other.means},
                          self.tokens if self.tokens is not None else other.tokens,
                          self.moments if self.moments is not None else other.moments)

    # ---- checks ---------------------------------------------------------------------------
    def check(self, model: Any) -> None:
        """Raise a clear error when these scores were made on another model."""
        from prune_heads.model.adapters import get_adapter

        layout = get_adapter(model).layout(model.config)
        if (layout.num_layers, layout.num_heads) != (self.num_layers, self.num_heads):
            raise ModelMismatchError(
                f"scores have {self.num_layers} layers x {self.num_heads} heads but the model has "
                f"{layout.num_layers} x {layout.num_heads}: they were made on another model"
            )
        check_fingerprint(self.meta.get("fingerprint"), model, "this scores file")

    # ---- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, overwrite: bool = False, *,
             inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
        """Write the scores directory atomically; ``inputs`` (model, data) may not be, contain or hold it."""
        tensors: dict[str, torch.Tensor] = {}
        for sid, v in self.means.items():
            tensors[sid] = v.float().contiguous()
        for sid, v in self.per_sample_values.items():
            tensors[f"per_sample/{sid}"] = v.float().contiguous()
        meta = dict(self.meta)
        meta.setdefault("tool_version", __version__)
        meta.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        meta["scores"] = self.score_ids
        if self.moments is not None:
            from prune_heads.compensation.moments import MOMENTS_FILE

            meta["moments"] = {"file": MOMENTS_FILE, **self.moments.summary()}
        with atomic_dir(directory, overwrite=overwrite, inputs=inputs) as tmp:
            save_file(tensors, str(tmp / SCORES_FILE), metadata={"format": "prune-heads-scores/1"})
            meta["tensors_sha256"] = file_sha256(tmp / SCORES_FILE)  # ties the files together
            if self.tokens is not None:
                save_tokens(self.tokens, tmp / TOKENS_FILE)
                meta["tokens_sha256"] = file_sha256(tmp / TOKENS_FILE)
            write_json_atomic(tmp / META_FILE, meta)
            if self.moments is not None:
                self.moments.save(tmp / MOMENTS_FILE)
        self.meta = meta
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, lazy_moments: bool = True) -> HeadScores:
        """The scores in ``directory``. The moments' layers are read from their file when used
        (``Moments.load``), unless ``lazy_moments=False`` (for a directory that is about to go)."""
        d = Path(directory)
        if not (d / SCORES_FILE).is_file() or not (d / META_FILE).is_file():
            raise PruneHeadsError(f"{d} is not a scores directory (expected {SCORES_FILE} and {META_FILE}); make one with `prune-heads calibrate`")
        try:
            tensors = load_file(str(d / SCORES_FILE))
            meta = json.loads((d / META_FILE).read_text())
        except Exception as e:  # corrupt file: say which
            raise PruneHeadsError(f"cannot read scores in {d}: {e}") from e
        recorded = meta.get("tensors_sha256") if isinstance(meta, dict) else None
        if not isinstance(meta, dict):
            raise PruneHeadsError(f"{d / META_FILE} is not a JSON object; recalibrate with `prune-heads calibrate`")
        if recorded and recorded != file_sha256(d / SCORES_FILE):
            raise PruneHeadsError(f"{d / SCORES_FILE} is not the file {META_FILE} describes (its content changed or "
                                  "it comes from another run); recalibrate with `prune-heads calibrate`")
        _check_shapes(d, tensors)
        from prune_heads.finite import require_finite

        for k, t in tensors.items():  # NaN compares false with every threshold: it would rank silently
            require_finite(t, f"the scores in {d} ({k})", "recalibrate with `prune-heads calibrate`")
        # safetensors sorts its keys; keep the order the scores were saved in
        order = {sid: i for i, sid in enumerate(meta.get("scores") or [])}
        keys = sorted(tensors, key=lambda k: (order.get(k.split("/", 1)[-1], len(order)), k))
        means = {k: tensors[k] for k in keys if not k.startswith("per_sample/")}
        per = {k.split("/", 1)[1]: tensors[k] for k in keys if k.startswith("per_sample/")}
        tokens = None
        if (d / TOKENS_FILE).is_file():
            if meta.get("tokens_sha256") not in (None, file_sha256(d / TOKENS_FILE)):
                raise PruneHeadsError(f"{d / TOKENS_FILE} is not the file these scores were computed on (its hash "
                                      "differs from scores.json); recalibrate with `prune-heads calibrate`")
            tokens = load_tokens(d / TOKENS_FILE)
        from prune_heads.compensation.moments import MOMENTS_FILE, Moments

        moments = Moments.load(d / MOMENTS_FILE, lazy=lazy_moments) if (d / MOMENTS_FILE).is_file() else None
        return cls(per, meta, means, tokens, moments)

    def require_tokens(self) -> list[list[int]]:
        if self.tokens is None:
            raise PruneHeadsError("this scores directory does not keep its calibration tokens (made by an older "
                                  "prune-heads or from the Python API without them); recalibrate with "
                                  "`prune-heads calibrate`, or pass the calibration data explicitly (--data SPEC, "
                                  "select.data in a recipe)")
        return self.tokens

    def summary(self) -> dict[str, Any]:
        """Small JSON-able digest (for plans, provenance and model cards)."""
        return {
            "scores": self.score_ids,
            "num_samples": self.meta.get("num_samples"),
            "num_tokens": self.meta.get("num_tokens"),
            "data": self.meta.get("data"),
            "model": self.meta.get("model"),
            "moments": self.moments.fingerprint() if self.moments is not None else None,
        }


def save_tokens(seqs: list[list[int]], path: Path) -> None:
    """Variable-length token sequences as one flat int64 tensor plus their lengths."""
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    save_file({"ids": flat, "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.int64)}, str(path))


def load_tokens(path: Path) -> list[list[int]]:
    t = load_file(str(path))
    ids, lengths = t["ids"].tolist(), t["lengths"].tolist()
    out, pos = [], 0
    for n in lengths:
        out.append(ids[pos:pos + n])
        pos += n
    return out


def _check_shapes(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every mean ``(L, H)`` and every per-sample ``(N, L, H)`` with one ``L, H`` and one ``N``."""
    means = {k: v.shape for k, v in tensors.items() if not k.startswith("per_sample/")}
    per = {k: v.shape for k, v in tensors.items() if k.startswith("per_sample/")}
    if not means:
        raise PruneHeadsError(f"{d / SCORES_FILE} holds no scores; recalibrate with `prune-heads calibrate`")
    lh = {tuple(s) for s in means.values()} | {tuple(s[1:]) for s in per.values()}
    ns = {s[0] for s in per.values()}
    if len(lh) != 1 or len(next(iter(lh))) != 2 or len(ns) > 1 or any(len(s) != 3 for s in per.values()):
        raise PruneHeadsError(f"{d / SCORES_FILE} has inconsistent shapes ({dict(list(means.items())[:2])}, "
                              f"{dict(list(per.items())[:2])}); it is damaged: recalibrate")
