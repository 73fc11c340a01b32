"""The small interface every model family implements.

Everything the tool must know about an architecture lives behind this interface, so that scoring,
masking and export never branch on ``model_type`` (the pattern peft uses for its per-architecture
adapters). A new family is one subclass plus one line in ``adapters/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune_heads.errors import UnsupportedArchitectureError

NormKind = Literal["none", "per_head", "full_width"]


@dataclass(frozen=True)
class OBiasSupport:
    """How this family's stock class can hold an ``o_proj`` bias (what compensation folds into).

    ``config``: the config keys that give the class the bias (``attention_bias=True``); ``also_biased``:
    projections those keys give a bias too, written as zeros when the source has none; ``model_type``: the
    stock ``model_type`` a ``uniform`` export writes then (None: the family's ``uniform_model_type``).
    """

    config: dict[str, Any]
    also_biased: tuple[str, ...] = ()
    model_type: str | None = None


@dataclass(frozen=True)
class HeadLayout:
    """Head geometry of one model, read from its config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    def kv_of(self, head: int) -> int:
        return head // self.group_size


class FamilyAdapter:
    """Per-family knowledge. Subclasses override only what differs from the Llama layout."""

    #: human name, shown in errors and model cards
    name: str = "base"
    #: ``config.model_type`` values handled by this adapter
    model_types: tuple[str, ...] = ()
    #: ``q_proj``/``k_proj``/``v_proj`` or a single fused projection
    fused_qkv: str | None = None
    q_name: str = "q_proj"
    k_name: str = "k_proj"
    v_name: str = "v_proj"
    o_name: str = "o_proj"
    #: q/k normalisation: none, per head (Qwen3, Gemma-3) or across all heads (OLMo-2)
    qk_norm: NormKind = "none"
    q_norm_name: str = "q_norm"
    k_norm_name: str = "k_norm"
    #: stock ``model_type`` the ``uniform`` export writes, or None when the family can't be written uniform
    uniform_model_type: str | None = None
    #: how a stock class of the family holds an ``o_proj`` bias, or None when none can (then a compensated
    #: plan exports only as ``sliced``)
    o_bias: OBiasSupport | None = None
    #: a short note shown in recipes and model cards
    caveat: str = ""
    #: where the decoder layers sit in a ``*ForCausalLM`` (module path, and checkpoint key prefix)
    layers_path: str = "model.layers"
    #: the attention block's attribute name in a decoder layer
    attention_name: str = "self_attn"
    #: model types the ``sliced`` format covers (None = all of ``model_types``); a multimodal wrapper
    #: whose decoder sits elsewhere is left out
    sliced_model_types: tuple[str, ...] | None = None

    # ---- geometry -------------------------------------------------------------------------
    def layout(self, config: Any) -> HeadLayout:
        cfg = self.text_config(config)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return HeadLayout(
            num_layers=int(cfg.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=int(head_dim),
            hidden_size=int(cfg.hidden_size),
        )

    def text_config(self, config: Any) -> Any:
        """Multimodal wrappers (Gemma-3) keep the decoder's settings in a sub-config."""
        return getattr(config, "text_config", None) or config

    # ---- module access --------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns ``layers`` (``model.model`` for ``*ForCausalLM``)."""
        inner = getattr(model, "model", model)
        if hasattr(inner, "language_model") and not hasattr(inner, "layers"):
            inner = inner.language_model
        return inner

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [self.attention(layer) for layer in self.layers(model)]

    def o_proj(self, attn: nn.Module) -> nn.Linear:
        return getattr(attn, self.o_name)

    def o_proj_head_weight(self, attn: nn.Module, layout: HeadLayout) -> torch.Tensor:
        """``o_proj`` weight as ``(heads, hidden, head_dim)``: columns ``h*D:(h+1)*D`` belong to head ``h``."""
        w = self.o_proj(attn).weight
        return w.view(w.shape[0], layout.num_heads, layout.head_dim).permute(1, 0, 2)

    # ---- checkpoint tensor names (used by the streaming exporter) --------------------------
    def layer_prefix(self, layer_idx: int) -> str:
        return f"{self.layers_path}.{layer_idx}."

    def attn_prefix(self, layer_idx: int) -> str:
        return f"{self.layer_prefix(layer_idx)}{self.attention_name}."

    # ---- the stock classes the ``sliced`` format subclasses ---------------------------------
    def sliced_types(self) -> tuple[str, ...]:
        return self.model_types if self.sliced_model_types is None else self.sliced_model_types

    def transformers_classes(self, model_type: str) -> tuple[str, str, str]:
        """``(module, config class, causal-LM class)`` of ``model_type``: names importable from ``module``.

        The default reads transformers' Auto mappings; a family that lives outside transformers
        overrides this. The ``sliced`` export writes these names into the checkpoint's generated
        family table, so its modelling code needs no table of its own.
        """
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config_cls = CONFIG_MAPPING_NAMES.get(model_type)
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
        if not config_cls or not isinstance(model_cls, str):
            raise UnsupportedArchitectureError(
                f"transformers has no causal-LM class for model_type {model_type!r}; override "
                f"{type(self).__name__}.transformers_classes() to name the classes the sliced format subclasses"
            )
        return "transformers", config_cls, model_cls

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "fused_qkv": self.fused_qkv,
            "qk_norm": self.qk_norm,
            "uniform_model_type": self.uniform_model_type,
            "o_bias": None if self.o_bias is None else {"config": self.o_bias.config,
                                                        "model_type": self.o_bias.model_type},
        }
