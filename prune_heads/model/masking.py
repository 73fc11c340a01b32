"""Zeroing heads without touching weights: the static mask and the paper's dynamic per-input mode.

Both go through the registered attention function, so they work in plain Python, inside lm-eval and
under ``generate()``. Leaving the ``with`` block restores the model exactly. The static mask optionally
applies a ``prune_heads.compensation.Compensation`` of the same heads at every ``o_proj`` (the removed
heads' outputs are then replaced by their least-squares prediction instead of zero); the dynamic mode
always zeroes, as the paper does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention import HeadControl, attach
from prune_heads.plan import Plan
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import FORWARD_SCORES, derive, inactive_when_high, validate_score_ids

Heads = Iterable[tuple[int, int]] | Plan | torch.Tensor


def heads_to_mask(model: nn.Module, heads: Heads) -> torch.Tensor:
    """``(L, H)`` bool mask (True = zeroed) from a plan, a list of ``(layer, head)`` or a mask."""
    layout = get_adapter(model).layout(model.config)
    if isinstance(heads, torch.Tensor):
        if heads.shape != (layout.num_layers, layout.num_heads):
            raise PruneHeadsError(f"mask shape {tuple(heads.shape)} != ({layout.num_layers}, {layout.num_heads})")
        return heads.bool()
    if isinstance(heads, Plan):
        heads = heads.removed_heads
    return Plan(list(heads)).mask(layout)


def static_control(model: nn.Module, heads: Heads) -> HeadControl:
    mask = heads_to_mask(model, heads)
    return HeadControl(scale={i: (~mask[i]).float() for i in range(mask.shape[0]) if mask[i].any()})


@contextlib.contextmanager
def static_mask(model: nn.Module, heads: Heads, *, compensation: Any = None) -> Iterator[torch.Tensor]:
    """Zero the outputs of ``heads`` before ``o_proj`` inside the block; yields the ``(L, H)`` mask.

    ``compensation``: a ``Compensation`` computed for exactly these heads; it is applied on top (the
    compensated model, the same function the export writes).
    """
    control = static_control(model, heads)
    mask = heads_to_mask(model, heads)
    if compensation is None:
        with attach(model, control):
            yield mask
        return
    from prune_heads.compensation.apply import apply_compensation

    compensation.check_matches(mask)
    with attach(model, control), apply_compensation(model, compensation):
        yield mask


@dataclass
class DynamicStats:
    """What the dynamic mode did: heads zeroed over heads seen, counted per input and layer."""

    zeroed: int = 0
    total: int = 0
    per_layer_zeroed: dict[int, int] = field(default_factory=dict)

    @property
    def fraction_zeroed(self) -> float:
        return self.zeroed / self.total if self.total else 0.0


class DynamicRule:
    """The paper's dynamic mode: zero a head for one input when that input's score crosses ``τ``.

    Inactive means ``score > τ`` for ``awft``/``awft_ln`` and ``score < τ`` otherwise. Only inputs'
    real tokens enter the score (padding is excluded by the attention function).
    """

    def __init__(self, score_id: str, threshold: float, stats: DynamicStats) -> None:
        if score_id not in FORWARD_SCORES:
            raise PruneHeadsError(f"dynamic mode needs a forward-pass score, not {score_id!r}; choose from {', '.join(FORWARD_SCORES)}")
        self.score_id = score_id
        self.threshold = float(threshold)
        self.stats = stats

    def __call__(self, layer_idx: int, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        value = derive(raw, [self.score_id])[self.score_id]
        inactive = value > self.threshold if inactive_when_high(self.score_id) else value < self.threshold
        self.stats.zeroed += int(inactive.sum())
        self.stats.total += inactive.numel()
        self.stats.per_layer_zeroed[layer_idx] = self.stats.per_layer_zeroed.get(layer_idx, 0) + int(inactive.sum())
        return (~inactive).float()


def threshold_for_fraction(scores: HeadScores, score_id: str, fraction: float) -> float:
    """``τ`` that marks ``fraction`` of all (sequence, head) scores inactive in the calibration set."""
    if not 0.0 <= fraction <= 1.0:
        raise PruneHeadsError(f"fraction must be in [0, 1], got {fraction}")
    values = scores.per_sample(score_id).reshape(-1)
    if inactive_when_high(score_id):
        return float(torch.quantile(values, 1.0 - fraction)) if fraction > 0 else float("inf")
    return float(torch.quantile(values, fraction)) if fraction > 0 else float("-inf")


@contextlib.contextmanager
def dynamic_mask(model: nn.Module, score_id: str, threshold: float, *, block_size: int | None = None) -> Iterator[DynamicStats]:
    """Zero, per input, the heads whose score crosses ``threshold``; yields running ``DynamicStats``."""
    validate_score_ids([score_id])
    stats = DynamicStats()
    control = HeadControl(dynamic=DynamicRule(score_id, threshold, stats), block_size=block_size,
                          need_fhon=score_id.startswith("fhon"))
    with attach(model, control):
        yield stats
