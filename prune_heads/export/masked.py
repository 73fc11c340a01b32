"""``masked`` format: same shapes, removed heads' ``o_proj`` columns (and ``q_proj`` rows) zeroed.

Exact and loadable by anything that loads the source, with no speed-up: it is the oracle the other
formats are verified against. A compensated plan also changes the kept ``o_proj`` columns and adds an
``o_proj`` bias, switched on through the family's stock config (``attention_bias``; zero q/k/v biases).
"""

from __future__ import annotations

from typing import Any

from prune_heads.errors import UnsupportedArchitectureError
from prune_heads.export.formats_common import base_config_dict
from prune_heads.export.slicing import LayerHeads
from prune_heads.model.adapters import FamilyAdapter, HeadLayout

MODE = "mask"
REMOTE_CODE = False


def check(adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], src_config: dict[str, Any], *,
          o_bias: bool = False) -> None:
    """Every family and plan can be written masked; a compensated one only where the class holds an o_proj bias."""
    if o_bias and adapter.o_bias is None:
        raise UnsupportedArchitectureError(
            f"the masked format keeps {adapter.name}'s own class, which cannot hold the o_proj bias the compensation "
            "needs; use --format sliced (or --compensate none)")


def output_config(src_config: dict[str, Any], adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], *,
                  dtype: str | None, approximate_norms: bool, o_bias: bool = False) -> dict[str, Any]:
    d = base_config_dict(src_config, dtype)
    d["architectures"] = src_config.get("architectures")
    if o_bias:
        d.update(adapter.o_bias.config)
    return d
