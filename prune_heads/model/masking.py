"""Zeroing heads without touching weights: the static mask (the paper's dynamic per-input mode is in
``model/dynamic.py`` and re-exported here).

Both go through the registered attention function, so they work in plain Python, inside lm-eval and
under ``generate()``. Leaving the ``with`` block restores the model exactly. The static mask optionally
applies a ``prune_heads.compensation.Compensation`` of the same heads at every ``o_proj`` (the removed
heads' outputs are then replaced by their least-squares prediction instead of zero); the dynamic mode
always zeroes, as the paper does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention import HeadControl, attach, refuse_sliced
from prune_heads.plan import Plan
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import inactive_when_high

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
    if bool(mask.any()):
        refuse_sliced(model, "removing heads from")
    if compensation is None:
        with attach(model, control):
            yield mask
        return
    from prune_heads.compensation.apply import apply_compensation

    compensation.check_matches(mask)
    with attach(model, control), apply_compensation(model, compensation):
        yield mask


def threshold_for_fraction(scores: HeadScores, score_id: str, fraction: float, method: str = "quantile") -> float:
    """``τ`` that marks ``fraction`` of all (sequence, head) scores inactive in the calibration set.

    ``method``: ``"quantile"`` (``torch.quantile``) or ``"paper"`` (the authors' empirical CDF); see
    ``prune_heads.scoring.thresholds``, whose ``threshold()`` also returns the method and marked fraction.
    """
    from prune_heads.scoring.thresholds import check_method, threshold

    check_method(method)
    if not 0.0 <= fraction <= 1.0:
        raise PruneHeadsError(f"fraction must be in [0, 1], got {fraction}")
    values = scores.per_sample(score_id).reshape(-1)
    if method == "paper":
        return threshold(values.double().numpy(), score_id, fraction, method).value
    if inactive_when_high(score_id):
        return float(torch.quantile(values, 1.0 - fraction)) if fraction > 0 else float("inf")
    return float(torch.quantile(values, fraction)) if fraction > 0 else float("-inf")


# the dynamic mode lives in model/dynamic.py; these names stay importable from here
from prune_heads.model.dynamic import DynamicRule, DynamicStats, dynamic_mask  # noqa: E402, F401
