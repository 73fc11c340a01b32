"""Model fingerprints: catch a scores file or plan applied to a model it was not made on.

Two parts: the head geometry (exact), and a weight signature (a few hundred fixed weights, compared
with a tolerance so the same checkpoint in float32 and bfloat16 still matches).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from prune_heads.model.adapters import get_adapter

SIGNATURE_SIZE = 64


def config_fingerprint(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    text = adapter.text_config(config)
    key = {
        "family": adapter.name,
        "layers": layout.num_layers,
        "heads": layout.num_heads,
        "kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "hidden": layout.hidden_size,
        "vocab": getattr(text, "vocab_size", None),
        "intermediate": getattr(text, "intermediate_size", None),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def weight_signature(model: nn.Module) -> list[float]:
    """Fixed, evenly spaced weights of layer 0's q projection (or the fused qkv)."""
    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers(model)[0])
    proj = getattr(attn, adapter.fused_qkv or adapter.q_name)
    w = proj.weight.detach().reshape(-1)
    if w.device.type == "meta":
        return []
    idx = torch.linspace(0, w.numel() - 1, SIGNATURE_SIZE).long().to(w.device)
    return [float(x) for x in w[idx].float().cpu()]


def signatures_match(a: list[float], b: list[float], rtol: float = 2e-2) -> bool:
    if not a or not b:
        return True
    ta, tb = torch.tensor(a), torch.tensor(b)
    scale = ta.abs().mean().clamp_min(1e-12)
    return bool(((ta - tb).abs() <= rtol * scale + rtol * ta.abs()).all())


def fingerprint(model: nn.Module) -> dict[str, Any]:
    return {"config": config_fingerprint(model), "weights": weight_signature(model)}


def check_fingerprint(recorded: dict[str, Any] | None, model: nn.Module, what: str) -> None:
    """Raise ``ModelMismatchError`` when ``recorded`` was made on a different model."""
    from prune_heads.errors import ModelMismatchError

    if not recorded:
        return
    current = config_fingerprint(model)
    if recorded.get("config") and recorded["config"] != current:
        raise ModelMismatchError(
            f"{what} was made on a model with a different architecture (fingerprint {recorded['config']}, "
            f"this model {current}); recompute it on this model"
        )
    if not signatures_match(recorded.get("weights") or [], weight_signature(model)):
        raise ModelMismatchError(
            f"{what} was made on a model with the same shape but different weights; recompute it on this model"
        )
