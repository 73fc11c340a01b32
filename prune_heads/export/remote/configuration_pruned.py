"""Configurations of head-pruned checkpoints written by prune-heads (``sliced`` format).

This file travels inside the checkpoint (``auto_map``) and must not import ``prune_heads``: a pruned
model has to load in an environment where only ``transformers`` is installed.

Each class subclasses the family's own configuration and adds what the family's layout cannot say:

* ``base_model_type``: the family the checkpoint came from;
* ``kept_heads``: for every layer, the original indices of the query heads that were kept (layers may
  keep different numbers of heads, and the KV groups of one layer different numbers of query heads);
* ``pruned_layout``: projection/norm names and the q/k norm kind, so the modelling code needs no
  per-family branches;
* ``approximate_norms``: OLMo-2 style full-width q/k norms were shrunk to the kept heads (inexact).

``num_attention_heads`` / ``num_key_value_heads`` keep their original values: they describe the
geometry the head indices refer to.
"""

from __future__ import annotations

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

#: family model_type -> stock configuration class
BASE_CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "olmo2": Olmo2Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
    "phi3": Phi3Config,
}


def _pruned_config(base_type: str, name: str) -> type:
    base = BASE_CONFIGS[base_type]
    ns = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{base.__name__} with per-layer kept attention heads (model_type ``pruned_{base_type}``).",
        "model_type": f"pruned_{base_type}",
        "__annotations__": {
            "base_model_type": str,
            "kept_heads": "list | None",
            "pruned_layout": "dict | None",
            "approximate_norms": bool,
        },
        "base_model_type": base_type,
        "kept_heads": None,
        "pruned_layout": None,
        "approximate_norms": False,
    }
    return type(name, (base,), ns)


PrunedLlamaConfig = _pruned_config("llama", "PrunedLlamaConfig")
PrunedMistralConfig = _pruned_config("mistral", "PrunedMistralConfig")
PrunedQwen2Config = _pruned_config("qwen2", "PrunedQwen2Config")
PrunedQwen3Config = _pruned_config("qwen3", "PrunedQwen3Config")
PrunedOlmo2Config = _pruned_config("olmo2", "PrunedOlmo2Config")
PrunedGemma2Config = _pruned_config("gemma2", "PrunedGemma2Config")
PrunedGemma3TextConfig = _pruned_config("gemma3_text", "PrunedGemma3TextConfig")
PrunedPhi3Config = _pruned_config("phi3", "PrunedPhi3Config")

#: family model_type -> pruned configuration class
PRUNED_CONFIGS = {
    "llama": PrunedLlamaConfig,
    "mistral": PrunedMistralConfig,
    "qwen2": PrunedQwen2Config,
    "qwen3": PrunedQwen3Config,
    "olmo2": PrunedOlmo2Config,
    "gemma2": PrunedGemma2Config,
    "gemma3_text": PrunedGemma3TextConfig,
    "phi3": PrunedPhi3Config,
}
