"""The small interface every model family implements.

Everything the tool must know about an architecture lives behind this interface, so that scoring,
masking and export never branch on ``model_type`` (the pattern peft uses for its per-architecture
adapters). A new family is one subclass plus one line in ``adapters/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
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
    #: the LM head's attribute on the ``*ForCausalLM`` (and its checkpoint key prefix)
    lm_head_name: str = "lm_head"
    #: the input embedding's module path in the ``*ForCausalLM`` (and its checkpoint key prefix)
    embed_name: str = "model.embed_tokens"
    #: the final norm's attribute on the decoder (``decoder(model)``)
    final_norm_name: str = "norm"
    #: config keys a ``uniform`` export sets when it writes the family as another stock ``model_type`` and the
    #: source config lacks them, so the stock class computes what the source did
    uniform_defaults: dict[str, Any] = {}

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
        """Multimodal wrappers (Gemma-3) keep the decoder's settings in a sub-config.

        ``config`` is a transformers config or a checkpoint's ``config.json`` as a dict (the exporter reads
        the source's file without building a config object); the same kind comes back.
        """
        if isinstance(config, dict):
            return config.get("text_config") or config
        return getattr(config, "text_config", None) or config

    # ---- q/k norms --------------------------------------------------------------------------
    @property
    def qk_norm_spans_heads(self) -> bool:
        """q/k are normalised across all heads at once (OLMo-2), not per head.

        The one reading of ``qk_norm == "full_width"``: a removed head's q/k rows still feed the kept heads'
        norm statistic, so the exact export keeps them, the masked export cannot zero them, and only such a
        family has an ``approximate_norms`` export (which drops them and shrinks the norm weights).
        """
        return self.qk_norm == "full_width"

    # ---- the LM head --------------------------------------------------------------------------
    def lm_head(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.lm_head_name)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.final_norm_name)

    def logit_transform(self, config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the family's ``forward`` does to the LM head's output, or None when nothing.

        Measured scores recompute logits from hidden states (``scoring.ablation``), so they must apply the
        same step the model does. The default is the final soft-cap some families configure
        (``final_logit_softcapping``: Gemma-2, Gemma-3); a family that scales its logits overrides this.
        """
        cap = getattr(self.text_config(config), "final_logit_softcapping", None)
        if not cap:
            return None
        cap = float(cap)
        return lambda logits: torch.tanh(logits / cap) * cap

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model's ``forward`` returns for final-normed ``hidden`` states."""
        logits = self.lm_head(model)(hidden)
        transform = self.logit_transform(model.config)
        return transform(logits) if transform is not None else logits

    def tied_lm_head(self, config: dict[str, Any], names: set[str] | frozenset[str]) -> str | None:
        """The checkpoint tensor that duplicates the embedding (a tied LM head stored anyway), or None.

        ``config``: the checkpoint's ``config.json``; ``names``: every tensor name in the checkpoint.
        """
        cfg = self.text_config(config)
        tied = config.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
        head, embed = f"{self.lm_head_name}.weight", f"{self.embed_name}.weight"
        return head if tied and head in names and embed in names else None

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

    def final_norm_prefix(self) -> str:
        """Checkpoint key prefix of the decoder's final norm (``model.norm.``): the decoder owns ``layers``."""
        return f"{self.layers_path.rpartition('.')[0]}.{self.final_norm_name}."

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
