"""Family adapters: look one up from a model or config."""

from __future__ import annotations

from typing import Any

from prune_heads.errors import UnsupportedArchitectureError
from prune_heads.model.adapters.base import FamilyAdapter, HeadLayout
from prune_heads.model.adapters.families import ALL_ADAPTERS

_BY_TYPE: dict[str, FamilyAdapter] = {t: a for a in ALL_ADAPTERS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def adapters_by_type() -> dict[str, FamilyAdapter]:
    """Every registered ``model_type`` and its adapter (built-in and added with ``register_adapter``)."""
    return dict(_BY_TYPE)


def register_adapter(adapter: FamilyAdapter) -> None:
    """Add a family at run time (for code outside this package)."""
    for t in adapter.model_types:
        _BY_TYPE[t] = adapter


def get_adapter(model_or_config: Any) -> FamilyAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    # exported (sliced) checkpoints record the family they came from
    model_type = getattr(config, "base_model_type", None) or model_type
    if model_type not in _BY_TYPE:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported. Supported families: "
            f"{', '.join(supported_model_types())}. Add one by subclassing "
            "prune_heads.model.adapters.FamilyAdapter and calling register_adapter()."
        )
    return _BY_TYPE[model_type]


__all__ = ["FamilyAdapter", "HeadLayout", "adapters_by_type", "get_adapter", "register_adapter", "supported_model_types"]
