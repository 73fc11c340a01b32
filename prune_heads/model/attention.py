"""The registered attention function and the per-model state it reads.

Everything prune-heads does to a running model (scoring, static masks, the paper's dynamic masks,
learned gates, batched ablations) goes through one function registered with transformers'
``AttentionInterface`` under the name ``prune_heads``. No family class is patched: ``attach`` switches
the model's attention implementation for the duration of a ``with`` block and hangs a ``HeadControl``
on the model; the function finds it through the attention module's ``layer_idx``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention_stats import attention_with_stats, o_proj_gram

ATTN_NAME = "prune_heads"

#: called with (layer_idx, stats) where stats maps raw score ids to (B, H) float32 tensors
StatsSink = Callable[[int, dict[str, torch.Tensor]], None]
#: called with (layer_idx, stats) and returns a (B, H) multiplier (1 keeps, 0 zeroes)
DynamicRule = Callable[[int, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class HeadControl:
    """What the attention function should do in each layer.

    ``scale`` maps a layer to a multiplier on each head's output before ``o_proj``: shape ``(H,)``
    (a static mask or learned gates) or ``(B, H)`` (one mask per batch row, for batched ablations).
    ``sink`` receives per-sequence statistics; ``dynamic`` turns them into a per-input mask. Either one
    makes the function take the exact block-wise path instead of SDPA.
    """

    scale: dict[int, torch.Tensor] = field(default_factory=dict)
    sink: StatsSink | None = None
    dynamic: DynamicRule | None = None
    block_size: int | None = None
    need_fhon: bool = True
    _grams: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _o_proj: dict[int, nn.Linear] = field(default_factory=dict, repr=False)
    _num_heads: int = 0

    @property
    def wants_stats(self) -> bool:
        return self.sink is not None or self.dynamic is not None

    def gram(self, layer_idx: int) -> torch.Tensor:
        """``o_proj`` Gram matrices, computed once per layer (weights are frozen while attached)."""
        g = self._grams.get(layer_idx)
        if g is None:
            weight = self._o_proj[layer_idx].weight.detach()
            g = o_proj_gram(weight, self._num_heads, weight.shape[1] // self._num_heads)
            self._grams[layer_idx] = g
        return g


def prune_heads_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    control: HeadControl | None = getattr(module, "_prune_heads_control", None)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if control is None and not kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    control = control or HeadControl()
    layer_idx = module.layer_idx
    if control.wants_stats or kwargs.get("softcap"):
        # SDPA has no soft-capping (Gemma-2), so capped models always take the exact block-wise path
        gram = control.gram(layer_idx) if control.need_fhon and control.wants_stats else None
        out, stats = attention_with_stats(
            query, key, value, attention_mask, scaling, o_gram=gram, softcap=kwargs.get("softcap"), block=control.block_size
        )
        if control.sink is not None:
            control.sink(layer_idx, stats)
        if control.dynamic is not None:
            keep = control.dynamic(layer_idx, stats)  # (B, H)
            out = out * keep.to(out.dtype)[:, None, :, None]
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    scale = control.scale.get(layer_idx)
    if scale is not None:
        scale = scale.to(device=out.device, dtype=out.dtype)
        if scale.dim() == 1:
            out = out * scale.view(1, 1, -1, 1)
        else:
            out = out * scale.view(scale.shape[0], 1, scale.shape[1], 1)
    return out, None


def _mask_function(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    return sdpa_mask(*args, **kwargs)


_registered = False


def register() -> None:
    """Register the attention function and its mask builder (idempotent).

    Without the mask registration transformers hands a custom function ``attention_mask=None`` and
    padding would be silently ignored.
    """
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, prune_heads_attention)
        AttentionMaskInterface.register(ATTN_NAME, _mask_function)
        _registered = True


def is_sliced_export(model_or_config: Any) -> bool:
    """A sliced prune-heads export (``pruned_<family>``): its layers hold different numbers of heads, and its
    attention is the exported modelling code's, so head scores and masks of the original layout do not apply."""
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", "")).startswith("pruned_") and hasattr(config, "base_model_type")


def refuse_sliced(model: Any, doing: str) -> None:
    """One line instead of a failure deep inside ("statistics came from 0 of 2 layers")."""
    if is_sliced_export(model):
        from prune_heads.errors import PruneHeadsError

        raise PruneHeadsError(f"this model is a sliced prune-heads export ({model.config.model_type}): {doing} a sliced "
                              "model is not supported; calibrate and select on the original model (its "
                              "prune_heads.json names it), then export again")


@contextlib.contextmanager
def attach(model: nn.Module, control: HeadControl) -> Iterator[HeadControl]:
    """Run ``model`` through the prune-heads attention function with ``control`` inside the block.

    The model's weights are never touched; its previous attention implementation is restored on exit.
    Nesting is refused because two controls on one model would silently override each other.
    """
    register()
    adapter = get_adapter(model)
    layout = adapter.layout(model.config)
    attns = adapter.attention_modules(model)
    if any(getattr(a, "_prune_heads_control", None) is not None for a in attns):
        raise RuntimeError("a HeadControl is already attached to this model; combine them into one instead")
    previous = model.config._attn_implementation
    control._num_heads = layout.num_heads
    control._grams.clear()
    for a in attns:
        a._prune_heads_control = control
        control._o_proj[a.layer_idx] = adapter.o_proj(a)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield control
    finally:
        for a in attns:
            a._prune_heads_control = None
        model.set_attn_implementation(previous)
