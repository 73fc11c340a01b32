"""``masked`` format: same shapes, removed heads' ``o_proj`` columns (and ``q_proj`` rows) zeroed.

Exact and loadable by anything that loads the source, with no speed-up: it is the oracle the other
formats are verified against.
"""

from __future__ import annotations

from typing import Any

from prune_heads.export.formats_common import base_config_dict
from prune_heads.export.slicing import LayerHeads
from prune_heads.model.adapters import FamilyAdapter, HeadLayout

MODE = "mask"
REMOTE_CODE = False


def check(adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], src_config: dict[str, Any]) -> None:
    """Every family and plan can be written masked."""


def output_config(src_config: dict[str, Any], adapter: FamilyAdapter, layout: HeadLayout, heads: list[LayerHeads], *,
                  dtype: str | None, approximate_norms: bool) -> dict[str, Any]:
    d = base_config_dict(src_config, dtype)
    d["architectures"] = src_config.get("architectures")
    return d
