"""``uniform`` format: a stock architecture with fewer heads, loadable with no custom code.

Possible only when every layer keeps the same number of KV groups and every kept group the same
number of query heads (a plan made with the ``uniform`` policy). The family adapter names the stock
``model_type`` written (``uniform_model_type``); families whose computation a stock class cannot
express with fewer heads (OLMo-2's full-width q/k norm) have none and are refused. A compensated plan
needs a class with an ``o_proj`` bias (``adapter.o_bias``: Llama's own class, Qwen3 and Gemma with
``attention_bias`` and zero q/k/v biases); Mistral, Qwen2 and Phi-3 have none and are refused.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prune_heads.errors import PruneHeadsError, UnsupportedArchitectureError
from prune_heads.export.formats_common import base_config_dict
from prune_heads.export.slicing import LayerHeads
from prune_heads.model.adapters import FamilyAdapter, HeadLayout

MODE = "slice"
REMOTE_CODE = False


def covered_families() -> list[str]:
    from prune_heads.model.adapters.families import ALL_ADAPTERS

    return [a.name for a in ALL_ADAPTERS if a.uniform_model_type]


def uniform_shape(layout: HeadLayout, heads: list[LayerHeads]) -> tuple[int, int] | None:
    """``(query heads, KV heads)`` every layer keeps, or None when layers or groups differ."""
    shapes = set()
    for lh in heads:
        per_group = Counter(layout.kv_of(h) for h in lh.kept)
        if len(set(per_group.values())) > 1:
            return None
        shapes.add((len(lh.kept), len(lh.kept_kv)))
    return shapes.pop() if len(shapes) == 1 else None


def target_model_type(adapter: FamilyAdapter, o_bias: bool) -> str | None:
    """The stock ``model_type`` written: the family's, or the one that can hold an o_proj bias."""
    if o_bias and adapter.o_bias is not None:
        return adapter.o_bias.model_type or adapter.uniform_model_type
    return adapter.uniform_model_type


def check(adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], src_config: dict[str, Any], *,
          o_bias: bool = False) -> None:
    if o_bias and adapter.uniform_model_type and adapter.o_bias is None:
        raise UnsupportedArchitectureError(
            f"no stock {adapter.name} class can hold the o_proj bias the compensation adds (its o_proj has no bias "
            "option); use --format sliced (or --compensate none)")
    if not adapter.uniform_model_type:
        raise UnsupportedArchitectureError(
            f"the uniform format covers {', '.join(covered_families())}; {adapter.name} can't be written as a stock "
            f"model with fewer heads ({adapter.caveat or 'no stock equivalent'}). Use --format sliced"
        )
    shape = uniform_shape(layout, heads)
    if shape is None or shape[0] == 0:
        raise PruneHeadsError(
            "the uniform format needs every layer to keep the same number of KV groups and every kept group the same "
            "number of query heads (and no empty layer); select with --policy uniform, or use --format sliced"
        )
    _target_config_class(adapter, src_config, o_bias)
    if o_bias:
        _check_buildable(output_config(src_config, adapter, layout, heads, dtype=None, approximate_norms=False,
                                       o_bias=True), adapter)


def _check_buildable(config: dict[str, Any], adapter: FamilyAdapter) -> None:
    """The stock config class must accept the pruned shape (Llama's needs heads | hidden_size)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    try:
        AutoConfig.for_model(config["model_type"], **kw)
    except Exception as e:  # transformers' strict configs raise their own validation errors
        raise UnsupportedArchitectureError(
            f"the stock {config['model_type']} class that can hold the compensation's o_proj bias rejects this shape "
            f"({e}); use --format sliced") from e


def _target_config_class(adapter: FamilyAdapter, src_config: dict[str, Any], o_bias: bool = False):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    target = CONFIG_MAPPING[target_model_type(adapter, o_bias)]
    source = CONFIG_MAPPING[src_config["model_type"]]
    if target is not source:
        # a renamed architecture must not silently lose an option the source uses
        src_defaults = AutoConfig.for_model(src_config["model_type"]).to_dict()
        target_keys = set(target().to_dict())
        lost = [k for k, v in src_config.items()
                if k not in target_keys and k in src_defaults and v != src_defaults[k] and v not in (None, False)]
        if lost:
            raise UnsupportedArchitectureError(
                f"{adapter.name} is written uniform as {target_model_type(adapter, o_bias)}, which has no "
                f"{', '.join(lost)}; use --format sliced"
            )
    return target


def output_config(src_config: dict[str, Any], adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], *,
                  dtype: str | None, approximate_norms: bool, o_bias: bool = False) -> dict[str, Any]:
    nq, nkv = uniform_shape(layout, heads)
    target = _target_config_class(adapter, src_config, o_bias)
    model_type = target_model_type(adapter, o_bias)
    d = base_config_dict(src_config, dtype)
    d.update(num_attention_heads=nq, num_key_value_heads=nkv, head_dim=layout.head_dim)
    if o_bias:
        d.update(adapter.o_bias.config)
    if model_type != src_config["model_type"]:
        d["model_type"] = model_type
        target_keys = target().to_dict()
        d.update({k: v for k, v in adapter.uniform_defaults.items() if k in target_keys and k not in src_config})
        d["architectures"] = [target.__name__.removesuffix("Config") + "ForCausalLM"]
    else:
        d["architectures"] = src_config.get("architectures")
    return d
