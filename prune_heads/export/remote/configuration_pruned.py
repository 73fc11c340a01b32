"""Configurations of head-pruned checkpoints written by prune-heads (``sliced`` format).

This file travels inside the checkpoint (``auto_map``) and must not import ``prune_heads``: a pruned
model has to load in an environment where only ``transformers`` is installed.

It holds no family table of its own. The exporter renders ``pruned_family.py`` beside it from
prune-heads' family adapters (``FAMILIES``: model type -> the stock classes to subclass and the names
of the pruned ones), so a family added with ``register_adapter()`` exports as well as a built-in one.
Inside the prune_heads package there is no such file; ``prune_heads.export.registration.register_auto_classes``
builds the classes from the live adapters with the same functions.

Each class subclasses the family's own configuration and adds what the family's layout cannot say:

* ``base_model_type``: the family the checkpoint came from;
* ``kept_heads``: for every layer, the original indices of the query heads that were kept (layers may
  keep different numbers of heads, and the KV groups of one layer different numbers of query heads);
* ``pruned_layout``: module path of the layers, projection/norm names and the q/k norm kind, so the
  modelling code needs no per-family branches;
* ``approximate_norms``: OLMo-2 style full-width q/k norms were shrunk to the kept heads (inexact);
* ``pruned_o_bias``: ``o_proj`` carries a bias the source had not (the removed heads' mean output).

``num_attention_heads`` / ``num_key_value_heads`` keep their original values: they describe the
geometry the head indices refer to.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    from .pruned_family import FAMILIES  # generated at export time
except ImportError:  # inside the prune_heads package: classes are made on registration
    FAMILIES: dict[str, dict[str, Any]] = {}

#: family model_type -> pruned configuration class (filled by ``make_config_class``)
PRUNED_CONFIGS: dict[str, type] = {}


def stock_class(spec: dict[str, Any], key: str) -> type:
    """The stock class ``spec[key]`` names, imported from ``spec["module"]`` (transformers by default)."""
    return getattr(importlib.import_module(spec.get("module", "transformers")), spec[key])


def make_config_class(base_type: str, spec: dict[str, Any]) -> type:
    """Define ``spec["pruned_config_class"]`` in this module (``auto_map`` names it) and return it."""
    base = stock_class(spec, "config_class")
    name = spec["pruned_config_class"]
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
            "pruned_o_bias": bool,
        },
        "base_model_type": base_type,
        "kept_heads": None,
        "pruned_layout": None,
        "approximate_norms": False,
        "pruned_o_bias": False,
    }
    cls = type(name, (base,), ns)
    globals()[name] = cls
    PRUNED_CONFIGS[base_type] = cls
    return cls


for _base_type, _spec in FAMILIES.items():
    make_config_class(_base_type, _spec)
