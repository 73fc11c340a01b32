"""Score ids, which direction means "inactive", and the per-sequence normalisations.

Definitions follow ``SCORES.md`` (copied to ``docs/SCORES.md``). Raw forward scores come out of the
attention function as per-sequence ``(B, H)`` values for one layer; normalised scores are derived
here, per sequence, before any averaging over sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from prune_heads.errors import PruneHeadsError

#: raw scores computed inside the attention function in one forward pass
RAW_FORWARD: tuple[str, ...] = ("awft", "aeqd", "ftvvn", "avvn", "lthon", "ahon", "fhon", "confidence")
#: layer-normalised scores: id -> (numerator raw score, raw score whose layer mean divides it)
LAYER_NORMALISED: dict[str, tuple[str, str]] = {
    "awft_ln": ("awft", "awft"),
    "aeqd_ln": ("aeqd", "aeqd"),
    "ftvvn_ln": ("ftvvn", "ftvvn"),
    "avvn_ln": ("avvn", "avvn"),
    "ahon_ln": ("ahon", "ahon"),
    "fhon_ln": ("fhon", "fhon"),
    "lthon_ln": ("lthon", "ahon"),
}
#: head-normalised scores: id -> (numerator, denominator) of the same head
HEAD_NORMALISED: dict[str, tuple[str, str]] = {"lthon_hn": ("lthon", "ahon")}
#: scores that need extra passes (not part of the single forward pass)
GRADIENT: tuple[str, ...] = ("grad",)
ABLATION: tuple[str, ...] = ("ablation_kl", "ablation_loss")
#: the error removing a head leaves after least-squares compensation, from the calibration moments
#: (``prune_heads.compensation.greedy``): per-head greedy order, and KV-group greedy order (every head of a
#: group carries its group's value, for ``--gqa kv-groups``)
COMPENSATION: tuple[str, ...] = ("lsq_error", "lsq_error_group")

FORWARD_SCORES: tuple[str, ...] = RAW_FORWARD + tuple(LAYER_NORMALISED) + tuple(HEAD_NORMALISED)
#: scores where a HIGH value means inactive; every other score is inactive when low
INACTIVE_WHEN_HIGH: set[str] = {"awft", "awft_ln"}


@dataclass(frozen=True)
class CustomScore:
    """A user score computed per sequence from the raw per-layer statistics."""

    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    inactive_when: str = "low"


CUSTOM_SCORES: dict[str, CustomScore] = {}


def register_score(score_id: str, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], *, inactive_when: str = "low") -> None:
    """Register a score computed from one layer's raw statistics.

    ``fn`` receives a dict of raw score id -> ``(B, H)`` float32 tensor for one layer (the same values
    the built-in scores use) and returns a ``(B, H)`` tensor. It is evaluated in the same forward pass.
    """
    if inactive_when not in ("low", "high"):
        raise ValueError("inactive_when must be 'low' or 'high'")
    if score_id in all_score_ids():
        raise PruneHeadsError(f"score id {score_id!r} already exists")
    CUSTOM_SCORES[score_id] = CustomScore(fn, inactive_when)
    if inactive_when == "high":
        INACTIVE_WHEN_HIGH.add(score_id)


def all_score_ids() -> list[str]:
    return list(FORWARD_SCORES) + list(GRADIENT) + list(ABLATION) + list(COMPENSATION) + list(CUSTOM_SCORES)


def validate_score_ids(ids: Iterable[str]) -> list[str]:
    ids = list(ids)
    known = all_score_ids()
    bad = [s for s in ids if s not in known]
    if bad:
        raise PruneHeadsError(f"unknown score id(s) {', '.join(map(repr, bad))}; known: {', '.join(known)}")
    return ids


def inactive_when_high(score_id: str) -> bool:
    return score_id in INACTIVE_WHEN_HIGH


def inactivity(values: torch.Tensor, score_id: str) -> torch.Tensor:
    """A tensor where larger always means "more inactive", so every score ranks the same way."""
    values = values.float()
    return values if inactive_when_high(score_id) else -values


def is_layer_comparable(score_id: str) -> bool:
    """LN/HN scores are comparable across layers; raw scores are not (the selector warns)."""
    return (score_id.endswith("_ln") or score_id.endswith("_hn") or score_id in ABLATION or score_id in COMPENSATION
            or score_id == "grad")


def derive(raw: dict[str, torch.Tensor], wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """Compute requested scores from raw per-sequence values of shape ``(..., H)`` (last axis = heads
    of one layer). Normalisation uses the mean over the last axis, i.e. per sequence and per layer."""
    out: dict[str, torch.Tensor] = {}
    for sid in wanted:
        if sid in raw:
            out[sid] = raw[sid]
        elif sid in LAYER_NORMALISED:
            num, den = LAYER_NORMALISED[sid]
            out[sid] = raw[num] / raw[den].mean(dim=-1, keepdim=True).clamp_min(1e-30)
        elif sid in HEAD_NORMALISED:
            num, den = HEAD_NORMALISED[sid]
            out[sid] = raw[num] / raw[den].clamp_min(1e-30)
        elif sid in CUSTOM_SCORES:
            out[sid] = CUSTOM_SCORES[sid].fn(raw).float()
        else:
            raise KeyError(sid)
    return out
