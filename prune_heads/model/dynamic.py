"""The paper's dynamic mode: zero, per input, the heads whose score crosses a threshold ``τ``.

Every forward pass decides from the statistics of the whole sequence it sees, so a plain forward (scoring,
lm-eval log-likelihoods) is the paper's rule as it stands. Generation is where modes differ:

- ``mode="exact"`` (default): the paper's decisions. Each generated token re-runs the whole sequence so far
  without the KV cache, as the authors' code does (``use_cache=False`` in their ``_model_generate``), so
  every step decides over every position. Inside the context ``model.generate`` is wrapped to pass
  ``use_cache=False`` whatever the caller asks (lm-eval's ``generate_until`` asks for the cache), and a
  cached decoding step that still arrives (a hand-written loop with ``past_key_values``) is refused.
- ``mode="cached"``: the KV cache stays on and each layer keeps running sums of the per-query statistics
  (the query means: ``awft``, ``aeqd``, ``ahon``, ``fhon``, ``confidence``), extended by each new query;
  key-based statistics (``avvn``, ``ftvvn``) and the last-token ones (``lthon``) are exact from the cache.
  Faster (one token per step instead of the whole sequence), but the earlier positions' statistics were
  computed under earlier decisions, so decisions can differ from the paper's (measured in the report).
  Beam search reorders the cache and is not supported in this mode.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prune_heads.errors import PruneHeadsError
from prune_heads.model.attention import HeadControl, attach
from prune_heads.scoring.score_defs import FORWARD_SCORES, derive, inactive_when_high, validate_score_ids

MODES = ("exact", "cached")
#: raw statistics that are means over query positions (the ones a cached step must accumulate)
QUERY_MEANS = ("awft", "aeqd", "ahon", "fhon", "confidence")


@dataclass
class DynamicStats:
    """What the dynamic mode did: heads zeroed over heads seen, counted per input and layer.

    With ``record=True`` in ``dynamic_mask``, ``decisions`` keeps every forward pass's ``(layer, (B, H) bool)``
    (True = zeroed) and ``values`` the ``(layer, (B, H))`` scores they were decided on, in call order.
    """

    zeroed: int = 0
    total: int = 0
    per_layer_zeroed: dict[int, int] = field(default_factory=dict)
    forward_passes: int = 0
    cached_steps: int = 0
    decisions: list[tuple[int, torch.Tensor]] | None = None
    values: list[tuple[int, torch.Tensor]] | None = None

    @property
    def fraction_zeroed(self) -> float:
        return self.zeroed / self.total if self.total else 0.0


class DynamicRule:
    """``(layer, raw stats) -> (B, H)`` keep-multiplier: inactive means ``score > τ`` for ``awft``/``awft_ln``
    and ``score < τ`` otherwise. Only an input's real tokens enter its score (the attention function
    excludes padding)."""

    def __init__(self, score_id: str, threshold: float, stats: DynamicStats, mode: str = "exact") -> None:
        if score_id not in FORWARD_SCORES:
            raise PruneHeadsError(f"dynamic mode needs a forward-pass score, not {score_id!r}; choose from {', '.join(FORWARD_SCORES)}")
        if mode not in MODES:
            raise PruneHeadsError(f"dynamic mode {mode!r}: choose exact (the paper's decisions) or cached (faster)")
        self.score_id = score_id
        self.threshold = float(threshold)
        self.stats = stats
        self.mode = mode
        #: cached mode: per layer, running sums of the query-mean statistics and the query count (B, 1)
        self._sums: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}

    def __call__(self, layer_idx: int, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        step = bool((raw["n_keys"] > raw["n_tokens"]).any()) if "n_keys" in raw else False
        if step and self.mode == "exact":
            raise PruneHeadsError(
                "the exact dynamic mode decides over the whole sequence, but this forward pass decodes from a KV "
                "cache: generate inside dynamic_mask (model.generate runs without the cache there), pass "
                "use_cache=False, or choose mode='cached'"
            )
        if self.mode == "cached":
            raw = self._accumulate(layer_idx, raw, step)
        value = derive(raw, [self.score_id])[self.score_id]
        inactive = value > self.threshold if inactive_when_high(self.score_id) else value < self.threshold
        self._count(layer_idx, inactive, step)
        if self.stats.values is not None:
            self.stats.values.append((layer_idx, value.detach().cpu()))
        return (~inactive).float()

    def _accumulate(self, layer_idx: int, raw: dict[str, torch.Tensor], step: bool) -> dict[str, torch.Tensor]:
        n = raw["n_tokens"]
        if not step:  # a new prompt: start the sums over
            self._sums[layer_idx] = ({k: raw[k] * n for k in QUERY_MEANS if k in raw}, n.clone())
            return raw
        if layer_idx not in self._sums or self._sums[layer_idx][1].shape != n.shape:
            raise PruneHeadsError("the cached dynamic mode saw a decoding step without its prompt (or a changed batch, "
                                  "as in beam search); use mode='exact'")
        sums, count = self._sums[layer_idx]
        count = count + n
        sums = {k: v + raw[k] * n for k, v in sums.items()}
        self._sums[layer_idx] = (sums, count)
        return {**raw, **{k: v / count for k, v in sums.items()}}

    def _count(self, layer_idx: int, inactive: torch.Tensor, step: bool) -> None:
        s = self.stats
        zeroed = int(inactive.sum())
        s.zeroed += zeroed
        s.total += inactive.numel()
        s.per_layer_zeroed[layer_idx] = s.per_layer_zeroed.get(layer_idx, 0) + zeroed
        if layer_idx == 0:
            s.forward_passes += 1
            s.cached_steps += int(step)
        if s.decisions is not None:
            s.decisions.append((layer_idx, inactive.detach().cpu()))


@contextlib.contextmanager
def _generate_without_cache(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model.generate(...)`` always runs with ``use_cache=False``."""
    had_own = "generate" in vars(model)
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        kwargs["use_cache"] = False
        return original(*args, **kwargs)

    model.generate = generate
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate


@contextlib.contextmanager
def dynamic_mask(model: nn.Module, score_id: str, threshold: float, *, block_size: int | None = None,
                 mode: str = "exact", record: bool = False) -> Iterator[DynamicStats]:
    """Zero, per input, the heads whose score crosses ``threshold``; yields running ``DynamicStats``.

    ``mode``: ``"exact"`` (the paper's decisions, generation without the KV cache) or ``"cached"`` (running
    accumulators in the cache; see the module docstring). ``record`` keeps every decision in the stats.
    """
    validate_score_ids([score_id])
    stats = DynamicStats(decisions=[] if record else None, values=[] if record else None)
    control = HeadControl(dynamic=DynamicRule(score_id, threshold, stats, mode), block_size=block_size,
                          need_fhon=score_id.startswith("fhon"))
    with attach(model, control):
        if mode == "exact":
            with _generate_without_cache(model):
                yield stats
        else:
            yield stats
