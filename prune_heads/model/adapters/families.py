"""One adapter per supported family; each states only how it differs from Llama."""

from __future__ import annotations

from prune_heads.model.adapters.base import FamilyAdapter, OBiasSupport

#: ``attention_bias=True`` gives q, k, v and o biases together (Llama, Qwen3, OLMo-2, Gemma)
_ATTENTION_BIAS = OBiasSupport({"attention_bias": True}, ("q_proj", "k_proj", "v_proj"))


class LlamaAdapter(FamilyAdapter):
    name = "llama"
    model_types = ("llama",)
    # LlamaConfig rejects head counts that don't divide hidden_size, so uniform exports use Mistral's
    # class, which takes an explicit head_dim and, with sliding_window=None, computes the same thing.
    uniform_model_type = "mistral"
    # Mistral's class has no o_proj bias; Llama's has one (with attention_bias), when heads | hidden_size
    o_bias = OBiasSupport({"attention_bias": True}, ("q_proj", "k_proj", "v_proj"), model_type="llama")
    # Mistral's class defaults to a 4096-token sliding window; Llama attends to the full context
    uniform_defaults = {"sliding_window": None}
    caveat = "SmolLM2 and other Llama-style models use this adapter."


class MistralAdapter(FamilyAdapter):
    name = "mistral"
    model_types = ("mistral",)
    uniform_model_type = "mistral"


class Qwen2Adapter(FamilyAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    uniform_model_type = "qwen2"
    caveat = "q/k/v projections carry biases; they are sliced with their rows."


class Qwen3Adapter(FamilyAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    qk_norm = "per_head"
    uniform_model_type = "qwen3"
    o_bias = _ATTENTION_BIAS
    caveat = "q_norm/k_norm act per head (over head_dim), so slicing heads is exact."


class Olmo2Adapter(FamilyAdapter):
    name = "olmo2"
    model_types = ("olmo2",)
    qk_norm = "full_width"
    uniform_model_type = None
    o_bias = _ATTENTION_BIAS
    caveat = (
        "OLMo-2 normalises q and k across all heads, so a removed head still feeds the norm statistic. "
        "The exact export keeps the removed heads' q/k rows for that statistic; the approximate export "
        "drops them and reports the measured error."
    )


class Gemma2Adapter(FamilyAdapter):
    name = "gemma2"
    model_types = ("gemma2",)
    uniform_model_type = "gemma2"
    o_bias = _ATTENTION_BIAS
    caveat = "Attention logits are soft-capped; scoring applies the same cap."


class Gemma3Adapter(FamilyAdapter):
    name = "gemma3"
    model_types = ("gemma3_text", "gemma3")
    qk_norm = "per_head"
    uniform_model_type = "gemma3_text"
    # the multimodal ``gemma3`` wrapper keeps its decoder under ``model.language_model``
    sliced_model_types = ("gemma3_text",)
    o_bias = _ATTENTION_BIAS


class Phi3Adapter(FamilyAdapter):
    name = "phi3"
    model_types = ("phi3",)
    fused_qkv = "qkv_proj"
    uniform_model_type = "phi3"
    caveat = "q, k and v share one fused qkv_proj; rows are sliced inside the fused layout."


ALL_ADAPTERS: tuple[FamilyAdapter, ...] = (
    LlamaAdapter(),
    MistralAdapter(),
    Qwen2Adapter(),
    Qwen3Adapter(),
    Olmo2Adapter(),
    Gemma2Adapter(),
    Gemma3Adapter(),
    Phi3Adapter(),
)
