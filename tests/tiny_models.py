"""Tiny random models of every supported family, built offline from configs."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3_text", "phi3")


def tiny_config(family: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                hidden: int | None = None, vocab: int = 101, **extra):
    hidden = hidden or 32
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if family == "qwen2":
        kw.update(use_sliding_window=False)
    if family == "mistral":
        kw.update(sliding_window=None)
    if family in ("gemma2", "gemma3_text"):
        kw.update(query_pre_attn_scalar=head_dim, sliding_window=16)
    if family == "phi3":
        kw.pop("head_dim")
        kw["hidden_size"] = heads * head_dim
        kw.update(pad_token_id=0)
    if family == "llama" and hidden % heads:
        raise ValueError("LlamaConfig needs heads | hidden")
    kw.update(extra)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init keeps biases at zero; give them values so slicing them is tested
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
