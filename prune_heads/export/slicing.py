"""Per-tensor slicing rules: which rows/columns of each checkpoint tensor a pruned model keeps.

The rules are built from the family adapter's description (projection names, fused qkv, q/k norm
kind, checkpoint prefixes), so no family is special-cased here. Tensors the rules don't mention pass
through unchanged; ``None`` means "drop the tensor".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prune_heads.model.adapters import FamilyAdapter, HeadLayout
from prune_heads.plan import Plan

Rule = Callable[[torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class LayerHeads:
    """Which heads of one layer survive, as original indices."""

    kept: tuple[int, ...]        # query heads
    kept_kv: tuple[int, ...]     # KV groups still used by some kept query head

    @property
    def empty(self) -> bool:
        return not self.kept


def layer_heads(plan: Plan, layout: HeadLayout) -> list[LayerHeads]:
    removed = plan.by_layer(layout.num_layers)
    out = []
    for i in range(layout.num_layers):
        kept = tuple(h for h in range(layout.num_heads) if h not in set(removed[i]))
        out.append(LayerHeads(kept, tuple(sorted({layout.kv_of(h) for h in kept}))))
    return out


def pruned_layout(adapter: FamilyAdapter) -> dict[str, Any]:
    """What the travelling modelling code needs to know about the family (recorded in the config)."""
    return {
        "layers": adapter.layers_path,
        "attn_name": adapter.attention_name,
        "q_name": adapter.q_name,
        "k_name": adapter.k_name,
        "v_name": adapter.v_name,
        "o_name": adapter.o_name,
        "fused_qkv": adapter.fused_qkv,
        # the checkpoint's code knows the three labels; whether the norm spans heads is the adapter's to say
        "qk_norm": "full_width" if adapter.qk_norm_spans_heads else adapter.qk_norm,
        "q_norm_name": adapter.q_norm_name,
        "k_norm_name": adapter.k_norm_name,
    }


def _rows(heads: tuple[int, ...], head_dim: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([offset + h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _take_rows(idx: torch.Tensor) -> Rule:
    return lambda t: t.index_select(0, idx).contiguous()


def _take_cols(idx: torch.Tensor) -> Rule:
    return lambda t: t.index_select(1, idx).contiguous()


def _zero_rows(idx: torch.Tensor) -> Rule:
    def rule(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[idx] = 0
        return t

    return rule


def _zero_cols(idx: torch.Tensor) -> Rule:
    def rule(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, idx] = 0
        return t

    return rule


def _drop(_: torch.Tensor) -> None:
    return None


def slicing_rules(adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], *, mode: str,
                  approximate_norms: bool = False) -> dict[str, Rule]:
    """``{checkpoint tensor name: rule}`` for ``mode`` ``"slice"`` (sliced/uniform) or ``"mask"``.

    ``mask`` zeroes the removed heads' ``o_proj`` columns, which removes their contribution exactly, and
    also their ``q_proj`` rows unless q is normalised across all heads (zeroing rows would change the
    norm statistic of the kept heads).
    """
    rules: dict[str, Rule] = {}
    d = layout.head_dim
    full_norm = adapter.qk_norm_spans_heads
    keep_full_qk = full_norm and not approximate_norms
    all_heads = tuple(range(layout.num_heads))
    for i, lh in enumerate(heads):
        if lh.kept == all_heads:
            continue
        p = adapter.attn_prefix(i)
        removed = tuple(h for h in all_heads if h not in lh.kept)
        o_w = f"{p}{adapter.o_name}.weight"
        if mode == "mask":
            rules[o_w] = _zero_cols(_rows(removed, d))
            if not full_norm:
                q_base = adapter.fused_qkv or adapter.q_name
                rules[f"{p}{q_base}.weight"] = _zero_rows(_rows(removed, d))
                rules[f"{p}{q_base}.bias"] = _zero_rows(_rows(removed, d))
            continue
        if lh.empty:
            for name in (adapter.fused_qkv, adapter.q_name, adapter.k_name, adapter.v_name):
                if name:
                    rules[f"{p}{name}.weight"] = _drop
                    rules[f"{p}{name}.bias"] = _drop
            for norm in (adapter.q_norm_name, adapter.k_norm_name):
                rules[f"{p}{norm}.weight"] = _drop
            rules[o_w] = _drop
            continue
        q_idx, kv_idx = _rows(lh.kept, d), _rows(lh.kept_kv, d)
        rules[o_w] = _take_cols(q_idx)
        if adapter.fused_qkv:
            q_size, kv_size = layout.num_heads * d, layout.num_kv_heads * d
            idx = torch.cat([q_idx, q_size + kv_idx, q_size + kv_size + kv_idx])
            for suffix in ("weight", "bias"):
                rules[f"{p}{adapter.fused_qkv}.{suffix}"] = _take_rows(idx)
            continue
        for suffix in ("weight", "bias"):
            rules[f"{p}{adapter.v_name}.{suffix}"] = _take_rows(kv_idx)
            if not keep_full_qk:
                rules[f"{p}{adapter.q_name}.{suffix}"] = _take_rows(q_idx)
                rules[f"{p}{adapter.k_name}.{suffix}"] = _take_rows(kv_idx)
        if full_norm and approximate_norms:
            rules[f"{p}{adapter.q_norm_name}.weight"] = _take_rows(q_idx)
            rules[f"{p}{adapter.k_norm_name}.weight"] = _take_rows(kv_idx)
    return rules


def predicted_removed_params(layout: HeadLayout, adapter: FamilyAdapter, heads: list[LayerHeads], *,
                             approximate_norms: bool = False) -> int:
    """Projection weights the ``sliced`` format removes (biases and norm weights not counted)."""
    d, hidden = layout.head_dim, layout.hidden_size
    keep_full_qk = adapter.qk_norm_spans_heads and not approximate_norms
    removed = 0
    for lh in heads:
        rq = layout.num_heads - len(lh.kept)
        rkv = layout.num_kv_heads - len(lh.kept_kv)
        removed += (rq + rkv) * d * hidden              # o_proj columns, v_proj rows
        if not keep_full_qk or lh.empty:
            removed += (rq + rkv) * d * hidden          # q_proj, k_proj rows
    return removed
